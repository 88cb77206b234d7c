"""What a failed command tells its user: one line naming the file and what to do, and an exit code.

Exit codes of `humpback` (also in README.md and `humpback --help`):
  0   success
  1   `plan`: the job does not fit the devices
  2   usage, config or input error: the message names the file, line, field or config key
  3   the workdir is in use by another run: the message names the holder (pid, host, start time)
  4   file-system error: a path is missing, not a folder, not writable, or the disk is full
  5   training stopped: the loss diverged, or SIGTERM (preemption) saved a checkpoint; rerun to resume
  70  internal error (a bug): rerun with --verbose for the traceback and report it
"""
from __future__ import annotations

import errno
import json

from humpback_jax.errors import ConfigError, DataError, LockError, Preempted, TrainingDiverged

OK, DOES_NOT_FIT, BAD_INPUT, LOCKED, FILESYSTEM, TRAINING_STOPPED, INTERNAL = 0, 1, 2, 3, 4, 5, 70

_OS_ADVICE = {
    errno.ENOSPC: "the disk is full; free space or use a workdir on another disk, then rerun (finished work is kept)",
    errno.EDQUOT: "the disk quota is exceeded; free space, then rerun (finished work is kept)",
    errno.EACCES: "not writable by this user; fix its permissions or use another workdir",
    errno.EPERM: "not permitted; fix its permissions or use another workdir",
    errno.EROFS: "on a read-only file system; use a workdir on a writable disk",
    errno.ENOTDIR: "a file where a folder is needed; remove it or choose another path",
    errno.EEXIST: "exists and is not a folder; remove it or choose another path",
    errno.EISDIR: "a folder where a file is needed; choose a file path",
    errno.ENOENT: "does not exist; check the path",
}


def describe(exc: BaseException, where: str = "") -> tuple[int, str]:
  """(exit code, one-line message) for an exception; `where` names the workdir for errors without a file."""
  if isinstance(exc, LockError):
    return LOCKED, str(exc)
  if isinstance(exc, (ConfigError, DataError)):
    return BAD_INPUT, _one_line(str(exc))
  if isinstance(exc, json.JSONDecodeError):
    return BAD_INPUT, f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
  if isinstance(exc, (TrainingDiverged, Preempted)):
    return TRAINING_STOPPED, _one_line(str(exc))
  if isinstance(exc, OSError):
    path = exc.filename or where
    advice = _OS_ADVICE.get(exc.errno, exc.strerror or str(exc))
    detail = f" ({exc.strerror})" if exc.errno in (errno.ENOSPC,) and exc.strerror else ""
    return FILESYSTEM, f"{path}: {advice}{detail}"
  text = str(exc)
  if "RESOURCE_EXHAUSTED" in text or "No space left" in text:  # tensorstore (orbax) reports ENOSPC so
    return FILESYSTEM, f"{where}: {_OS_ADVICE[errno.ENOSPC]}"
  return INTERNAL, f"internal error {type(exc).__name__}: {_one_line(text)}; rerun with --verbose for the traceback"


def _one_line(text: str) -> str:
  return " ".join(text.split())[:2000]
