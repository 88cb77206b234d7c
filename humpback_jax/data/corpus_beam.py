"""The corpus stage as an Apache Beam pipeline (`corpus.engine = "beam"`), written by tfds as array_record.

The same steps as the local engine (`corpus.py`), each a Beam transform, so a crawl of any size
runs on any Beam runner (DirectRunner on this machine; Dataflow, Flink or Spark by
`corpus.beam_options`). Files are listed up front and read on the workers; per document: cut,
filter, drop nested; exact duplicates grouped by content hash (smallest id kept); near
duplicates: LSH band buckets -> candidate pairs -> exact Jaccard joined from both ends -> the
verified edges, gathered in one place (ids only), give the ids dropped by ascending-id order
(`dedup.py`). Every count is a Beam metric (namespace "corpus"); the report is read from them.
"""
from __future__ import annotations

import functools
import logging
import os
import shlex
import shutil
import tempfile
from collections.abc import Mapping

import tensorflow_datasets as tfds

from humpback_jax import quiet
from humpback_jax.data import corpus, dedup, documents, tfds_datasets
from humpback_jax.data.corpus import CorpusSource
from humpback_jax.errors import ConfigError, DataError

NAMESPACE = "corpus"
TFDS_RANGE = 10_000  # tfds records per read task
DEFAULT_OPTIONS = ("--runner=DirectRunner --direct_num_workers=2 --direct_running_mode=multi_processing "
                   "--default_sdk_harness_log_level=ERROR")


@functools.cache
def _beam():
  """apache_beam, imported on first use (the `beam` extra); its import-time noise kept out of the log."""
  try:
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # "apitools not found": only Dataflow's GCP clients need it
    try:
      import apache_beam
    finally:
      root.setLevel(level)
  except ImportError:
    raise ConfigError("corpus.engine='beam' needs Apache Beam: pip install -e '.[beam]'") from None
  return apache_beam


def _count(name: str, n: int = 1) -> None:
  _beam().metrics.Metrics.counter(NAMESPACE, name).inc(n)


# ------------------------------------------------------------------------------ reading


def _read_file(relative: str, root: str, options) -> list:
  docs = []
  _count("files")
  for item in documents.read_file(root, relative, options):
    if isinstance(item, str):
      _count(item)
    else:
      _count("documents")
      docs.append(item)
  return docs


def _read_tfds_range(bounds: tuple[int, int], source: CorpusSource) -> list:
  texts = tfds_datasets.read_text_dataset(source.tfds_name, text_field=source.options.text_field,
                                          split=source.split, data_dir=source.path or None)
  docs = list(documents.tfds_documents(texts, source.tfds_name, *bounds))
  _count("documents", len(docs))
  return docs


def _documents(pbegin, source: CorpusSource):
  beam = _beam()
  if source.tfds_name:
    total = len(tfds_datasets.read_text_dataset(source.tfds_name, text_field=source.options.text_field,
                                                split=source.split, data_dir=source.path or None))
    ranges = [(lo, min(lo + TFDS_RANGE, total)) for lo in range(0, total, TFDS_RANGE)]
    return (pbegin | "Ranges" >> beam.Create(ranges) | "SpreadRanges" >> beam.Reshuffle()
            | "ReadRange" >> beam.FlatMap(_read_tfds_range, source=source))
  files, skipped = documents.list_files(source.path)
  _ = (pbegin | "Skipped" >> beam.Create(sorted(skipped.items()))
       | "CountSkipped" >> beam.Map(lambda reason_n: _count(*reason_n)))
  return (pbegin | "Files" >> beam.Create(files) | "SpreadFiles" >> beam.Reshuffle()
          | "ReadFiles" >> beam.FlatMap(_read_file, root=source.path, options=source.options))


def _raise_on_duplicate(doc_id_count, where: str):
  doc_id, n = doc_id_count
  raise DataError(f"{where}: document id {doc_id!r} appears {n} times; give every document a unique id",
                  path=where, field="id")


# ---------------------------------------------------------------------- per document


def _cut_and_filter(doc, cfg: Mapping) -> list:
  passed, counts = corpus.filter_segments(corpus.cut_document(doc, cfg), cfg)
  for name, n in counts.items():
    _count(name, n)
  return passed


# ----------------------------------------------------------------------------- dedup


def _smallest_id(key_segments) -> list:
  _, group = key_segments
  group = sorted(group, key=lambda s: s.id)
  _count("exact_duplicate", len(group) - 1)
  return group[:1]


def _band_entries(segment_shingles, seeds, bands: int) -> list:
  segment_id, shingles = segment_shingles
  return [(key, segment_id) for key in dedup.band_keys(shingles, seeds, bands)]


def _bucket_pairs(key_ids) -> list:
  _, ids = key_ids
  return dedup.bucket_pairs(ids)


def _first_half(joined) -> list:
  """(a, {pairs: [b...], shingles: [sh_a]}) -> (b, (a, sh_a)) for each pair."""
  a, sides = joined
  return [(b, (a, sides["shingles"][0])) for b in sides["pairs"]]


def _verified(joined, threshold: float) -> list:
  """(b, {halves: [(a, sh_a)...], shingles: [sh_b]}) -> the edges (a, b) at or over the threshold."""
  b, sides = joined
  if not sides["shingles"]:
    return []
  shingles_b = sides["shingles"][0]
  return [(a, b) for a, shingles_a in sides["halves"] if dedup.jaccard(shingles_a, shingles_b) >= threshold]


def _example(joined) -> list:
  segment_id, sides = joined
  if sides["dropped"]:
    _count("near_duplicate")
    return []
  _count("kept")
  [s] = sides["segment"]
  return [(corpus.output_key(segment_id),
           dict(id=s.id, doc_id=s.doc_id, header=s.header or "", text=s.text))]


class PrepareCorpus:
  """Builds the pipeline: a callable PBegin -> PCollection of (output_key, segment record)."""

  def __init__(self, source: CorpusSource, cfg: Mapping):
    self.source, self.cfg = source, corpus.corpus_config(cfg)

  def __call__(self, pbegin):
    beam, cfg = _beam(), self.cfg
    docs = _documents(pbegin, self.source)
    where = self.source.path or self.source.tfds_name
    _ = (docs | "DocIds" >> beam.Map(lambda d: (d.id, 1)) | "CountIds" >> beam.CombinePerKey(sum)
         | "Repeated" >> beam.Filter(lambda kv: kv[1] > 1) | "Fail" >> beam.Map(_raise_on_duplicate, where))
    passed = docs | "CutAndFilter" >> beam.FlatMap(_cut_and_filter, cfg=cfg)
    unique = (passed | "ContentKey" >> beam.Map(lambda s: (dedup.content_key(s.text), s))
              | "GroupContent" >> beam.GroupByKey() | "SmallestId" >> beam.FlatMap(_smallest_id))
    by_id = unique | "ById" >> beam.Map(lambda s: (s.id, s))
    shingles = unique | "Shingles" >> beam.Map(
        lambda s, n: (s.id, dedup.shingle_hashes(s.text, n)), n=cfg["shingle_words"])
    seeds = dedup.minhash_seeds(cfg["num_perm"], cfg["minhash_seed"])
    pairs = (shingles | "Bands" >> beam.FlatMap(_band_entries, seeds=seeds, bands=cfg["bands"])
             | "GroupBands" >> beam.GroupByKey() | "Pairs" >> beam.FlatMap(_bucket_pairs)
             | "DistinctPairs" >> beam.Distinct())
    halves = ({"pairs": pairs, "shingles": shingles} | "JoinFirst" >> beam.CoGroupByKey()
              | "FirstHalf" >> beam.FlatMap(_first_half))
    edges = ({"halves": halves, "shingles": shingles} | "JoinSecond" >> beam.CoGroupByKey()
             | "Verify" >> beam.FlatMap(_verified, threshold=cfg["near_dup_threshold"]))
    dropped = (edges | "AllEdges" >> beam.combiners.ToList()
               | "DropByIdOrder" >> beam.FlatMap(lambda e: [(i, True) for i in sorted(dedup.dropped_by_id_order(e))]))
    return ({"segment": by_id, "dropped": dropped} | "JoinDropped" >> beam.CoGroupByKey()
            | "Examples" >> beam.FlatMap(_example))


# ------------------------------------------------------------------------- tfds writer


class _BeamSegmentsBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """The `segments` dataset, generated by a Beam pipeline; keeps the pipeline's corpus counts."""

  def __init__(self, *, name: str, version: str, pipeline: PrepareCorpus, **kwargs):
    self.name = name
    self.VERSION = tfds.core.Version(version)  # pylint: disable=invalid-name
    self._pipeline = pipeline
    self.counts: dict[str, int] = {}
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, description="Corpus segments (Beam).",
                                 features=tfds_datasets.features_for(tfds_datasets.SEGMENT_FIELDS),
                                 disable_shuffling=True)

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    return _beam().ptransform_fn(lambda pbegin: self._pipeline(pbegin))()

  def _process_pipeline_result(self, pipeline_result) -> None:
    metrics = _beam().metrics.MetricsFilter().with_namespace(NAMESPACE)
    for result in pipeline_result.metrics().query(metrics)["counters"]:
      value = result.committed if result.committed is not None else result.attempted
      self.counts[result.key.metric.name] = self.counts.get(result.key.metric.name, 0) + value


def prepare_beam(source: CorpusSource, cfg: Mapping, data_dir, name: str = "segments",
                 version: str = "1.0.0") -> tuple[str, dict]:
  """Runs the corpus pipeline on Beam, writing dataset `name` (array_record shards) under
  `data_dir`, replacing an existing version; returns the dataset dir and the report."""
  beam, cfg = _beam(), corpus.corpus_config(cfg)
  options = beam.options.pipeline_options.PipelineOptions(shlex.split(cfg["beam_options"] or DEFAULT_OPTIONS))
  make = lambda: _BeamSegmentsBuilder(name=name, version=version, pipeline=PrepareCorpus(source, cfg),
                                      data_dir=os.fspath(data_dir), file_format="array_record")
  builder = make()
  if builder.is_prepared():
    shutil.rmtree(builder.data_dir)
    builder = make()
  with tempfile.TemporaryDirectory() as download_dir, quiet.third_party(), quiet.worker_processes():
    try:
      builder.download_and_prepare(download_dir=download_dir, download_config=tfds.download.DownloadConfig(
          beam_options=options))
    except ValueError as e:
      if "number of generated examples is 0" not in str(e):
        raise
      where = source.path or source.tfds_name  # tfds cannot hold an empty split; Beam's counts are lost
      raise DataError(f"{where}: no segment was kept (an empty corpus, or every segment filtered out); "
                      "corpus.engine=local shows the counts per filter", path=where) from None
  return os.fspath(builder.data_dir), corpus.make_report(builder.counts, cfg)
