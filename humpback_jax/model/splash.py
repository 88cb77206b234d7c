"""Splash attention (JAX's Pallas TPU kernel) for whole causal sequences with segment ids.

The kernel is per device and unbatched: [heads, t, d] queries over [kv_heads, s, d] keys (grouped
query heads natively). Under a mesh it runs inside `shard_map`, each device on its own rows and
heads (batch over data/fsdp, heads over tensor, as the layout's rules say), so XLA never gathers
its operands. Sequences are padded to a multiple of the block with segment 0; a padded query then
sees only padded keys (itself at least), so no row of the softmax is empty. Off TPU the kernel runs
in Pallas interpret mode (how the tests check it against XLA on CPU).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel_lib
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib

BLOCK = 128  # lanes: the smallest block Mosaic takes; larger sequences use up to MAX_BLOCK
MAX_BLOCK = 512


def _block_sizes(t: int, s: int) -> kernel_lib.BlockSizes:
  bq, bkv = min(MAX_BLOCK, t), min(MAX_BLOCK, s)
  return kernel_lib.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq,
                               block_kv_dkv=bkv, block_kv_dkv_compute=bkv, block_q_dq=bq, block_kv_dq=bkv)


def _pad_to(x, axis: int, size: int):
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, pad)


def _padded_len(n: int) -> int:
  n = -(-n // BLOCK) * BLOCK
  return -(-n // MAX_BLOCK) * MAX_BLOCK if n > MAX_BLOCK else n


def _local_attention(q_bnth, k_bksh, v_bksh, q_seg_bt, kv_seg_bs, interpret: bool):
  """One device's rows: the kernel built for its (local) head count and lengths, vmapped over rows."""
  heads, t, s = q_bnth.shape[1], q_bnth.shape[2], k_bksh.shape[2]
  mask = mask_lib.MultiHeadMask([mask_lib.CausalMask((t, s)) for _ in range(heads)])
  kernel = kernel_lib.make_splash_mha(mask, block_sizes=_block_sizes(t, s), head_shards=1, q_seq_shards=1,
                                      interpret=interpret)
  run = lambda q, k, v, qs, ks: kernel(q, k, v, kernel_lib.SegmentIds(q=qs, kv=ks))
  return jax.vmap(run)(q_bnth, k_bksh, v_bksh, q_seg_bt, kv_seg_bs)


def attention(q_btnh, k_bsnh, v_bsnh, q_segment_bt, kv_segment_bs, *, layout=None, interpret: bool = False):
  """softmax(q k^T / sqrt(d)) v where query i sees key j <= i of the same segment (0 = padding):
  q [b, t, heads, d], k/v [b, s, kv_heads, d] -> [b, t, heads, d]."""
  b, t, n, d = q_btnh.shape
  s = k_bsnh.shape[1]
  tp, sp = _padded_len(t), _padded_len(s)
  q = _pad_to((q_btnh * jnp.asarray(d ** -0.5, q_btnh.dtype)).transpose(0, 2, 1, 3), 2, tp)  # [b, n, t, d]
  k = _pad_to(k_bsnh.transpose(0, 2, 1, 3), 2, sp)
  v = _pad_to(v_bsnh.transpose(0, 2, 1, 3), 2, sp)
  q_seg = _pad_to(q_segment_bt.astype(jnp.int32), 1, tp)
  kv_seg = _pad_to(kv_segment_bs.astype(jnp.int32), 1, sp)
  local = functools.partial(_local_attention, interpret=interpret)
  if layout is not None and layout.mesh.size > 1:
    heads = layout.spec(("batch", "heads", "length", "head_dim"), q.shape)
    kv_heads = layout.spec(("batch", "kv_heads", "length", "head_dim"), k.shape)
    if heads[1] != kv_heads[1]:  # the KV heads cannot split as the query heads do: keep heads whole
      heads = kv_heads = jax.sharding.PartitionSpec(heads[0])
    rows = jax.sharding.PartitionSpec(heads[0])
    local = jax.shard_map(local, mesh=layout.mesh, in_specs=(heads, kv_heads, kv_heads, rows, rows),
                          out_specs=heads, check_vma=False)
  out = local(q, k, v, q_seg, kv_seg)
  return out[:, :, :t].transpose(0, 2, 1, 3).astype(q_btnh.dtype)
