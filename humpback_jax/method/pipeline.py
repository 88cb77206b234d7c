"""The Humpback method as stages that talk only through artifacts on disk.

prepare_seed -> prepare_corpus -> [pretrain] -> train_backward -> augment -> train_m0 -> curate_m0
-> train_m1 -> curate_m1 -> ... -> train_mT -> report

Each stage writes into `workdir/<stage>/` and finishes by writing `manifest.json` (config hash,
counts, timing, each output's record count and sha256; see artifacts.py). A rerun skips stages
with a manifest, a stage checks its inputs against their writers' manifests before using them,
and a killed stage resumes from what it left: training from its last checkpoint, generation
from its finished shards. A changed threshold (selection.FIELDS) re-selects a curate stage from
its stored scores, without judging, and every stage after it runs again.
"""
from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import jax

from humpback_jax import api, distributed, prompts, shards
from humpback_jax import tokenizer as tokenizer_lib
from humpback_jax.checkpoints import model_dir
from humpback_jax.errors import ConfigError
from humpback_jax.method import (ablations, artifacts, backtranslate, curate, engines, finetune, report, selection,
                                 sources)
from humpback_jax.method.artifacts import Candidate, CuratedPair, SeedPair, Segment
from humpback_jax.model import build


def stage_names(cfg) -> list[str]:
  """The ordered stages this config runs."""
  names = ["prepare_seed", "prepare_corpus"]
  if not cfg.base.checkpoint:
    names.append("pretrain")
  names += ["train_backward", "augment", "train_m0", "curate_m0"]
  for t in range(1, cfg.pipeline.iterations + 1):
    names.append(f"train_m{t}")
    if t < cfg.pipeline.iterations:
      names.append(f"curate_m{t}")
  return names + ["report"]


def config_hash(cfg) -> str:
  """A short hash of the run config but its selection fields; a stage refuses to reuse artifacts made
  under another (a changed threshold re-selects instead, see Run.run)."""
  return selection.judge_hash(cfg)


CONFIG_FILE = "config.json"  # the last run's config, so `humpback curate --workdir` needs no --config


class Run:
  """Paths, layout and tokenizer of one pipeline run; each stage is a method writing its folder."""

  def __init__(self, cfg, workdir: Path, layout, progress: bool = True):
    self.cfg, self.workdir, self.layout, self.progress = cfg, Path(workdir), layout, progress
    self.artifacts = artifacts.Workdir(self.workdir)
    self.tokenizer_path = Path(cfg.tokenizer.path or cfg.base.checkpoint)
    self.tokenizer = tokenizer_lib.load_tokenizer(self.tokenizer_path)
    self.hash = config_hash(cfg)
    ablations.check(cfg)
    self._outputs: dict = {}
    self._reselecting: set = set()  # curate stages whose stored scores were checked: only the selection changed

  # ------------------------------------------------------------------ bookkeeping

  def dir(self, stage: str) -> Path:
    return self.artifacts.stage(stage)

  def manifest(self, stage: str) -> dict | None:
    return self.artifacts.manifest(stage)

  def selection_of(self, name: str) -> dict | None:
    """The selection a stage depends on: the config's for curate_m0 and every stage after it."""
    names = stage_names(self.cfg)
    return selection.of(self.cfg) if names.index(name) >= names.index("curate_m0") else None

  def run(self, only: list[str] | None = None) -> None:
    """Runs the stages in `only` (default: all), skipping those already done; a curate stage whose
    selection changed re-selects from its stored scores, and every later stage runs again."""
    if jax.process_index() == 0:
      self.workdir.mkdir(parents=True, exist_ok=True)
      shards.write_json_atomic(self.workdir / CONFIG_FILE, json.loads(self.cfg.to_json()))
    upstream_changed = False
    for name in only or stage_names(self.cfg):
      done = self.manifest(name)
      if done is not None:
        if done["config_hash"] != self.hash:
          raise ConfigError(f"stage {name} in {self.workdir} was made with another config (hash "
                            f"{done['config_hash']} vs {self.hash}); use a new --workdir or --from={name}")
        if not upstream_changed and done.get("selection") == self.selection_of(name):
          print(f"[{name}] done already, skipped")
          continue
        self._invalidate(name, reselect=not upstream_changed and name.startswith("curate_m"))
      upstream_changed = True  # what this stage writes now is new to every stage after it
      print(f"[{name}] running")
      self.dir(name).mkdir(parents=True, exist_ok=True)
      start = time.time()
      self._outputs = {}
      counts = self._stage_fn(name)(name)
      if jax.process_index() == 0:
        artifacts.write_manifest(self.dir(name), stage=name, config_hash=self.hash, counts=counts,
                                 outputs=self._outputs, seconds=time.time() - start,
                                 selection=self.selection_of(name))
      print(f"[{name}] done in {round(time.time() - start, 2)} s: {json.dumps(counts)[:300]}")

  def _write(self, stage: str, name: str, records) -> None:
    """Writes one output of the running stage (process 0) and notes its digest for the manifest."""
    if jax.process_index() == 0:
      self._outputs[name] = artifacts.write_records(self.dir(stage) / name, records)

  def _invalidate(self, name: str, reselect: bool) -> None:
    """Forgets a finished stage: when it only re-selects, its manifest (its scores are kept, checked,
    for the new selection); else its whole folder (training would resume from old checkpoints)."""
    if reselect:
      self.artifacts.checked(name, artifacts.SCORES)  # read again, streamed, once the manifest is gone
      self._reselecting.add(name)
    distributed.barrier(f"{name}_read_before_invalidate")
    if jax.process_index() == 0:
      if reselect:
        (self.dir(name) / artifacts.MANIFEST).unlink()
      else:
        shutil.rmtree(self.dir(name))
    distributed.barrier(f"{name}_invalidate")
    print(f"[{name}] " + ("selection changed: re-selecting from the stored scores, no judge" if reselect
                          else "made from inputs that changed: running again"))

  def _stage_fn(self, name):
    for prefix in ("train_m", "curate_m"):
      if name.startswith(prefix):
        return getattr(self, "_" + prefix[:-2])
    return getattr(self, "_" + name)

  # ------------------------------------------------------------------ data stages

  def _prepare_seed(self, name):
    rows, stats = sources.seed_pairs(self.cfg)
    self._write(name, artifacts.SEED, [SeedPair(**r) for r in rows])
    sources.write_dataset(rows, self.workdir / "datasets", "seed", kind="pairs")
    return dict(seed_pairs=len(rows), **stats)

  def _prepare_corpus(self, name):
    report = sources.prepare_corpus_dataset(self.cfg, self.workdir / "datasets")
    distributed.barrier(f"{name}_dataset")  # augment reads it on every process
    if jax.process_index() == 0:
      self._outputs[artifacts.SEGMENTS] = artifacts.dataset_digest(self.workdir / "datasets", artifacts.SEGMENTS)
    return report

  # ------------------------------------------------------------------ model stages

  def _pretrain(self, name):
    texts = sources.pretraining_texts(self.cfg)
    p = self.cfg.pretrain
    examples = finetune.lm_examples(self.tokenizer, texts, p.seq_len)
    cfg = self._with_train(learning_rate=p.learning_rate, end_learning_rate=p.end_learning_rate,
                           warmup_steps=p.warmup_steps, schedule=p.schedule, dropout_rate=0.0,
                           seq_len=p.seq_len)
    init = lambda: build.init_params(self.cfg.model, self.layout, seed=self.cfg.train.seed)
    summary = finetune.run(cfg, self.layout, self.tokenizer, examples, init_params=init,
                           workdir=self.dir(name), steps=p.steps, batch_size=p.batch_size,
                           tokenizer_file=model_dir.tokenizer_file_of(self.tokenizer_path),
                           progress=self.progress, desc=name)
    self._note_model(name)
    return summary

  def _train_backward(self, name):
    seed = self.artifacts.read("prepare_seed", artifacts.SEED, SeedPair)
    pairs = [finetune.Pair(prompts.backward_instruction(r.output), r.instruction) for r in seed]
    return self._finetune(name, pairs, self._base_params)

  def _train(self, name):
    t = int(name.removeprefix("train_m"))
    seed = self.artifacts.read("prepare_seed", artifacts.SEED, SeedPair)
    curated = self.artifacts.read(f"curate_m{t - 1}", artifacts.CURATED, CuratedPair) if t else []
    pairs = ablations.training_pairs(self.cfg, seed, curated, t)
    start_stage = ablations.start_stage(self.cfg, t)
    start = self._base_params if start_stage is None else lambda: self._model_params(start_stage)
    return self._finetune(name, pairs, start)

  def _finetune(self, name, pairs, init_params):
    examples, stats = finetune.pair_examples(self.tokenizer, pairs, template=self.cfg.tokenizer.chat_template,
                                             seq_len=self.cfg.train.seq_len, policy=self.cfg.train.truncation)
    steps, batch = finetune.steps_and_batch(self.cfg.train, len(examples))
    summary = finetune.run(self.cfg, self.layout, self.tokenizer, examples, init_params=init_params,
                           workdir=self.dir(name), steps=steps, batch_size=batch,
                           tokenizer_file=model_dir.tokenizer_file_of(self.tokenizer_path),
                           progress=self.progress, desc=name)
    self._note_model(name)
    return dict(pairs=len(pairs), tokenize=stats.as_dict(), **summary)

  def _note_model(self, stage):
    if jax.process_index() == 0:
      self._outputs[artifacts.MODEL] = artifacts.folder_digest(self.dir(stage) / artifacts.MODEL)

  def _base_params(self):
    if self.cfg.base.checkpoint:
      _, params, _, _ = api.load_weights(Path(self.cfg.base.checkpoint), self.layout, fmt=self.cfg.base.format,
                                         scan_layers=self.cfg.model.scan_layers)  # the layer form training uses
      return params
    return self._model_params("pretrain")

  def _model_params(self, stage):
    path = self.artifacts.model(stage)
    return model_dir.restore_params(path, model_dir.read_meta(path)["model"], self.layout)

  # ------------------------------------------------------------------ generation stages

  def _engine(self, stage):
    """An engine on this process's devices: each process generates for its own shards alone."""
    return engines.engine(self.cfg, self.cfg.model, self._model_params(stage), self.layout)

  def _augment(self, name):
    # Streams end to end: each process loads only the segments of its own shards (a view), and process 0
    # merges the shards one at a time into the candidates file and dataset; no step holds the corpus.
    segments = self.artifacts.read_dataset("prepare_corpus", artifacts.SEGMENTS, Segment)
    engine = self._engine("train_backward")
    work = lambda batch, first: backtranslate.augment(engine, self.tokenizer, self.cfg, batch, first)
    timing = self._sharded(name, segments, work)
    counts = dict(segments=len(segments))
    if jax.process_index() == 0:
      statuses = dict.fromkeys(("ok", "empty", "skipped"), 0)
      self._write(name, artifacts.CANDIDATES, self._candidates(name, segments.ids, statuses))
      counts.update(candidates=self._outputs[artifacts.CANDIDATES]["records"], **statuses)
      self._write_dataset(name, artifacts.CANDIDATES, Candidate, artifacts.CANDIDATES_DATASET)
    distributed.barrier(f"{name}_dataset")  # curate reads it on every process
    return dict(counts, **timing, tokens_per_s=engine.stats.tokens_per_second, compiles=engine.stats.compiles,
                padding_share=engine.stats.padding_share)

  def _candidates(self, name, segment_ids, statuses: dict):
    """Streams the merged shards' candidate pairs (those with an instruction), counting each status."""
    where = f"{self.dir(name)}/{artifacts.SHARDS}"
    for row in shards.merged(self.dir(name) / artifacts.SHARDS, segment_ids):
      candidate = artifacts.from_dict(Candidate, row, where)
      statuses[candidate.status] += 1
      if candidate.instruction:
        yield candidate

  def _write_dataset(self, stage, file_name, cls, dataset):
    """Streams the stage's JSONL output `file_name` into tfds dataset `dataset` (process 0), noting its digest."""
    rows = (artifacts.as_dict(r) for r in artifacts.iter_records(self.dir(stage) / file_name, cls))
    if sources.write_dataset(rows, self.workdir / "datasets", dataset, kind="pairs") is not None:
      self._outputs[dataset] = artifacts.dataset_digest(self.workdir / "datasets", dataset)

  def _curate(self, name):
    t = int(name.removeprefix("curate_m"))
    # A view whose records load by index, as in augment; tfds holds no empty split: no candidates, no dataset.
    candidates = (self.artifacts.read_dataset("augment", artifacts.CANDIDATES_DATASET, Candidate)
                  if self.artifacts.finished("augment")["counts"]["candidates"] else [])
    c, sel = self.cfg.pipeline, selection.of(self.cfg)
    judged = dict(judged=False)
    if sel is not None and name not in self._reselecting:
      judged = self._judge(name, t, candidates)
    counts = dict(candidates=len(candidates), threshold_k=c.threshold_k, keep_top_fraction=c.keep_top_fraction,
                  mode=c.curation_mode)
    if jax.process_index() == 0:
      counts.update(self._select(name, t, candidates, sel, rescore=judged["judged"]))
    return dict(counts, **judged)

  def _select(self, name, t, candidates, sel, rescore: bool) -> dict:
    """Process 0: writes the scores (merged from the judge's shards, or kept as stored when only the
    selection changed) and the curated pairs at the selection's threshold, streaming both; holds one
    float per scored candidate (the top-fraction cut needs them all), never the scores or pairs."""
    mode, scores_path = self.cfg.pipeline.curation_mode, self.dir(name) / artifacts.SCORES
    if rescore:
      where = f"{self.dir(name)}/{artifacts.SHARDS}"
      ids = candidates.ids if len(candidates) else []  # no candidates: a plain empty list, not a view
      self._write(name, artifacts.SCORES, (artifacts.from_dict(artifacts.Score, r, where)
                                           for r in shards.merged(self.dir(name) / artifacts.SHARDS, ids)))
    elif sel is None:  # the uncurated control: seed + all of A, no judge
      self._write(name, artifacts.SCORES, [])
    else:  # judged under this same config, checked in _invalidate: only the selection changed
      self._outputs[artifacts.SCORES] = shards.digest(scores_path)
    scores = lambda: artifacts.iter_records(scores_path, artifacts.Score)
    values = sorted(v for s in scores() if (v := selection.value(s, mode)) is not None)
    unparsable = sum(s.score is None for s in scores())
    k = None if sel is None else curate.threshold_of_values(values, sel["threshold_k"], sel["keep_top_fraction"])
    kept = selection.kept(candidates, scores() if sel else None, sel, k)
    self._write(name, artifacts.CURATED, (CuratedPair(id=r.id, instruction=r.instruction, output=r.output, score=v,
                                                      header=r.header) for r, v in kept))
    curated = self._outputs[artifacts.CURATED]["records"]
    self._write_dataset(name, artifacts.CURATED, CuratedPair, f"curated_{t + 1}")
    spread = dict(score_min=values[0], score_median=values[len(values) // 2], score_max=values[-1]) if values else {}
    if len(candidates) and not curated:  # say it loudly: the next model would silently train on the seed alone
      seen = f"{mode} scores {values[0]:.2f}-{values[-1]:.2f}" if values else "no candidate was scored"
      print(f"[{name}] warning: no candidate reached threshold_k={self.cfg.pipeline.threshold_k} ({seen}); "
            f"train_m{t + 1} trains on the seed alone", file=sys.stderr)
    return dict(curated=curated, threshold_used=k, unparsable=unparsable, **spread)

  def _judge(self, name, t, candidates):
    """Every candidate's score from M_t, in resumable shards on every process; returns the judge's counts."""
    engine = self._engine(f"train_m{t}")
    if self.cfg.pipeline.curation_mode == "expected":
      work = lambda batch, first: curate.score_candidates_by_expectation(engine, self.tokenizer, self.cfg, batch)
    else:
      work = lambda batch, first: curate.score_candidates_by_generation(engine, self.tokenizer, self.cfg, batch, first)
    timing = self._sharded(name, candidates, work)
    return dict(judged=True, **timing, tokens_per_s=engine.stats.tokens_per_second, compiles=engine.stats.compiles)

  def _sharded(self, name, records, work):
    """Runs `work` over this process's shards, then waits for every process (the merge reads all)."""
    timing = shards.run(records, work, self.dir(name) / artifacts.SHARDS, shard_size=self.cfg.generate.shard_size,
                        process_index=jax.process_index(), process_count=jax.process_count(),
                        desc=name, progress=self.progress)
    distributed.barrier(f"{name}_shards")
    return timing

  # ------------------------------------------------------------------ report

  def _report(self, name):
    return report.write(self.workdir, [n for n in stage_names(self.cfg) if n != "report"])

  def _with_train(self, **fields):
    cfg = self.cfg.copy_and_resolve_references()
    with cfg.unlocked():
      cfg.train.update(fields)
    return cfg


PIPELINE_SECTIONS = ("model", "mesh", "base", "tokenizer", "data", "corpus", "train", "generate", "pipeline")


def check_pipeline_config(cfg) -> None:
  """A ConfigError naming the sections a config lacks to run the whole method (a model-only config)."""
  missing = [name for name in PIPELINE_SECTIONS if name not in cfg]
  if not missing and not cfg.base.checkpoint and "pretrain" not in cfg:
    missing = ["pretrain (needed when base.checkpoint is empty)"]
  if missing == ["pretrain (needed when base.checkpoint is empty)"]:
    raise ConfigError("base.checkpoint: empty, and this config has no pretrain stage; name the base model, "
                      "e.g. --config.base.checkpoint=/ckpt/llama-7b-hf (our checkpoint folder, a Hugging Face "
                      "folder or a .gguf file)")
  if missing:
    raise ConfigError(f"--config: not a pipeline config: it has no {', '.join(missing)} section(s); run the "
                      "method with a pipeline config (configs/humpback.py, configs/toy.py, configs/smollm2_135m.py) "
                      "and use model configs with `humpback train` or `humpback plan`")
  if not cfg.data.seed_path:
    raise ConfigError("data.seed_path: empty; name the seed set, e.g. --config.data.seed_path=/data/oasst1 "
                      "(an OASST export or (instruction, output) JSONL)")
  if not cfg.data.corpus_path and not cfg.data.get("corpus_tfds_name"):
    raise ConfigError("data.corpus_path: empty (and no data.corpus_tfds_name); name the unlabelled corpus, "
                      "e.g. --config.data.corpus_path=/data/web_segments (a folder, txt, JSONL or WARC)")


def select_stages(cfg, start: str | None, until: str | None) -> list[str]:
  """The stages between --from and --until (inclusive); unknown names fail listing the known ones."""
  names = stage_names(cfg)
  for flag, value in (("--from", start), ("--until", until)):
    if value is not None and value not in names:
      raise ConfigError(f"{flag}={value}: unknown stage; stages of this config: {', '.join(names)}")
  lo = names.index(start) if start else 0
  hi = names.index(until) + 1 if until else len(names)
  return names[lo:hi]


def run_pipeline(cfg, workdir: Path, layout, *, start: str | None = None, until: str | None = None,
                 progress: bool = True) -> Path:
  """Runs (or resumes) the method; `start` forces that stage and later ones to run again."""
  check_pipeline_config(cfg)
  run = Run(cfg, workdir, layout, progress)
  chosen = select_stages(cfg, start, until)
  if start and jax.process_index() == 0:
    for stage in stage_names(cfg)[stage_names(cfg).index(start):]:
      shutil.rmtree(run.dir(stage), ignore_errors=True)
  run.run(chosen)
  return Path(workdir) / "report" / "report.md"


def saved_config(workdir: Path):
  """The config the last pipeline run in `workdir` used (its config.json), unlocked."""
  import ml_collections
  path = Path(workdir) / CONFIG_FILE
  if not path.exists():
    raise ConfigError(f"{path} does not exist: pass --config, or run `humpback pipeline` in this workdir first")
  try:
    return ml_collections.ConfigDict(json.loads(path.read_text()))
  except json.JSONDecodeError as e:
    raise ConfigError(f"{path}: not valid JSON ({e}); pass --config with the run's config file") from None


def reselect(cfg, workdir: Path, layout, stage: str, *, k: float | None = None,
             keep_top_fraction: float | None = None, progress: bool = True) -> Path:
  """Applies threshold `k` to curate `stage` from its stored scores (no judge), then runs every later stage."""
  names = stage_names(cfg)
  if stage not in names or not stage.startswith("curate_m"):
    raise ConfigError(f"--stage={stage}: not a curate stage of this config; curate stages: "
                      f"{', '.join(n for n in names if n.startswith('curate_m'))}")
  if artifacts.read_manifest(Path(workdir) / stage) is None:
    raise ConfigError(f"{Path(workdir) / stage}: not judged yet (no {artifacts.MANIFEST}); run "
                      f"`humpback pipeline --until={stage}` first")
  cfg = cfg.copy_and_resolve_references()
  with cfg.unlocked():
    if k is not None:
      cfg.pipeline.threshold_k = float(k)
    if keep_top_fraction is not None:
      cfg.pipeline.keep_top_fraction = float(keep_top_fraction)
  Run(cfg, workdir, layout, progress).run(names[names.index(stage):])
  return Path(workdir) / "report" / "report.md"
