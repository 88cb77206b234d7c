"""Hugging Face LLaMA checkpoints (`config.json` + `*.safetensors`, sharded index included).

Import streams tensor by tensor: each of our parameters is built from a memory-mapped view of
its HF tensor and placed onto its sharding slice by slice, so no host ever holds a whole model.
Export writes HF names and layouts back; HF -> ours -> HF reproduces every tensor bit for bit.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable

import jax
import numpy as np

from humpback_jax import sharding
from humpback_jax.checkpoints import safetensors_io, weights_check
from humpback_jax.config import from_hf_config, head_dim, to_hf_config
from humpback_jax.errors import DataError
from humpback_jax.model import build, stacking

# (our path pattern, HF name pattern). `{i}` is the layer index.
NAME_TABLE = (
    ("embed", "model.embed_tokens.weight"),
    ("final_norm/scale", "model.norm.weight"),
    ("lm_head", "lm_head.weight"),
    ("layers/{i}/attn_norm/scale", "model.layers.{i}.input_layernorm.weight"),
    ("layers/{i}/mlp_norm/scale", "model.layers.{i}.post_attention_layernorm.weight"),
    ("layers/{i}/attn/q", "model.layers.{i}.self_attn.q_proj.weight"),
    ("layers/{i}/attn/k", "model.layers.{i}.self_attn.k_proj.weight"),
    ("layers/{i}/attn/v", "model.layers.{i}.self_attn.v_proj.weight"),
    ("layers/{i}/attn/o", "model.layers.{i}.self_attn.o_proj.weight"),
    ("layers/{i}/mlp/gate", "model.layers.{i}.mlp.gate_proj.weight"),
    ("layers/{i}/mlp/up", "model.layers.{i}.mlp.up_proj.weight"),
    ("layers/{i}/mlp/down", "model.layers.{i}.mlp.down_proj.weight"),
)


def hf_name(path: str) -> str:
  """The Hugging Face tensor name of one of our parameter paths (e.g. 'layers/3/attn/q')."""
  for ours, theirs in NAME_TABLE:
    m = re.fullmatch(ours.replace("{i}", r"(?P<i>\d+)"), path)
    if m:
      return theirs.replace("{i}", m.group("i")) if "i" in m.groupdict() else theirs
  raise KeyError(f"no Hugging Face name for parameter {path!r}")


def hf_shapes(cfg, our_paths) -> dict[str, tuple[str, tuple[int, ...]]]:
  """{HF tensor name: (our path, HF shape [out, in])} for our per-layer parameter paths."""
  h, heads, kv = head_dim(cfg), cfg.num_heads, cfg.num_kv_heads
  by_leaf = {"q": (heads * h, cfg.dim), "k": (kv * h, cfg.dim), "v": (kv * h, cfg.dim), "o": (cfg.dim, heads * h),
             "gate": (cfg.mlp_dim, cfg.dim), "up": (cfg.mlp_dim, cfg.dim), "down": (cfg.dim, cfg.mlp_dim),
             "embed": (cfg.vocab_size, cfg.dim), "lm_head": (cfg.vocab_size, cfg.dim), "scale": (cfg.dim,)}
  return {hf_name(p): (p, by_leaf[p.rsplit("/", 1)[-1]]) for p in our_paths}


def to_ours(path: str, w: np.ndarray, cfg) -> np.ndarray:
  """HF layout -> our layout (views only: transposes and reshapes of the mapped tensor)."""
  leaf = path.rsplit("/", 1)[-1]
  h = head_dim(cfg)
  if leaf in ("q", "k", "v"):
    return w.T.reshape(cfg.dim, -1, h)
  if leaf == "o":
    return w.T.reshape(-1, h, cfg.dim)
  if leaf in ("gate", "up", "down", "lm_head"):
    return w.T
  return w


def to_hf(path: str, w: np.ndarray) -> np.ndarray:
  """Our layout -> HF layout."""
  leaf = path.rsplit("/", 1)[-1]
  if leaf in ("q", "k", "v"):
    return w.reshape(w.shape[0], -1).T
  if leaf == "o":
    return w.reshape(-1, w.shape[-1]).T
  if leaf in ("gate", "up", "down", "lm_head"):
    return w.T
  return w


def flatten(tree, prefix="") -> dict[str, object]:
  """Nested param dict -> {'layers/0/attn/q': leaf, ...}."""
  out = {}
  for k, v in tree.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(flatten(v, key + "/"))
    else:
      out[key] = v
  return out


def per_layer_items(params):
  """(per-layer path, array) for every tensor, stacked parameters sliced one layer at a time on device."""
  for path, leaf in flatten(params).items():
    if path.startswith("layers/") and stacking.is_stacked(params):
      rest = path.removeprefix("layers/")
      yield from ((f"layers/{i}/{rest}", leaf[i]) for i in range(leaf.shape[0]))
    else:
      yield path, leaf


def unflatten(flat: dict[str, object]) -> dict:
  """{'layers/0/attn/q': leaf} -> nested dict (layer indices become ints, as NNX uses)."""
  out: dict = {}
  for key, v in flat.items():
    node = out
    parts = [int(p) if p.isdigit() else p for p in key.split("/")]
    for p in parts[:-1]:
      node = node.setdefault(p, {})
    node[parts[-1]] = v
  return out


def read_config(folder: Path):
  """Our model config from an HF folder's config.json."""
  path = Path(folder) / "config.json"
  if not path.exists():
    raise DataError(f"{path}: missing; a Hugging Face checkpoint folder needs config.json", path=path)
  try:
    return from_hf_config(json.loads(path.read_text()))
  except json.JSONDecodeError as e:
    raise DataError(f"{path}: not valid JSON ({e})", path=path) from None
  except KeyError as e:
    raise DataError(f"{path}: field {e.args[0]!r} is missing; a LLaMA config.json needs it", path=path,
                    field=str(e.args[0])) from None


def open_hf_tensors(folder: Path) -> dict[str, np.ndarray]:
  """Memory-mapped HF tensors by name, across a single file or a sharded index."""
  folder = Path(folder)
  index = folder / "model.safetensors.index.json"
  files = (sorted({confined(folder, f, index) for f in _weight_map(index).values()})
           if index.exists() else sorted(folder.glob("*.safetensors")))
  if not files:
    raise DataError(f"{folder}: no *.safetensors files found", path=folder)
  tensors = {}
  for f in files:
    tensors.update(safetensors_io.open_tensors(f))
  return tensors


def _weight_map(index: Path) -> dict:
  try:
    weight_map = json.loads(index.read_text())["weight_map"]
  except (ValueError, KeyError, TypeError) as e:
    raise DataError(f"{index}: not a safetensors index ({type(e).__name__}: {e}); it needs a 'weight_map' object",
                    path=index) from None
  if not isinstance(weight_map, dict):
    raise DataError(f"{index}: 'weight_map' must map tensor names to file names", path=index, field="weight_map")
  return weight_map


def confined(folder: Path, name, source: Path) -> Path:
  """`folder / name` for a file name read from `source`; DataError if it would leave `folder`."""
  path = (Path(folder) / str(name)).resolve()
  if not isinstance(name, str) or Path(name).is_absolute() or not path.is_relative_to(Path(folder).resolve()):
    raise DataError(f"{source}: path {name!r} points outside {folder}; a checkpoint may only name its own files",
                    path=source)
  return path


def load_params(folder: Path, cfg, layout: sharding.Layout, dtype=None):
  """Imports HF weights onto `layout`, tensor by tensor, after checking every tensor's name and shape
  against config.json; returns our nested params dict."""
  tensors = open_hf_tensors(folder)
  fields = weights_check.HF_FIELDS
  if "head_dim" not in json.loads((Path(folder) / "config.json").read_text()):
    fields = weights_check.derived_head_dim(fields)
  weights_check.check(str(folder), "config.json", cfg, {n: t.shape for n, t in tensors.items()},
                      hf_shapes(cfg, weights_check.per_layer_paths(cfg)), fields, ignore=weights_check.hf_buffer)
  return place(lambda path: tensors.get(hf_name(path)), cfg, layout, dtype, source=str(folder))


def place(get_hf_tensor: Callable[[str], np.ndarray | None], cfg, layout, dtype=None, source=""):
  """Builds every parameter from `get_hf_tensor(our_path)` (HF layout) straight into its sharding.

  `our_path` is always a per-layer path (`layers/3/attn/q`); a stacked parameter (scan_layers) is
  filled one layer at a time, each layer placed onto its share of the stack's sharding.
  """
  shardings = flatten(build.param_shardings(cfg, layout))
  abstract = flatten(build.abstract_params(cfg))
  out = {}
  for path, spec in abstract.items():
    target = np.dtype(dtype or spec.dtype)
    members = stacking.layer_paths(path, cfg)
    if members is None:
      out[path] = sharding.put_array(_host_view(get_hf_tensor, path, spec.shape, target, cfg, source),
                                     shardings[path])
      continue
    per_layer = stacking.layer_sharding(shardings[path])
    get_layer = lambda i: sharding.put_array(
        _host_view(get_hf_tensor, members[i], spec.shape[1:], target, cfg, source), per_layer)
    out[path] = stacking.stack_onto(get_layer, len(members), spec.shape, target, shardings[path])
  return unflatten(out)


def _host_view(get_hf_tensor, path, shape, dtype, cfg, source):
  """One tensor in our layout and `dtype` (cast lazily, slice by slice), checked against `shape`."""
  w = get_hf_tensor(path)
  if w is None:
    raise DataError(f"{source}: tensor {hf_name(path)!r} (for {path}) is missing", path=source, field=hf_name(path))
  w = to_ours(path, w, cfg)
  if tuple(w.shape) != tuple(shape):
    raise DataError(f"{source}: tensor {hf_name(path)!r} has shape {w.shape} after conversion, "
                    f"expected {tuple(shape)}", path=source, field=hf_name(path))
  return w if w.dtype == dtype else _LazyCast(w, dtype)


class _LazyCast:
  """Casts only the slice a device asks for, so a bf16 -> fp32 import never copies a whole tensor."""

  def __init__(self, array, dtype):
    self.array, self.dtype, self.shape = array, dtype, array.shape

  def __getitem__(self, idx):
    return np.asarray(self.array[idx]).astype(self.dtype)


def save(folder: Path, params, cfg, dtype=None, max_shard_bytes: int = 5 * 2**30) -> None:
  """Exports params to an HF folder: config.json and safetensors (sharded with an index when large)."""
  folder = Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  hf_cfg = to_hf_config(cfg)
  if dtype is not None:
    hf_cfg["torch_dtype"] = str(np.dtype(dtype))
  (folder / "config.json").write_text(json.dumps(hf_cfg, indent=2))
  shards, current, size = [], {}, 0
  for path, leaf in per_layer_items(params):
    w = to_hf(path, np.asarray(jax.device_get(leaf)))
    if dtype is not None:
      w = w.astype(dtype)
    if current and size + w.nbytes > max_shard_bytes:
      shards.append(current)
      current, size = {}, 0
    current[hf_name(path)] = w
    size += w.nbytes
  shards.append(current)
  if len(shards) == 1:
    safetensors_io.write(folder / "model.safetensors", shards[0], {"format": "pt"})
    return
  weight_map = {}
  for n, shard in enumerate(shards, 1):
    name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
    safetensors_io.write(folder / name, shard, {"format": "pt"})
    weight_map.update({k: name for k in shard})
  total = sum(w.nbytes for s in shards for w in s.values())
  (folder / "model.safetensors.index.json").write_text(
      json.dumps(dict(metadata=dict(total_size=total), weight_map=weight_map), indent=2))
