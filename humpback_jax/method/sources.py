"""The pipeline's inputs: seed pairs and corpus segments from the files a config names, and
the versioned tfds datasets every artifact is also written as."""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from pathlib import Path

import jax

from humpback_jax.data import corpus, seed, tfds_datasets
from humpback_jax.errors import DataError


def seed_pairs(cfg) -> tuple[list[dict], dict]:
  """Seed (instruction, output) pairs per `cfg.data` (OASST trees/messages or plain JSONL) and counts."""
  d = cfg.data
  return seed.load_seed(d.seed_path, fmt=d.seed_format, n=d.seed_size, lang=d.seed_lang, seed=d.seed_shuffle)


def prepare_corpus_dataset(cfg, data_dir: Path) -> dict:
  """Prepares the `segments` dataset under `data_dir` with `corpus.engine`; returns the report.

  Both engines write the same records in the same order (`corpus.output_key`). The work runs on
  process 0 (Beam spreads it over its own workers); the others wait at the stage's barrier.
  """
  d = cfg.data
  field = "data.corpus_tfds_name" if d.corpus_tfds_name else "data.corpus_path"
  source = corpus.source_from_config(d)
  if cfg.corpus.engine == "beam":
    from humpback_jax.data import corpus_beam  # Apache Beam loads only when asked for
    report = corpus_beam.prepare_beam(source, cfg.corpus, data_dir, "segments")[1] if jax.process_index() == 0 else {}
  else:
    kept, report = corpus.prepare_local(source, cfg.corpus)
    if report["kept"]:
      write_dataset((dataclasses.asdict(s) for s in kept), data_dir, "segments", kind="segments")
  if jax.process_index() == 0 and not report["kept"]:
    what = "the corpus is empty (no segments found" if not report["input"] else "no segment passed the filters ("
    raise DataError(f"{d.corpus_path or d.corpus_tfds_name}: {what}; config field {field}; "
                    f"skipped files: {report['skipped_files']}; dropped: {report['dropped']})",
                    path=d.corpus_path, field=field)
  return dict(report, engine=cfg.corpus.engine)


def pretraining_texts(cfg) -> list[str]:
  """Plain text for the toy base model's pretraining: every corpus segment (before filters) and seed answer."""
  raw = corpus.raw_segments(corpus.source_from_config(cfg.data), cfg.corpus)
  texts = [f"{s.header}\n\n{s.text}" if s.header else s.text for s in raw]
  rows, _ = seed_pairs(cfg)
  return texts + [r["output"] for r in rows]


def write_dataset(rows: Iterable[dict], data_dir: Path, name: str, kind: str) -> Path | None:
  """Streams an artifact into a versioned tfds dataset (array_record) from process 0 only; returns its
  folder, None elsewhere or when there are no rows (tfds holds no empty split; the JSONL artifact can).

  A stage that runs again (after --from) rewrites its own version in place.
  """
  if jax.process_index() != 0:
    return None
  if kind == "pairs":
    path = tfds_datasets.write_pairs_dataset(
        (dict(id=r["id"], instruction=r["instruction"], output=r["output"], source=r.get("source", name),
              score=r.get("score"), header=r.get("header")) for r in rows), data_dir, name, overwrite=True)
  else:
    path = tfds_datasets.write_segments_dataset(
        (dict(id=r["id"], doc_id=r["doc_id"], header=r.get("header") or "", text=r["text"]) for r in rows),
        data_dir, name, overwrite=True)
  return None if path is None else Path(path)
