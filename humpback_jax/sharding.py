"""Device mesh from config, logical axis rules, and placing parameters onto their shardings.

Every parameter and key activation carries logical axis names (`embed`, `heads`, `mlp`, ...).
A table of rules maps each logical name to mesh axes (`data`, `fsdp`, `tensor`); the same
model then runs data-parallel, fully sharded, tensor-parallel or any mix by config alone.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from humpback_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axes, MaxText style. Activations use `batch`/`length`; weights use the rest.
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("norm", None),
    ("cache_length", None),
    ("layers", None),  # the stacked-layer axis of `scan_layers`: each device keeps every layer's share
)


def resolve_mesh_shape(shape: Sequence[int], num_devices: int, field: str = "mesh.shape") -> tuple[int, ...]:
  """Fills the one -1 entry of `shape` so the product equals `num_devices`; fails naming `field`."""
  shape = tuple(int(s) for s in shape)
  if shape.count(-1) > 1:
    raise ConfigError(f"{field}: at most one axis may be -1, got {shape}")
  if any(s == 0 or s < -1 for s in shape):
    raise ConfigError(f"{field}: axis sizes must be positive or -1, got {shape}")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if num_devices % known:
      raise ConfigError(f"{field}: {shape} cannot fill {num_devices} devices "
                        f"({num_devices} is not a multiple of {known})")
    shape = tuple(num_devices // known if s == -1 else s for s in shape)
  if math.prod(shape) != num_devices:
    raise ConfigError(f"{field}: product of {shape} is {math.prod(shape)}, but there are "
                      f"{num_devices} devices; use -1 for one axis to fill the rest")
  return shape


def make_mesh(mesh_cfg, devices: Sequence[Any] | None = None) -> Mesh:
  """Builds the device mesh the config names (axes `mesh.axes`, sizes `mesh.shape`, one may be -1)."""
  devices = list(devices if devices is not None else jax.devices())
  axes = tuple(mesh_cfg.axes)
  if len(axes) != len(tuple(mesh_cfg.shape)):
    raise ConfigError(f"mesh.shape: {tuple(mesh_cfg.shape)} has {len(tuple(mesh_cfg.shape))} entries "
                      f"but mesh.axes {axes} has {len(axes)}")
  shape = resolve_mesh_shape(mesh_cfg.shape, len(devices))
  return jax.make_mesh(shape, axes, axis_types=(AxisType.Auto,) * len(axes), devices=devices)


def validate_model_on_mesh(model_cfg, mesh) -> None:
  """Fails naming the field when tensor parallelism cannot split the model's heads or MLP; `mesh`
  is a (possibly abstract) mesh or its {axis: size} (config.check passes that, before any device)."""
  tensor = dict(mesh if isinstance(mesh, dict) else mesh.shape).get("tensor", 1)
  if model_cfg.num_heads % tensor:
    raise ConfigError(f"model.num_heads: {model_cfg.num_heads} heads cannot be split over the "
                      f"tensor axis of size {tensor} (mesh.shape); pick a tensor size that divides it")
  if model_cfg.mlp_dim % tensor:
    raise ConfigError(f"model.mlp_dim: {model_cfg.mlp_dim} cannot be split over the tensor axis "
                      f"of size {tensor} (mesh.shape)")


@dataclasses.dataclass(frozen=True)
class Layout:
  """A mesh plus the logical rules: turns logical axis names into shardings."""
  mesh: Mesh
  rules: tuple = DEFAULT_RULES

  def spec(self, names: Sequence[str | None], shape: Sequence[int] | None = None) -> PartitionSpec:
    """PartitionSpec for logical `names`; a mesh axis is used once, and only where it divides the dim."""
    table = dict(self.rules)
    used: set[str] = set()
    out = []
    for i, name in enumerate(names):
      target = table.get(name) if name is not None else None
      target = (target,) if isinstance(target, str) else tuple(target or ())
      axes = tuple(a for a in target if a in self.mesh.shape and a not in used)
      if shape is not None:
        axes = _dividing_prefix(axes, shape[i], self.mesh)
      used.update(axes)
      out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*out)

  def sharding(self, names, shape=None) -> NamedSharding:
    """NamedSharding for logical `names` on this mesh."""
    return NamedSharding(self.mesh, self.spec(names, shape))

  def constrain(self, x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """with_sharding_constraint by logical names (for activations inside jitted code)."""
    return jax.lax.with_sharding_constraint(x, self.sharding(names, x.shape))


def _dividing_prefix(axes: tuple[str, ...], dim: int, mesh: Mesh) -> tuple[str, ...]:
  """The longest prefix of `axes` whose size product divides `dim` (else that dim is replicated)."""
  kept, size = [], 1
  for a in axes:
    if dim % (size * mesh.shape[a]):
      break
    size *= mesh.shape[a]
    kept.append(a)
  return tuple(kept)


def logical_axes(abstract_state) -> Any:
  """Tree of logical axis-name tuples, one per parameter, read from the `axes` metadata."""
  return jax.tree.map(lambda v: v.get_metadata().get("axes"), abstract_state,
                      is_leaf=lambda x: isinstance(x, nnx.Variable))


def state_shardings(abstract_state, layout: Layout) -> Any:
  """NamedSharding tree matching an (abstract) nnx.State, from each parameter's logical axes."""
  def one(v):
    names = v.get_metadata().get("axes") or (None,) * len(v.get_value().shape)
    return layout.sharding(names, v.get_value().shape)
  return jax.tree.map(one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def put_array(host_value: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """Places a host array (or memmap) onto `sharding`, touching only this host's slices."""
  return jax.make_array_from_callback(host_value.shape, sharding, lambda idx: np.asarray(host_value[idx]))


def replicated(mesh: Mesh) -> NamedSharding:
  """A fully replicated sharding on `mesh`."""
  return NamedSharding(mesh, PartitionSpec())


def process_local(layout: Layout) -> Layout:
  """The same axes and rules over this process's devices only: for work each process does alone
  (generation and scoring over its own share of the input). Unchanged with one process."""
  if jax.process_count() == 1:
    return layout
  local = jax.local_devices()
  names = layout.mesh.axis_names
  inner = {a: layout.mesh.shape[a] for a in names[1:]}
  if len(local) % math.prod(inner.values()):
    inner = {a: 1 for a in inner}  # model axes do not fit in one process: data-parallel only
  shape = (len(local) // math.prod(inner.values()), *inner.values())
  mesh = jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(names), devices=local)
  return Layout(mesh, layout.rules)


def to_layout(tree: Any, shardings: Any) -> Any:
  """Copies arrays onto `shardings`, gathering those spread over other processes first.

  Every process must call it with the same tree (the gather is a collective).
  """
  from jax.experimental import multihost_utils

  def move(x, s):
    if not x.is_fully_addressable:
      x = multihost_utils.process_allgather(x, tiled=True)
    return jax.device_put(np.asarray(x), s)
  return jax.tree.map(move, tree, shardings)
