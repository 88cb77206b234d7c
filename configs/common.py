"""Shared pieces of every config: model sizes, mesh layouts, and the method's defaults.

Configs are data (big_vision style): `get_config(arg)` in each file builds a ConfigDict from
these presets. Every number the paper fixes sits here with the paper's value as default, except the
corpus filters', which `humpback_jax/data/corpus.py` (CORPUS_DEFAULTS) defines and checks. The model
config's schema and every check of a run config are `humpback_jax/config.py`.
"""
from __future__ import annotations

from importlib import resources

import ml_collections

from humpback_jax import prompts, tokenizer
from humpback_jax.config import model_config
from humpback_jax.errors import ConfigError

# Chat templates (defined in tokenizer.py), named here for the config files.
LLAMA2_INST = tokenizer.LLAMA2_INST
CHATML = tokenizer.CHATML  # SmolLM2's: its template adds a default system turn
# The embedded toy corpus, seed set and tokenizer.
TOY_ASSETS = resources.files("humpback_jax") / "assets" / "toy"


# Paper-size (accelerator) presets scan their layers (one layer compiled, not 32-80) and recompute each
# layer in the backward pass: without remat the scan stacks every layer's residuals, and LLaMA-7B's
# batch-32 x 2048 step needs 115 GiB of temporaries per v5p chip (XLA, 8 chips, fsdp). The small CPU
# presets (toy, bench20m, smollm2_135m) keep the layer list, where the CPU kernels' decode path applies.
def _llama1(dim, layers, heads, mlp):
  return dict(vocab_size=32000, dim=dim, num_layers=layers, num_heads=heads, num_kv_heads=heads,
              mlp_dim=mlp, norm_eps=1e-6, rope_theta=10000.0, max_seq_len=2048, scan_layers=True, remat_policy="full")


def _llama2(dim, layers, heads, kv, mlp):
  return dict(vocab_size=32000, dim=dim, num_layers=layers, num_heads=heads, num_kv_heads=kv,
              mlp_dim=mlp, norm_eps=1e-5, rope_theta=10000.0, max_seq_len=4096, scan_layers=True, remat_policy="full")


MODELS = {
    # ~1.3M parameters: the embedded pipeline runs end to end in minutes on 2 CPU cores.
    "toy": dict(vocab_size=2048, dim=128, num_layers=4, num_heads=4, num_kv_heads=2, mlp_dim=384,
                norm_eps=1e-5, rope_theta=10000.0, max_seq_len=2048),
    # ~20M parameters: the benchmark model (same shape family as toy, wider).
    "bench20m": dict(vocab_size=2048, dim=512, num_layers=6, num_heads=8, num_kv_heads=4, mlp_dim=1376,
                     norm_eps=1e-5, rope_theta=10000.0, max_seq_len=1024),
    "llama1_7b": _llama1(4096, 32, 32, 11008),
    "llama1_13b": _llama1(5120, 40, 40, 13824),
    "llama1_33b": _llama1(6656, 60, 52, 17920),
    "llama1_65b": _llama1(8192, 80, 64, 22016),
    "llama2_7b": _llama2(4096, 32, 32, 32, 11008),
    "llama2_13b": _llama2(5120, 40, 40, 40, 13824),
    "llama2_70b": _llama2(8192, 80, 64, 8, 28672),
    "llama3_8b": dict(vocab_size=128256, dim=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                      mlp_dim=14336, norm_eps=1e-5, rope_theta=500000.0, max_seq_len=8192, scan_layers=True, remat_policy="full"),
    "llama3.1_8b": dict(vocab_size=128256, dim=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                        mlp_dim=14336, norm_eps=1e-5, rope_theta=500000.0, max_seq_len=131072, scan_layers=True, remat_policy="full",
                        rope_scaling=dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                          original_max_position_embeddings=8192)),
    "smollm2_135m": dict(vocab_size=49152, dim=576, num_layers=30, num_heads=9, num_kv_heads=3,
                         mlp_dim=1536, norm_eps=1e-5, rope_theta=100000.0, max_seq_len=8192,
                         tie_embeddings=True),
}
MODELS["7b"], MODELS["13b"], MODELS["33b"], MODELS["65b"] = (
    MODELS["llama1_7b"], MODELS["llama1_13b"], MODELS["llama1_33b"], MODELS["llama1_65b"])

# Mesh layouts over (data, fsdp, tensor); -1 fills the rest of the devices.
MESHES = {
    "single": (1, 1, 1),
    "data": (-1, 1, 1),
    "fsdp": (1, -1, 1),
    "cpu8_data": (8, 1, 1),
    "cpu8_fsdp": (1, 8, 1),
    "cpu8_fsdp_tensor": (1, 4, 2),
    "gpu8": (1, 8, 1),               # one 8-GPU node: FSDP inside NVLink
    "gpu8_tensor": (1, 1, 8),        # one node, tensor parallel (fast decode of big models)
    "gpu_multinode": (-1, 8, 1),     # data parallel across nodes, FSDP inside each node
    "tpu_v4_32": (1, -1, 1),         # v4-32: 16 chips, FSDP
    "tpu_v5e_256": (-1, 16, 1),      # 256 chips: 16-way FSDP x data
    "tpu_v5p_64": (1, -1, 1),        # v5p-64: 32 chips, FSDP
    "tpu_v5p_128_tensor": (1, -1, 4),
    "tpu_two_slices": (2, -1, 1),    # two slices: data parallel over DCN, FSDP inside each slice
}


def model_preset(name: str, **overrides) -> ml_collections.ConfigDict:
  """The model config of a named size preset, with overrides."""
  if name not in MODELS:
    raise ConfigError(f"model preset {name!r} is unknown; known: {', '.join(sorted(MODELS))}")
  return model_config(**{**MODELS[name], **overrides})


def mesh_preset(name: str) -> ml_collections.ConfigDict:
  """The mesh config of a named layout preset."""
  if name not in MESHES:
    raise ConfigError(f"mesh preset {name!r} is unknown; known: {', '.join(sorted(MESHES))}")
  return ml_collections.ConfigDict(dict(axes=("data", "fsdp", "tensor"), shape=MESHES[name], preset=name))


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """big_vision style `file.py:key=value,flag` -> ConfigDict of `defaults` updated by the arg.

  A bare first token without '=' sets the first default (so `llama.py:7b` means variant=7b).
  """
  out = dict(defaults)
  if arg:
    for i, item in enumerate(t for t in arg.split(",") if t):
      if "=" in item:
        key, value = item.split("=", 1)
      elif i == 0:
        key, value = next(iter(defaults)), item
      else:
        key, value = item, True
      if key not in defaults:
        raise ConfigError(f"config arg {key!r} is unknown; known: {', '.join(defaults)}")
      out[key] = type(defaults[key])(value) if not isinstance(defaults[key], bool) else value in (True, "True", "true", "1")
  return ml_collections.ConfigDict(out)


def train_config(**overrides) -> ml_collections.ConfigDict:
  """The paper's SFT recipe (METHOD.md 'Fine-tuning'); fields marked open are our documented choices."""
  cfg = ml_collections.ConfigDict(dict(
      learning_rate=1e-5, end_learning_rate=9e-6,   # paper: linear 1e-5 -> 9e-6
      warmup_steps=0,                                # open
      schedule="paper_linear",                       # or any optax schedule name: cosine, constant
      weight_decay=0.1,                              # paper
      b1=0.9, b2=0.95, eps=1e-8,                     # open: AdamW betas
      grad_clip=1.0,                                 # open
      batch_size=32, small_data_batch_size=8, small_data_threshold=3000,  # paper: examples per step
      steps=0,                                       # 0: the paper's steps-by-data-size table
      micro_batches=1,                               # gradient accumulation
      seq_len=2048,                                  # open
      dropout_rate=0.1,                              # paper; applied on residual branches
      batching="packing",                            # or "bucketing"; either way a step has batch_size examples
      pack_rows="step",                              # open: rows per packed step: its own need (few shapes,
                                                     # little padding) or "block": the block's most (one shape)
      truncation="truncate",                         # or "drop": over-long examples
      compute_dtype="float32", param_dtype="float32",
      seed=0,
      log_every=10, checkpoint_every=100, keep_checkpoints=2,
      peak_flops=190e9,                              # MFU's peak per CPU device (bench/RESULTS.md; accelerators: chips.py)
      on_bad_record="raise",                         # or "skip" (counted)
  ))
  cfg.update(overrides)
  return cfg


def generate_config(**overrides) -> ml_collections.ConfigDict:
  """Decoding defaults: the paper's nucleus sampling T=0.7, top-p=0.9."""
  cfg = ml_collections.ConfigDict(dict(
      temperature=0.7, top_p=0.9, top_k=0, max_new_tokens=512, batch_size=32,
      prompt_buckets=(64, 128, 256, 512, 1024, 2048), seed=0,
      too_long="truncate_left",   # or "skip" (counted)
      shard_size=1024,            # records per output shard
      scheduler="static",         # or "continuous": decode slots refilled as rows stop, chunked prefill
      decode_slots=0,             # continuous: rows decoded at once (0 = batch_size)
      decode_steps=8,             # continuous: decode steps per jitted call between refills
      prefill_chunk=64,           # continuous: prompt tokens per prefill call
      prefill_rows=0,             # continuous: most prompts prefilled in one call (0 = decode slots)
      refill_slots=0,             # continuous: a decode call returns once this many slots are free
                                  # while prompts wait (0 = a quarter of the slots)
      prefix_reuse=True,          # continuous: a shared prompt prefix's KV is computed once per engine
  ))
  cfg.update(overrides)
  return cfg


def pipeline_config(**overrides) -> ml_collections.ConfigDict:
  """The loop of the method (METHOD.md 'Models and the loop'); paper values by default."""
  cfg = ml_collections.ConfigDict(dict(
      iterations=2,               # paper: two iterations (M_1, M_2)
      threshold_k=5.0,            # paper headline k=5 (k=4 also studied)
      keep_top_fraction=1.0,      # open: < 1 also caps the kept share at the best fraction (1 = paper)
      curation_mode="generate",   # paper-faithful; or "expected" (next-token probabilities of 1..5);
                                  # or "none": the paper's uncurated control (seed + all of A, no judge)
      judge_temperature=0.0,      # open: greedy judge, so a rerun gives the same scores
      judge_max_new_tokens=256,   # open
      fresh_from_base=True,       # paper: every M_t starts from the base model; False continues from M_{t-1}
      seed_only_tags=(),          # M_0 is trained on seed alone: no tags (the paper tags only mixtures)
      train_tags="both",          # paper: seed pairs get the seed tag, augmented the web tag; none|seed|web|both
      inference_tags="both",      # paper's best: seed tag then web tag appended at inference; none|seed|web|both
      tag_separator=prompts.TAG_SEPARATOR,  # open (a blank line): between the instruction and its tags (tags join with one space)
  ))
  cfg.update(overrides)
  return cfg


def data_config(**overrides) -> ml_collections.ConfigDict:
  """Where the seed set and the unlabeled corpus come from."""
  cfg = ml_collections.ConfigDict(dict(
      seed_path="", seed_format="auto", seed_size=3200, seed_lang="en", seed_shuffle=0,
      corpus_path="", corpus_tfds_name="", corpus_text_field="text", corpus_split="train"))
  cfg.update(overrides)
  return cfg
