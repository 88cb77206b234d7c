"""How good is a judge? Its curation scores against human 1-5 labels on a dev set.

The paper reports its selectors on a 250-pair dev set as precision/recall of "keep" (M_0 0.44/0.09,
M_1 0.52/0.44, GPT-4 0.88/0.92). Here a pair is positive at k when its label is >= k, and the judge
keeps it when the value curation thresholds is >= k: the parsed score (generate mode; unparsable
keeps nothing) or the expected score (expected mode). ROC AUC ranks pairs by that value, an
unparsable answer below every score. The confusion table floors the value, so column c holds the
pairs a threshold at c keeps and c + 1 does not.
"""
from __future__ import annotations

import math

import numpy as np

from humpback_jax.data.jsonl import read_jsonl
from humpback_jax.errors import DataError
from humpback_jax.method import curate

MODES = ("generate", "expected")
KS = (3, 4, 5)
LABELS = (1, 2, 3, 4, 5)


def read_labels(path) -> list[dict]:
  """Dev-set records `{id, instruction, output, label: 1..5, reason}`; errors name the line and field."""
  rows = []
  for line, record in read_jsonl(path, ["instruction", "output", "label"], types={"label": int}):
    label = record["label"]
    if isinstance(label, bool) or label not in LABELS:
      raise DataError(f"{path}:{line}: field 'label' must be an integer 1..5, got {label!r}", path=path,
                      line=line, field="label")
    rows.append(dict(record, id=str(record.get("id", line))))
  if not rows:
    raise DataError(f"{path}: no labelled pairs", path=path)
  return rows


def judge(engine, tokenizer, cfg, rows: list[dict], mode: str) -> list[float | None]:
  """The value curation thresholds, per row, from the judge in `mode` (None: no score)."""
  if mode == "expected":
    scored = curate.score_candidates_by_expectation(engine, tokenizer, cfg, rows)
    return [s["expected_score"] for s in scored]
  if mode == "generate":
    return [s["score"] for s in curate.score_candidates_by_generation(engine, tokenizer, cfg, rows, 0)]
  raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def keep_metrics(labels, values, k: float) -> dict:
  """Precision, recall and F1 of "value >= k" against "label >= k" (None is never kept)."""
  truth = np.asarray(labels) >= k
  kept = np.array([v is not None and v >= k for v in values])
  tp, fp, fn = int(np.sum(truth & kept)), int(np.sum(~truth & kept)), int(np.sum(truth & ~kept))
  precision = tp / (tp + fp) if tp + fp else float("nan")
  recall = tp / (tp + fn) if tp + fn else float("nan")
  f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else float("nan")
  return dict(k=k, positives=int(truth.sum()), kept=int(kept.sum()), tp=tp, fp=fp, fn=fn,
              precision=precision, recall=recall, f1=f1)


def roc_auc(labels, values, k: float) -> float:
  """P(a random pair labelled >= k outranks a random pair labelled < k); ties count half, None lowest."""
  truth = np.asarray(labels) >= k
  v = np.array([-math.inf if x is None else x for x in values], np.float64)
  pos, neg = v[truth][:, None], v[~truth][None, :]
  if pos.size == 0 or neg.size == 0:
    return float("nan")
  return float(np.mean((pos > neg) + 0.5 * (pos == neg)))


def floored(value: float | None) -> int | None:
  """The confusion-table column of a value: its floor in 1..5, None for no score."""
  return None if value is None else min(max(int(math.floor(value)), 1), 5)


def confusion(labels, values) -> dict[int, dict]:
  """{label: {column: count}} with columns 1..5 (floored value) and None (no score)."""
  table = {label: {c: 0 for c in (*LABELS, None)} for label in LABELS}
  for label, value in zip(labels, values):
    table[label][floored(value)] += 1
  return table


def agreement(first, second, k: float) -> float:
  """Share of pairs on which two modes make the same keep decision at k."""
  same = [(a is not None and a >= k) == (b is not None and b >= k) for a, b in zip(first, second)]
  return float(np.mean(same)) if same else float("nan")


def report(labels, values_by_mode: dict[str, list]) -> dict:
  """Every figure eval-judge prints: per mode metrics at each k, AUC, confusion; agreement."""
  out = dict(pairs=len(labels), label_counts={l: int(np.sum(np.asarray(labels) == l)) for l in LABELS},
             modes={})
  for mode, values in values_by_mode.items():
    out["modes"][mode] = dict(
        unscored=sum(v is None for v in values),
        at_k=[dict(keep_metrics(labels, values, k), auc=roc_auc(labels, values, k)) for k in KS],
        confusion=confusion(labels, values))
  if len(values_by_mode) == 2:
    first, second = values_by_mode.values()
    out["agreement"] = {k: agreement(first, second, k) for k in KS}
  return out


def format_report(rep: dict) -> str:
  """The report as plain-text tables."""
  lines = [f"{rep['pairs']} labelled pairs; labels 1..5: "
           + " ".join(str(rep["label_counts"][l]) for l in LABELS)]
  for mode, m in rep["modes"].items():
    lines += ["", f"mode {mode}: {m['unscored']} without a score",
              "  k  positives  kept  precision  recall    F1   ROC AUC"]
    lines += [f"  {r['k']}  {r['positives']:9d}  {r['kept']:4d}  {r['precision']:9.3f}  {r['recall']:6.3f}"
              f"  {r['f1']:5.3f}  {r['auc']:8.3f}" for r in m["at_k"]]
    lines += ["  confusion (rows: label; columns: floored score, '-' none)",
              "  label    1    2    3    4    5    -"]
    lines += [f"  {l:5d}" + "".join(f"{m['confusion'][l][c]:5d}" for c in (*LABELS, None)) for l in LABELS]
  if "agreement" in rep:
    lines += ["", "agreement of keep decisions between modes: "
              + ", ".join(f"k={k}: {a:.3f}" for k, a in rep["agreement"].items())]
  return "\n".join(lines)
