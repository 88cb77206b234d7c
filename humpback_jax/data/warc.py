"""Web crawls as WARC files (ClueWeb, Common Crawl): each HTML response record is one document."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from humpback_jax.errors import DataError

WARC_SUFFIXES = (".warc", ".warc.gz")


def is_warc(path) -> bool:
  """Whether the file name marks a WARC file (plain or gzipped per record)."""
  return str(path).lower().endswith(WARC_SUFFIXES)


def html_responses(path, name: str) -> Iterator[tuple[str, bytes] | None]:
  """(doc id, HTML bytes) of each HTML response in a WARC file; None for every other record.

  The doc id is f"{target URI}@{name}:{record offset}": unique across files, stable across runs.
  """
  from warcio.archiveiterator import ArchiveIterator  # the `beam` extra; only WARC input needs it
  from warcio.exceptions import ArchiveLoadFailed
  with open(path, "rb") as stream:
    records = ArchiveIterator(stream)
    try:
      for record in records:
        content_type = record.http_headers.get_header("Content-Type", "") if record.http_headers else ""
        if record.rec_type != "response" or "html" not in content_type.lower():
          yield None
          continue
        uri = record.rec_headers.get_header("WARC-Target-URI")
        content = record.content_stream().read()  # before get_record_offset, which skips the payload
        yield f"{uri}@{name}:{records.get_record_offset()}", content
    except ArchiveLoadFailed as e:
      raise DataError(f"{Path(path)}: not a readable WARC file ({e}); check the file or remove it "
                      "from the corpus folder", path=path) from None
