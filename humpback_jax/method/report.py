"""The run report: counts per stage, score histograms, curated-set statistics next to the paper's,
examples of accepted and rejected pairs, and timings. Written as report.md, report.json and a PNG.

Built from the workdir alone: each stage's manifest and its checked artifacts (artifacts.py).
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np

from humpback_jax import shards
from humpback_jax.method import artifacts
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
      hist = Counter(s.score for s in scored)
      iterations[name] = dict(
          histogram={str(k): hist.get(k, 0) for k in (1, 2, 3, 4, 5)}, unparsable=hist.get(None, 0),
          parse_failure_rate=hist.get(None, 0) / max(len(scored), 1),
          curated=len(curated), curated_share=len(curated) / max(len(candidates), 1),
          at_least_4=sum(1 for s in scored if (s.score or 0) >= 4),
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
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 4))
  width = 0.8 / max(len(iterations), 1)
  for i, (name, it) in enumerate(iterations.items()):
    xs = np.arange(1, 6) + i * width
    ax.bar(xs, [it["histogram"][str(k)] for k in range(1, 6)], width=width, label=name)
  ax.set_xlabel("score")
  ax.set_ylabel("candidates")
  ax.legend()
  fig.tight_layout()
  fig.savefig(png, dpi=100)
  plt.close(fig)


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
            "| iteration | 1 | 2 | 3 | 4 | 5 | unparsable | parse failure | curated (share) | score>=4 | curated output chars |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
  for name, it in s["iterations"].items():
    h = it["histogram"]
    lines.append(f"| {name} | {h['1']} | {h['2']} | {h['3']} | {h['4']} | {h['5']} | {it['unparsable']} | "
                 f"{it['parse_failure_rate']:.1%} | {it['curated']} ({it['curated_share']:.1%}) | {it['at_least_4']} | "
                 f"{_fmt(it['curated_output_chars'])} |")
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
