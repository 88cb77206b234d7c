"""Malformed inputs stop the pipeline with file, line and field named, before any model runs."""
import re
from pathlib import Path

import pytest

from helpers import layout
from humpback_jax import configlib
from humpback_jax.errors import DataError
from humpback_jax.method import pipeline

ROOT = Path(__file__).resolve().parents[1]
GOOD_SEED = ROOT / "humpback_jax" / "assets" / "toy" / "seed.jsonl"
GOOD_CORPUS = ROOT / "humpback_jax" / "assets" / "toy" / "corpus"


def run_with(tmp_path, seed_path=GOOD_SEED, corpus_path=GOOD_CORPUS):
  cfg = configlib.load_config("configs/toy.py", [f"--config.data.seed_path={seed_path}",
                                                 f"--config.data.corpus_path={corpus_path}"])
  work = tmp_path / "run"
  with pytest.raises(DataError) as failure:
    pipeline.run_pipeline(cfg, work, layout(), progress=False)
  model_stages = [s for s in pipeline.stage_names(cfg) if s not in ("prepare_seed", "prepare_corpus")]
  assert not any((work / s).exists() for s in model_stages), "a model stage started"
  return str(failure.value)


def seed_file(tmp_path, *lines: bytes) -> Path:
  good = GOOD_SEED.read_bytes().splitlines()[:3]
  path = tmp_path / "seed.jsonl"
  path.write_bytes(b"\n".join([*good, *lines]) + b"\n")
  return path


@pytest.mark.parametrize("bad_line, expected", [
    (b'{"instruction": "Say hi", "output": "hi"', r"seed\.jsonl:4: invalid JSON"),
    (b'{"instruction": "Say hi"}', r"seed\.jsonl:4: .*output"),
    (b'{"instruction": "Say hi", "output": 5}', r"seed\.jsonl:4: .*output"),
    (b'{"instruction": "caf\xe9", "output": "x"}', r"seed\.jsonl:4: .*UTF-8"),
], ids=["bad_json", "missing_field", "wrong_type", "not_utf8"])
def test_a_bad_seed_line_is_named_before_any_model_runs(tmp_path, bad_line, expected):
  message = run_with(tmp_path, seed_path=seed_file(tmp_path, bad_line))
  assert re.search(expected, message), message


def test_an_empty_corpus_is_named_before_any_model_runs(tmp_path):
  empty = tmp_path / "corpus"
  empty.mkdir()
  message = run_with(tmp_path, corpus_path=empty)
  assert str(empty) in message and "empty" in message and "data.corpus_path" in message


def test_a_non_utf8_corpus_file_is_named_before_any_model_runs(tmp_path):
  corpus = tmp_path / "corpus"
  corpus.mkdir()
  (corpus / "notes.txt").write_bytes(b"A paragraph about caf\xe9s.\n")
  message = run_with(tmp_path, corpus_path=corpus)
  assert "notes.txt" in message and "UTF-8" in message
