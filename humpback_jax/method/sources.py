"""The pipeline's inputs: seed pairs and corpus segments from the files a config names, and
the versioned tfds datasets every artifact is also written as."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax

from humpback_jax.data import corpus, seed, tfds_datasets
from humpback_jax.errors import ConfigError, DataError


def seed_pairs(cfg) -> tuple[list[dict], dict]:
  """Seed (instruction, output) pairs per `cfg.data` (OASST trees/messages or plain JSONL) and counts."""
  d = cfg.data
  return seed.load_seed(d.seed_path, fmt=d.seed_format, n=d.seed_size, lang=d.seed_lang, seed=d.seed_shuffle)


def corpus_segments(cfg) -> tuple[list[dict], dict]:
  """Segments of the unlabeled corpus after filters and dedup (local engine), and the report."""
  d = cfg.data
  source = corpus.source_from_config(d)
  if cfg.corpus.engine != "local":
    raise ConfigError(f"corpus.engine={cfg.corpus.engine!r}: only 'local' runs in this version")
  kept, report = corpus.prepare_local(source, cfg.corpus)
  if not report["input"]:
    field = "data.corpus_tfds_name" if d.corpus_tfds_name else "data.corpus_path"
    raise DataError(f"{d.corpus_path or d.corpus_tfds_name}: the corpus is empty (no segments found; "
                    f"config field {field}; skipped files: {report['skipped_files']})",
                    path=d.corpus_path, field=field)
  return [dataclasses.asdict(s) for s in kept], report


def pretraining_texts(cfg) -> list[str]:
  """Plain text for the toy base model's pretraining: every corpus segment (before filters) and seed answer."""
  raw = corpus.raw_segments(corpus.source_from_config(cfg.data), cfg.corpus)
  texts = [f"{s.header}\n\n{s.text}" if s.header else s.text for s in raw]
  rows, _ = seed_pairs(cfg)
  return texts + [r["output"] for r in rows]


def read_jsonl(path: Path) -> list[dict]:
  """Every record of one of our own artifact files."""
  return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def write_dataset(rows: list[dict], data_dir: Path, name: str, kind: str) -> None:
  """Writes an artifact as a versioned tfds dataset (array_record), from process 0 only.

  A stage that runs again (after --from) rewrites its own version in place.
  """
  if jax.process_index() != 0 or not rows:  # tfds cannot hold an empty split; the JSONL artifact can
    return
  if kind == "pairs":
    tfds_datasets.write_pairs_dataset(
        [dict(id=r["id"], instruction=r["instruction"], output=r["output"], source=r.get("source", name),
              score=r.get("score")) for r in rows], data_dir, name, overwrite=True)
  else:
    tfds_datasets.write_segments_dataset(
        [dict(id=r["id"], doc_id=r["doc_id"], header=r.get("header") or "", text=r["text"]) for r in rows],
        data_dir, name, overwrite=True)
