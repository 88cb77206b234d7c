"""Ahead-of-time compilation of our real programs for a TPU topology, from any host (MaxText's
`train_compile.py` idea): XLA's per-device memory and FLOPs before a slice is ever rented.

`jax.experimental.topologies` describes a slice (`v5p:2x2x2`, `v5e:16x16`, ...) without its chips;
a mesh over those devices compiles the train step, or prefill + decode, exactly as the run would
(same shardings, same backend resolution: splash attention on TPU). libtpu must be installed
(`pip install -e .[tpu]`); a process beside another that loads it needs ALLOW_MULTIPLE_LIBTPU_LOAD=1.
"""
from __future__ import annotations

import dataclasses
import functools
import re
import time

import jax
import jax.numpy as jnp
import numpy as np

from humpback_jax import chips, sharding
from humpback_jax.errors import ConfigError
from humpback_jax.model import build
from humpback_jax.model import cache as kv_cache

EXAMPLE_TOPOLOGIES = "v4:2x2x1, v5e:2x2, v5e:16x16, v5p:2x2x2, v6e:2x4"


def topology_devices(name: str, num_slices: int = 1) -> list:
  """The devices of a TPU topology `name` (e.g. v5p:2x2x2) times `num_slices`, chips not needed."""
  from jax.experimental import topologies
  kwargs = dict(chip_config_name="megacore") if name.startswith("v4") else {}
  try:
    return list(topologies.get_topology_desc(topology_name=name, platform="tpu", num_slices=num_slices,
                                             **kwargs).devices)
  except ImportError as e:
    raise ConfigError(f"--topology: libtpu is not installed ({e}); pip install -e '.[tpu]'") from e
  except Exception as e:  # libtpu's errors are XlaRuntimeErrors with the reason in their text
    raise ConfigError(f"--topology: {name!r} with {num_slices} slice(s) is not a TPU topology libtpu knows "
                      f"({str(e).splitlines()[0][:200]}); examples: {EXAMPLE_TOPOLOGIES}") from e


def topology_layout(mesh_cfg, devices) -> sharding.Layout:
  """The config's mesh (one axis may be -1) over topology devices; slices outermost along it."""
  devices = sorted(devices, key=lambda d: (getattr(d, "slice_index", 0) or 0, d.id))
  shape = sharding.resolve_mesh_shape(mesh_cfg.shape, len(devices))
  mesh = jax.sharding.Mesh(np.array(devices, dtype=object).reshape(shape), tuple(mesh_cfg.axes),
                           axis_types=(jax.sharding.AxisType.Auto,) * len(shape))
  return sharding.Layout(mesh)


@dataclasses.dataclass
class Compiled:
  """XLA's figures for one compiled program, per device."""
  name: str
  arguments: int
  outputs: int
  aliases: int
  temporaries: int
  code: int
  flops: float           # per device per call, from cost_analysis
  seconds: float         # compile time
  program: object = dataclasses.field(repr=False, default=None)  # jax's Compiled: shardings, HLO text

  @property
  def total(self) -> int:
    """Bytes live at the peak: arguments + outputs (minus donated aliases) + temporaries + code."""
    return self.arguments + self.outputs - self.aliases + self.temporaries + self.code


class DoesNotFit(Exception):
  """XLA refused a program: it needs more HBM than the chip has (`used` of `limit` bytes, when said)."""

  def __init__(self, name: str, message: str):
    super().__init__(message)
    self.name = name
    found = (re.search(r"Used ([\d.]+)([KMGT])? of ([\d.]+)([KMGT])? hbm", message)
             or re.search(r"\(([\d.]+)([KMGT])?\) exceeds available HBM \(([\d.]+)([KMGT])?\)", message))
    scale = dict(K=2**10, M=2**20, G=2**30, T=2**40)
    self.used = self.limit = None
    if found:
      self.used = float(found.group(1)) * scale.get(found.group(2), 1)
      self.limit = float(found.group(3)) * scale.get(found.group(4), 1)


def compile_program(name: str, jitted, *args) -> Compiled:
  """Lowers and compiles `jitted` for shape-only `args`; DoesNotFit where XLA runs out of HBM."""
  start = time.perf_counter()
  lowered = jitted.lower(*args)
  try:
    compiled = lowered.compile()
  except Exception as e:  # XlaRuntimeError; the class moved between jax versions
    if "RESOURCE_EXHAUSTED" in str(e) or "exceeds" in str(e) and "HBM" in str(e).upper():
      raise DoesNotFit(name, str(e)) from e
    raise
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return Compiled(name, memory.argument_size_in_bytes, memory.output_size_in_bytes, memory.alias_size_in_bytes,
                  memory.temp_size_in_bytes, memory.generated_code_size_in_bytes, float((cost or {}).get("flops", 0.0)),
                  time.perf_counter() - start, compiled)


def _shaped(tree, shardings):
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), tree, shardings)


def train_step(cfg, layout: sharding.Layout) -> Compiled:
  """The config's train step (model, optimizer, batch, micro-batches), compiled for `layout`."""
  from humpback_jax import train
  t = cfg.train
  optimizer = train.make_optimizer(t, 1000)
  fns = train.build_step(cfg.model, layout, optimizer, micro_batches=t.micro_batches, dropout_rate=t.dropout_rate,
                         seed=t.seed)
  state = _shaped(jax.eval_shape(fns.init, fns.abstract_params), fns.state_shardings)
  batch = {k: jax.ShapeDtypeStruct((t.batch_size, t.seq_len), jnp.float32 if k == "loss_mask" else jnp.int32,
                                   sharding=fns.batch_sharding[k]) for k in train.BATCH_KEYS}
  return compile_program("train step", fns.step, state, batch)


def generate_programs(cfg, layout: sharding.Layout, *, batch: int, prompt_len: int, max_new: int) -> list[Compiled]:
  """Prefill of `batch` prompts of `prompt_len` tokens and the sampling decode loop of `max_new`
  tokens, as the engine compiles them (greedy=False: the paper samples), for `layout`."""
  from humpback_jax import generate
  from humpback_jax.model import ops
  m = cfg.model
  backend = ops.for_model(m, layout)
  rows = lambda *tail: layout.sharding(("batch",) + (None,) * len(tail), (batch, *tail))
  params = _shaped(build.abstract_params(m), build.param_shardings(m, layout))
  cache_len = prompt_len - 1 + max_new
  cache_sh = kv_cache.cache_shardings(layout, m, batch, cache_len)
  tokens = jax.ShapeDtypeStruct((batch, prompt_len - 1), jnp.int32, sharding=rows(prompt_len - 1))
  prefill = jax.jit(functools.partial(generate.prefill, m, layout, cache_len=cache_len, backend=backend),
                    out_shardings=cache_sh)
  first = compile_program("prefill", prefill, params, tokens, tokens)
  cache = _shaped(jax.eval_shape(lambda: kv_cache.init_cache(m, batch, cache_len)), cache_sh)
  vector = lambda dtype: jax.ShapeDtypeStruct((batch,), dtype, sharding=rows())
  scalar = lambda dtype: jax.ShapeDtypeStruct((), dtype, sharding=sharding.replicated(layout.mesh))
  eos = jax.ShapeDtypeStruct((8,), jnp.int32, sharding=sharding.replicated(layout.mesh))
  args = (params, cache, vector(jnp.int32), vector(jnp.int32), vector(jnp.int32), vector(jnp.int32), eos,
          scalar(jnp.int32), scalar(jnp.float32), scalar(jnp.float32), scalar(jnp.int32))
  decode = jax.jit(functools.partial(generate.decode, m, layout, max_new=max_new, greedy=False, backend=backend),
                   out_shardings=(rows(max_new), rows(), cache_sh), donate_argnums=(1,))
  return [first, compile_program("decode", decode, *args)]


def hbm_bytes(layout: sharding.Layout) -> int:
  """HBM per device of the layout's chips (chips.py), 0 when the table does not know them."""
  found = chips.chip(layout.mesh.devices.flat[0].device_kind)
  return found.hbm_bytes if found else 0


def continuous_programs(cfg, layout: sharding.Layout, *, slots: int, rows: int, chunk: int, width: int,
                        max_new: int, steps: int = 8) -> list[Compiled]:
  """The continuous engine's programs as it compiles them: a prefill chunk of `rows` prompts into a
  group cache `width` wide, the insertion of that group into `slots` decode slots, and the sampling
  decode call (greedy=False, up to `steps` steps) over the slot ring."""
  from humpback_jax.engine import programs
  from humpback_jax.engine.slots import STATE_KEYS, batch_shards
  from humpback_jax.model import ops
  m = cfg.model
  backend = ops.for_model(m, layout)
  replicated = sharding.replicated(layout.mesh)
  shaped = lambda shape, dtype, names: jax.ShapeDtypeStruct(shape, dtype, sharding=layout.sharding(names, shape))
  params = _shaped(build.abstract_params(m), build.param_shardings(m, layout))
  cache_of = lambda n, length: _shaped(jax.eval_shape(lambda: kv_cache.init_cache(m, n, length)),
                                       kv_cache.cache_shardings(layout, m, n, length))
  ring = width + max_new
  group, slot_cache = cache_of(rows, width), cache_of(slots, ring)
  tokens = shaped((rows, chunk), jnp.int32, ("batch", "length"))
  fill = jax.jit(functools.partial(programs.prefill_chunk, m, layout, backend=backend),
                 out_shardings=kv_cache.cache_shardings(layout, m, rows, width), donate_argnums=(1,))
  ids = jax.ShapeDtypeStruct((rows,), jnp.int32, sharding=replicated)
  insert = jax.jit(functools.partial(programs.insert, shards=batch_shards(layout, slots)),
                   out_shardings=kv_cache.cache_shardings(layout, m, slots, ring), donate_argnums=(0,))
  state = {k: shaped((slots,), jnp.int32, ("batch",)) for k in STATE_KEYS}
  scalar = lambda dtype: jax.ShapeDtypeStruct((), dtype, sharding=replicated)
  eos = jax.ShapeDtypeStruct((8,), jnp.int32, sharding=replicated)
  decode = jax.jit(functools.partial(programs.decode_steps, m, layout, steps=steps, greedy=False, backend=backend),
                   donate_argnums=(1,))
  return [compile_program("prefill chunk", fill, params, group, tokens, tokens),
          compile_program("insert", insert, slot_cache, group, ids),
          compile_program("decode steps", decode, params, slot_cache, state, scalar(jnp.int32), eos, scalar(jnp.int32),
                          scalar(jnp.float32), scalar(jnp.float32), scalar(jnp.int32))]
