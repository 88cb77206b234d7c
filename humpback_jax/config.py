"""The model config's schema (every field and its default), conversion from and to Hugging Face
`config.json`, and every static check of a run config (model, mesh, batch splits, curation share).

Every check here runs before anything is compiled and names the config field at fault. Loading a
config file is `configlib.py`; the presets the files build from are `configs/common.py`.
"""
from __future__ import annotations

import ml_collections

from humpback_jax import sharding
from humpback_jax.errors import ConfigError

BACKENDS = ("auto", "xla", "cpu_kernels", "pallas_tpu", "cudnn")  # what each means: model/ops.py
REMAT_POLICIES = ("none", "full", "dots_saveable", "dots_with_no_batch_dims_saveable")
DTYPES = ("float32", "bfloat16", "float16")


def model_config(**overrides) -> ml_collections.ConfigDict:
  """A LLaMA model config with every field present; `overrides` replace the defaults."""
  cfg = ml_collections.ConfigDict(dict(
      vocab_size=32000,
      dim=4096,
      num_layers=32,
      num_heads=32,
      num_kv_heads=32,
      head_dim=0,  # 0: dim // num_heads
      mlp_dim=11008,
      norm_eps=1e-6,
      rope_theta=10000.0,
      # LLaMA-3.1 style frequency scaling; factor 0 means off.
      rope_scaling=dict(factor=0.0, low_freq_factor=1.0, high_freq_factor=4.0,
                        original_max_position_embeddings=8192),
      max_seq_len=2048,
      tie_embeddings=False,
      dtype="float32",        # compute dtype
      param_dtype="float32",  # storage (master) dtype
      dropout_rate=0.0,       # applied after attention and MLP outputs, training only
      remat_policy="none",
      backend="auto",         # kernels (model/ops.py): auto = by the mesh's platform
      # Stacked layer params [layers, ...] run by jax.lax.scan: one layer compiled, not num_layers.
      scan_layers=False,
  ))
  for key, value in overrides.items():
    if key not in cfg:
      raise ConfigError(f"model.{key}: unknown model field (known: {', '.join(sorted(cfg))})")
    if key == "rope_scaling":
      cfg.rope_scaling.update(value)
    else:
      cfg[key] = value
  return cfg


def frozen(cfg) -> ml_collections.FrozenConfigDict:
  """A hashable, immutable view of `cfg` (equal configs give equal views, locked or not): what
  in-process caches of compiled programs and abstract models key on."""
  return ml_collections.FrozenConfigDict(cfg.to_dict() if isinstance(cfg, ml_collections.ConfigDict) else cfg)


def head_dim(cfg) -> int:
  """The per-head width: `head_dim` when set, else dim // num_heads."""
  return cfg.head_dim or cfg.dim // cfg.num_heads


def validate_model(cfg) -> None:
  """Raises ConfigError naming the field when the model config cannot describe a LLaMA."""
  for field in ("vocab_size", "dim", "num_layers", "num_heads", "num_kv_heads", "mlp_dim"):
    if int(cfg[field]) <= 0:
      raise ConfigError(f"model.{field}: must be positive, got {cfg[field]}")
  if cfg.num_heads % cfg.num_kv_heads:
    raise ConfigError(f"model.num_kv_heads: {cfg.num_kv_heads} does not divide "
                      f"model.num_heads={cfg.num_heads}")
  if not cfg.head_dim and cfg.dim % cfg.num_heads:
    raise ConfigError(f"model.num_heads: {cfg.num_heads} does not divide model.dim={cfg.dim}; "
                      "set model.head_dim explicitly")
  if head_dim(cfg) % 2:
    raise ConfigError(f"model.head_dim: rotary embeddings need an even head_dim, got {head_dim(cfg)}")
  for field, allowed in (("dtype", DTYPES), ("param_dtype", DTYPES),
                         ("backend", BACKENDS), ("remat_policy", REMAT_POLICIES)):
    value = cfg.get(field, "auto")  # a stored config may predate `backend`
    if value not in allowed:
      raise ConfigError(f"model.{field}: {value!r} is not one of {allowed}")
  if not 0.0 <= cfg.dropout_rate < 1.0:
    raise ConfigError(f"model.dropout_rate: must be in [0, 1), got {cfg.dropout_rate}")


def check(cfg, num_devices: int) -> None:
  """All static checks of a run config: model fields, mesh shape vs devices, heads vs tensor axis,
  batch splits, the curation share."""
  validate_model(cfg.model)
  shape = sharding.resolve_mesh_shape(cfg.mesh.shape, num_devices)
  sharding.validate_model_on_mesh(cfg.model, dict(zip(cfg.mesh.axes, shape)))
  if "train" in cfg:
    t = cfg.train
    if t.micro_batches < 1 or t.batch_size % t.micro_batches:
      raise ConfigError(f"train.micro_batches: {t.micro_batches} must divide train.batch_size={t.batch_size}")
    data_ways = 1
    for axis, size in zip(cfg.mesh.axes, shape):
      if axis in ("data", "fsdp"):
        data_ways *= size
    if (t.batch_size // t.micro_batches) % data_ways:
      raise ConfigError(f"train.batch_size: a micro-batch of {t.batch_size // t.micro_batches} examples "
                        f"cannot be split over {data_ways} data-parallel devices (mesh.shape)")
    if t.seq_len > cfg.model.max_seq_len:
      raise ConfigError(f"train.seq_len: {t.seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len}")
  if "pipeline" in cfg and not 0 < cfg.pipeline.keep_top_fraction <= 1:
    raise ConfigError(f"pipeline.keep_top_fraction: must be in (0, 1], got {cfg.pipeline.keep_top_fraction}")


def from_hf_config(hf: dict) -> ml_collections.ConfigDict:
  """Builds our model config from a Hugging Face LLaMA `config.json` dict."""
  scaling = hf.get("rope_scaling") or {}
  rope_theta = hf.get("rope_theta", (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0))
  if not scaling and isinstance(hf.get("rope_parameters"), dict):
    params = hf["rope_parameters"]
    if params.get("rope_type", "default") != "default":
      scaling = params
  if scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "llama3", "default"):
    raise ConfigError(f"config.json rope_scaling: type {scaling.get('rope_type')!r} is not supported "
                      "(supported: llama3)")
  num_heads = hf["num_attention_heads"]
  cfg = model_config(
      vocab_size=hf["vocab_size"],
      dim=hf["hidden_size"],
      num_layers=hf["num_hidden_layers"],
      num_heads=num_heads,
      num_kv_heads=hf.get("num_key_value_heads") or num_heads,
      head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
      mlp_dim=hf["intermediate_size"],
      norm_eps=hf.get("rms_norm_eps", 1e-6),
      rope_theta=float(rope_theta),
      max_seq_len=hf.get("max_position_embeddings", 2048),
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
  )
  if scaling.get("rope_type", scaling.get("type")) == "llama3":
    cfg.rope_scaling.update(dict(
        factor=float(scaling["factor"]),
        low_freq_factor=float(scaling["low_freq_factor"]),
        high_freq_factor=float(scaling["high_freq_factor"]),
        original_max_position_embeddings=int(scaling["original_max_position_embeddings"])))
  if hf.get("attention_bias") or hf.get("mlp_bias"):
    raise ConfigError("config.json attention_bias/mlp_bias: biases are not supported by this LLaMA")
  return cfg


def to_hf_config(cfg) -> dict:
  """Our model config as a Hugging Face LlamaForCausalLM `config.json` dict."""
  hf = dict(
      architectures=["LlamaForCausalLM"], model_type="llama",
      vocab_size=cfg.vocab_size, hidden_size=cfg.dim, num_hidden_layers=cfg.num_layers,
      num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
      head_dim=head_dim(cfg), intermediate_size=cfg.mlp_dim, rms_norm_eps=cfg.norm_eps,
      rope_theta=cfg.rope_theta, max_position_embeddings=cfg.max_seq_len,
      tie_word_embeddings=cfg.tie_embeddings, hidden_act="silu", attention_bias=False,
      mlp_bias=False, torch_dtype=cfg.param_dtype)
  if cfg.rope_scaling.factor:
    hf["rope_scaling"] = dict(rope_type="llama3", factor=cfg.rope_scaling.factor,
                              low_freq_factor=cfg.rope_scaling.low_freq_factor,
                              high_freq_factor=cfg.rope_scaling.high_freq_factor,
                              original_max_position_embeddings=cfg.rope_scaling.original_max_position_embeddings)
  return hf
