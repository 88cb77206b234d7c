"""Exactly-once processing of a record stream in shards: resumable, multi-host, atomic.

Records are cut into fixed shards by input order (shard k = records[k*S : (k+1)*S]). A shard's
output is written to a temp file and renamed into place only when complete, then its record
count and sha256 are written beside it (`part-k.done.json`). A shard is done only when its file
matches that record, so a killed, torn or edited shard is redone, never trusted. A rerun skips
done shards; process p of P takes the shards with k % P == p. `merged` streams the results back,
checking every shard against its record and that every input id appears exactly once, in order.

Records are dicts or dataclasses with an `id`; results are written as JSON objects.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

from tqdm import tqdm

from humpback_jax.errors import DataError


def shard_path(out_dir: Path, k: int) -> Path:
  """The file holding shard k's results."""
  return Path(out_dir) / f"part-{k:05d}.jsonl"


def done_path(out_dir: Path, k: int) -> Path:
  """The record of shard k's count and sha256, written after the shard itself."""
  return Path(out_dir) / f"part-{k:05d}.done.json"


def digest(path: Path) -> dict:
  """{"records": non-blank lines, "sha256": hex} of a JSONL file."""
  h, records = hashlib.sha256(), 0
  with open(path, "rb") as f:
    for line in f:
      h.update(line)
      records += bool(line.strip())
  return dict(records=records, sha256=h.hexdigest())


def shard_problem(out_dir: Path, k: int) -> str | None:
  """Why shard k is not done (missing, unrecorded, or differing from its record); None when done."""
  path, done = shard_path(out_dir, k), done_path(out_dir, k)
  if not path.exists():
    return "missing"
  try:
    recorded = json.loads(done.read_text())
  except (OSError, ValueError):
    return f"{done.name} is missing or unreadable"
  found = digest(path)
  if found != {key: recorded.get(key) for key in found}:
    return (f"has {found['records']} records (sha256 {found['sha256'][:12]}), its writer recorded "
            f"{recorded.get('records')} (sha256 {str(recorded.get('sha256'))[:12]})")
  return None


def pending_shards(num_records: int, shard_size: int, out_dir: Path, process_index: int = 0,
                   process_count: int = 1) -> list[int]:
  """Shards of this process that are not done; an existing shard that differs from its record is
  named on stderr and redone."""
  num_shards = -(-num_records // shard_size)
  todo = []
  for k in range(num_shards):
    if k % process_count != process_index:
      continue
    problem = shard_problem(out_dir, k)
    if problem is not None:
      if problem != "missing":
        print(f"warning: {shard_path(out_dir, k)}: {problem}; redoing this shard", file=sys.stderr)
      todo.append(k)
  return todo


def _id(record) -> str:
  return record["id"] if isinstance(record, dict) else record.id


def _as_dict(record) -> dict:
  return record if isinstance(record, dict) else dataclasses.asdict(record)


def run(records: Sequence, process: Callable[[list, int], list], out_dir: Path, *,
        shard_size: int, process_index: int = 0, process_count: int = 1, desc: str = "shards",
        progress: bool = True) -> dict:
  """Applies `process(batch, first_index)` (a batch of records and the input index of its first ->
  one result per record, same order) shard by shard; `records` is read one shard's slice at a time.

  Returns timing and counts for this process. Results must carry the input's `id`.
  """
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  todo = pending_shards(len(records), shard_size, out_dir, process_index, process_count)
  done_before = -(-len(records) // shard_size) - len(todo)
  start, written = time.perf_counter(), 0
  bar = tqdm(total=len(todo), desc=desc, unit="shard", disable=not progress, dynamic_ncols=True)
  for k in todo:
    batch = list(records[k * shard_size:(k + 1) * shard_size])
    results = process(batch, k * shard_size)
    if [_id(r) for r in results] != [_id(r) for r in batch]:
      raise RuntimeError(f"shard {k}: results do not match the input ids one to one")
    write_atomic(shard_path(out_dir, k), [_as_dict(r) for r in results])
    write_json_atomic(done_path(out_dir, k), digest(shard_path(out_dir, k)))
    written += len(results)
    bar.update(1)
  bar.close()
  return dict(records_written=written, shards_written=len(todo), shards_skipped=done_before,
              seconds=time.perf_counter() - start)


def write_atomic(path: Path, rows: Iterable[dict]) -> None:
  """Writes JSONL to a temp file, fsyncs, then renames: readers never see a partial file."""
  _write_then_rename(Path(path), lambda f: f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def write_json_atomic(path: Path, obj) -> None:
  """Writes one JSON document atomically (temp file, fsync, rename)."""
  _write_then_rename(Path(path), lambda f: json.dump(obj, f, indent=2, ensure_ascii=False))


def _write_then_rename(path: Path, write) -> None:
  """On any failure (a full disk included) the temp file is removed and `path` keeps its old state."""
  tmp = path.with_name(path.name + f".tmp{os.getpid()}")
  try:
    with open(tmp, "w", encoding="utf-8") as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise


def merged(out_dir: Path, expected_ids: Sequence[str]) -> Iterator[dict]:
  """Every shard result in input order, streamed one shard at a time (memory holds one shard, never
  the whole output); fails naming a shard that differs from its record, is missing, or holds an id
  out of place: duplicated, not in the input, or missing.

  `expected_ids` is the input's ids in order; only the slice of the shard being read is looked at
  (a dataset view reads just those records)."""
  out_dir, position = Path(out_dir), 0
  for k in itertools.count():
    path = shard_path(out_dir, k)
    if not path.exists():
      later = next((j for j in _shard_indices(out_dir) if j > k), None)
      if later is not None:
        raise DataError(f"{path}: missing (found {shard_path(out_dir, later).name} after it); rerun to redo "
                        "this shard", path=path)
      break
    problem = shard_problem(out_dir, k)
    if problem is not None:
      raise DataError(f"{path}: {problem}; delete it and rerun to redo this shard", path=path)
    rows = _read_shard(path)
    want = list(expected_ids[position:position + len(rows)])
    for line_no, row in enumerate(rows, 1):
      if line_no > len(want) or row["id"] != want[line_no - 1]:
        raise _misplaced(out_dir, path, line_no, row["id"], expected_ids, position + line_no - 1)
    position += len(rows)
    yield from rows
  if position < len(expected_ids):
    missing = len(expected_ids) - position
    raise DataError(f"{out_dir}: {missing} ids have no result, e.g. {list(expected_ids[position:position + 3])}",
                    path=out_dir, field="id")


def _shard_indices(out_dir: Path) -> Iterator[int]:
  """The index of each shard file in `out_dir`, streamed from the directory listing (not all held)."""
  with os.scandir(out_dir) as entries:
    for entry in entries:
      match = re.fullmatch(r"part-(\d+)\.jsonl", entry.name)
      if match:
        yield int(match.group(1))


def _read_shard(path: Path) -> list[dict]:
  rows = []
  with open(path, encoding="utf-8") as f:
    for line_no, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError as e:
        raise DataError(f"{path}:{line_no}: not a complete JSON record ({e}); delete the shard and rerun",
                        path=path, line=line_no) from None
  return rows


def _misplaced(out_dir: Path, path: Path, line_no: int, found: str, expected_ids: Sequence[str],
               position: int) -> DataError:
  """The error for a result whose id is not the input's id at its position. Only on this error path
  are the earlier ids scanned (one at a time), to say whether the id is a duplicate."""
  where = f"{path}:{line_no}"
  if any(expected_ids[i] == found for i in range(min(position, len(expected_ids)))):
    return DataError(f"{where}: id {found!r} appears twice", path=path, line=line_no, field="id")
  if position >= len(expected_ids):
    return DataError(f"{out_dir}: results have ids not in the input ({len(expected_ids)} records), e.g. "
                     f"{found!r} at {where}", path=path, line=line_no, field="id")
  return DataError(f"{where}: id {found!r} where the input has {expected_ids[position]!r}; the input "
                   "changed since this shard was written; delete the shards and rerun", path=path,
                   line=line_no, field="id")
