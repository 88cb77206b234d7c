"""Errors users see: each names the file, line, field or config key at fault."""
from __future__ import annotations


class ConfigError(ValueError):
  """A config field is invalid or contradicts another; raised before anything compiles."""


class DataError(ValueError):
  """An input record is malformed; the message names the file, line and field."""

  def __init__(self, message: str, *, path=None, line: int | None = None, field: str | None = None):
    super().__init__(message)
    self.path = path
    self.line = line
    self.field = field


class LockError(RuntimeError):
  """Another run holds the workdir; the message names the holder (pid, host, start time)."""

  def __init__(self, message: str, *, path=None):
    super().__init__(message)
    self.path = path


class TrainingDiverged(RuntimeError):
  """The loss became NaN or infinite; the message names the step and the last good checkpoint."""


class Preempted(RuntimeError):
  """SIGTERM arrived; a checkpoint of the current step was saved before stopping."""
