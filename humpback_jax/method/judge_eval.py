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
import time

import ml_collections
import numpy as np

from humpback_jax import generate
from humpback_jax.data.jsonl import read_jsonl
from humpback_jax.errors import DataError
from humpback_jax.method import curate, engines
from humpback_jax.method.artifacts import Candidate, Score

MODES = ("generate", "expected")
# Judge prompts are the ~450-token rubric plus one answer: buckets close above that keep padding low.
PROMPT_BUCKETS = (256, 512, 640, 768, 1024, 2048)
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


def judge(engine, tokenizer, cfg, rows: list[dict], mode: str) -> list[Score]:
  """Curation's own score per row in `mode`; `value(score, mode)` is what curation thresholds."""
  candidates = [Candidate(id=r["id"], instruction=r["instruction"], output=r["output"]) for r in rows]
  if mode == "expected":
    return curate.score_candidates_by_expectation(engine, tokenizer, cfg, candidates)
  if mode == "generate":
    return curate.score_candidates_by_generation(engine, tokenizer, cfg, candidates, 0)
  raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def value(score: Score, mode: str) -> float | None:
  """The score curation thresholds: the expected score (expected mode) or the parsed score."""
  return score.expected_score if mode == "expected" else score.score


def judge_settings(chat_template: str, max_new_tokens: int) -> ml_collections.ConfigDict:
  """The config fields curation reads, for a judge run without a pipeline config: greedy decoding."""
  return ml_collections.ConfigDict(dict(
      tokenizer=dict(chat_template=chat_template), generate=dict(top_p=1.0, seed=0),
      pipeline=dict(judge_temperature=0.0, judge_max_new_tokens=max_new_tokens)))


def run(model, cfg, rows: list[dict], modes, *, batch_size: int = 16) -> tuple[dict, list[dict]]:
  """(report with seconds per mode, per-pair records with each mode's value and judge text).

  A run config with a `generate` section judges on the engine its curation stage uses (scheduler,
  buckets, batch, prefix reuse); otherwise a static engine with `batch_size` rows."""
  if "prompt_buckets" in cfg.generate:
    engine = engines.engine(cfg, model.cfg, model.params, model.layout)
  else:
    engine = generate.Engine(model.cfg, model.params, model.layout, batch_size=batch_size,
                             prompt_buckets=PROMPT_BUCKETS, too_long="skip")
  records, seconds = {}, {}
  for mode in modes:
    start = time.perf_counter()
    records[mode] = judge(engine, model.tokenizer, cfg, rows, mode)
    seconds[mode] = time.perf_counter() - start
  values = {mode: [value(r, mode) for r in records[mode]] for mode in modes}
  rep = dict(report([r["label"] for r in rows], values, [r.get("category") for r in rows]), seconds=seconds,
             skipped_too_long=engine.stats.skipped_too_long)
  pairs = [dict(id=r["id"], label=r["label"], **{m: values[m][i] for m in modes},
                judge_output=records["generate"][i].judge_output if "generate" in records else None)
           for i, r in enumerate(rows)]
  return rep, pairs


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


def by_category(categories, labels, values_by_mode: dict[str, list]) -> dict[str, dict]:
  """Per dev-set category: pairs, mean label, and each mode's mean value over the pairs it scored."""
  out = {}
  for name in sorted(set(categories)):
    idx = [i for i, c in enumerate(categories) if c == name]
    row = dict(pairs=len(idx), label=float(np.mean([labels[i] for i in idx])))
    for mode, values in values_by_mode.items():
      scored = [values[i] for i in idx if values[i] is not None]
      row[mode] = float(np.mean(scored)) if scored else float("nan")
    out[name] = row
  return out


def report(labels, values_by_mode: dict[str, list], categories=None) -> dict:
  """Every figure eval-judge prints: per mode metrics at each k, AUC, confusion; agreement; and
  per-category means when the pairs name a category."""
  out = dict(pairs=len(labels), label_counts={l: int(np.sum(np.asarray(labels) == l)) for l in LABELS},
             modes={})
  if categories is not None and all(isinstance(c, str) for c in categories):
    out["categories"] = by_category(categories, labels, values_by_mode)
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
  if "categories" in rep:
    modes = list(rep["modes"])
    lines += ["", "by category: pairs, mean label, mean score per mode (" + ", ".join(modes) + ")"]
    lines += [f"  {name:18s} {c['pairs']:4d}  {c['label']:4.2f}" + "".join(f"  {c[m]:4.2f}" for m in modes)
              for name, c in rep["categories"].items()]
  if "seconds" in rep:
    lines += ["seconds: " + ", ".join(f"{m} {s:.1f}" for m, s in rep["seconds"].items())
              + f"; prompts skipped as too long: {rep['skipped_too_long']}"]
  return "\n".join(lines)
