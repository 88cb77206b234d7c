"""Selection: which judged candidates a threshold keeps. The judge runs once and stores every score;
any threshold applies later from those scores, so changing k re-selects without judging again.

The score a threshold compares is the parsed score in `generate` mode and the expected score in
`expected` mode; `none` (the uncurated control) keeps every candidate.
"""
from __future__ import annotations

import hashlib
import json

import numpy as np

from humpback_jax.method import curate
from humpback_jax.method.artifacts import Candidate, Score

# The config fields that only choose among stored scores: changing them re-selects, never re-judges.
FIELDS = ("threshold_k", "keep_top_fraction")
EXPECTED_BIN = 0.25  # histogram bin width of expected scores in [1, 5]


def of(cfg) -> dict | None:
  """The selection a config asks for (None in the uncurated control, which keeps everything)."""
  c = cfg.pipeline
  if c.curation_mode == "none":
    return None
  return dict(mode=c.curation_mode, **{f: float(c[f]) for f in FIELDS})


def judge_hash(cfg) -> str:
  """A short hash of the config without the selection fields: equal hashes judge alike."""
  plain = json.loads(cfg.to_json(sort_keys=True))
  for field in FIELDS:
    plain.get("pipeline", {}).pop(field, None)
  return hashlib.sha256(json.dumps(plain, sort_keys=True).encode()).hexdigest()[:16]


def value(score: Score, mode: str) -> float | None:
  """The number a threshold compares for one stored score (None: unscored)."""
  v = score.expected_score if mode == "expected" else score.score
  return None if v is None else float(v)


def select(candidates: list[Candidate], scored: list[Score], sel: dict | None) -> tuple[list[Candidate], float | None]:
  """(the candidates kept, in candidate order; the threshold used) for a selection."""
  if sel is None:
    return list(candidates), None
  k = curate.threshold(scored, sel["threshold_k"], sel["mode"], sel["keep_top_fraction"])
  keep = curate.selected(scored, k, sel["mode"])
  return [r for r in candidates if r.id in keep], k


def histogram(scored: list[Score], mode: str) -> dict:
  """Counts of the thresholded score: per score 1..5 (generate) or per 0.25-wide bin of [1, 5]
  (expected, keyed by the bin's lower edge), plus the unscored."""
  values = [value(s, mode) for s in scored]
  present = np.array([v for v in values if v is not None], float)
  if mode == "expected":
    edges = np.arange(1.0, 5.0 + EXPECTED_BIN / 2, EXPECTED_BIN)
    counts, _ = np.histogram(np.clip(present, 1.0, 5.0), bins=edges)
    bins = {f"{lo:.2f}": int(n) for lo, n in zip(edges[:-1], counts)}
  else:
    bins = {str(k): int(np.sum(present == k)) for k in range(1, 6)}
  return dict(bins=bins, unscored=len(values) - len(present))
