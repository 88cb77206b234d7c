"""What a run prints: our own lines and one progress bar per stage. Third-party chatter (tfds'
"Downloading and preparing dataset", its nested progress bars, absl's log lines) shows only with
`humpback --verbose`, which sets HUMPBACK_VERBOSE=1 so that restarted and launched processes agree.
libtpu's start-up errors on a host without TPU chips never show: JAX is pinned to the CPU there
(see xla_flags.pin_cpu_without_accelerator).
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import tempfile

VERBOSE_ENV = "HUMPBACK_VERBOSE"


def verbose() -> bool:
  """True when third-party output should be shown (`--verbose`, or HUMPBACK_VERBOSE=1)."""
  return os.environ.get(VERBOSE_ENV, "0") == "1"


def configure(verbose_output: bool) -> None:
  """Sets this process (and processes it starts) verbose or quiet, and quiets absl's and
  TensorFlow's loggers accordingly. Called once by the CLI."""
  os.environ[VERBOSE_ENV] = "1" if verbose_output else "0"
  if not verbose_output:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  level = logging.INFO if verbose_output else logging.ERROR
  for name in ("absl", "tensorflow_datasets"):
    logger = logging.getLogger(name)
    logger.setLevel(level)
    if verbose_output and not logger.handlers:
      # Python shows no INFO line without a handler; verbose means their INFO lines too
      handler = _CurrentStderr()
      handler.setFormatter(logging.Formatter("%(levelname)s:%(name)s:%(message)s"))
      logger.addHandler(handler)
  absl = logging.getLogger("absl")
  for f in [f for f in absl.filters if isinstance(f, _OrbaxThreadErrors)]:
    absl.removeFilter(f)
  if not verbose_output:
    absl.addFilter(_OrbaxThreadErrors())


class _CurrentStderr(logging.StreamHandler):
  """Writes to sys.stderr as it is when a record is logged: a handler that kept the stream of the
  call that made it would write into a replaced (closed or captured) stream ever after."""

  @property
  def stream(self):
    return sys.stderr

  @stream.setter
  def stream(self, value):
    pass


class _OrbaxThreadErrors(logging.Filter):
  """Holds back what orbax's writer threads log when a save fails (a page of traceback per thread):
  the failure reaches the command, which prints it as one line; --verbose shows these too."""

  def filter(self, record: logging.LogRecord) -> bool:
    frame = sys._getframe(1)  # absl names itself as the caller, so the stack tells who logged
    while frame is not None:
      if f"{os.sep}orbax{os.sep}" in frame.f_code.co_filename:
        return False
      frame = frame.f_back
    return True


@contextlib.contextmanager
def third_party():
  """Runs a third-party call (a tfds build or load) without its prints, progress bars and log lines,
  unless verbose. Our own errors still propagate; warnings logged at ERROR or above still show."""
  if verbose():
    yield
    return
  import tensorflow_datasets as tfds  # only where a tfds call is being made anyway
  loggers = [logging.getLogger(name) for name in ("absl", "tensorflow_datasets")]
  levels = [logger.level for logger in loggers]
  for logger in loggers:
    logger.setLevel(logging.ERROR)
  tfds.disable_progress_bar()
  try:
    with contextlib.redirect_stdout(io.StringIO()):
      yield
  finally:
    tfds.enable_progress_bar()
    for logger, level in zip(loggers, levels):
      logger.setLevel(level)


@contextlib.contextmanager
def worker_processes():
  """Runs a call that starts worker processes (Beam's DirectRunner) with this process's stdout and
  stderr file descriptors sent to a temporary file, so the workers' start-up and log lines stay out
  of the run's output unless verbose. If the call fails, what they wrote is shown (its last 4 KB)."""
  if verbose():
    yield
    return
  sys.stdout.flush()
  sys.stderr.flush()
  saved = [os.dup(1), os.dup(2)]
  failed = True
  with tempfile.TemporaryFile() as sink:
    try:
      os.dup2(sink.fileno(), 1)
      os.dup2(sink.fileno(), 2)
      yield
      failed = False
    finally:
      sys.stdout.flush()
      sys.stderr.flush()
      for fd, copy in zip((1, 2), saved):
        os.dup2(copy, fd)
        os.close(copy)
      if failed:
        sink.seek(max(0, sink.seek(0, os.SEEK_END) - 4096))
        sys.stderr.write(sink.read().decode("utf-8", "replace"))
