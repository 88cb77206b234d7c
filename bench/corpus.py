"""Corpus-stage throughput, memory and near-duplicate recall: local engine vs Beam's DirectRunner.

Builds >= 20,000 HTML documents from Debian's python3-doc pages (apt-get install python3-doc):
sections of the pages that pass the filters, two half-sections glued together (new texts), and
planted near-duplicates (about 1% of a document's words substituted, deleted or inserted, so
their shingle Jaccard with the original is known and above the threshold). Each engine runs in
its own process from documents on disk to the written `segments` dataset; the RSS of its whole
process tree is sampled. Prints the table for bench/RESULTS.md.
  python bench/corpus.py [--docs=20000] [--near_dups=2000] [--workdir=/tmp/corpus_bench]
"""
from __future__ import annotations

import argparse
import collections
import glob
import html
import json
import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil

from humpback_jax.data import corpus, dedup, documents

ENGINES = {
    "local": None,
    "beam, 1 worker": "--runner=DirectRunner --direct_num_workers=1 --direct_running_mode=multi_processing",
    "beam, 2 workers": "--runner=DirectRunner --direct_num_workers=2 --direct_running_mode=multi_processing",
}
QUIET = " --default_sdk_harness_log_level=ERROR"


def cpu_model() -> str:
  """The CPU's model name (lscpu's), for the table header."""
  for line in Path("/proc/cpuinfo").read_text().splitlines():
    if line.startswith("model name"):
      return line.split(":", 1)[1].strip()
  return platform.machine()


def python_docs() -> Path:
  for candidate in ["/usr/share/doc/python3-doc/html", *sorted(glob.glob("/usr/share/doc/python3.*-doc/html"))]:
    if Path(candidate).is_dir():
      return Path(candidate)
  sys.exit("python3-doc not found: apt-get install -y python3-doc")


def page(header: str, paragraphs: list[str]) -> str:
  body = "".join(f"<p>{html.escape(p)}</p>" for p in paragraphs)
  return f"<html><body><h1>{html.escape(header)}</h1>{body}</body></html>"


def passing_sections(root: Path) -> list[tuple[str, list[str]]]:
  """(header, paragraphs) of every python3-doc section that passes the filters on its own."""
  cfg = corpus.corpus_config()
  sections = []
  for path in sorted(root.resolve().rglob("*.html")):
    doc = documents.Document(path.as_posix(), "html", path.read_bytes())
    passed, _ = corpus.filter_segments(corpus.cut_document(doc, cfg), cfg)
    sections += [(s.header, s.text.split("\n\n")) for s in passed]
  unique = {dedup.content_key("\n".join(p)): (h, p) for h, p in sections}
  return [unique[k] for k in sorted(unique)]


def perturbed(paragraphs: list[str], rng: random.Random, rate: float = 0.01) -> list[str]:
  """The paragraphs with about `rate` of their words substituted, deleted or duplicated."""
  words = [p.split(" ") for p in paragraphs]
  positions = [(i, j) for i, ws in enumerate(words) for j in range(len(ws))]
  for i, j in rng.sample(positions, max(2, int(rate * len(positions)))):
    op = rng.choice(("substitute", "delete", "insert"))
    words[i][j] = {"substitute": "perturbed", "delete": "", "insert": f"{words[i][j]} {words[i][j]}"}[op]
  return [" ".join(w for w in ws if w) for ws in words]


def build(folder: Path, docs: int, near_dups: int, seed: int = 0) -> dict:
  """Writes the documents; returns {copy doc id: (original doc id, exact shingle Jaccard)}."""
  rng = random.Random(seed)
  sections = passing_sections(python_docs())
  texts = list(sections)
  while len(texts) < docs - near_dups:  # new texts: the first half of one section, the second of another
    (h1, p1), (_, p2) = rng.sample(sections, 2)
    glued = p1[:max(1, len(p1) // 2)] + p2[len(p2) // 2:]
    if 600 <= len("\n\n".join(glued)) <= 3000:
      texts.append((h1, glued))
  texts = texts[:docs - near_dups]
  folder.mkdir(parents=True)
  for n, (header, paragraphs) in enumerate(texts):
    (folder / f"doc{n:06d}.html").write_text(page(header, paragraphs), encoding="utf-8")
  planted = {}
  for n, original in enumerate(rng.sample(range(len(texts)), near_dups)):
    header, paragraphs = texts[original]
    copy = perturbed(paragraphs, rng)
    (folder / f"near{n:06d}.html").write_text(page(header, copy), encoding="utf-8")
    similarity = dedup.jaccard(dedup.shingle_hashes("\n\n".join(paragraphs)), dedup.shingle_hashes("\n\n".join(copy)))
    planted[f"near{n:06d}.html"] = (f"doc{original:06d}.html", similarity)
  return planted


def run_engine(engine: str, folder: Path, out: Path) -> None:
  """One engine, corpus on disk -> segments dataset; writes the kept doc ids and the report."""
  source = corpus.CorpusSource(path=str(folder))
  if ENGINES[engine] is None:
    from humpback_jax.data import tfds_datasets
    kept, report = corpus.prepare_local(source)
    tfds_datasets.write_segments_dataset(
        [dict(id=s.id, doc_id=s.doc_id, header=s.header or "", text=s.text) for s in kept], out / "data", "segments")
  else:
    from humpback_jax.data import corpus_beam
    _, report = corpus_beam.prepare_beam(source, {"beam_options": ENGINES[engine] + QUIET}, out / "data")
  from humpback_jax.data import tfds_datasets
  kept_docs = [r["doc_id"] for r in tfds_datasets.read_dataset(out / "data", "segments")]
  (out / "result.json").write_text(json.dumps(dict(report=report, kept_docs=kept_docs)))


def measure(engine: str, folder: Path, out: Path) -> dict:
  """Runs one engine in a child process: wall time, CPU time (all its processes) and the peak
  summed RSS of its process tree."""
  out.mkdir(parents=True)
  before = resource.getrusage(resource.RUSAGE_CHILDREN)
  start = time.perf_counter()
  child = subprocess.Popen([sys.executable, __file__, f"--run={engine}", f"--corpus={folder}", f"--workdir={out}"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  proc, peak = psutil.Process(child.pid), 0
  while child.poll() is None:
    try:
      tree = [proc, *proc.children(recursive=True)]
      peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
    except psutil.Error:
      pass
    time.sleep(0.1)
  if child.returncode:
    sys.exit(f"{engine}: exit code {child.returncode}; rerun with --run={engine!r} to see why")
  seconds = time.perf_counter() - start
  after = resource.getrusage(resource.RUSAGE_CHILDREN)  # waited-for descendants: Beam's workers too
  cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
  result = json.loads((out / "result.json").read_text())
  return dict(seconds=seconds, cpu_seconds=cpu, peak_mib=peak / 2**20, **result)


def recall(planted: dict, kept_docs: list[str], threshold: float) -> float:
  """Share of planted near-duplicate pairs (Jaccard >= threshold) left with one copy, among
  pairs with any copy kept (the filters treat both alike)."""
  kept = collections.Counter(kept_docs)
  pairs = [(copy, original) for copy, (original, similarity) in planted.items()
           if similarity >= threshold and (kept[copy] or kept[original])]
  return sum(not (kept[copy] and kept[original]) for copy, original in pairs) / max(len(pairs), 1)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--docs", type=int, default=20000)
  parser.add_argument("--near_dups", type=int, default=2000)
  parser.add_argument("--workdir", default="/tmp/corpus_bench")
  parser.add_argument("--run", help=argparse.SUPPRESS)
  parser.add_argument("--corpus", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.run:
    return run_engine(args.run, Path(args.corpus), Path(args.workdir))
  work = Path(args.workdir)
  shutil.rmtree(work, ignore_errors=True)
  planted = build(work / "corpus", args.docs, args.near_dups)
  megabytes = sum(p.stat().st_size for p in (work / "corpus").iterdir()) / 1e6
  similarities = sorted(s for _, s in planted.values())
  threshold = corpus.CORPUS_DEFAULTS["near_dup_threshold"]
  print(f"# {args.docs} documents ({megabytes:.1f} MB of HTML; {args.near_dups} planted near-duplicates, shingle Jaccard "
        f"{similarities[0]:.2f}-{similarities[-1]:.2f}, median {similarities[len(similarities) // 2]:.2f}, "
        f"{sum(s >= threshold for s in similarities)} at or over {threshold}); "
        f"{os.cpu_count()} CPUs, {cpu_model()}")
  print("| engine | wall s | docs/s | CPU s | docs per CPU-s | MB per CPU-s | peak RSS MiB (all processes) | kept | near-dups dropped | planted recall |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  kept_by_engine = {}
  for engine in ENGINES:
    r = measure(engine, work / "corpus", work / engine.replace(", ", "_").replace(" ", ""))
    kept_by_engine[engine] = r["kept_docs"]
    print(f"| {engine} | {r['seconds']:.0f} | {args.docs / r['seconds']:.0f} | {r['cpu_seconds']:.0f} | "
          f"{args.docs / r['cpu_seconds']:.0f} | {megabytes / r['cpu_seconds']:.2f} | {r['peak_mib']:.0f} | "
          f"{r['report']['kept']} | {r['report']['near_duplicate']} | {recall(planted, r['kept_docs'], threshold):.3f} |", flush=True)
  same = all(kept == kept_by_engine["local"] for kept in kept_by_engine.values())
  print(f"\nAll engines wrote the same segments in the same order: {'yes' if same else 'NO'}")


if __name__ == "__main__":
  main()
