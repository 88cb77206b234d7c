"""The generation engine and sampling a run's config asks for: one setup shared by the pipeline's
generation stages and `humpback generate`."""
from __future__ import annotations

from humpback_jax import generate


def engine(cfg, model_cfg, params, layout) -> generate.Engine:
  """An engine on this process's devices (each process generates for its own shards alone), with
  the config's prompt buckets, batch size, too-long policy and scheduler (static or continuous, its
  slots, steps per call, prefill chunk and prefix reuse); empty prompts are skipped and counted."""
  g = cfg.generate
  options = {k: g[k] for k in ("scheduler", "decode_slots", "decode_steps", "prefill_chunk", "prefix_reuse",
                               "prefill_rows", "refill_slots") if k in g}
  return generate.process_local_engine(model_cfg, params, layout, prompt_buckets=tuple(g.prompt_buckets),
                                       batch_size=g.batch_size, too_long=g.too_long, on_empty="skip", **options)


def sampling(cfg, offset_seed: int = 0) -> generate.SamplingParams:
  """The config's sampling (the paper's nucleus sampling, T=0.7, top-p=0.9) and new-token budget."""
  g = cfg.generate
  return generate.SamplingParams(temperature=g.temperature, top_p=g.top_p, top_k=g.top_k,
                                 max_new_tokens=g.max_new_tokens, seed=g.seed + offset_seed)

