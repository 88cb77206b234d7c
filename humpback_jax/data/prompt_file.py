"""The input of `humpback generate`: one JSON object per line with a text field and an optional id.

Every line is checked before any model is loaded: a malformed line, a missing or non-string text
field, an id that is not a string or integer, or an id seen on an earlier line stops the command
with a message naming the file and line. A line without an id gets its line number as id.
"""
from __future__ import annotations

from pathlib import Path

from humpback_jax.data.jsonl import read_jsonl
from humpback_jax.errors import DataError


def read_prompts(path, field: str) -> list[dict]:
  """Records {"id": str, field: text, ...} of a prompt file, in order; DataError names file and line."""
  path = Path(path)
  records, first_line = [], {}
  for line, record in read_jsonl(path, [field]):
    raw_id = record.get("id", line)
    if isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)) or str(raw_id).strip() == "":
      raise DataError(f"{path}:{line}: field 'id' must be a non-empty string or an integer, got {raw_id!r}",
                      path=path, line=line, field="id")
    key = str(raw_id)
    if key in first_line:
      raise DataError(f"{path}:{line}: id {key!r} already appears on line {first_line[key]}; ids must be unique",
                      path=path, line=line, field="id")
    first_line[key] = line
    records.append(dict(record, id=key))
  return records
