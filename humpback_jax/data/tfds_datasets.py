"""Artifacts of the method as versioned TFDS datasets in `array_record` files, read without TensorFlow.

Every stage writes its output (seed pairs, corpus segments, candidate pairs, curated sets) as
`<data_dir>/<name>/<version>/`, streamed through tfds' `SequentialWriter` (a batch of records in
memory at a time; a `GeneratorBasedBuilder` buffers up to 1 GB of examples before its first file),
and reads it back through TFDS's random-access `array_record` data source. Order is preserved, so
record i on disk is the i-th record written. `tfds.dataset_builders.store_as_tfds_dataset` is not used:
in tfds 4.9.10 it touches `tf.data` and fails when TensorFlow is absent.
"""
from __future__ import annotations

import glob
import math
import os
import shutil
from collections.abc import Iterable, Iterator, Mapping

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import sequential_writer

from humpback_jax import quiet
from humpback_jax.errors import DataError

# The schemas; `score` is the curation score, NaN when a pair has none (seed, uncurated candidates).
PAIR_FIELDS = ("id", "instruction", "output", "source", "score", "header")
SEGMENT_FIELDS = ("id", "doc_id", "header", "text")
_OPTIONAL_FLOATS = ("score",)
_OPTIONAL_TEXTS = ("header",)  # the segment header a generated pair came from; "" when none


def features_for(fields: Iterable[str]) -> tfds.features.FeaturesDict:
  """The tfds features of a schema: text fields, and float32 for the optional scores."""
  return tfds.features.FeaturesDict({
      f: tfds.features.Scalar(np.float32) if f in _OPTIONAL_FLOATS else tfds.features.Text()
      for f in fields})


def _checked_record(record: Mapping, fields: tuple[str, ...], name: str, index: int) -> dict:
  """The record with exactly `fields`; optional floats default to NaN, optional texts to ""; anything
  else is an error."""
  where = f"dataset {name!r}, record {index}"
  unknown = sorted(set(record) - set(fields))
  if unknown:
    raise DataError(f"{where}: field {unknown[0]!r}: not in the schema ({', '.join(fields)})",
                    path=name, line=index, field=unknown[0])
  checked = {}
  for field in fields:
    value = record.get(field)
    if field in _OPTIONAL_FLOATS:
      checked[field] = math.nan if value is None else float(value)
    elif field in _OPTIONAL_TEXTS and value is None:
      checked[field] = ""
    elif not isinstance(value, str):
      reason = "missing" if value is None else f"expected a string, got {type(value).__name__}"
      raise DataError(f"{where}: field {field!r}: {reason}", path=name, line=index, field=field)
    else:
      checked[field] = value
  return checked


RECORDS_PER_FILE = 100_000  # array_record files of a split; any size reads alike
_RECORDS_PER_WRITE = 1_000  # records serialized per call: what the writer holds at once


def _write(records: Iterable[dict], data_dir, name: str, version: str, fields: tuple[str, ...],
           description: str, overwrite: bool) -> str | None:
  """Streams `records` into `<data_dir>/<name>/<version>`, a batch at a time, never the whole set
  in memory. Written beside the final folder and renamed into place, so readers never see a partial
  version. No records: nothing is written (tfds holds no empty split) and None is returned."""
  final = os.path.join(os.fspath(data_dir), name, version)
  if os.path.exists(os.path.join(final, "dataset_info.json")) and not overwrite:
    raise FileExistsError(f"{final}: dataset {name!r} version {version} already exists; "
                          "write a new version, pass overwrite=True or delete that directory")
  for stale in glob.glob(glob.escape(final) + ".incomplete-*"):  # left by a killed writer
    shutil.rmtree(stale, ignore_errors=True)
  tmp = f"{final}.incomplete-{os.getpid()}"  # not a version name: readers skip it
  os.makedirs(tmp)
  try:
    with quiet.third_party():
      count = _write_split(records, tmp, name, version, fields, description)
    if os.path.exists(final):  # overwrite, or a folder that holds no complete version
      shutil.rmtree(final)
    if count:
      os.rename(tmp, final)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return final if count else None


def _write_split(records: Iterable[dict], folder: str, name: str, version: str, fields: tuple[str, ...],
                 description: str) -> int:
  """Writes the `train` split in input order with tfds' SequentialWriter; returns the record count."""
  identity = tfds.core.DatasetIdentity(name=name, version=tfds.core.Version(version), data_dir=folder,
                                       module_name=__name__)
  info = tfds.core.DatasetInfo(builder=identity, description=description, features=features_for(fields),
                               disable_shuffling=True)
  writer = sequential_writer.SequentialWriter(info, max_examples_per_shard=RECORDS_PER_FILE,
                                              file_format="array_record")
  writer.initialize_splits(["train"])
  batch, count = [], 0
  for index, record in enumerate(records):
    batch.append(_checked_record(record, fields, name, index))
    count += 1
    if len(batch) == _RECORDS_PER_WRITE:
      writer.add_examples({"train": batch})
      batch = []
  if batch:
    writer.add_examples({"train": batch})
  writer.close_all()
  return count


def write_pairs_dataset(records: Iterable[dict], data_dir, name: str, version: str = "1.0.0",
                        overwrite: bool = False) -> str:
  """Writes instruction pairs (id, instruction, output, source, score, header) in order; returns the dataset dir.

  `score` may be missing or None (stored as NaN), `header` too (stored as ""); any other missing or
  unknown field raises DataError.
  An existing version raises FileExistsError unless `overwrite`.
  """
  return _write(records, data_dir, name, version, PAIR_FIELDS, "Instruction-output pairs.", overwrite)


def write_segments_dataset(records: Iterable[dict], data_dir, name: str, version: str = "1.0.0",
                           overwrite: bool = False) -> str:
  """Writes corpus segments (id, doc_id, header, text) in order; returns the dataset dir."""
  return _write(records, data_dir, name, version, SEGMENT_FIELDS, "Corpus segments.", overwrite)


def _to_python(value):
  if isinstance(value, bytes):
    return value.decode("utf-8")
  if isinstance(value, np.generic):
    return value.item()
  return value


class RecordSource:
  """Random access over a TFDS data source; records come back as dicts of str / float / int."""

  def __init__(self, source, name: str):
    self._source = source
    self.name = name

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict:
    return {k: _to_python(v) for k, v in self._source[index].items()}

  def __iter__(self) -> Iterator[dict]:
    return (self[i] for i in range(len(self)))


def _latest_version_dir(data_dir, name: str) -> str:
  dataset_dir = os.path.join(os.fspath(data_dir), name)
  versions = []
  if os.path.isdir(dataset_dir):
    for entry in os.listdir(dataset_dir):
      if tfds.core.Version.is_valid(entry) and os.path.exists(
          os.path.join(dataset_dir, entry, "dataset_info.json")):
        versions.append(tfds.core.Version(entry))
  if not versions:
    raise FileNotFoundError(f"{dataset_dir}: no prepared version of dataset {name!r}")
  return os.path.join(dataset_dir, str(max(versions)))


def read_dataset(data_dir, name: str, split: str = "train", version: str | None = None) -> RecordSource:
  """Random-access records of a dataset written here (latest version unless `version` is given)."""
  if version is None:
    path = _latest_version_dir(data_dir, name)
  else:
    path = os.path.join(os.fspath(data_dir), name, version)
    if not os.path.exists(os.path.join(path, "dataset_info.json")):
      raise FileNotFoundError(f"{path}: dataset {name!r} has no prepared version {version}")
  with quiet.third_party():
    builder = tfds.builder_from_directory(path)
  return RecordSource(builder.as_data_source(split=split), name)


class TextSource:
  """Random access over one text field of a TFDS data source; items are str."""

  def __init__(self, source, name: str, text_field: str):
    self._source = source
    self.name = name
    self.text_field = text_field

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> str:
    return _to_python(self._source[index][self.text_field])

  def __iter__(self) -> Iterator[str]:
    return (self[i] for i in range(len(self)))


def _prepared_builder(name_or_dir: str, data_dir):
  """A builder for a dataset directory, or for a TFDS name prepared under `data_dir`; never downloads."""
  if os.path.exists(os.path.join(name_or_dir, "dataset_info.json")):
    return tfds.builder_from_directory(name_or_dir)
  how = (f"prepare it first (e.g. `tfds build {name_or_dir} --file_format=array_record"
         f"{' --data_dir=' + os.fspath(data_dir) if data_dir else ''}`) or pass its directory; "
         "this run never downloads")
  try:
    builder = tfds.builder(name_or_dir, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    builder = None
  if builder is None or not builder.is_prepared():
    raise FileNotFoundError(f"TFDS dataset {name_or_dir!r} is not prepared under "
                            f"data_dir={data_dir or tfds.core.constants.DATA_DIR!s}: {how}")
  if builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
    raise FileNotFoundError(f"TFDS dataset {name_or_dir!r} at {builder.data_dir} is stored as "
                            f"{builder.info.file_format.value}, not array_record: {how}")
  return builder


def read_text_dataset(name_or_dir: str, text_field: str = "text", split: str = "train",
                      data_dir=None) -> TextSource:
  """Random-access texts of any prepared TFDS dataset ('c4/en', 'wikipedia/20230601.en', or a dir).

  Raises FileNotFoundError naming the dataset when it is not prepared locally as array_record.
  """
  builder = _prepared_builder(os.fspath(name_or_dir), data_dir)
  fields = sorted(builder.info.features.keys())
  if text_field not in fields:
    raise DataError(f"TFDS dataset {name_or_dir!r}: field {text_field!r}: not in the dataset "
                    f"(fields: {', '.join(fields)})", path=name_or_dir, field=text_field)
  return TextSource(builder.as_data_source(split=split), os.fspath(name_or_dir), text_field)


def host_shard(num_records: int, process_index: int, process_count: int) -> range:
  """This host's contiguous slice of `range(num_records)`; the slices of all hosts cover it once."""
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} is not in [0, process_count={process_count})")
  return range(num_records * process_index // process_count,
               num_records * (process_index + 1) // process_count)
