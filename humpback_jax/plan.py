"""Memory planner: per-device bytes of a training or inference job, from shapes alone.

Parameters, optimizer state and gradients are exact (each tensor's shard under the mesh and
rules); activations and the KV cache are estimates documented below. No weights are made.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np
from jax.sharding import AbstractMesh

from humpback_jax import sharding
from humpback_jax.config import head_dim
from humpback_jax.model import build

GIB = 2**30


@dataclasses.dataclass
class Plan:
  """Per-device bytes by category, and whether they fit a device of `device_bytes`."""
  mesh: dict
  params: int
  optimizer: int
  gradients: int
  activations: int
  kv_cache: int
  global_batch: int
  per_device_batch: float
  device_bytes: int

  @property
  def total(self) -> int:
    return self.params + self.optimizer + self.gradients + self.activations + self.kv_cache

  @property
  def fits(self) -> bool:
    return self.total <= self.device_bytes

  def table(self) -> str:
    """A readable table of the plan."""
    rows = [("params", self.params), ("optimizer state", self.optimizer), ("gradients", self.gradients),
            ("activations (est.)", self.activations), ("kv cache", self.kv_cache), ("total", self.total)]
    lines = [f"mesh {self.mesh}; global batch {self.global_batch}, per device {self.per_device_batch:g}",
             "| per device | GiB |", "|---|---|"]
    lines += [f"| {name} | {b / GIB:.2f} |" for name, b in rows]
    verdict = "fits" if self.fits else "does NOT fit"
    lines.append(f"{verdict} in {self.device_bytes / GIB:.1f} GiB per device")
    return "\n".join(lines)


def shard_bytes(shape, spec, mesh_shape: dict, itemsize: int) -> int:
  """Bytes of one device's shard of an array of `shape` under a PartitionSpec."""
  n = 1
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
    n *= math.ceil(dim / math.prod(mesh_shape[a] for a in axes))
  return n * itemsize


def param_bytes_per_device(model_cfg, layout: sharding.Layout, dtype=None) -> int:
  """Exact per-device bytes of the parameters under `layout`."""
  from humpback_jax.checkpoints.hf import flatten
  axes = flatten(build.param_logical_axes(model_cfg))
  shapes = flatten(build.abstract_params(model_cfg))
  mesh_shape = dict(layout.mesh.shape)
  total = 0
  for path, s in shapes.items():
    itemsize = np.dtype(dtype or s.dtype).itemsize
    total += shard_bytes(s.shape, layout.spec(axes[path], s.shape), mesh_shape, itemsize)
  return total


def plan(cfg, num_devices: int, *, device_gib: float = 80.0, mode: str = "train", batch: int | None = None,
         seq_len: int | None = None) -> Plan:
  """Plans `cfg` (model, mesh, train/generate) on `num_devices` devices of `device_gib` GiB each."""
  shape = sharding.resolve_mesh_shape(cfg.mesh.shape, num_devices)
  mesh = AbstractMesh(shape, tuple(cfg.mesh.axes))
  layout = sharding.Layout(mesh)
  sharding.validate_model_on_mesh(cfg.model, mesh)
  m = cfg.model
  mesh_shape = dict(mesh.shape)
  data_ways = mesh_shape.get("data", 1) * mesh_shape.get("fsdp", 1)
  params = param_bytes_per_device(m, layout)
  compute = np.dtype(m.dtype).itemsize
  if mode == "train":
    batch = batch or cfg.train.batch_size
    seq = seq_len or cfg.train.seq_len
    optimizer = 2 * param_bytes_per_device(m, layout, np.float32)  # Adam mu and nu
    gradients = param_bytes_per_device(m, layout, np.float32)
    local = batch / data_ways
    activations = int(_activation_bytes(m, local, seq, compute, mesh_shape.get("tensor", 1)))
    kv = 0
  else:
    batch = batch or cfg.generate.batch_size
    seq = seq_len or m.max_seq_len
    optimizer = gradients = 0
    local = batch / data_ways
    kv_heads_local = m.num_kv_heads / (mesh_shape.get("tensor", 1) if m.num_kv_heads % mesh_shape.get("tensor", 1) == 0 else 1)
    kv = int(2 * m.num_layers * local * seq * kv_heads_local * head_dim(m) * compute)
    activations = int(local * seq * (m.dim * 4 + m.vocab_size * 4 / mesh_shape.get("tensor", 1)))
  return Plan(mesh=mesh_shape, params=params, optimizer=optimizer, gradients=gradients, activations=activations,
              kv_cache=kv, global_batch=batch, per_device_batch=local, device_bytes=int(device_gib * GIB))


def _activation_bytes(m, local_batch: float, seq: int, itemsize: int, tensor: int) -> float:
  """Estimate. Saved per layer: with full remat only the block input [b, s, d]; without remat
  roughly 10 x d + 3 x mlp + 2 x heads x s values per token. Plus one layer's recompute peak and
  the float32 logits and their gradient."""
  tokens = local_batch * seq
  per_layer_full = tokens * (10 * m.dim + 3 * m.mlp_dim / tensor + 2 * m.num_heads / tensor * seq) * itemsize
  saved = tokens * m.dim * itemsize if m.remat_policy != "none" else per_layer_full
  logits = 2 * tokens * m.vocab_size / tensor * 4
  return m.num_layers * saved + per_layer_full + logits
