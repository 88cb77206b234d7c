"""One writer per workdir: a lock file naming its holder (pid, host, start time, command).

Every command that writes a workdir holds `<workdir>/.humpback.lock` for its whole run. The file
is created complete or not at all (written to a temp name, then hard-linked into place, which
fails if it exists), so a second run reads a whole holder and refuses, naming it. A lock left by
a process that died on this host is taken over with a warning. A multi-host job holds it once,
from process 0, and every process learns whether it got it, so none waits for a refused one.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from humpback_jax.errors import LockError

LOCK_NAME = ".humpback.lock"


@dataclasses.dataclass(frozen=True)
class Holder:
  """Who holds a workdir: process id, host name, start time (UTC) and the command line."""
  pid: int
  host: str
  started: str
  command: str

  def describe(self) -> str:
    return f"pid {self.pid} on {self.host}, started {self.started} ({self.command})"


def lock_path(workdir: Path) -> Path:
  """The lock file of a workdir."""
  return Path(workdir) / LOCK_NAME


def read_holder(workdir: Path) -> Holder | None:
  """The current holder, or None when the workdir is not locked (or the lock file is unreadable)."""
  try:
    return Holder(**json.loads(lock_path(workdir).read_text()))
  except (OSError, ValueError, TypeError):
    return None


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # alive, owned by another user
    return True
  return True


def _is_stale(holder: Holder | None) -> bool:
  """A lock whose process is gone from this host; a holder on another host is never judged stale."""
  return holder is None or (holder.host == socket.gethostname() and not _pid_alive(holder.pid))


def _try_create(path: Path, me: Holder) -> bool:
  """Creates the lock file with `me` inside, atomically; False if a lock file exists."""
  tmp = path.with_name(f"{LOCK_NAME}.{me.pid}.tmp")
  tmp.write_text(json.dumps(dataclasses.asdict(me)))
  try:
    os.link(tmp, path)
    return True
  except FileExistsError:
    return False
  finally:
    tmp.unlink(missing_ok=True)


def acquire(workdir: Path, command: str) -> Holder:
  """Takes the workdir's lock for this process; raises LockError naming the holder if it is held."""
  workdir = Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  path = lock_path(workdir)
  me = Holder(pid=os.getpid(), host=socket.gethostname(),
              started=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), command=command)
  if _try_create(path, me):
    return me
  # Taking over a stale lock is serialised, so two newcomers cannot both remove it and both win.
  with open(workdir / f"{LOCK_NAME}.takeover", "a") as guard:
    fcntl.flock(guard, fcntl.LOCK_EX)
    holder = read_holder(workdir)
    if path.exists() and not _is_stale(holder):
      raise LockError(f"{workdir}: in use by another run ({holder.describe()}); wait for it to finish, "
                      f"stop it, or use another workdir", path=path)
    if path.exists():
      gone = f"the lock of {holder.describe()}, which is no longer running" if holder else "an unreadable lock"
      print(f"warning: {path}: taking over {gone}", file=sys.stderr)
    path.unlink(missing_ok=True)
    if not _try_create(path, me):
      taken = read_holder(workdir)
      raise LockError(f"{workdir}: another run took the lock just now"
                      f"{f' ({taken.describe()})' if taken else ''}; use another workdir", path=path)
  return me


def release(workdir: Path, me: Holder) -> None:
  """Removes the lock if it is still ours (a takeover by another run is left alone)."""
  if read_holder(workdir) == me:
    lock_path(workdir).unlink(missing_ok=True)


@contextlib.contextmanager
def hold(workdir: Path, command: str, *, process_index: int = 0, process_count: int = 1):
  """Holds the workdir for the block: process 0 takes the lock, and every process of a multi-host
  job learns whether it did, so all stop together when another run holds it."""
  me, error = None, None
  if process_index == 0:
    try:
      me = acquire(workdir, command)
    except (LockError, OSError) as e:
      error = e
  if process_count > 1 and not _broadcast_from_process_0(error is None) and error is None:
    raise LockError(f"{workdir}: process 0 could not take the workdir lock (its message says why); stopping",
                    path=lock_path(workdir))
  if error is not None:
    raise error
  try:
    yield me
  finally:
    if me is not None:
      release(workdir, me)


def _broadcast_from_process_0(ok: bool) -> bool:
  """Process 0's `ok`, on every process (a collective all processes reach)."""
  import numpy as np
  from jax.experimental import multihost_utils
  return bool(multihost_utils.broadcast_one_to_all(np.int32(ok)))
