"""The paper's ablation switches as pure functions of the config: which tags, which data, which start.

`pipeline.train_tags` / `pipeline.inference_tags`: none | seed | web | both (paper: both; at inference
the seed tag comes first), appended after `pipeline.tag_separator`. `pipeline.iterations`: T. `pipeline.fresh_from_base`: every M_t starts from
the base model (paper) or continues from M_{t-1}. `pipeline.curation_mode="none"`: the uncurated
control, M_t trained on the seed plus all of A.
"""
from __future__ import annotations

from typing import Sequence

from humpback_jax.errors import ConfigError
from humpback_jax import prompts
from humpback_jax.method.finetune import Pair

TAG_CHOICES = ("none", "seed", "web", "both")
CURATION_MODES = ("generate", "expected", "none")


def _check(field: str, value: str, choices: Sequence[str]) -> str:
  if value not in choices:
    raise ConfigError(f"pipeline.{field}: {value!r} is not one of {', '.join(choices)}")
  return value


def tags_of(field: str, choice: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """(tags of seed pairs, tags of augmented pairs) that `choice` switches on."""
  _check(field, choice, TAG_CHOICES)
  seed = (prompts.SEED_TAG,) if choice in ("seed", "both") else ()
  web = (prompts.WEB_TAG,) if choice in ("web", "both") else ()
  return seed, web


def inference_tags(cfg) -> tuple[str, ...]:
  """The tags appended to an instruction at evaluation: the seed tag, then the web tag (paper: both)."""
  seed, web = tags_of("inference_tags", cfg.pipeline.inference_tags)
  return seed + web


def training_pairs(cfg, seed_rows: Sequence, curated_rows: Sequence, t: int) -> list[Pair]:
  """M_t's training pairs: the seed alone for t = 0 (tagged `seed_only_tags`), else the seed plus
  the curated set of iteration t, each part tagged as `pipeline.train_tags` says."""
  c = cfg.pipeline
  pair = lambda r, tags: Pair(_field(r, "instruction"), _field(r, "output"), tuple(tags), c.tag_separator)
  if t == 0:
    return [pair(r, c.seed_only_tags) for r in seed_rows]
  seed_tags, web_tags = tags_of("train_tags", c.train_tags)
  return [pair(r, seed_tags) for r in seed_rows] + [pair(r, web_tags) for r in curated_rows]


def _field(record, name: str):
  return record[name] if isinstance(record, dict) else getattr(record, name)


def start_stage(cfg, t: int) -> str | None:
  """The stage whose model M_t starts from: None for the base model (t = 0, or fresh_from_base)."""
  return None if t == 0 or cfg.pipeline.fresh_from_base else f"train_m{t - 1}"


def curation_mode(cfg) -> str:
  """generate | expected (judge, then threshold) or none (keep all of A: the uncurated control)."""
  return _check("curation_mode", cfg.pipeline.curation_mode, CURATION_MODES)


def check(cfg) -> None:
  """Every switch names a known choice and T >= 1."""
  tags_of("train_tags", cfg.pipeline.train_tags)
  tags_of("inference_tags", cfg.pipeline.inference_tags)
  curation_mode(cfg)
  if int(cfg.pipeline.iterations) < 1:
    raise ConfigError(f"pipeline.iterations: {cfg.pipeline.iterations}; the method needs at least one "
                      "iteration (M_1); set 1 or more")
