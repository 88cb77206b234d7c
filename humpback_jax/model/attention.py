"""The one attention dispatch point: masks from positions/segments, then the chosen kernel.

`xla` is `jax.nn.dot_product_attention` lowered by XLA on TPU and GPU; on CPU it is our own GQA
forms and, for decoding, our FFI kernel. `cudnn` asks for the cuDNN flash kernel on NVIDIA GPUs;
`auto` picks cuDNN on GPU and XLA elsewhere. A TPU splash kernel would be one more branch here.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from humpback_jax.kernels import cpu as cpu_kernels


def attention_mask(q_pos, q_seg, kv_pos, kv_seg):
  """Boolean mask [batch, 1, q_len, kv_len]: same segment, key slot filled, key not in the future.

  Positions count from 0 inside each packed example; a slot with position -1 or segment 0 is empty.
  """
  same = q_seg[:, :, None] == kv_seg[:, None, :]
  filled = (kv_pos[:, None, :] >= 0) & (kv_seg[:, None, :] != 0)
  causal = kv_pos[:, None, :] <= q_pos[:, :, None]
  return (same & filled & causal)[:, None, :, :]


def _impl(name: str) -> str:
  if name == "auto":
    return "cudnn" if jax.default_backend() == "gpu" else "xla"
  return name


CAUSAL_BLOCK = 64  # query block of the block-causal path (CPU, no cache)


def dot_product_attention(q_btnh, k_bsnh, v_bsnh, mask, impl: str = "xla", index_causal: bool = False):
  """Grouped-query attention; q [b, t, heads, d], k/v [b, s, kv_heads, d] -> [b, t, heads, d].

  `index_causal` promises that no query attends a key at a later index (true without a KV cache:
  positions increase along each packed example). Queries are then taken in blocks that each see
  only the keys up to their block's end, skipping most of the masked upper triangle.
  """
  impl = _impl(impl)
  if impl == "xla" and jax.default_backend() == "cpu":
    t = q_btnh.shape[1]
    if t > 1 and cpu_kernels.wants_sequence_attention(q_btnh, k_bsnh, v_bsnh):
      return cpu_kernels.sequence_attention(q_btnh, k_bsnh, v_bsnh, mask[:, 0], 1.0 / q_btnh.shape[-1] ** 0.5)
    if index_causal and t == k_bsnh.shape[1] and t % CAUSAL_BLOCK == 0 and t > CAUSAL_BLOCK:
      return _block_causal_attention(q_btnh, k_bsnh, v_bsnh, mask, CAUSAL_BLOCK)
    return _grouped_attention(q_btnh, k_bsnh, v_bsnh, mask)
  return jax.nn.dot_product_attention(q_btnh, k_bsnh, v_bsnh, mask=mask, implementation=impl)


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
  """One query per row (decoding): our CPU kernel (kernels/attention.cc) when it applies.

  It reads only the visible slots, each row's cache front to back (~15x XLA's batched dot at
  batch 32). The XLA form below does the value side as a multiply-and-reduce over the cache as
  stored. XLA:CPU's batched dot wants its batch dims (batch, kv_heads) outermost, so the einsum form
  copies the [b, s, kv_heads, d] cache per layer and step; probs @ V avoids that copy of V.
  q @ K must stay a dot: jaxlib 0.10.2's XLA:CPU `__ynn_fusion` miscompiles the equivalent
  broadcast-multiply-reduce when a device holds one row (b == 1) and head_dim >= 32 (garbage
  logits, e.g. SmolLM2 with batch_size 1 or batch_size == device count).
  """
  b, _, n, d = q.shape
  kv = k.shape[2]
  q = q.reshape(b, kv, n // kv, d)
  if cpu_kernels.wants_decode_attention(q, k, v):
    return cpu_kernels.decode_attention(q, k, v, mask[:, 0, 0, :], 1.0 / d ** 0.5).reshape(b, 1, n, d)
  logits = jnp.einsum("bkgd,bskd->bskg", q, k, preferred_element_type=jnp.float32)  # [b, s, kv, group]
  logits = logits * (1.0 / jnp.sqrt(jnp.float32(d)))
  logits = jnp.where(mask[:, 0, 0, :, None, None], logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=1)
  out = jnp.sum(probs[..., None] * v[:, :, :, None, :].astype(jnp.float32), axis=1)  # [b, kv, group, d]
  return out.reshape(b, 1, n, d).astype(v.dtype)
