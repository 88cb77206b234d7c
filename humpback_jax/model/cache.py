"""Static KV cache for decoding: one preallocated buffer per layer, written in place; with
`scan_layers`, one buffer [layers, ...] per k and v, carried through the scan over the layers.

Rows are left-padded, so every row writes its next token into the same slot `index`; the
`positions` buffer says which position each slot holds (-1 = empty), which is all the
attention mask needs. The cache is a plain pytree, donated to each decode step.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from humpback_jax.config import head_dim

CACHE_AXES = ("batch", "cache_length", "kv_heads", "head_dim")


@struct.dataclass
class KVCache:
  """k/v: tuples of [batch, max_len, kv_heads, head_dim] (one per layer), or with `scan_layers` one
  array [layers, batch, max_len, kv_heads, head_dim] each; positions [batch, max_len]; index: next slot."""
  k: tuple
  v: tuple
  positions: jax.Array
  index: jax.Array

  @property
  def max_len(self) -> int:
    return self.positions.shape[1]


def init_cache(cfg, batch: int, max_len: int, dtype=None) -> KVCache:
  """An empty cache for `batch` rows of up to `max_len` tokens, in the compute dtype by default."""
  dtype = jnp.dtype(dtype or cfg.dtype)
  shape = (batch, max_len, cfg.num_kv_heads, head_dim(cfg))
  if cfg.scan_layers:
    zeros = lambda: jnp.zeros((cfg.num_layers, *shape), dtype)
  else:
    zeros = lambda: tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))
  return KVCache(k=zeros(), v=zeros(), positions=jnp.full((batch, max_len), -1, jnp.int32),
                 index=jnp.zeros((), jnp.int32))


def cache_shardings(layout, cfg, batch: int, max_len: int, dtype=None):
  """The NamedSharding tree of a cache of this size (batch over data/fsdp, kv heads over tensor)."""
  shape = (batch, max_len, cfg.num_kv_heads, head_dim(cfg))
  if cfg.scan_layers:
    layers = layout.sharding(("layers", *CACHE_AXES), (cfg.num_layers, *shape))
  else:
    layers = tuple(layout.sharding(CACHE_AXES, shape) for _ in range(cfg.num_layers))
  return KVCache(k=layers, v=layers, positions=layout.sharding(("batch", "cache_length"), (batch, max_len)),
                 index=layout.sharding(()))


def write(cache_k, cache_v, k_new, v_new, index, layer=None):
  """Writes k/v of shape [batch, t, kv_heads, d] at slot `index`; returns the updated buffers.

  With `layer`, the buffers are stacked [layers, ...] and only that layer's new slots are written.
  """
  start = (0, index, 0, 0)
  if layer is not None:
    start, k_new, v_new = (layer, *start), k_new[None], v_new[None]
  return (jax.lax.dynamic_update_slice(cache_k, k_new.astype(cache_k.dtype), start),
          jax.lax.dynamic_update_slice(cache_v, v_new.astype(cache_v.dtype), start))


def layer_of(buffer, layer=None):
  """One layer's [batch, max_len, kv_heads, d] view of a cache buffer (the buffer itself when unstacked)."""
  return buffer if layer is None else jax.lax.dynamic_index_in_dim(buffer, layer, keepdims=False)


def write_positions(cache: KVCache, positions) -> jax.Array:
  """The positions buffer with the new tokens' positions [batch, t] written at slot `index`."""
  return jax.lax.dynamic_update_slice(cache.positions, positions.astype(jnp.int32), (0, cache.index))
