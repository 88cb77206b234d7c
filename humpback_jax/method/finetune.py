"""One fine-tuning run of the method (M_yx, M_0, M_1, ...): pairs -> tokens -> train -> model folder.

Also the toy base model's pretraining, which is the same loop with the loss on every token.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Callable, Sequence

import jax
import numpy as np

from humpback_jax import train, train_loop
from humpback_jax.checkpoints import model_dir
from humpback_jax.data import sft
from humpback_jax import prompts
from humpback_jax.tokenizer import render_chat


@dataclasses.dataclass
class Pair:
  """One training example: the user turn, the answer, and the tags appended to the user turn after `sep`."""
  instruction: str
  output: str
  tags: Sequence[str] = ()
  sep: str = prompts.TAG_SEPARATOR


def pair_examples(tokenizer, pairs: Sequence[Pair], *, template: str, seq_len: int, policy: str):
  """Tokenised (tokens, loss_mask) examples with loss on the answers only, plus the counts."""
  stats = sft.TokenizeStats(policy=policy)
  examples = []
  for p in pairs:
    ex = sft.tokenize_example(tokenizer, prompts.tagged_instruction(p.instruction, p.tags, p.sep), p.output,
                              template=template, seq_len=seq_len, stats=stats)
    if ex is not None:
      examples.append(ex)
  return examples, stats


def lm_examples(tokenizer, texts: Sequence[str], seq_len: int):
  """Pretraining examples: each text as bos + tokens + eos, cut into pieces of `seq_len`, loss everywhere."""
  examples = []
  for text in texts:
    ids = tokenizer.encode_prompt(text) + [tokenizer.eos_id]
    for start in range(0, len(ids) - 1, seq_len):
      piece = np.asarray(ids[start:start + seq_len], np.int32)
      if len(piece) > 1:
        examples.append((piece, np.ones(len(piece), bool)))
  return examples


def run(cfg, layout, tokenizer, examples, *, init_params: Callable[[], dict], workdir: Path,
        steps: int, batch_size: int, tokenizer_file: Path, progress: bool = True, desc: str = "train") -> dict:
  """Trains on tokenised `examples` (resuming inside `workdir`), saves `workdir/model`; returns a summary.
  `desc` labels the progress bar (the stage's name in a pipeline)."""
  t = cfg.train
  train_cfg = t.copy_and_resolve_references()
  with train_cfg.unlocked():
    train_cfg.batch_size = batch_size
    train_cfg.micro_batches = min(train_cfg.micro_batches, batch_size)
  loader = sft.SFTLoader(examples, seq_len=t.seq_len, batch_size=batch_size, batching=t.batching,
                         seed=t.seed, process_index=jax.process_index(), process_count=jax.process_count(),
                         row_multiple=train_cfg.micro_batches * batch_ways(layout), pack_rows=t.pack_rows)
  result = train_loop.run(cfg.model, train_cfg, layout, loader, init_params, workdir,
                          total_steps=steps, seq_len=t.seq_len, progress=progress, desc=desc)
  model_dir.save(Path(workdir) / "model", result["params"], cfg.model, tokenizer_file=tokenizer_file,
                 chat_template=cfg.tokenizer.chat_template)
  return dict(examples=len(examples), steps=steps, batch_size=batch_size, batching=t.batching,
              epochs=round(loader.epochs(steps), 3), final_loss=result["final_loss"],
              resumed_from=result["resumed_from"], padding_efficiency=loader.efficiency())


def batch_ways(layout) -> int:
  """How many ways the mesh splits a batch's rows (the mesh axes the `batch` logical axis maps to)."""
  axes = dict(layout.rules).get("batch") or ()
  axes = (axes,) if isinstance(axes, str) else axes
  return math.prod(layout.mesh.shape.get(a, 1) for a in axes)


def steps_and_batch(train_cfg, num_examples: int) -> tuple[int, int]:
  """Steps (config's, or the paper's table when 0) and the paper's batch-size rule."""
  return (train_cfg.steps or train.paper_steps(num_examples),
          train.paper_batch_size(train_cfg, num_examples))


def chat_prompt(cfg, instruction: str) -> str:
  """The instruction in this run's chat template."""
  return render_chat(cfg.tokenizer.chat_template, instruction)
