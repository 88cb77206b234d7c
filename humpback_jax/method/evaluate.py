"""AlpacaEval outputs: answers to the 805 evaluation prompts in AlpacaEval's JSON format.

Uses the paper's inference setting: both tags appended (seed tag, then web tag; a config's
`pipeline.inference_tags` chooses), nucleus sampling T=0.7, top-p 0.9.
"""
from __future__ import annotations

import json
from pathlib import Path

from humpback_jax import api, prompts, shards
from humpback_jax.errors import DataError
from humpback_jax.method import ablations

PAPER_INFERENCE_TAGS = (prompts.SEED_TAG, prompts.WEB_TAG)


def read_prompts(path: Path) -> list[dict]:
  """AlpacaEval records (a JSON list of {instruction, dataset, ...}); errors name the entry and field."""
  try:
    records = json.loads(Path(path).read_text(encoding="utf-8"))
  except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
    raise DataError(f"{path}: cannot read AlpacaEval prompts ({e})", path=path) from e
  if not isinstance(records, list):
    raise DataError(f"{path}: expected a JSON list of records", path=path)
  for i, r in enumerate(records):
    if not isinstance(r, dict) or not isinstance(r.get("instruction"), str):
      raise DataError(f"{path}: entry {i}: field 'instruction' missing or not a string", path=path, line=i,
                      field="instruction")
  return records


def write_model_outputs(checkpoint: Path, prompts_path: Path, output: Path, *, cfg=None, generator=None,
                        limit=None) -> int:
  """Generates an answer per prompt and writes `[{dataset, instruction, output, generator}]`."""
  records = read_prompts(prompts_path)[:limit]
  model = api.load(checkpoint)
  g = cfg.generate if cfg is not None else None
  tags = ablations.inference_tags(cfg) if cfg is not None else PAPER_INFERENCE_TAGS
  sep = cfg.pipeline.tag_separator if cfg is not None else prompts.TAG_SEPARATOR
  user_turns = [prompts.tagged_instruction(r["instruction"], tags, sep) for r in records]
  outputs = model.generate(user_turns, max_new_tokens=g.max_new_tokens if g else 512,
                           temperature=g.temperature if g else 0.7, top_p=g.top_p if g else 0.9,
                           seed=g.seed if g else 0)
  name = generator or Path(checkpoint).name
  rows = [dict(dataset=r.get("dataset", ""), instruction=r["instruction"], output=(o or "").strip(), generator=name)
          for r, o in zip(records, outputs)]
  shards.write_json_atomic(Path(output), rows)
  return len(rows)
