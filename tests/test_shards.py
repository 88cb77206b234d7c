"""Sharded processing gives every input exactly once, across kills, reruns and processes."""
import json

import pytest

from humpback_jax import shards
from humpback_jax.errors import DataError


def records(n):
  return [dict(id=f"r{i}", x=i) for i in range(n)]


def double(batch, first_index=0):
  return [dict(id=r["id"], y=2 * r["x"]) for r in batch]


def test_every_record_is_processed_once_in_order(tmp_path):
  shards.run(records(23), double, tmp_path, shard_size=5, progress=False)
  merged = list(shards.merged(tmp_path, [r["id"] for r in records(23)]))
  assert [r["y"] for r in merged] == [2 * i for i in range(23)]


def test_a_killed_run_resumes_without_redoing_finished_shards(tmp_path):
  calls = []

  def dies_on_third_shard(batch, first_index):
    calls.append(batch[0]["id"])
    if len(calls) == 3:
      raise KeyboardInterrupt  # stands in for a kill between shards
    return double(batch)

  with pytest.raises(KeyboardInterrupt):
    shards.run(records(23), dies_on_third_shard, tmp_path, shard_size=5, progress=False)
  assert sorted(p.name for p in tmp_path.glob("part-*.jsonl")) == ["part-00000.jsonl", "part-00001.jsonl"]
  stats = shards.run(records(23), double, tmp_path, shard_size=5, progress=False)
  assert (stats["shards_skipped"], stats["shards_written"]) == (2, 3)
  assert len(list(shards.merged(tmp_path, [r["id"] for r in records(23)]))) == 23


def test_processes_split_shards_and_together_cover_all(tmp_path):
  for p in range(3):
    shards.run(records(40), double, tmp_path, shard_size=4, process_index=p, process_count=3, progress=False)
  assert len(list(shards.merged(tmp_path, [r["id"] for r in records(40)]))) == 40


def test_partial_temp_files_are_never_read(tmp_path):
  shards.run(records(10), double, tmp_path, shard_size=5, progress=False)
  (tmp_path / "part-00002.jsonl.tmp123").write_text('{"id": "r0", "y": 0}\n')
  assert len(list(shards.merged(tmp_path, [r["id"] for r in records(10)]))) == 10


def test_merge_names_a_duplicated_id(tmp_path):
  inputs = records(10) + [dict(id="r0", x=0)]
  shards.run(inputs, double, tmp_path, shard_size=5, progress=False)
  with pytest.raises(DataError, match=r"part-00002.jsonl:1: id 'r0' appears twice"):
    list(shards.merged(tmp_path, [r["id"] for r in records(10)]))


def test_a_shard_edited_after_it_was_written_is_redone_not_trusted(tmp_path, capsys):
  shards.run(records(10), double, tmp_path, shard_size=5, progress=False)
  lines = (tmp_path / "part-00001.jsonl").read_text().splitlines()
  (tmp_path / "part-00001.jsonl").write_text("\n".join(lines[:3]) + "\n")  # shortened from 5 to 3 records
  with pytest.raises(DataError, match=r"part-00001.jsonl: has 3 records .*its writer recorded 5"):
    list(shards.merged(tmp_path, [r["id"] for r in records(10)]))
  stats = shards.run(records(10), double, tmp_path, shard_size=5, progress=False)
  assert (stats["shards_skipped"], stats["shards_written"]) == (1, 1)
  assert "part-00001.jsonl: has 3 records" in capsys.readouterr().err
  assert len(list(shards.merged(tmp_path, [r["id"] for r in records(10)]))) == 10


def test_a_shard_without_its_record_is_not_done(tmp_path):
  shards.run(records(10), double, tmp_path, shard_size=5, progress=False)
  (tmp_path / "part-00000.done.json").unlink()  # killed between writing the shard and its record
  assert shards.pending_shards(10, 5, tmp_path) == [0]


def test_merge_names_missing_ids(tmp_path):
  shards.run(records(10), double, tmp_path, shard_size=5, progress=False)
  (tmp_path / "part-00001.jsonl").unlink()
  with pytest.raises(DataError, match="5 ids have no result"):
    list(shards.merged(tmp_path, [r["id"] for r in records(10)]))


def test_results_must_match_inputs_one_to_one(tmp_path):
  with pytest.raises(RuntimeError, match="shard 0: results do not match"):
    shards.run(records(4), lambda b, first_index: double(b)[:-1], tmp_path, shard_size=4, progress=False)


def test_a_full_disk_while_writing_a_shard_keeps_the_finished_ones_and_leaves_no_partial_file(
    tmp_path, monkeypatch):
  import errno
  import os
  real_fsync, calls = os.fsync, []

  def disk_fills_on_the_third_shard(fd):
    calls.append(fd)
    if len(calls) == 5:  # two fsyncs per shard (its file, then its record): the third shard's file
      raise OSError(errno.ENOSPC, "No space left on device")
    real_fsync(fd)

  monkeypatch.setattr(os, "fsync", disk_fills_on_the_third_shard)
  with pytest.raises(OSError, match="No space left"):
    shards.run(records(23), double, tmp_path, shard_size=5, progress=False)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["part-00000.done.json", "part-00000.jsonl",
                                                        "part-00001.done.json", "part-00001.jsonl"]
  monkeypatch.setattr(os, "fsync", real_fsync)  # space freed: the rerun finishes the rest
  stats = shards.run(records(23), double, tmp_path, shard_size=5, progress=False)
  assert (stats["shards_skipped"], stats["shards_written"]) == (2, 3)
  assert [r["y"] for r in list(shards.merged(tmp_path, [r["id"] for r in records(23)]))] == [2 * i for i in range(23)]


def test_a_full_disk_while_rewriting_a_file_keeps_its_previous_version(tmp_path, monkeypatch):
  import errno
  import os
  path = tmp_path / "manifest.json"
  shards.write_json_atomic(path, {"stage": "augment", "version": 1})

  def no_space(fd):
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(os, "fsync", no_space)
  with pytest.raises(OSError):
    shards.write_json_atomic(path, {"stage": "augment", "version": 2})
  assert json.loads(path.read_text())["version"] == 1
  assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]


def test_merge_names_a_missing_shard_between_finished_ones(tmp_path):
  shards.run(records(15), double, tmp_path, shard_size=5, progress=False)
  (tmp_path / "part-00001.jsonl").unlink()
  with pytest.raises(DataError, match=r"part-00001.jsonl: missing \(found part-00002.jsonl after it\)"):
    list(shards.merged(tmp_path, [r["id"] for r in records(15)]))


def test_each_batch_comes_with_the_input_index_of_its_first_record(tmp_path):
  starts = []
  shards.run(records(23), lambda batch, first_index: starts.append(first_index) or double(batch), tmp_path,
             shard_size=5, process_index=1, process_count=2, progress=False)
  assert starts == [5, 15]


class CountingIds:
  """Input ids that record the largest slice asked for at once."""

  def __init__(self, ids):
    self.ids, self.largest = ids, 0

  def __len__(self):
    return len(self.ids)

  def __getitem__(self, index):
    got = self.ids[index]
    self.largest = max(self.largest, len(got) if isinstance(index, slice) else 1)
    return got


def test_merged_streams_one_shard_at_a_time(tmp_path):
  shards.run(records(23), double, tmp_path, shard_size=5, progress=False)
  ids = CountingIds([r["id"] for r in records(23)])
  stream = shards.merged(tmp_path, ids)
  assert [next(stream)["y"] for _ in range(5)] == [0, 2, 4, 6, 8]  # the first shard, before any other is read
  (tmp_path / "part-00004.jsonl").unlink()  # a later shard lost while the first is consumed is still caught
  with pytest.raises(DataError, match="3 ids have no result"):
    list(stream)
  assert ids.largest == 5  # the input's ids were read a shard's slice at a time
