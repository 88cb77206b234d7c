"""Selection: which judged candidates a threshold keeps. The judge runs once and stores every score;
any threshold applies later from those scores, so changing k re-selects without judging again.

The score a threshold compares is the parsed score in `generate` mode and the expected score in
`expected` mode; `none` (the uncurated control) keeps every candidate.
"""
from __future__ import annotations

import hashlib
import itertools
import json
from typing import Iterable, Iterator

import numpy as np

from humpback_jax.errors import DataError
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


def kept(candidates: Iterable[Candidate], scored: Iterable[Score] | None, sel: dict | None,
         k: float | None) -> Iterator[tuple[Candidate, float | None]]:
  """Streams (candidate, the value it was kept on) for those a selection keeps at threshold k, in
  candidate order. `scored` holds one score per candidate in the same order (None: the uncurated
  control keeps all); they are read side by side, one pair at a time."""
  if sel is None:
    yield from ((c, None) for c in candidates)
    return
  for c, s in itertools.zip_longest(candidates, scored):
    if c is None or s is None or c.id != s.id:
      got, want = (None if s is None else s.id), (None if c is None else c.id)
      raise DataError(f"scores and candidates differ: score of {got!r} beside candidate {want!r}; "
                      "the scores were written for other candidates; rerun the curate stage (--from)", field="id")
    if curate.passes(s, k, sel["mode"]):
      yield c, value(s, sel["mode"])


def select(candidates: list[Candidate], scored: list[Score], sel: dict | None) -> tuple[list[Candidate], float | None]:
  """(the candidates kept, in candidate order; the threshold used) for a selection."""
  k = None if sel is None else curate.threshold(scored, sel["threshold_k"], sel["mode"], sel["keep_top_fraction"])
  return [c for c, _ in kept(candidates, scored, sel, k)], k


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
