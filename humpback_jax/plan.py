"""Memory planner: per-device bytes of a training or inference job, from shapes alone, and beside
it what XLA compiles for a real TPU topology (`compiled_report`, through aot.py).

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
from humpback_jax.errors import ConfigError
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


def config_devices(cfg, devices: int | None = None) -> int:
  """The device count to plan for: `devices` when given, else the size of the config's own mesh."""
  if devices is not None:
    if devices < 1:
      raise ConfigError(f"--devices: must be at least 1, got {devices}")
    return devices
  shape = tuple(cfg.mesh.shape)
  if -1 in shape:
    raise ConfigError(f"mesh.shape: {shape} has a -1 axis, which takes its size from the devices; pass "
                      "--devices=N or --topology=v5p:2x2x2, or a mesh of fixed sizes (--config.mesh.shape='(1,8,1)')")
  return math.prod(shape)


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
  """Estimate. Saved for the backward per layer and token: without remat the inputs of its matmuls
  and elementwise ops, ~10 x dim + 3 x mlp values, plus under XLA's attention (model.backend xla or
  cpu_kernels) the [heads, seq] probabilities (splash and cuDNN keep one log-sum-exp per head
  instead); with remat only the block input [b, s, d], plus one layer's recompute peak. Plus the
  float32 logits and their gradient. Checked against XLA's compiled temporaries in bench/RESULTS.md."""
  tokens = local_batch * seq
  probs = m.num_heads / tensor * seq if m.get("backend", "auto") in ("xla", "cpu_kernels") else 0
  per_layer = tokens * ((10 * m.dim + 3 * m.mlp_dim / tensor) * itemsize + probs * 4)
  logits = 2 * tokens * m.vocab_size / tensor * 4
  if m.remat_policy == "none":  # scanned layers stack every residual: ~1.5x (LLaMA-7B on v5p, bench/RESULTS.md)
    return m.num_layers * per_layer * (1.5 if m.get("scan_layers", False) else 1.0) + logits
  return m.num_layers * tokens * m.dim * itemsize + per_layer + logits


def generate_shape(cfg, prompt_len: int | None = None) -> tuple[int, int, int]:
  """(batch, prompt tokens, new tokens) of a generation job: the config's batch and max_new_tokens,
  and by default the longest prompt bucket that leaves room for them."""
  g, limit = cfg.generate, cfg.model.max_seq_len - cfg.generate.max_new_tokens
  if prompt_len is None:
    prompt_len = max([b for b in g.prompt_buckets if b <= limit] or [limit])
  if not 2 <= prompt_len <= limit:
    raise ConfigError(f"--prompt-len: {prompt_len} must be in [2, {limit}] (model.max_seq_len - "
                      "generate.max_new_tokens)")
  return g.batch_size, prompt_len, g.max_new_tokens


def compiled_report(cfg, topology: str, slices: int = 1, mode: str = "train",
                    prompt_len: int | None = None) -> tuple[str, bool]:
  """Compiles the config's programs for a TPU topology; returns the report (our estimate, XLA's
  per-device memory and FLOPs, the step time at the chip's peak, and last the verdict) and whether
  it fits."""
  from humpback_jax import aot, chips, train
  layout = aot.topology_layout(cfg.mesh, aot.topology_devices(topology, slices))
  sharding.validate_model_on_mesh(cfg.model, layout.mesh)
  n = layout.mesh.devices.size
  chip = chips.chip(layout.mesh.devices.flat[0].device_kind)
  hbm = chip.hbm_bytes
  if mode == "train":
    batch, seq = cfg.train.batch_size, cfg.train.seq_len
    estimate = plan(cfg, n, device_gib=hbm / GIB, mode=mode)
    est_flops = train.model_flops_per_token(cfg.model, seq) * batch * seq
  else:
    batch, prompt, new = generate_shape(cfg, prompt_len)
    estimate = plan(cfg, n, device_gib=hbm / GIB, mode=mode, batch=batch, seq_len=prompt + new)
    est_flops = train.model_flops_per_token(cfg.model, prompt + new) / 3 * batch * (prompt + new)
  lines = [f"{topology} x {slices} slice(s): {n} x {chip.name} ({hbm / GIB:.0f} GiB HBM, "
           f"{chip.peak_flops / 1e12:.0f} TFLOP/s bf16 each)", "our estimate:", estimate.table(), ""]
  try:
    if mode == "train":
      programs = [aot.train_step(cfg, layout)]
    else:
      programs = aot.generate_programs(cfg, layout, batch=batch, prompt_len=prompt, max_new=new)
  except aot.DoesNotFit as e:
    used = f"{e.used / GIB:.1f} GiB > {e.limit / GIB:.1f} GiB" if e.used else f"more than {hbm / GIB:.1f} GiB"
    lines.append(f"XLA: the {e.name} ran out of HBM: {str(e).splitlines()[0][:300]}")
    return "\n".join(lines + [f"compiled: does not fit ({used} HBM per device)"]), False
  lines += ["XLA, per device | arguments | outputs | donated | temporaries | code | total GiB | compile s | TFLOP",
            "|---|---|---|---|---|---|---|---|---|"]
  g = lambda b: f"{b / GIB:.2f}"
  for p in programs:
    lines.append(f"| {p.name} | {g(p.arguments)} | {g(p.outputs)} | {g(p.aliases)} | {g(p.temporaries)} | "
                 f"{g(p.code)} | {g(p.total)} | {p.seconds:.0f} | {p.flops / 1e12:.3g} |")
  steps = {"train step": 1, "prefill": 1, "decode": new if mode == "generate" else 0}
  xla_flops = sum(p.flops * n * steps[p.name] for p in programs)  # XLA counts a while loop's body once
  lines.append(f"FLOPs per {'step' if mode == 'train' else 'batch'}: XLA {xla_flops:.3e} (remat recompute "
               f"included), our model estimate {est_flops:.3e}; at peak {xla_flops / (n * chip.peak_flops):.3g} s")
  peak = max(p.total for p in programs)
  fits = peak <= hbm
  verdict = f"fits ({g(peak)} GiB of {g(hbm)} GiB" if fits else f"does not fit ({g(peak)} GiB > {g(hbm)} GiB"
  return "\n".join(lines + [f"compiled: {verdict} HBM per device)"]), fits


def topology_size(topology: str, slices: int = 1) -> tuple[int, float]:
  """(devices, GiB of HBM per device) of a TPU topology, from libtpu's description and chips.py."""
  from humpback_jax import aot, chips
  devices = aot.topology_devices(topology, slices)
  return len(devices), chips.chip(devices[0].device_kind).hbm_bytes / GIB
