"""Stages read their inputs from the run's tfds datasets by index: each process only its shards."""
import pytest

from humpback_jax import shards
from humpback_jax.data import tfds_datasets
from humpback_jax.data.segment import Segment
from humpback_jax.errors import DataError
from humpback_jax.method import artifacts


class CountingView:
  """A dataset view that records which indices were read."""

  def __init__(self, view):
    self.view, self.read = view, []

  def __len__(self):
    return len(self.view)

  def __getitem__(self, index):
    indices = range(*index.indices(len(self))) if isinstance(index, slice) else [index]
    self.read += list(indices)
    return self.view[index]


def workdir_with_segments(tmp_path, n=20):
  """A workdir whose finished prepare_corpus stage wrote `n` segments."""
  records = [dict(id=f"s{i}", doc_id=f"d{i}", header="", text=f"text {i}") for i in range(n)]
  tfds_datasets.write_segments_dataset(records, tmp_path / "datasets", artifacts.SEGMENTS)
  outputs = {artifacts.SEGMENTS: artifacts.dataset_digest(tmp_path / "datasets", artifacts.SEGMENTS)}
  (tmp_path / "prepare_corpus").mkdir()
  artifacts.write_manifest(tmp_path / "prepare_corpus", stage="prepare_corpus", config_hash="h", counts={},
                           outputs=outputs, seconds=0)
  return artifacts.Workdir(tmp_path)


def test_a_checked_dataset_reads_typed_records_by_index(tmp_path):
  segments = workdir_with_segments(tmp_path).read_dataset("prepare_corpus", artifacts.SEGMENTS, Segment)
  assert len(segments) == 20 and list(segments.ids) == [f"s{i}" for i in range(20)]
  assert segments[8:10] == [Segment(id="s8", doc_id="d8", header="", text="text 8"),
                            Segment(id="s9", doc_id="d9", header="", text="text 9")]


def test_each_process_reads_only_the_records_of_its_own_shards(tmp_path):
  segments = CountingView(workdir_with_segments(tmp_path).read_dataset("prepare_corpus", artifacts.SEGMENTS, Segment))
  work = lambda batch, first_index: [dict(id=s.id) for s in batch]
  shards.run(segments, work, tmp_path / "out", shard_size=4, process_index=1, process_count=2, progress=False)
  assert segments.read == [4, 5, 6, 7, 12, 13, 14, 15]  # shards 1 and 3 of 0..4


def test_a_dataset_that_differs_from_its_manifest_is_named(tmp_path):
  workdir = workdir_with_segments(tmp_path)
  records = [dict(id="s0", doc_id="d0", header="", text="changed")]
  tfds_datasets.write_segments_dataset(records, tmp_path / "datasets", artifacts.SEGMENTS, overwrite=True)
  with pytest.raises(DataError, match=r"datasets/segments: holds 1 records .* manifest records 20"):
    workdir.read_dataset("prepare_corpus", artifacts.SEGMENTS, Segment)
