"""The corpus as documents: files under a folder (HTML, text, JSONL, WARC) or a tfds text dataset.

The walk stays inside its root: a symlink is followed only to a file inside the root, and every
file that gives no document is counted by reason (`SKIP_REASONS`), so nothing vanishes silently.
Listing is cheap and happens up front; reading is per file, so a distributed engine reads each
file on some worker and never holds the corpus in one place.
"""
from __future__ import annotations

import collections
import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path

from humpback_jax.data import warc
from humpback_jax.data.jsonl import read_jsonl
from humpback_jax.errors import DataError

TEXT_SUFFIXES = (".html", ".htm", ".txt", ".jsonl")
SKIP_REASONS = ("symlink_outside_root", "symlinked_folder", "unsupported_type", "unreadable", "binary",
                "empty", "warc_record_not_html")


@dataclasses.dataclass(frozen=True)
class Document:
  """One document: `content` is HTML (bytes, charset declared inside) or plain text (str)."""
  id: str
  kind: str          # "html" or "text"
  content: bytes | str


@dataclasses.dataclass(frozen=True)
class TextOptions:
  """How JSONL records become documents: the text field and the optional id field."""
  text_field: str = "text"
  id_field: str | None = None


def list_files(path) -> tuple[list[str], collections.Counter]:
  """The corpus files under `path` (relative POSIX paths, sorted) and the skipped ones by reason.

  `path` may also be a single file. Raises DataError when it is neither.
  """
  root = Path(path)
  skipped = collections.Counter()
  if root.is_file():
    return ([root.name] if _supported(root.name) else []), skipped
  if not root.is_dir():
    raise DataError(f"{root}: not a folder; pass the folder that holds the corpus files", path=root)
  real_root = root.resolve()
  files = []
  for folder, dirnames, filenames in os.walk(root, followlinks=False):
    for name in dirnames:
      if os.path.islink(os.path.join(folder, name)):
        skipped["symlinked_folder"] += 1  # os.walk does not descend into it
    for name in filenames:
      full = Path(folder) / name
      if full.is_symlink() and not full.resolve().is_relative_to(real_root):
        skipped["symlink_outside_root"] += 1
      elif full.is_symlink() and full.resolve().is_dir():
        skipped["symlinked_folder"] += 1
      elif not _supported(name):
        skipped["unsupported_type"] += 1
      else:
        files.append(full.relative_to(root).as_posix())
  return sorted(files), skipped


def _supported(name: str) -> bool:
  return name.lower().endswith(TEXT_SUFFIXES) or warc.is_warc(name)


def read_file(root, relative: str, options: TextOptions = TextOptions()) -> Iterator[Document | str]:
  """The documents of one corpus file, and a skip reason (str) for each part that gives none.

  Doc ids: the relative path; f"{path}:{line}" or the id field for JSONL; URI@path:offset for WARC.
  """
  root = Path(root)
  full = root / relative if root.is_dir() else root
  if warc.is_warc(relative):
    for item in warc.html_responses(full, relative):
      yield Document(item[0], "html", item[1]) if item else "warc_record_not_html"
    return
  try:
    data = full.read_bytes()
  except OSError:
    yield "unreadable"
    return
  if not data.strip():
    yield "empty"
  elif b"\0" in data:
    yield "binary"
  elif relative.lower().endswith(".jsonl"):
    yield from _jsonl_documents(full, relative, options)
  elif relative.lower().endswith(".txt"):
    yield Document(relative, "text", _utf8(data, full))
  else:
    yield Document(relative, "html", data)


def _jsonl_documents(path: Path, name: str, options: TextOptions) -> Iterator[Document]:
  fields = [options.text_field] + ([options.id_field] if options.id_field else [])
  types = {options.id_field: (str, int)} if options.id_field else {}
  for line_number, record in read_jsonl(path, fields, types=types):
    doc_id = str(record[options.id_field]) if options.id_field else f"{name}:{line_number}"
    yield Document(doc_id, "text", record[options.text_field])


def _utf8(data: bytes, file: Path) -> str:
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise DataError(f"{file}: not valid UTF-8 at byte {e.start}; re-encode the file as UTF-8",
                    path=file) from None


def tfds_documents(texts, name: str, start: int = 0, stop: int | None = None) -> Iterator[Document]:
  """Documents f"{name}-{i}" for records start..stop of a tfds text source (`read_text_dataset`)."""
  for i in range(start, len(texts) if stop is None else stop):
    yield Document(f"{name}-{i}", "text", texts[i])
