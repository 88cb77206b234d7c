"""Self-augmentation: the backward model M_yx writes the instruction each corpus segment answers."""
from __future__ import annotations

from humpback_jax import generate
from humpback_jax import prompts
from humpback_jax.tokenizer import render_chat


def backward_user_turn(cfg, segment_text: str) -> str:
  """The backward prompt for one segment, wrapped by the run's chat template."""
  return render_chat(cfg.tokenizer.chat_template, prompts.backward_instruction(segment_text))


def sampling(cfg, offset_seed: int = 0) -> generate.SamplingParams:
  """The paper's nucleus sampling (T=0.7, top-p=0.9) and the run's new-token budget."""
  g = cfg.generate
  return generate.SamplingParams(temperature=g.temperature, top_p=g.top_p, top_k=g.top_k,
                                 max_new_tokens=g.max_new_tokens, seed=g.seed + offset_seed)


def augment(engine, tokenizer, cfg, segments: list[dict], index_offset: int) -> list[dict]:
  """Candidate pairs for a shard of segments: {id, instruction, output, segment header}.

  An empty or skipped generation keeps the row with instruction None, so it is counted, not lost.
  """
  ids = [tokenizer.encode_prompt(backward_user_turn(cfg, s["text"])) for s in segments]
  outs = engine.generate_ids(ids, sampling(cfg), eos_ids=[tokenizer.eos_id], index_offset=index_offset)
  rows = []
  for seg, out in zip(segments, outs):
    text = tokenizer.decode(out).strip() if out is not None else ""
    rows.append(dict(id=seg["id"], instruction=text or None, output=seg["text"], header=seg.get("header", ""),
                     status="ok" if text else ("skipped" if out is None else "empty")))
  return rows
