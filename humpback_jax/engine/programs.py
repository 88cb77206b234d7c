"""Pure functions the continuous engine jits: chunked prefill into a group cache, insertion of a
group's rows into decode slots, N decode steps over every slot, and scoring chunks.

Two caches take part. A *group cache* [P, Lp] holds P prompts left-aligned (slot j = position j of
a prompt, unused slots at position -1) and is filled chunk by chunk, optionally on top of a copy of
a shared prefix. The *slot cache* [S, L] is a ring: every decode step writes all slots at the one
shared `index` (mod L), and a prompt is inserted so that its history ends just before that index.
Attention only reads positions, never slot order, so where a row's tokens sit does not matter.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from humpback_jax.engine.sampling import sample_next
from humpback_jax.model import build
from humpback_jax.model import cache as kv_cache
from humpback_jax.model import ops


def fresh_cache(cfg, *, rows: int, length: int):
  """An empty cache [rows, length] (all positions -1)."""
  return kv_cache.init_cache(cfg, rows, length)


def copy_cache(cache, start, *, rows: int):
  """A fresh copy of `cache` (whose rows are all alike: one prefix) with `rows` rows, writing next at
  slot `start` (a stored prefix stays intact when the copy is donated; the padding of the prefix's
  last chunk is overwritten by the next chunk)."""
  def grown(x, axis):  # the batch axis: k/v are [..., batch, length, kv_heads, d], positions [batch, length]
    if rows == x.shape[axis]:
      return x + jnp.zeros((), x.dtype)  # a copy: the stored prefix is not donated with it
    return jnp.repeat(x, rows // x.shape[axis], axis=axis)  # a new array already
  return cache.replace(k=jax.tree.map(lambda x: grown(x, x.ndim - 4), cache.k),
                       v=jax.tree.map(lambda x: grown(x, x.ndim - 4), cache.v),
                       positions=grown(cache.positions, 0), index=start)


def prefill_chunk(cfg, layout, params, cache, tokens_pc, positions_pc, *, backend=ops.XLA):
  """Writes one chunk of prompt tokens [P, C] (position -1 = padding) at the cache's index."""
  _, cache = build.forward(cfg, params, tokens_pc, positions_pc, cache=cache, layout=layout, hidden_only=True,
                           backend=backend)
  return cache


def score_chunk(cfg, layout, params, cache, tokens_pc, positions_pc, targets_pc, target_mask_pc, read_p,
                candidate_ids, *, kind: str, backend=ops.XLA):
  """A prefill chunk that also scores: `kind="logp"` -> (cache, sum over marked tokens of
  log p(target | tokens so far) [P]); `kind="probs"` -> (cache, the full-vocab softmax after the
  token at chunk offset `read_p` [P], read at `candidate_ids` -> [P, c])."""
  hidden, cache = build.forward(cfg, params, tokens_pc, positions_pc, cache=cache, layout=layout, hidden_only=True,
                                backend=backend)
  head = build.head_weight(cfg, params)  # [dim, vocab]
  if kind == "logp":
    logits = jnp.einsum("bcd,dv->bcv", hidden, head.astype(hidden.dtype), preferred_element_type=jnp.float32)
    picked = jnp.take_along_axis(logits, targets_pc[..., None], axis=-1)[..., 0]
    logp = picked - jax.nn.logsumexp(logits, axis=-1)
    return cache, jnp.sum(jnp.where(target_mask_pc > 0, logp, 0.0), axis=-1)
  row = jnp.take_along_axis(hidden, jnp.clip(read_p, 0, hidden.shape[1] - 1)[:, None, None], axis=1)[:, 0]
  logits = jnp.dot(row, head.astype(row.dtype), preferred_element_type=jnp.float32)
  return cache, jax.nn.softmax(logits, axis=-1)[:, candidate_ids]


def insert(slots_cache, group_cache, local_ids_p, *, shards: int = 1):
  """Copies row r of the group cache (its written slots) into decode slot local_ids_p[r] of the ring,
  ending just before the ring's write index; every other slot of that row is emptied.

  Each of the `shards` batch shards takes only its own rows: row r of the group's P goes to slot
  local_ids_p[r] among the S / shards slots of shard r // (P / shards) (an id >= S / shards writes
  nothing), so no device reads another's rows (a scatter at global slot ids made XLA all-gather the
  whole group onto every device). The ring must hold the group's slots plus the new tokens."""
  ring, width = slots_cache.max_len, group_cache.max_len
  slot = jnp.arange(ring)
  src = (slot - slots_cache.index + group_cache.index) % ring  # [L]: the group slot each ring slot takes
  valid = src < group_cache.index
  src = jnp.minimum(src, width - 1)
  ids = local_ids_p.reshape(shards, -1)

  def per_shard(buffer, rows_axis):  # [..., S, ...] -> [..., shards, S / shards, ...]
    return buffer.reshape(*buffer.shape[:rows_axis], shards, -1, *buffer.shape[rows_axis + 1:])

  def put(ring_rows, new_rows, rows_axis):  # writes shard by shard: new_rows' row r at slot ids[shard, r]
    at = lambda dst, new, i: dst.at[(slice(None),) * rows_axis + (i,)].set(new, mode="drop")
    out = jax.vmap(at, in_axes=(rows_axis, rows_axis, 0), out_axes=rows_axis)(
        per_shard(ring_rows, rows_axis), per_shard(new_rows, rows_axis), ids)
    return out.reshape(ring_rows.shape)

  def rows(ring_kv, group_kv):  # [S, L, kv, d] <- [P, Lp, kv, d], after a leading layers axis when scanned
    lead = ring_kv.ndim - 4
    return put(ring_kv, jnp.take(group_kv, src, axis=lead + 1).astype(ring_kv.dtype), lead)

  positions = jnp.where(valid, jnp.take(group_cache.positions, src, axis=1), -1)
  return slots_cache.replace(k=jax.tree.map(rows, slots_cache.k, group_cache.k),
                             v=jax.tree.map(rows, slots_cache.v, group_cache.v),
                             positions=put(slots_cache.positions, positions, 0))


def decode_steps(cfg, layout, params, cache, state, min_done, eos_ids, seed, temperature, top_p, top_k, *,
                 steps: int, greedy: bool = False, backend=ops.XLA):
  """Up to `steps` decode steps over every slot, the ring index wrapping; fewer once `min_done` slots
  are done (the host refills them: a call costs a pass over the weights to pack them, so returning
  at every finished row would pay that often).

  `state` (dict of [S] int32): token (fed next), position, row_id, limit (the row's max new tokens),
  step (tokens sampled so far), done. Row r samples step s with fold_in(fold_in(seed, row_id), s),
  as the static engine does, so a token never depends on its slot or its neighbours.
  Returns (tokens [S, steps], emitted [S] (new tokens before EOS or the limit), busy (live
  row-steps), new state, cache).
  """
  ring = cache.max_len
  base = jax.random.key(seed)
  row_keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(state["row_id"])
  limit = state["limit"]
  done = state["done"] > 0
  # A finished slot feeds position 0 and sees only its own writes since this call began: cheap.
  cache = cache.replace(positions=jnp.where(done[:, None], -1, cache.positions))
  next_tokens = _next_tokens_fn(cfg, layout, params, greedy, backend.in_decode_loop())

  def body(carry):
    i, token, position, step, done, emitted, busy, out, cache = carry
    keys = jax.vmap(jax.random.fold_in)(row_keys, step)
    live = ~done
    new, cache = next_tokens(token, position, cache, keys, temperature, top_p, top_k, live)
    cache = cache.replace(index=cache.index % ring)
    is_eos = jnp.isin(new, eos_ids)
    out = jax.lax.dynamic_update_slice(out, new[:, None], (0, i))
    emitted += (live & ~is_eos).astype(jnp.int32)
    busy += jnp.sum(live.astype(jnp.int32))
    done = done | is_eos | (step + 1 >= limit)
    step += live.astype(jnp.int32)
    position = jnp.where(done, 0, position + 1)
    return i + 1, new, position, step, done, emitted, busy, out, cache

  def cond(carry):
    return (carry[0] < steps) & (jnp.sum(carry[4].astype(jnp.int32)) < min_done)

  s = state["token"].shape[0]
  zero = jnp.zeros((), jnp.int32)
  carry = (zero, state["token"], jnp.where(done, 0, state["position"]), state["step"], done,
           jnp.zeros((s,), jnp.int32), zero, jnp.full((s, steps), -1, jnp.int32), cache)
  _, token, position, step, done, emitted, busy, out, cache = jax.lax.while_loop(cond, body, carry)
  new_state = dict(state, token=token, position=position, step=step, done=done.astype(jnp.int32))
  return out, emitted, busy, new_state, cache


def _next_tokens_fn(cfg, layout, params, greedy, backend):
  """(token [b], position [b], cache, keys [b], knobs, live [b]) -> (next token [b], cache); with the CPU kernels a
  greedy program picks tokens with `ops.greedy_head` (no logits but the ones that could win)."""
  head_nk = build.head_weight(cfg, params).T if greedy else None  # [vocab, dim]: the tied embedding, no copy
  head_tables = ops.greedy_head_tables(head_nk, backend) if greedy else None  # built once, outside the loop

  def next_tokens(token, position, cache, keys, temperature, top_p, top_k, live):
    if head_tables is None:
      logits, cache = build.forward(cfg, params, token[:, None], position[:, None], cache=cache, layout=layout,
                                    backend=backend)
      return sample_next(logits[:, 0], keys, temperature, top_p, top_k, backend=backend, live=live), cache
    hidden, cache = build.forward(cfg, params, token[:, None], position[:, None], cache=cache, layout=layout,
                                  hidden_only=True, backend=backend)
    return ops.greedy_head(hidden[:, 0], head_tables, head_nk), cache

  return next_tokens
