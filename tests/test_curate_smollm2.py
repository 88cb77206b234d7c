"""Expected-score curation with the real SmolLM2-135M: matched pairs outscore shuffled ones."""
import json
from pathlib import Path

import ml_collections
import numpy as np
import pytest

from humpback_jax import api, generate
from humpback_jax.assets_fetch import smollm2_gguf_path
from humpback_jax.method import curate
from humpback_jax.method.artifacts import Candidate

pytestmark = [pytest.mark.smollm2, pytest.mark.slow]  # ~150 s on 2 cores: full run only
SEED = Path(__file__).resolve().parents[1] / "humpback_jax" / "assets" / "toy" / "seed.jsonl"
N = 8


def auc(positives, negatives) -> float:
  """Probability that a random positive outscores a random negative (ties count half)."""
  p, n = np.asarray(positives)[:, None], np.asarray(negatives)[None, :]
  return float(np.mean((p > n) + 0.5 * (p == n)))


def test_matched_pairs_score_higher_than_shuffled_pairs():
  model = api.load(smollm2_gguf_path(), layout=api.default_layout())
  cfg = ml_collections.ConfigDict(dict(tokenizer=dict(chat_template=model.chat_template)))
  rows = [json.loads(line) for line in SEED.read_text().splitlines()[:N]]
  for r in rows:
    r["output"] = r["output"][:300]
  matched = [Candidate(id=f"m{i}", instruction=r["instruction"], output=r["output"]) for i, r in enumerate(rows)]
  shuffled = [Candidate(id=f"s{i}", instruction=r["instruction"], output=rows[(i + N // 2) % N]["output"])
              for i, r in enumerate(rows)]
  engine = generate.Engine(model.cfg, model.params, model.layout, prompt_buckets=(512, 1024), batch_size=8)
  scored = curate.score_candidates_by_expectation(engine, model.tokenizer, cfg, matched + shuffled)
  expected = np.array([s.expected_score for s in scored])
  assert np.all((expected >= 1) & (expected <= 5))
  value = auc(expected[:N], expected[N:])
  print(f"expected-score AUC matched vs shuffled (SmolLM2-135M, {N} pairs): {value:.3f}; "
        f"mean {expected[:N].mean():.3f} vs {expected[N:].mean():.3f}")
  assert expected[:N].mean() > expected[N:].mean()
  assert value > 0.5
