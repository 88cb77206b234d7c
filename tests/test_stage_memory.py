"""Augment and curate stream their data: a stage's peak memory does not grow with the corpus.

Each stage runs for real (views, shards, merge, JSONL and tfds outputs) with a stand-in engine, on a
corpus and on one 8x larger; Python's peak allocation (tracemalloc) may grow by a small share of the
added corpus bytes, not by the corpus itself.
"""
import tracemalloc
import types

import pytest
from helpers import finished_augment

from humpback_jax import configlib
from humpback_jax.data import tfds_datasets
from humpback_jax.method import artifacts, pipeline

SHARD = 8          # records per generation shard
TEXT_CHARS = 8000  # per segment: the corpus dwarfs the stage's fixed overhead
BASE = 16          # segments of the small corpus; the large one has 8x


class FakeEngine:
  """Writes a fixed answer for every prompt, as the engine would, without a model."""

  def __init__(self, answer_ids):
    self.answer_ids = answer_ids
    self.stats = types.SimpleNamespace(tokens_per_second=0.0, compiles=0, padding_share=0.0)

  def generate_ids(self, prompts, sampling, eos_ids, index_offset=0):
    return [list(self.answer_ids) for _ in prompts]


def run_for(work, answer: str, monkeypatch):
  cfg = configlib.load_config("configs/toy.py", [f"--config.generate.shard_size={SHARD}",
                                                 "--config.pipeline.curation_mode=generate",
                                                 "--config.pipeline.threshold_k=5"])
  run = pipeline.Run(cfg, work, layout=None, progress=False)
  engine = FakeEngine(run.tokenizer.encode(answer))
  monkeypatch.setattr(pipeline.Run, "_engine", lambda self, stage: engine)
  monkeypatch.setattr(pipeline.Run, "_model_params", lambda self, stage: None)
  return run


def text(i: int) -> str:
  return f"segment {i} " + "".join(chr(97 + (i * 7 + j) % 26) for j in range(TEXT_CHARS))


def with_segments(work, n: int):
  """`work` as a finished prepare_corpus leaves it, with n segments."""
  records = (dict(id=f"s{i}", doc_id=f"d{i}", header="", text=text(i)) for i in range(n))
  tfds_datasets.write_segments_dataset(records, work / "datasets", artifacts.SEGMENTS)
  (work / "prepare_corpus").mkdir(parents=True)
  artifacts.write_manifest(work / "prepare_corpus", stage="prepare_corpus", config_hash="h", counts={},
                           outputs={artifacts.SEGMENTS: artifacts.dataset_digest(work / "datasets", artifacts.SEGMENTS)},
                           seconds=0)


def with_candidates(work, n: int):
  """`work` as a finished augment leaves it, with n candidates."""
  finished_augment(work, [artifacts.Candidate(id=f"c{i}", instruction=f"Question {i}?", output=text(i))
                          for i in range(n)])


def peak_bytes(stage):
  tracemalloc.start()
  try:
    tracemalloc.reset_peak()
    before = tracemalloc.get_traced_memory()[0]
    counts = stage()
    return tracemalloc.get_traced_memory()[1] - before, counts
  finally:
    tracemalloc.stop()


@pytest.fixture
def small_write_batches(monkeypatch):
  # The tfds writer holds a batch of records; batches smaller than the corpus show that is all it holds.
  monkeypatch.setattr(tfds_datasets, "_RECORDS_PER_WRITE", SHARD)


def assert_flat(peaks, corpus_bytes):
  small, large = peaks
  added = 7 * corpus_bytes  # the large corpus has this many more bytes of text
  assert large - small < 0.25 * added, (f"peak grew by {(large - small) / 1e6:.2f} MB for {added / 1e6:.2f} MB more "
                                       f"corpus (peaks {small / 1e6:.2f} MB and {large / 1e6:.2f} MB)")


def assert_stage_peak_is_flat(tmp_path, monkeypatch, write_inputs, reply, stage, check):
  """Runs `stage` on BASE and 8 x BASE inputs written by `write_inputs`; its peak must not follow the corpus."""
  peaks = []
  for n in (BASE, 8 * BASE):
    work = tmp_path / str(n)
    write_inputs(work, n)
    run = run_for(work, reply, monkeypatch)
    peak, counts = peak_bytes(lambda: stage(run))
    check(work, n, counts)
    peaks.append(peak)
  assert_flat(peaks, BASE * TEXT_CHARS)


def test_augments_peak_memory_does_not_grow_with_the_corpus(tmp_path, monkeypatch, small_write_batches):
  def check(work, n, counts):
    assert counts["candidates"] == n and len(artifacts.read_records(work / "augment" / artifacts.CANDIDATES,
                                                                    artifacts.Candidate)) == n
  assert_stage_peak_is_flat(tmp_path, monkeypatch, with_segments, "What does this text explain?",
                            lambda run: run._augment("augment"), check)


def test_curates_peak_memory_does_not_grow_with_the_candidates(tmp_path, monkeypatch, small_write_batches):
  def check(work, n, counts):
    assert (counts["candidates"], counts["curated"]) == (n, n)
  assert_stage_peak_is_flat(tmp_path, monkeypatch, with_candidates, "A clear answer. Score: 5",
                            lambda run: run._curate("curate_m0"), check)
