"""JSON Lines in and out: strict reading with errors that name file, line and field; atomic writes.

Reading works on bytes so that a file which is not UTF-8 is reported with the byte offset,
and blank lines are ignored. `on_error="skip"` drops bad lines and counts them by reason in
a `ReadStats`, so nothing is lost silently.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

from humpback_jax.errors import DataError

ON_ERROR = ("raise", "skip")


@dataclasses.dataclass
class ReadStats:
  """Counts from one or more `read_jsonl` calls: records yielded, lines skipped and why."""
  read: int = 0
  skipped: int = 0
  reasons: collections.Counter = dataclasses.field(default_factory=collections.Counter)


def read_jsonl(path, required_fields: Sequence[str] = (), *, types: Mapping[str, type | tuple] | None = None,
               on_error: str = "raise", stats: ReadStats | None = None) -> Iterator[tuple[int, dict]]:
  """Yields (line_number, record) for each non-blank line; line numbers start at 1.

  Every name in `required_fields` must be present and a string unless `types` gives another
  type for it. Bad lines raise DataError, or with `on_error="skip"` are counted in `stats`.
  """
  if on_error not in ON_ERROR:
    raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
  stats = stats if stats is not None else ReadStats()
  types = dict(types or {})
  with open(path, "rb") as f:
    offset = 0
    for line_number, raw in enumerate(f, start=1):
      try:
        record = _parse_line(line_number, raw, offset, required_fields, types)
      except _BadLine as bad:
        if on_error == "raise":
          raise DataError(f"{path}:{line_number}: {bad.message}", path=path, line=line_number,
                          field=bad.field) from None
        stats.skipped += 1
        stats.reasons[bad.reason] += 1
        record = None
      offset += len(raw)
      if record is not None:
        stats.read += 1
        yield line_number, record


class _BadLine(Exception):
  """Why one line cannot be read: `reason` is the key counted in ReadStats.reasons."""

  def __init__(self, reason: str, message: str, field: str | None = None):
    super().__init__(message)
    self.reason, self.message, self.field = reason, message, field


def _parse_line(line_number: int, raw: bytes, offset: int, required_fields: Sequence[str],
                types: Mapping[str, type | tuple]) -> dict | None:
  """One line's record, None for a blank line; raises _BadLine otherwise."""
  if line_number == 1 and raw.startswith(b"\xef\xbb\xbf"):
    raw, offset = raw[3:], offset + 3  # a UTF-8 byte-order mark is harmless; tolerate it
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise _BadLine("invalid_utf8", f"not valid UTF-8 at byte {offset + e.start}; "
                   "re-encode the file as UTF-8") from None
  if not text.strip():
    return None
  try:
    record = json.loads(text)
  except json.JSONDecodeError as e:
    raise _BadLine("invalid_json", f"invalid JSON: {e.msg} (column {e.colno})") from None
  if not isinstance(record, dict):
    raise _BadLine("not_an_object", f"expected a JSON object, got {_json_type(record)}")
  for field in required_fields:
    if field not in record:
      raise _BadLine(f"missing:{field}", f"field '{field}': missing", field)
    expected = types.get(field, str)
    if not isinstance(record[field], expected):
      raise _BadLine(f"wrong_type:{field}", f"field '{field}' must be {_type_name(expected)}, got "
                     f"{_json_type(record[field])}", field)
  return record


def _json_type(value) -> str:
  return "null" if value is None else type(value).__name__


def _type_name(expected: type | tuple) -> str:
  names = {str: "a string", dict: "an object", list: "a list", int: "an int", float: "a float",
           bool: "a bool", type(None): "null"}
  options = expected if isinstance(expected, tuple) else (expected,)
  return " or ".join(names.get(t, t.__name__) for t in options)


def write_jsonl_atomic(path, records: Iterable[Mapping]) -> int:
  """Writes one JSON object per line via a temp file in the same folder, fsync and os.replace.

  Readers see the old file or the complete new one, never a partial one. Returns the count.
  """
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      count = 0
      for count, record in enumerate(records, start=1):
        line = json.dumps(record, ensure_ascii=False) + "\n"
        try:
          f.write(line.encode("utf-8"))
        except UnicodeEncodeError:
          raise DataError(f"{path}: record {count} holds text that cannot be encoded as UTF-8 "
                          "(a lone surrogate?); clean it before writing", path=path) from None
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp_name, path)
  except BaseException:
    if os.path.exists(tmp_name):
      os.unlink(tmp_name)
    raise
  _fsync_dir(path.parent)
  return count


def _fsync_dir(folder: Path) -> None:
  """Makes the rename durable where the OS allows opening a folder (not on Windows)."""
  try:
    fd = os.open(folder, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)
