"""Self-augmentation: the backward model M_yx writes the instruction each corpus segment answers."""
from __future__ import annotations

from humpback_jax import prompts
from humpback_jax.method import engines
from humpback_jax.method.artifacts import Candidate, Segment
from humpback_jax.tokenizer import render_chat


def backward_user_turn(cfg, segment_text: str) -> str:
  """The backward prompt for one segment, wrapped by the run's chat template."""
  return render_chat(cfg.tokenizer.chat_template, prompts.backward_instruction(segment_text))


def augment(engine, tokenizer, cfg, segments: list[Segment], index_offset: int) -> list[Candidate]:
  """Candidate pairs for a shard of segments, one per segment, in order.

  An empty or skipped generation keeps the row with instruction None, so it is counted, not lost.
  """
  ids = [tokenizer.encode_prompt(backward_user_turn(cfg, s.text)) for s in segments]
  outs = engine.generate_ids(ids, engines.sampling(cfg), eos_ids=[tokenizer.eos_id], index_offset=index_offset)
  rows = []
  for seg, out in zip(segments, outs):
    text = tokenizer.decode(out).strip() if out is not None else ""
    rows.append(Candidate(id=seg.id, instruction=text or None, output=seg.text, header=seg.header or "",
                          status="ok" if text else ("skipped" if out is None else "empty")))
  return rows
