"""Memory planner: per-device bytes of a training or inference job, from shapes alone, and beside
it what XLA compiles for a real TPU topology (`compiled_report`, through aot.py).

Parameters, optimizer state, gradients and the KV cache are exact (each tensor's shard under the
mesh and rules); the step's other buffers and the activations are estimates fitted to XLA's figures
(below; within 5% for LLaMA-7B to 65B on v5p, bench/RESULTS.md). No weights are made.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
from jax.sharding import AbstractMesh

from humpback_jax import sharding
from humpback_jax.config import head_dim
from humpback_jax.engine import slots as slots_lib
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
  update_buffers: int = 0

  @property
  def total(self) -> int:
    return self.params + self.optimizer + self.gradients + self.update_buffers + self.activations + self.kv_cache

  @property
  def fits(self) -> bool:
    return self.total <= self.device_bytes

  def table(self) -> str:
    """A readable table of the plan."""
    rows = [("params", self.params), ("optimizer state", self.optimizer), ("gradients", self.gradients),
            ("update buffers (est.)", self.update_buffers), ("activations (est.)", self.activations),
            ("kv cache", self.kv_cache), ("total", self.total)]
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
         seq_len: int | None = None, prompt_len: int | None = None) -> Plan:
  """Plans `cfg` (model, mesh, train/generate) on `num_devices` devices of `device_gib` GiB each.
  Generation: `seq_len` cache slots of which `prompt_len` (default: all but generate.max_new_tokens)
  are the prompt."""
  shape = sharding.resolve_mesh_shape(cfg.mesh.shape, num_devices)
  mesh = AbstractMesh(shape, tuple(cfg.mesh.axes))
  layout = sharding.Layout(mesh)
  sharding.validate_model_on_mesh(cfg.model, mesh)
  m = cfg.model
  mesh_shape = dict(mesh.shape)
  data_ways = mesh_shape.get("data", 1) * mesh_shape.get("fsdp", 1)
  tensor = mesh_shape.get("tensor", 1)
  params = param_bytes_per_device(m, layout)
  compute = np.dtype(m.dtype).itemsize
  if mode == "train":
    batch = batch or cfg.train.batch_size
    seq = seq_len or cfg.train.seq_len
    optimizer = 2 * param_bytes_per_device(m, layout, np.float32)  # Adam mu and nu
    gradients = param_bytes_per_device(m, layout, np.float32)
    local = batch / data_ways
    activations = int(_activation_bytes(m, local, seq, compute, tensor))
    weights_cast = param_bytes_per_device(m, layout, m.dtype)
    update, kv = int(GRADIENT_COPIES * gradients + WEIGHT_CASTS * weights_cast), 0
  else:
    batch = batch or cfg.generate.batch_size
    seq = seq_len or m.max_seq_len
    prompt = prompt_len or max(seq - cfg.generate.max_new_tokens, 1)
    optimizer = gradients = update = 0
    kv_heads_local = m.num_kv_heads / (tensor if m.num_kv_heads % tensor == 0 else 1)
    slot_bytes = 2 * m.num_layers * kv_heads_local * head_dim(m) * compute  # one cache slot of one row
    if _continuous(cfg):
      c = continuous_shape(cfg, data_ways, prompt)
      batch, local = c.slots, c.slots / data_ways
      ring = local * (c.width + c.max_new) * slot_bytes
      kv = int(ring + (c.rows / data_ways + 1) * c.width * slot_bytes)  # + a prefill group and a stored prefix
      scores = PREFILL_SCORE_BUFFERS * c.rows / data_ways * m.num_heads / tensor * c.chunk * c.width * 4
      activations = int(max(scores, ring + params))
    else:
      local = batch / data_ways
      kv = int(local * seq * slot_bytes)
      activations = int(_generate_workspace(m, local, prompt, seq, tensor, params, kv))
  return Plan(mesh=mesh_shape, params=params, optimizer=optimizer, gradients=gradients, activations=activations,
              kv_cache=kv, global_batch=batch, per_device_batch=local, device_bytes=int(device_gib * GIB),
              update_buffers=update)


# Temporaries of the train step beyond the float32 gradients and the activations, fitted to XLA's
# for LLaMA-7B/13B/65B on v5p (bench/RESULTS.md, TPU slices): about two copies of the weight stack
# in the compute dtype (the optimised HLO holds the cast [layers, ...] stacks outside the layer scan)
# and a quarter of the gradients' bytes (their normalised copy and the Adam update, mostly fused).
WEIGHT_CASTS = 2.0
GRADIENT_COPIES = 0.25
# XLA's attention (prefill with a cache: no splash) holds ~3.3 float32 score buffers
# [rows, heads, prompt, cache] at its peak (scores, probabilities, their exponent), same source.
PREFILL_SCORE_BUFFERS = 3.3


def _activation_bytes(m, local_batch: float, seq: int, itemsize: int, tensor: int) -> float:
  """Estimate. Saved for the backward per layer and token: without remat the inputs of its matmuls
  and elementwise ops, ~10 x dim + 3 x mlp values, plus under XLA's attention (model.backend xla or
  cpu_kernels) the [heads, seq] probabilities (splash and cuDNN keep one log-sum-exp per head
  instead); with remat only the block input [b, s, d] per layer, plus about half of one layer's
  values while it is recomputed. Plus the float32 logits and their gradient."""
  tokens = local_batch * seq
  probs = m.num_heads / tensor * seq if m.get("backend", "auto") in ("xla", "cpu_kernels") else 0
  per_layer = tokens * ((10 * m.dim + 3 * m.mlp_dim / tensor) * itemsize + probs * 4)
  logits = 2 * tokens * m.vocab_size / tensor * 4
  if m.remat_policy == "none":  # scanned layers stack every residual: ~1.5x (LLaMA-7B on v5p, bench/RESULTS.md)
    return m.num_layers * per_layer * (1.5 if m.get("scan_layers", False) else 1.0) + logits
  return m.num_layers * tokens * m.dim * itemsize + per_layer / 2 + logits


def _generate_workspace(m, local_batch: float, prompt: int, cache_len: int, tensor: int, params: int,
                        kv: int) -> float:
  """Estimate of the larger of prefill's and decode's temporaries: prefill's float32 attention
  scores over the whole cache; decode's second copy of the cache (XLA copies the loop's carry) and
  of the weights."""
  scores = local_batch * m.num_heads / tensor * (prompt - 1) * cache_len * 4
  return max(PREFILL_SCORE_BUFFERS * scores, kv + params)


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


@dataclasses.dataclass(frozen=True)
class ContinuousShape:
  """The shapes the continuous engine compiles for prompts of one bucket."""
  slots: int      # decode slots (rows decoded at once)
  rows: int       # the largest prefill group
  chunk: int      # prompt tokens per prefill call
  width: int      # group cache slots (the bucket in whole chunks, plus one)
  max_new: int    # new tokens per row: the ring holds width + max_new slots
  steps: int      # decode steps per call


def _continuous(cfg) -> bool:
  return cfg.generate.get("scheduler", "static") == "continuous"


def continuous_shape(cfg, shards: int, prompt_len: int) -> ContinuousShape:
  """The continuous engine's shapes for the config's `generate` fields, `shards` batch shards (data x
  fsdp) and prompts of up to `prompt_len` tokens, as `engine.slots.Scheduler` picks them."""
  g = cfg.generate
  n = g.decode_slots or g.batch_size
  if n % shards:
    raise ConfigError(f"generate.decode_slots: {n} slots do not split over {shards} batch shards (data x fsdp)")
  return ContinuousShape(slots=n, rows=slots_lib.prefill_group_sizes(shards, g.prefill_rows, n)[-1],
                         chunk=g.prefill_chunk, width=slots_lib.group_width(prompt_len, g.prefill_chunk),
                         max_new=g.max_new_tokens, steps=g.decode_steps)


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
    estimate = plan(cfg, n, device_gib=hbm / GIB, mode=mode, batch=batch, seq_len=prompt - 1 + new,
                    prompt_len=prompt)
    est_flops = train.model_flops_per_token(cfg.model, prompt + new) / 3 * batch * (prompt + new)
  lines = [f"{topology} x {slices} slice(s): {n} x {chip.name} ({hbm / GIB:.0f} GiB HBM, "
           f"{chip.peak_flops / 1e12:.0f} TFLOP/s bf16 each)", "our estimate:", estimate.table(), ""]
  try:
    if mode == "train":
      programs = [aot.train_step(cfg, layout)]
    elif _continuous(cfg):
      c = continuous_shape(cfg, slots_lib.batch_shards(layout), prompt)
      lines += [f"continuous engine: {c.slots} decode slots ({c.width + c.max_new} each), prefill groups of "
                f"{c.rows} x {c.chunk} tokens into a {c.width}-slot group cache, {c.steps} steps per decode call", ""]
      programs = aot.continuous_programs(cfg, layout, **dataclasses.asdict(c))
    else:
      programs = aot.generate_programs(cfg, layout, batch=batch, prompt_len=prompt, max_new=new)
  except aot.DoesNotFit as e:
    used = f"{e.used / GIB:.1f} GiB > {e.limit / GIB:.1f} GiB" if e.used else f"more than {hbm / GIB:.1f} GiB"
    lines.append(f"XLA: the {e.name} ran out of HBM: {str(e).splitlines()[0][:300]}")
    if e.used and "temporaries" in str(e):
      temporaries = estimate.gradients + estimate.update_buffers + estimate.activations
      lines.append(f"our estimate / XLA of the temporaries: {temporaries / GIB:.1f} / {e.used / GIB:.1f} GiB = "
                   f"{temporaries / e.used:.2f}")
    return "\n".join(lines + [f"compiled: does not fit ({used} HBM per device)"]), False
  lines += ["XLA, per device | arguments | outputs | donated | temporaries | code | total GiB | compile s | "
            "cost_analysis TFLOP", "|---|---|---|---|---|---|---|---|---|"]
  g = lambda b: f"{b / GIB:.2f}"
  for p in programs:
    lines.append(f"| {p.name} | {g(p.arguments)} | {g(p.outputs)} | {g(p.aliases)} | {g(p.temporaries)} | "
                 f"{g(p.code)} | {g(p.total)} | {p.seconds:.0f} | {p.flops / 1e12:.3g} |")
  # XLA's cost_analysis counts a while loop's body once (a scanned layer stack, the decode loop) and
  # no Pallas kernel: the step time at peak comes from the model's FLOPs (100% MFU).
  xla_flops = sum(p.flops * n for p in programs)
  per_token = "6" if mode == "train" else "2"
  lines.append(f"FLOPs per {'step' if mode == 'train' else 'batch'}: {est_flops:.3e} (model: {per_token} x params x "
               f"tokens + attention); at peak {est_flops / (n * chip.peak_flops):.3g} s; "
               f"XLA's cost_analysis {xla_flops:.3e} (loop bodies once)")
  peak = max(p.total for p in programs)
  lines.append(f"our estimate / XLA: {estimate.total / GIB:.2f} / {peak / GIB:.2f} GiB = {estimate.total / peak:.2f}")
  fits = peak <= hbm
  verdict = f"fits ({g(peak)} GiB of {g(hbm)} GiB" if fits else f"does not fit ({g(peak)} GiB > {g(hbm)} GiB"
  return "\n".join(lines + [f"compiled: {verdict} HBM per device)"]), fits


def topology_size(topology: str, slices: int = 1) -> tuple[int, float]:
  """(devices, GiB of HBM per device) of a TPU topology, from libtpu's description and chips.py."""
  from humpback_jax import aot, chips
  devices = aot.topology_devices(topology, slices)
  return len(devices), chips.chip(devices[0].device_kind).hbm_bytes / GIB
