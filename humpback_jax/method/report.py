"""The run report: counts per stage, score histograms, curated-set statistics next to the paper's,
examples of accepted and rejected pairs, and timings. Written as report.md, report.json and a PNG.

Built from the workdir alone: each stage's manifest and its checked artifacts (artifacts.py).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from humpback_jax import shards
from humpback_jax.method import artifacts, selection
from humpback_jax.method.artifacts import Candidate, CuratedPair, Score, SeedPair

# METHOD.md: seed and augmented-data statistics and the 65B run's curated sizes.
PAPER = dict(seed_instruction_chars=(148, 322), seed_output_chars=(1072, 818), augmented_output_chars=(1722, 653),
             curated_5_share=0.083, curated_4_share=0.388, curated_5_size=41821, curated_4_size=195043)


def length_stats(texts) -> tuple[float, float]:
  """Mean and standard deviation of character lengths."""
  lengths = np.array([len(t) for t in texts], float)
  return (float(lengths.mean()), float(lengths.std())) if len(lengths) else (0.0, 0.0)


def write(workdir: Path, stages: list[str]) -> dict:
  """Builds the report of the run in `workdir` over `stages` (in run order) into `workdir/report/`;
  returns its JSON summary's counts. Stages that have not finished are shown without counts."""
  work = artifacts.Workdir(workdir)
  out = work.stage("report")
  out.mkdir(parents=True, exist_ok=True)
  manifests = {n: work.manifest(n) for n in stages}
  seed = work.read_if_finished("prepare_seed", artifacts.SEED, SeedPair)
  candidates = work.read_if_finished("augment", artifacts.CANDIDATES, Candidate)
  iterations, last = {}, None
  for name in stages:
    if name.startswith("curate_m") and manifests[name] is not None:
      scored = work.read(name, artifacts.SCORES, Score)
      curated = work.read(name, artifacts.CURATED, CuratedPair)
      last = (name, scored, curated)
      counts = manifests[name].get("counts") or {}
      mode = counts.get("mode", "generate")
      values = [selection.value(s, mode) for s in scored]  # the score the threshold compared
      unparsable = sum(s.score is None for s in scored)
      iterations[name] = dict(
          mode=mode, threshold=counts.get("threshold_used"), histogram=selection.histogram(scored, mode),
          unparsable=unparsable, parse_failure_rate=unparsable / max(len(scored), 1),
          curated=len(curated), curated_share=len(curated) / max(len(candidates), 1),
          at_least_4=sum(1 for v in values if v is not None and v >= 4),
          curated_output_chars=length_stats(r.output for r in curated),
          curated_instruction_chars=length_stats(r.instruction for r in curated))
  summary = dict(
      stages={n: (m or {}).get("counts") for n, m in manifests.items()},
      seconds={n: (m or {}).get("seconds") for n, m in manifests.items()},
      seed_instruction_chars=length_stats(r.instruction for r in seed),
      seed_output_chars=length_stats(r.output for r in seed),
      augmented_output_chars=length_stats(r.output for r in candidates),
      iterations=iterations, paper=PAPER)
  shards.write_json_atomic(out / "report.json", summary)
  _plot_histograms(iterations, out / "score_histogram.png")
  (out / "report.md").write_text(_markdown(Path(workdir), summary, candidates, last))
  return dict(iterations=len(iterations), candidates=len(candidates))


def _plot_histograms(iterations: dict, png: Path) -> None:
  """One panel per iteration: the histogram of the score its threshold compared, the threshold a red line."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, max(len(iterations), 1), figsize=(5 * max(len(iterations), 1), 3.5), squeeze=False)
  for ax, (name, it) in zip(axes[0], iterations.items()):
    bins = it["histogram"]["bins"]
    if it["mode"] == "expected":  # bins keyed by their lower edge; the threshold sits between bars
      ax.bar([float(lo) for lo in bins], list(bins.values()), width=selection.EXPECTED_BIN, align="edge")
      line = it["threshold"]
    else:  # integer scores: the line sits left of the lowest kept score's bar
      ax.bar([int(k) for k in bins], list(bins.values()), width=0.8)
      line = None if it["threshold"] is None else it["threshold"] - 0.5
    if line is not None:
      ax.axvline(line, color="red", linestyle="--", label=f"threshold {it['threshold']:g}")
      ax.legend()
    ax.set_title(f"{name} ({it['mode']} score)")
    ax.set_xlabel("expected score" if it["mode"] == "expected" else "score")
    ax.set_ylabel("candidates")
  fig.tight_layout()
  fig.savefig(png, dpi=100)
  plt.close(fig)


def _threshold_mark(lo: float, width: float, threshold: float | None) -> str:
  if threshold is None:
    return ""
  if lo >= threshold - 1e-9:
    return ">= kept"
  return "threshold inside this bin" if lo + width > threshold + 1e-9 and width < 1 else ""


def _fmt(ms) -> str:
  return f"{ms[0]:.0f} ± {ms[1]:.0f}"


def _corpus_lines(c: dict) -> list[str]:
  """Every corpus segment once: dropped per filter, nested, duplicates, kept; and the skipped files."""
  if "dropped" not in c:
    return []
  lines = ["", "## Corpus", "", "| segments | count |", "|---|---|", f"| input | {c['input']} |"]
  lines += [f"| dropped: {name} | {n} |" for name, n in c["dropped"].items()]
  lines += [f"| {key.replace('_', ' ')} | {c[key]} |" for key in ("nested", "exact_duplicate", "near_duplicate", "kept")]
  skipped = {k: v for k, v in c.get("skipped_files", {}).items() if v}
  return lines + ["", f"{c.get('files', 0)} files, {c.get('documents', 0)} documents, engine {c.get('engine')}; "
                      f"skipped files: {json.dumps(skipped) if skipped else 'none'}."]


def _markdown(workdir: Path, s: dict, candidates: list[Candidate], last) -> str:
  lines = [f"# Humpback run report: {workdir}", "", "## Stages", "",
           "| stage | seconds | counts |", "|---|---|---|"]
  for name, counts in s["stages"].items():
    shown = {k: v for k, v in (counts or {}).items() if not isinstance(v, (dict, list))}
    lines.append(f"| {name} | {s['seconds'][name]} | {json.dumps(shown)[:400]} |")
  lines += _corpus_lines(s["stages"].get("prepare_corpus") or {})
  p = s["paper"]
  lines += ["", "## Data statistics (characters, mean ± std)", "", "| set | this run | paper |", "|---|---|---|",
            f"| seed instruction | {_fmt(s['seed_instruction_chars'])} | {_fmt(p['seed_instruction_chars'])} |",
            f"| seed output | {_fmt(s['seed_output_chars'])} | {_fmt(p['seed_output_chars'])} |",
            f"| augmented output | {_fmt(s['augmented_output_chars'])} | {_fmt(p['augmented_output_chars'])} |"]
  lines += ["", "## Self-curation", "", "![score histogram](score_histogram.png)", "",
            "Scores are the ones each threshold compared: parsed (generate mode) or expected (expected mode).", "",
            "| iteration | mode | threshold | unparsable | parse failure | curated (share) | score>=4 | curated output chars |",
            "|---|---|---|---|---|---|---|---|"]
  for name, it in s["iterations"].items():
    threshold = "none (all kept)" if it["threshold"] is None else f"{it['threshold']:g}"
    lines.append(f"| {name} | {it['mode']} | {threshold} | {it['unparsable']} | "
                 f"{it['parse_failure_rate']:.1%} | {it['curated']} ({it['curated_share']:.1%}) | {it['at_least_4']} | "
                 f"{_fmt(it['curated_output_chars'])} |")
  for name, it in s["iterations"].items():
    lines += ["", f"{name}, histogram of the {it['mode']} score (kept: at or above the threshold):", "",
              "| score | candidates | |", "|---|---|---|"]
    width = selection.EXPECTED_BIN if it["mode"] == "expected" else 1.0
    for lo, n in it["histogram"]["bins"].items():
      lines.append(f"| {lo} | {n} | {_threshold_mark(float(lo), width, it['threshold'])} |")
  lines += ["", f"Paper (65B, A^(2)): k=5 keeps {p['curated_5_size']:,} ({p['curated_5_share']:.1%}), "
            f"k=4 keeps {p['curated_4_size']:,} ({p['curated_4_share']:.1%}).", ""]
  if last:
    name, scored_rows, curated = last
    scored = {r.id: r for r in scored_rows}
    curated_ids = {r.id for r in curated}
    for title, pick in (("Accepted", lambda c: c.id in curated_ids), ("Rejected", lambda c: c.id not in curated_ids)):
      lines += [f"## {title} examples ({name})", ""]
      for c in [c for c in candidates if pick(c)][:3]:
        sc = scored.get(c.id)
        lines += [f"- **{c.id}** score={sc and sc.score} expected={sc and sc.expected_score}",
                  f"  - instruction: {c.instruction[:200]!r}", f"  - output: {c.output[:300]!r}"]
      lines.append("")
  return "\n".join(lines) + "\n"
