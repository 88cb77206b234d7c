"""Attention in plain XLA: masks from positions/segments, and the attention forms XLA runs.

On CPU the grouped forms below are what XLA:CPU runs fastest; on TPU and GPU the XLA path is
`jax.nn.dot_product_attention(implementation="xla")`. Which kernel a program uses (these, our CPU
kernels, Pallas splash or cuDNN) is chosen in `ops.py`, the one backend seam.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class Mask:
  """Who attends whom. `dense` [b, 1, t, s] always; with `causal_by_index` (no cache: positions rise
  along each packed example) query i sees exactly the keys at index <= i of its own segment, the
  segment ids [b, t] / [b, s] (0 = padding) saying which: what splash attention takes instead."""
  dense: jax.Array
  q_segment: jax.Array | None = None
  kv_segment: jax.Array | None = None
  causal_by_index: bool = struct.field(pytree_node=False, default=False)


def self_attention_mask(positions_bt, segment_ids_bt) -> Mask:
  """The mask of packed sequences attending themselves (no cache)."""
  dense = attention_mask(positions_bt, segment_ids_bt, positions_bt, segment_ids_bt)
  return Mask(dense, segment_ids_bt, segment_ids_bt, causal_by_index=True)


def attention_mask(q_pos, q_seg, kv_pos, kv_seg):
  """Boolean mask [batch, 1, q_len, kv_len]: same segment, key slot filled, key not in the future.

  Positions count from 0 inside each packed example; a slot with position -1 or segment 0 is empty.
  """
  same = q_seg[:, :, None] == kv_seg[:, None, :]
  filled = (kv_pos[:, None, :] >= 0) & (kv_seg[:, None, :] != 0)
  causal = kv_pos[:, None, :] <= q_pos[:, :, None]
  return (same & filled & causal)[:, None, :, :]


CAUSAL_BLOCK = 64  # query block of the block-causal path (CPU, no cache)


def xla_attention(q_btnh, k_bsnh, v_bsnh, mask: Mask, cpu_forms: bool = True):
  """Grouped-query attention; q [b, t, heads, d], k/v [b, s, kv_heads, d] -> [b, t, heads, d].

  `cpu_forms`: the grouped forms XLA:CPU runs fastest; with `mask.causal_by_index` queries are taken
  in blocks that each see only the keys up to their block's end, skipping most of the masked upper
  triangle. Otherwise `jax.nn.dot_product_attention`, XLA's own form on TPU and GPU.
  """
  if not cpu_forms:
    return jax.nn.dot_product_attention(q_btnh, k_bsnh, v_bsnh, mask=mask.dense, implementation="xla")
  t = q_btnh.shape[1]
  if mask.causal_by_index and t == k_bsnh.shape[1] and t % CAUSAL_BLOCK == 0 and t > CAUSAL_BLOCK:
    return _block_causal_attention(q_btnh, k_bsnh, v_bsnh, mask.dense, CAUSAL_BLOCK)
  return _grouped_attention(q_btnh, k_bsnh, v_bsnh, mask.dense)


def _block_causal_attention(q, k, v, mask, block: int):
  """Query block i attends keys [0, (i + 1) * block): (n + 1) / 2n of the full work for n blocks."""
  outs = []
  for end in range(block, q.shape[1] + 1, block):
    rows = slice(end - block, end)
    outs.append(_grouped_attention(q[:, rows], k[:, :end], v[:, :end], mask[:, :, rows, :end]))
  return jnp.concatenate(outs, axis=1)


def _grouped_attention(q, k, v, mask):
  """Plain-XLA GQA without repeating K/V, heads-major inside: [b, kv_heads, group * t, d].

  With (batch, kv_heads) outermost and the contraction last, both batched matmuls and their
  gradients are the row-major GEMMs XLA:CPU wants; the only transposes are of q/k/v and the output.
  """
  if q.shape[1] == 1:
    return _single_query_attention(q, k, v, mask)
  b, t, n, d = q.shape
  s, kv = k.shape[1], k.shape[2]
  g = n // kv
  q = q * jnp.asarray(1.0 / d ** 0.5, q.dtype)  # scaling q is d/s times cheaper than the logits
  q = q.reshape(b, t, kv, g, d).transpose(0, 2, 3, 1, 4).reshape(b, kv, g * t, d)
  k = k.transpose(0, 2, 1, 3)  # [b, kv, s, d]
  v = v.transpose(0, 2, 1, 3)
  logits = jnp.einsum("bkqd,bksd->bkqs", q, k, preferred_element_type=jnp.float32)
  bias = jnp.where(mask, 0.0, jnp.finfo(jnp.float32).min)  # an add's gradient needs no mask pass
  logits = logits.reshape(b, kv, g, t, s) + bias[:, :, None]
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype).reshape(b, kv, g * t, s)
  out = jnp.einsum("bkqs,bksd->bkqd", probs, v)
  return out.reshape(b, kv, g, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, n, d)


def _single_query_attention(q, k, v, mask):
  """One query per row (decoding) over the cache as stored.

  The value side is a multiply-and-reduce over the [b, s, kv_heads, d] cache: XLA:CPU's batched dot
  wants its batch dims (batch, kv_heads) outermost, so the einsum form copies the cache per layer
  and step; probs @ V avoids that copy of V. q @ K must stay a dot: jaxlib 0.10.2's XLA:CPU
  `__ynn_fusion` miscompiles the equivalent broadcast-multiply-reduce when a device holds one row
  (b == 1) and head_dim >= 32 (garbage logits, e.g. SmolLM2 with batch_size 1 or batch_size ==
  device count).
  """
  b, _, n, d = q.shape
  kv = k.shape[2]
  q = q.reshape(b, kv, n // kv, d)
  logits = jnp.einsum("bkgd,bskd->bskg", q, k, preferred_element_type=jnp.float32)  # [b, s, kv, group]
  logits = logits * (1.0 / jnp.sqrt(jnp.float32(d)))
  logits = jnp.where(mask[:, 0, 0, :, None, None], logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=1)
  out = jnp.sum(probs[..., None] * v[:, :, :, None, :].astype(jnp.float32), axis=1)  # [b, kv, group, d]
  return out.reshape(b, 1, n, d).astype(v.dtype)
