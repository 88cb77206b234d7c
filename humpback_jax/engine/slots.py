"""Host side of the continuous engine: a queue of prompts over a fixed number of decode slots.

Modelled on JetStream's prefill / insert / generate and vLLM's scheduler, written for our programs:
each round fills the free slots (prefill a group of queued prompts chunk by chunk, then insert its
rows into the slot cache), runs `decode_steps` steps over every slot in one jitted call, and frees
the slots whose rows stopped (EOS, their own limit, or the caller's stop test). Only a handful of
shapes are ever compiled: chunk, insert and decode programs per (cache width, new-token budget).
Scoring runs the same chunked prefill, with the shared prefix reused, and reads scores per chunk.
"""
from __future__ import annotations

import collections
import functools
import math

import jax
import numpy as np

from humpback_jax.engine import prefix as prefix_lib
from humpback_jax.engine import programs

STATE_KEYS = ("token", "position", "row_id", "limit", "step", "done")


def batch_shards(layout) -> int:
  """How many ways the layout splits a batch (data x fsdp): the prefill group's row count."""
  axes = layout.spec(("batch",))[0]
  axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
  return math.prod(layout.mesh.shape[a] for a in axes)


class Scheduler:
  """Continuous batching and chunked, prefix-reusing prefill over one `generate.Engine`'s programs."""

  def __init__(self, engine, *, slots: int, steps: int, chunk: int, prefix_reuse: bool, granule: int = 16):
    if slots < 1 or steps < 1 or chunk < 1:
      raise ValueError(f"decode_slots ({slots}), decode_steps ({steps}) and prefill_chunk ({chunk}) must be >= 1")
    self.engine, self.slots, self.steps, self.chunk, self.granule = engine, slots, steps, chunk, granule
    self.group = batch_shards(engine.layout)
    self.prefixes = prefix_lib.PrefixStore() if prefix_reuse else None

  # ----------------------------------------------------------------- generation

  def generate(self, rows, limits, row_ids, eos, knobs, greedy: bool, stop=None):
    """New ids per row (None rows stay None), each row decoded in whichever slot frees first.

    `stop(i, tokens)`, when given, is asked after every decode call whether row i may stop early.
    """
    results: list = [None] * len(rows)
    live = [i for i, r in enumerate(rows) if r is not None]
    for i in live:
      results[i] = []
    queue = collections.deque(i for i in live if limits[i] > 0)
    if not queue:
      return results
    e = self.engine
    max_new = max(limits[i] for i in queue)
    width = self._width(max(len(rows[i]) - 1 for i in queue), e.cfg.max_seq_len - max_new)
    ring = width + max_new
    start, base = self._prefix([rows[i] for i in queue], width, [len(rows[i]) - 1 for i in queue])
    cache = self._run(("fresh", self.slots, ring), functools.partial(
        programs.fresh_cache, e.cfg, rows=self.slots, length=ring), ())
    state = {k: np.zeros(self.slots, np.int32) for k in STATE_KEYS}
    state["done"][:] = 1
    occupant: list = [None] * self.slots
    while True:
      free = [s for s in range(self.slots) if occupant[s] is None]
      while free and queue:
        take = [queue.popleft() for _ in range(min(self.group, len(free), len(queue)))]
        cache = self._prefill_insert(cache, [rows[i] for i in take], free[:len(take)], start, base, width)
        for s, i in zip(free, take):
          occupant[s] = i
          for key, value in zip(STATE_KEYS, (rows[i][-1], len(rows[i]) - 1, row_ids[i], limits[i], 0, 0)):
            state[key][s] = value
        free = free[len(take):]
      if all(o is None for o in occupant):
        return results
      out, emitted, busy, new_state, cache = self._decode(cache, state, eos, knobs, ring, greedy)
      out, emitted, busy, new_state = jax.device_get((out, emitted, busy, new_state))
      state = {k: np.array(v, np.int32) for k, v in new_state.items()}
      e.stats.useful_row_steps += int(busy)
      e.stats.decode_row_steps += self.slots * int(np.sum(np.any(out >= 0, axis=0)))  # steps run
      for s, i in enumerate(occupant):
        if i is None:
          continue
        results[i].extend(out[s, :emitted[s]].tolist())
        e.stats.new_tokens += int(emitted[s])
        if state["done"][s] or (stop is not None and stop(i, results[i])):
          occupant[s], state["done"][s] = None, 1

  def _decode(self, cache, state, eos, knobs, ring, greedy):
    e = self.engine
    args = (e.params, cache, {k: e._put(v, ("batch",)) for k, v in state.items()}, eos, *knobs)
    program = e._program(("slots", self.slots, ring, self.steps, greedy), "", functools.partial(
        programs.decode_steps, e.cfg, e.layout, steps=self.steps, greedy=greedy, backend=e.backend), args, donate=(1,))
    return program(*args)

  def _prefill_insert(self, cache, group_rows, slot_ids, start, base, width):
    """Prefills a group of prompts (all but each one's last token) and inserts it into `slot_ids`."""
    pad = self.group - len(group_rows)
    stops = [len(r) - 1 for r in group_rows] + [0] * pad
    group = self._group_cache(base, width, start)
    for lo, tokens, positions in self._chunks(group_rows + [[]] * pad, start, stops):
      group = self._chunk(group, tokens, positions, width)
    e = self.engine
    e.stats.prefill_tokens_saved += start * len(group_rows)
    ids = np.asarray(list(slot_ids) + [self.slots] * pad, np.int32)  # slot S = a dummy row: dropped
    args = (cache, group, e._put(ids, ()))
    program = e._program(("insert", self.group, width, self.slots, cache.max_len), "", programs.insert, args,
                         donate=(0,))
    return program(*args)

  # ----------------------------------------------------------------- scoring

  def next_token_probs(self, rows, candidates, out):
    """Fills out[i] with the candidates' probabilities after prompt i (rows None stay untouched)."""
    live = [i for i, r in enumerate(rows) if r is not None]
    seqs = [rows[i] for i in live]
    reads = self._score(seqs, [len(s) for s in seqs], [len(s) - 1 for s in seqs], "probs", candidates,
                        lambda r, lo, n: (None, None, np.full(n, -1)))
    for k, i in enumerate(live):
      out[i] = reads[k]

  def loglikelihood(self, rows, conts, out):
    """Fills out[i] with sum log p(continuation i | prompt i) (rows None stay untouched)."""
    live = [i for i, r in enumerate(rows) if r is not None]
    seqs = [rows[i] + conts[i] for i in live]
    firsts = [len(rows[i]) for i in live]
    sums = self._score(seqs, [len(s) - 1 for s in seqs], [f - 1 for f in firsts], "logp", None,
                       lambda r, lo, n: self._targets(seqs[r], firsts[r], lo, n))
    for k, i in enumerate(live):
      out[i] = sums[k]

  def _targets(self, seq, first, lo, n):
    """Next tokens of chunk [lo, lo + n) and which of them are continuation tokens."""
    at = np.arange(lo, lo + n) + 1
    inside = at < len(seq)
    targets = np.where(inside, np.asarray(seq + [0] * (n + 1))[np.minimum(at, len(seq))], 0)
    return targets, (inside & (at >= first)).astype(np.int32), None

  def _score(self, seqs, stops, keep, kind, candidates, extra):
    """Chunked scoring of `seqs` in groups; returns per seq the probs read at its last token (kind
    "probs") or the sum of its marked log-probabilities (kind "logp")."""
    if not seqs:
      return []
    e = self.engine
    width = self._width(max(stops), e.cfg.max_seq_len)
    start, base = self._prefix(seqs, width, keep)
    order = np.argsort([len(s) for s in seqs], kind="stable")
    pending = []
    cand = candidates if candidates is not None else e._put(np.zeros(1, np.int32), ())
    for g in range(0, len(order), self.group):
      members = [int(k) for k in order[g:g + self.group]]
      pad = self.group - len(members)
      group = self._group_cache(base, width, start)
      e.stats.prefill_tokens_saved += start * len(members)
      for lo, tokens, positions in self._chunks([seqs[k] for k in members] + [[]] * pad, start,
                                                [stops[k] for k in members] + [0] * pad):
        n = tokens.shape[1]
        targets, mask, reads = np.zeros_like(tokens), np.zeros_like(tokens), np.full(self.group, -1, np.int32)
        for r, k in enumerate(members):
          t, m, _ = extra(k, lo, n)
          if t is not None:
            targets[r], mask[r] = t, m
          reads[r] = len(seqs[k]) - 1 - lo if lo <= len(seqs[k]) - 1 < lo + n else -1
        args = (e.params, group, *e._put((tokens, positions, targets, mask), ("batch", "length")),
                e._put(reads, ("batch",)), cand)
        program = e._program(("score", kind, self.group, self.chunk, width, cand.shape[0]), "", functools.partial(
            programs.score_chunk, e.cfg, e.layout, kind=kind, backend=e.backend), args, donate=(1,))
        group, value = program(*args)
        pending.append((members, reads, value))
    if kind == "probs":
      result = [None] * len(seqs)
      for members, reads, value in pending:
        value = np.asarray(jax.device_get(value), np.float64)
        for r, k in enumerate(members):
          if reads[r] >= 0:
            result[k] = value[r]
      return result
    result = np.zeros(len(seqs), np.float64)
    for members, _, value in pending:
      result[members] += np.asarray(jax.device_get(value), np.float64)[:len(members)]
    return list(result)

  # ----------------------------------------------------------------- shared pieces

  def _width(self, need: int, limit: int) -> int:
    """Group cache width for prompts of up to `need` prefilled tokens: its bucket in whole chunks, plus
    one chunk (a prefix that ends inside a chunk shifts the chunks after it)."""
    bucket = self.engine._bucket(max(need, 1), max(limit, need, 1))
    return -(-bucket // self.chunk) * self.chunk + self.chunk

  def _chunks(self, seqs, start, stops):
    """(offset, tokens [P, C], positions [P, C]) covering seqs[r][start:stops[r]], padding at -1."""
    n = max((-(-(stop - start) // self.chunk) for stop in stops), default=0)
    for c in range(max(n, 0)):
      lo = start + c * self.chunk
      tokens = np.zeros((len(seqs), self.chunk), np.int32)
      positions = np.full((len(seqs), self.chunk), -1, np.int32)
      for r, (seq, stop) in enumerate(zip(seqs, stops)):
        hi = min(lo + self.chunk, stop)
        if hi > lo:
          tokens[r, :hi - lo] = seq[lo:hi]
          positions[r, :hi - lo] = np.arange(lo, hi)
      self.engine._count_padding(positions >= 0)
      yield lo, tokens, positions

  def _chunk(self, group, tokens, positions, width):
    e = self.engine
    args = (e.params, group, *e._put((tokens, positions), ("batch", "length")))
    program = e._program(("chunk", self.group, self.chunk, width), "", functools.partial(
        programs.prefill_chunk, e.cfg, e.layout, backend=e.backend), args, donate=(1,))
    return program(*args)

  def _group_cache(self, base, width, start: int = 0):
    """A group cache to prefill into from slot `start`: a copy of the shared prefix's, or an empty one."""
    e = self.engine
    if base is None:
      return self._run(("fresh", self.group, width), functools.partial(
          programs.fresh_cache, e.cfg, rows=self.group, length=width), ())
    return self._run(("copy", self.group, width), programs.copy_cache, (base, e._put(np.int32(start), ())))

  def _run(self, shape, fn, args):
    return self.engine._program(shape, "", fn, args)(*args)

  def _prefix(self, seqs, width, keep):
    """(length, group cache holding it) of the shared prefix these prompts reuse; (0, None) if none.

    The longest prefix all of them share (minus what each must run itself), in whole granules, is
    computed once and stored; a later call reuses a stored prefix, extending it when it can."""
    if self.prefixes is None or not seqs:
      return 0, None
    limit = prefix_lib.usable_prefix(seqs, granule=self.granule, keep=keep) if len(seqs) > 1 else \
        min(keep) // self.granule * self.granule
    have, cache = self.prefixes.longest(seqs, width, limit)
    if len(seqs) > 1 and limit > have:
      tokens = list(seqs[0][:limit])
      cache = self._group_cache(cache, width, have)
      for _, chunk_tokens, positions in self._chunks([tokens] * self.group, have, [limit] * self.group):
        cache = self._chunk(cache, chunk_tokens, positions, width)
      self.prefixes.put(tokens, width, cache)
      have = limit
    return have, cache
