"""Weights checked against their config before any tensor is placed.

Every importer (HF folder, GGUF file, our folder) builds two name -> shape tables: the tensors the
file holds, and the tensors its config asks for. They must agree exactly: a tensor the config
asks for and the file lacks, a tensor the file holds that nothing would use (a fourth layer under
`num_hidden_layers: 3`, an output head under tied embeddings), or a shape that differs (a head
split of 8 x 16 over 4 x 32 weights when config.json gives head_dim) is a DataError naming the
tensor and the config field. The tables are per tensor name, so they hold for any parameter form.
"""
from __future__ import annotations

import re
from typing import Callable, Mapping

from humpback_jax.config import head_dim
from humpback_jax.errors import DataError

# Our model-config fields as each format names them (for messages).
HF_FIELDS = dict(vocab_size="vocab_size", dim="hidden_size", num_layers="num_hidden_layers",
                 num_heads="num_attention_heads", num_kv_heads="num_key_value_heads", head_dim="head_dim",
                 mlp_dim="intermediate_size", tie_embeddings="tie_word_embeddings")
GGUF_FIELDS = dict(vocab_size="token_embd.weight rows", dim="llama.embedding_length",
                   num_layers="llama.block_count", num_heads="llama.attention.head_count",
                   num_kv_heads="llama.attention.head_count_kv", head_dim="llama.attention.key_length",
                   mlp_dim="llama.feed_forward_length", tie_embeddings="output.weight (absent: tied)")
OURS_FIELDS = {k: f"model.{k}" for k in HF_FIELDS}


def derived_head_dim(fields: Mapping[str, str]) -> dict[str, str]:
  """`fields` for a config that does not state head_dim, which is then dim / num_heads: a wrong head
  count shows in the message as the fields that set the width."""
  return {**fields, "head_dim": f"({fields['dim']} / {fields['num_heads']})"}


def hf_buffer(name: str) -> bool:
  """Tensors HF LLaMA checkpoints may hold that are not weights: older exports saved each layer's
  rotary frequencies (`rotary_emb.inv_freq`), which the config's rope settings recompute."""
  return name.endswith(".rotary_emb.inv_freq")


def per_layer_paths(cfg) -> list[str]:
  """Our parameter paths, one per tensor of a per-layer (unstacked) checkpoint."""
  layer = ["attn_norm/scale", "mlp_norm/scale", "attn/q", "attn/k", "attn/v", "attn/o", "mlp/gate", "mlp/up", "mlp/down"]
  paths = ["embed", "final_norm/scale"] + ([] if cfg.tie_embeddings else ["lm_head"])
  return paths + [f"layers/{i}/{leaf}" for i in range(cfg.num_layers) for leaf in layer]


def check(source: str, config_file: str, cfg, found: Mapping[str, tuple], expected: Mapping[str, tuple[str, tuple]],
          fields: Mapping[str, str], ignore: Callable[[str], bool] = lambda name: False) -> None:
  """Raises DataError naming the tensor and field when `found` ({name: shape}) and `expected`
  ({name: (our path, shape)}) differ: a missing or unused tensor, or a shape."""
  missing = [n for n in expected if n not in found]
  if missing:
    name, (path, _) = missing[0], expected[missing[0]]
    more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
    raise DataError(f"{source}: tensor {name!r} (for {path}) is missing{more}; {_why_expected(path, cfg, fields, config_file)}",
                    path=source, field=name)
  unused = [n for n in found if n not in expected and not ignore(n)]
  if unused:
    raise DataError(f"{source}: {len(unused)} tensor(s) would be unused, e.g. {unused[:3]}; "
                    f"{_why_unused(unused, cfg, fields, config_file)}", path=source, field=unused[0])
  for name, (path, shape) in expected.items():
    have = tuple(int(d) for d in found[name])
    if have != tuple(shape):
      raise DataError(f"{source}: tensor {name!r} has shape {have}, but {config_file} gives {tuple(shape)} "
                      f"({_dims_explained(have, shape, cfg, fields, _stacked(path))}); fix {config_file} or use the "
                      "matching weights",
                      path=source, field=name)


def _why_expected(path: str, cfg, fields, config_file) -> str:
  if path == "lm_head":
    return f"{config_file} has {fields['tie_embeddings']} = false, so an output head is needed"
  if path.startswith("layers/"):
    return f"{config_file} has {fields['num_layers']} = {cfg.num_layers}"
  return "every LLaMA needs it"


def _why_unused(unused, cfg, fields, config_file) -> str:
  layers = sorted({int(m[1]) for n in unused if (m := re.search(r"(?:layers[./]|blk\.)(\d+)[./]", n))})
  if layers and layers[0] >= cfg.num_layers:
    return (f"{config_file} has {fields['num_layers']} = {cfg.num_layers} but the weights hold layers up to "
            f"{layers[-1]} ({layers[-1] + 1} layers)")
  if any(n in ("lm_head.weight", "output.weight", "lm_head") for n in unused):
    return f"{config_file} has {fields['tie_embeddings']} = true, but the weights hold a separate output head"
  return "no parameter of a LLaMA with this config reads them"


def _stacked(path: str) -> bool:
  """True for our stacked layer parameters (`layers/attn/q`, [layers, ...]; model.scan_layers)."""
  parts = path.split("/")
  return parts[0] == "layers" and len(parts) > 1 and not parts[1].isdigit()


def _dims_explained(have, want, cfg, fields, stacked=False) -> str:
  """Which config fields give the dimensions that differ, e.g. 'dim 0: num_attention_heads x head_dim = 8 x 32'."""
  h = head_dim(cfg)
  named: dict[int, list[str]] = {}
  if stacked and len(have) == len(want) and have[0] != want[0]:  # a stack's first dimension is its layers
    return f"dim 0: {fields['num_layers']} = {cfg.num_layers}"
  for value, text in ((cfg.num_heads * h, f"{fields['num_heads']} x {fields['head_dim']} = {cfg.num_heads} x {h}"),
                      (cfg.num_kv_heads * h, f"{fields['num_kv_heads']} x {fields['head_dim']} = {cfg.num_kv_heads} x {h}"),
                      (cfg.vocab_size, f"{fields['vocab_size']} = {cfg.vocab_size}"),
                      (cfg.mlp_dim, f"{fields['mlp_dim']} = {cfg.mlp_dim}"), (cfg.dim, f"{fields['dim']} = {cfg.dim}"),
                      (cfg.num_heads, f"{fields['num_heads']} = {cfg.num_heads}"),
                      (cfg.num_kv_heads, f"{fields['num_kv_heads']} = {cfg.num_kv_heads}"),
                      (h, f"{fields['head_dim']} = {h}"), (cfg.num_layers, f"{fields['num_layers']} = {cfg.num_layers}")):
    if text not in named.setdefault(value, []):
      named[value].append(text)
  if len(have) != len(want):
    return f"{len(want)} dimensions expected"
  return "; ".join(f"dim {i}: {' or '.join(named.get(w, [str(w)]))}" for i, (g, w) in enumerate(zip(have, want)) if g != w)
