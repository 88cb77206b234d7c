"""Artifacts as versioned TFDS array_record datasets, read back in order and without TensorFlow."""
import math
import sys

import pytest

from humpback_jax.data import tfds_datasets as tds
from humpback_jax.errors import DataError

PAIRS = [
    dict(id="seed-0", instruction="Why is the sky blue?", output="Rayleigh scattering.", source="seed",
         score=None),
    dict(id="cand-1", instruction="Écris un poème ☃", output="Neige\nsur les toits.", source="candidates",
         score=4.5, header="Hiver"),
    dict(id="cand-2", instruction="", output="x" * 5000, source="candidates", score=5.0),
]
SEGMENTS = [dict(id=f"d{i // 2}-s{i}", doc_id=f"d{i // 2}", header=f"Header {i}", text=f"Text number {i}.")
            for i in range(7)]


def test_pairs_read_back_equal_and_in_order(tmp_path):
  path = tds.write_pairs_dataset(PAIRS, tmp_path, "seed_pairs")
  got = list(tds.read_dataset(tmp_path, "seed_pairs"))
  assert path == str(tmp_path / "seed_pairs" / "1.0.0")
  assert math.isnan(got[0]["score"])  # no score is stored as NaN, no header as ""
  assert got == [PAIRS[0] | dict(score=got[0]["score"], header=""), PAIRS[1], PAIRS[2] | dict(header="")]


def test_segments_read_back_equal_and_in_order(tmp_path):
  tds.write_segments_dataset(SEGMENTS, tmp_path, "segments")
  source = tds.read_dataset(tmp_path, "segments")
  assert len(source) == len(SEGMENTS) and source[3] == SEGMENTS[3]
  assert list(source) == SEGMENTS


def test_reading_needs_no_tensorflow(tmp_path):
  tds.write_segments_dataset(SEGMENTS, tmp_path, "segments")
  list(tds.read_dataset(tmp_path, "segments"))
  assert "tensorflow" not in sys.modules


def test_a_version_is_written_once_and_the_latest_is_read(tmp_path):
  tds.write_segments_dataset(SEGMENTS[:2], tmp_path, "segments", version="1.0.0")
  with pytest.raises(FileExistsError, match="version 1.0.0 already exists"):
    tds.write_segments_dataset(SEGMENTS, tmp_path, "segments", version="1.0.0")
  tds.write_segments_dataset(SEGMENTS, tmp_path, "segments", version="1.1.0")
  assert len(tds.read_dataset(tmp_path, "segments")) == len(SEGMENTS)
  assert len(tds.read_dataset(tmp_path, "segments", version="1.0.0")) == 2


def test_overwrite_replaces_a_version(tmp_path):
  tds.write_segments_dataset(SEGMENTS, tmp_path, "segments")
  tds.write_segments_dataset(SEGMENTS[:3], tmp_path, "segments", overwrite=True)
  assert list(tds.read_dataset(tmp_path, "segments")) == SEGMENTS[:3]


def test_a_record_outside_the_schema_names_record_and_field(tmp_path):
  with pytest.raises(DataError, match="record 1: field 'output': missing"):
    tds.write_pairs_dataset([PAIRS[0], dict(id="x", instruction="i", source="s")], tmp_path, "bad")
  with pytest.raises(DataError, match="record 0: field 'label': not in the schema"):
    tds.write_segments_dataset([SEGMENTS[0] | dict(label="nav")], tmp_path, "bad2")


def test_a_dataset_never_written_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="no prepared version of dataset 'curated'"):
    tds.read_dataset(tmp_path, "curated")


def test_text_dataset_reads_one_field_by_name_or_directory(tmp_path):
  path = tds.write_segments_dataset(SEGMENTS, tmp_path, "my_corpus")
  by_name = tds.read_text_dataset("my_corpus", data_dir=tmp_path)
  by_dir = tds.read_text_dataset(path, text_field="header")
  assert list(by_name) == [s["text"] for s in SEGMENTS]
  assert by_dir[2] == "Header 2"


def test_text_dataset_with_an_unknown_field_lists_the_fields(tmp_path):
  tds.write_segments_dataset(SEGMENTS, tmp_path, "my_corpus")
  with pytest.raises(DataError, match="field 'content'.*fields: doc_id, header, id, text"):
    tds.read_text_dataset("my_corpus", text_field="content", data_dir=tmp_path)


@pytest.mark.parametrize("name", ["c4/en", "mnist", "no_such_corpus"])
def test_an_unprepared_tfds_dataset_is_a_clear_error_naming_it(tmp_path, name):
  with pytest.raises(FileNotFoundError, match=f"TFDS dataset '{name}' is not prepared.*never downloads"):
    tds.read_text_dataset(name, data_dir=tmp_path)
  assert not any(tmp_path.iterdir()), "looking for a dataset must not create folders"


@pytest.mark.parametrize("process_count", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("num_records", [0, 1, 7, 100])
def test_host_shards_are_contiguous_and_cover_every_record_once(num_records, process_count):
  shards = [tds.host_shard(num_records, p, process_count) for p in range(process_count)]
  assert [i for shard in shards for i in shard] == list(range(num_records))
  assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_host_shard_rejects_a_process_index_out_of_range():
  with pytest.raises(ValueError, match="process_index 2 is not in"):
    tds.host_shard(10, 2, 2)


def test_a_version_left_half_written_by_a_killed_writer_is_never_read_and_is_cleared(tmp_path):
  torn = tmp_path / "segments" / "1.0.0.incomplete-999999"
  torn.mkdir(parents=True)
  (torn / "dataset_info.json").write_text("{}")
  with pytest.raises(FileNotFoundError, match="no prepared version"):
    tds.read_dataset(tmp_path, "segments")
  tds.write_segments_dataset(SEGMENTS, tmp_path, "segments")
  assert list(tds.read_dataset(tmp_path, "segments")) == SEGMENTS
  assert sorted(p.name for p in (tmp_path / "segments").iterdir()) == ["1.0.0"]
