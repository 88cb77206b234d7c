"""The two forms of the layer parameters and the moves between them.

Unscanned, `params["layers"]` is `{0: block, 1: block, ...}` (paths `layers/3/attn/q`); with
`model.scan_layers` it is one block whose leaves are stacked `[num_layers, ...]` (paths
`layers/attn/q`). Checkpoint formats name layers one by one, so importers and exporters speak
per-layer paths and use these helpers to build or slice the stacks one layer at a time, each layer
placed straight onto its share of the stacked sharding (the `layers` axis is never sharded).
"""
from __future__ import annotations

import functools
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec


def is_stacked(params) -> bool:
  """True when `params` hold the stacked (scan_layers) form."""
  return 0 not in params["layers"]


def layer_paths(path: str, cfg) -> list[str] | None:
  """The per-layer paths (`layers/0/attn/q`, ...) that make up a stacked path (`layers/attn/q`)
  of a scan_layers model; None for a path that is not a stack."""
  if not (cfg.scan_layers and path.startswith("layers/")):
    return None
  rest = path.removeprefix("layers/")
  return [f"layers/{i}/{rest}" for i in range(cfg.num_layers)]


def layer_sharding(stacked: NamedSharding) -> NamedSharding:
  """The sharding of one layer's slice of an array sharded as `stacked` (leading axis dropped)."""
  return NamedSharding(stacked.mesh, PartitionSpec(*stacked.spec[1:]))


def stack_onto(get_layer: Callable[[int], jax.Array], num_layers: int, shape, dtype,
               sharding: NamedSharding) -> jax.Array:
  """A [num_layers, *shape] array on `sharding`, filled one layer at a time from `get_layer(i)`
  (best already on `layer_sharding(sharding)`): device memory is the stack plus one layer."""
  out = _zeros(tuple(shape), jnp.dtype(dtype), sharding)()
  put = _setter(sharding)
  for i in range(num_layers):
    out = put(out, get_layer(i), jnp.int32(i))
  return out


def unstacked_layers(stacked: jax.Array, sharding: NamedSharding) -> Iterator[jax.Array]:
  """The layers of a stacked array one at a time, each placed on `sharding`."""
  take = _taker(sharding)
  for i in range(stacked.shape[0]):
    yield take(stacked, jnp.int32(i))


def to_form(params, cfg, shardings):
  """`params` in the form `cfg.scan_layers` asks for, on `shardings` (cfg's param shardings).

  Converted one parameter at a time; the input's layer arrays are deleted as they are copied, so
  device memory stays near one copy of the model. Params already in that form come back as they are.
  """
  if is_stacked(params) == bool(cfg.scan_layers):
    return params
  src, n = params["layers"], cfg.num_layers
  if cfg.scan_layers:
    def stack(target, *layers):
      out = stack_onto(lambda i: jax.device_put(layers[i], layer_sharding(target)), n, (n, *layers[0].shape), layers[0].dtype, target)
      for layer in layers:
        layer.delete()
      return out
    layers = jax.tree.map(stack, shardings["layers"], *(src[i] for i in range(n)))
  else:
    def unstack(target, stacked):
      out = list(unstacked_layers(jax.device_put(stacked, NamedSharding(target.mesh, PartitionSpec(None, *target.spec))),
                                  target))
      stacked.delete()
      return out
    lists = jax.tree.map(unstack, shardings["layers"][0], src)
    layers = {i: jax.tree.map(lambda per_layer: per_layer[i], lists, is_leaf=lambda x: isinstance(x, list))
              for i in range(n)}
  return {**params, "layers": layers}


@functools.lru_cache(maxsize=64)
def _zeros(shape, dtype, sharding):
  return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)


@functools.lru_cache(maxsize=64)
def _setter(sharding):
  def put(stack, layer, i):
    return jax.lax.dynamic_update_index_in_dim(stack, layer.astype(stack.dtype), i, 0)
  return jax.jit(put, out_shardings=sharding, donate_argnums=0)


@functools.lru_cache(maxsize=64)
def _taker(sharding):
  return jax.jit(lambda stack, i: jax.lax.dynamic_index_in_dim(stack, i, keepdims=False), out_shardings=sharding)
