"""Host side of the continuous engine: a queue of prompts over a fixed number of decode slots.

Modelled on JetStream's prefill / insert / generate and vLLM's scheduler, written for our programs:
each round fills the free slots (prefill groups of queued prompts chunk by chunk, then insert their
rows into the slot cache), runs up to `decode_steps` steps over every slot in one jitted call, which
returns early once `refill` slots are free while prompts wait, and frees the slots whose rows
stopped (EOS, their own limit, or the caller's stop test). Prompts are taken longest first: the
long ones do not straggle at the end, and a group's rows are of similar length (little padding).
A prefill group takes as many queued prompts as its largest size allows (a power of two times the
batch shards, at most `prefill_rows`), and its prefilled rows wait until slots free: a prefill call
costs about one pass over the weights however few its tokens, so on CPU a chunk of 8 rows runs at
~3x the tokens/s of one row's (bench/RESULTS.md), and groups stay full while slots free one by one.
On a mesh each prefilled row goes to a free slot of its own batch shard, so insertion moves no rows
between devices (a row waits when only other shards have free slots).
Only a handful of shapes are ever compiled: chunk, insert and decode programs per (group rows,
cache width, new-token budget). Scoring runs the same chunked prefill in groups of `prefill_rows`,
with the shared prefix reused, and reads scores per chunk.
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


def batch_shards(layout, rows: int | None = None) -> int:
  """How many ways the layout splits a batch (data x fsdp: the prefill group's row count), or a batch
  of `rows` rows (the mesh axes that divide it)."""
  axes = layout.spec(("batch",), None if rows is None else (rows,))[0]
  axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
  return math.prod(layout.mesh.shape[a] for a in axes)


def prefill_group_sizes(shards: int, prefill_rows: int, slots: int) -> list[int]:
  """Row counts a prefill group may have: `shards` (the batch shards) times powers of two, up to
  `prefill_rows` (0 = the decode slots), at least one."""
  most = max(prefill_rows or slots, shards)
  return [shards << j for j in range(most.bit_length()) if shards << j <= most]


def group_width(bucket: int, chunk: int) -> int:
  """Group cache width for prompts in a `bucket`: the bucket in whole chunks, plus one chunk (a shared
  prefix that ends inside a chunk shifts the chunks after it)."""
  return -(-bucket // chunk) * chunk + chunk


class Scheduler:
  """Continuous batching and chunked, prefix-reusing prefill over one `generate.Engine`'s programs."""

  def __init__(self, engine, *, slots: int, steps: int, chunk: int, prefix_reuse: bool, granule: int = 16,
               prefill_rows: int = 0, refill: int = 0):
    if slots < 1 or steps < 1 or chunk < 1 or prefill_rows < 0 or refill < 0:
      raise ValueError(f"decode_slots ({slots}), decode_steps ({steps}) and prefill_chunk ({chunk}) must be >= 1, "
                       f"prefill_rows ({prefill_rows}) and refill ({refill}) >= 0")
    self.engine, self.slots, self.steps, self.chunk, self.granule = engine, slots, steps, chunk, granule
    self.group = batch_shards(engine.layout)
    self.slot_shards = batch_shards(engine.layout, slots)  # the slot cache's row shards (insertion is per shard)
    self.slots_per_shard = slots // self.slot_shards
    self.group_sizes = prefill_group_sizes(self.group, prefill_rows, slots)
    self.refill = min(refill or max(1, slots // 4), slots)
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
    queue = collections.deque(sorted((i for i in live if limits[i] > 0), key=lambda i: -len(rows[i])))
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
    staged = None  # [group cache, its prompts, the group rows not yet inserted]: prefilled rows waiting for slots
    while True:
      free = [s for s in range(self.slots) if occupant[s] is None]
      while free and (queue or staged):
        if staged is None:
          take = [queue.popleft() for _ in range(min(self._group_size(len(queue)), len(queue)))]
          staged = [self._prefill([rows[i] for i in take], start, base, width), take, list(range(len(take)))]
        group, take, waiting = staged
        placed = self._place(waiting, free, group.positions.shape[0])
        if not placed:  # the free slots are on other batch shards than the waiting rows: decode first
          break
        cache = self._insert(cache, group, placed)
        for r, s in placed.items():
          i = occupant[s] = take[r]
          for key, value in zip(STATE_KEYS, (rows[i][-1], len(rows[i]) - 1, row_ids[i], limits[i], 0, 0)):
            state[key][s] = value
        waiting = [r for r in waiting if r not in placed]
        staged = [group, take, waiting] if waiting else None
        free = [s for s in free if s not in placed.values()]
      if all(o is None for o in occupant):
        return results
      # Return early to refill only while prompts wait, once `refill` more slots are free than now (a free
      # slot now is on a batch shard whose waiting rows are all placed).
      min_done = min(len(free) + self.refill, self.slots) if queue or staged else self.slots
      out, emitted, busy, new_state, cache = self._decode(cache, state, min_done, eos, knobs, ring, greedy)
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

  def _group_size(self, wanted: int) -> int:
    """The largest prefill group size <= `wanted` (the smallest when none is)."""
    return max([s for s in self.group_sizes if s <= wanted] or self.group_sizes[:1])

  def _fitting_size(self, rows: int) -> int:
    """The smallest prefill group size >= `rows` (rows <= the largest)."""
    return min(s for s in self.group_sizes if s >= rows)

  def _decode(self, cache, state, min_done, eos, knobs, ring, greedy):
    e = self.engine
    args = (e.params, cache, {k: e._put(v, ("batch",)) for k, v in state.items()}, e._put(np.int32(min_done), ()),
            eos, *knobs)
    program = e._program(("slots", self.slots, ring, self.steps, greedy), "", functools.partial(
        programs.decode_steps, e.cfg, e.layout, steps=self.steps, greedy=greedy, backend=e.backend), args, donate=(1,))
    return program(*args)

  def _prefill(self, group_rows, start, base, width):
    """A group cache holding `group_rows` prefilled (all but each one's last token), padded with
    empty rows to a group size."""
    size = self._fitting_size(len(group_rows))
    pad = size - len(group_rows)
    group = self._group_cache(base, width, start, size)
    stops = [len(r) - 1 for r in group_rows] + [0] * pad
    for _, tokens, positions in self._chunks(group_rows + [[]] * pad, start, stops):
      group = self._chunk(group, tokens, positions, width)
    self.engine.stats.prefill_tokens_saved += start * len(group_rows)
    return group

  def _place(self, waiting, free, group_rows) -> dict:
    """{group row: free slot} for as many waiting rows as fit, each in a slot of its own shard of the
    slot cache (row r of P is held by shard r // (P / shards), slot s of S by shard s // (S / shards))."""
    placed, free = {}, list(free)
    for r in waiting:
      shard = r // (group_rows // self.slot_shards)
      s = next((s for s in free if s // self.slots_per_shard == shard), None)
      if s is not None:
        placed[r] = s
        free.remove(s)
    return placed

  def _insert(self, cache, group, placed):
    """The slot cache with the group rows of `placed` ({row: slot}) inserted into their slots."""
    e = self.engine
    local = np.full(group.positions.shape[0], self.slots_per_shard, np.int32)  # past the shard's slots: not inserted
    for r, s in placed.items():
      local[r] = s % self.slots_per_shard
    args = (cache, group, e._put(local, ()))
    program = e._program(("insert", local.size, group.max_len, self.slots, cache.max_len), "", functools.partial(
        programs.insert, shards=self.slot_shards), args, donate=(0,))
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
    most = self.group_sizes[-1]
    for g in range(0, len(order), most):
      members = [int(k) for k in order[g:g + most]]
      size = self._fitting_size(len(members))
      pad = size - len(members)
      group = self._group_cache(base, width, start, size)
      e.stats.prefill_tokens_saved += start * len(members)
      for lo, tokens, positions in self._chunks([seqs[k] for k in members] + [[]] * pad, start,
                                                [stops[k] for k in members] + [0] * pad):
        n = tokens.shape[1]
        targets, mask, reads = np.zeros_like(tokens), np.zeros_like(tokens), np.full(size, -1, np.int32)
        for r, k in enumerate(members):
          t, m, _ = extra(k, lo, n)
          if t is not None:
            targets[r], mask[r] = t, m
          reads[r] = len(seqs[k]) - 1 - lo if lo <= len(seqs[k]) - 1 < lo + n else -1
        args = (e.params, group, *e._put((tokens, positions, targets, mask), ("batch", "length")),
                e._put(reads, ("batch",)), cand)
        program = e._program(("score", kind, size, n, width, cand.shape[0]), "", functools.partial(
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
    """Group cache width for prompts of up to `need` prefilled tokens (`group_width` of their bucket)."""
    return group_width(self.engine._bucket(max(need, 1), max(limit, need, 1)), self.chunk)

  def _chunks(self, seqs, start, stops):
    """(offset, tokens [P, C], positions [P, C]) covering seqs[r][start:stops[r]], padding at -1.

    Every chunk has the one width C: a row's values then do not depend on where its chunk starts
    (the kernels round alike for a given shape), so prefix reuse changes no bit of a result."""
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
    program = e._program(("chunk", *tokens.shape, width), "", functools.partial(
        programs.prefill_chunk, e.cfg, e.layout, backend=e.backend), args, donate=(1,))
    return program(*args)

  def _group_cache(self, base, width, start: int = 0, rows: int = 0):
    """A group cache of `rows` rows (default: the batch shards) to prefill into from slot `start`: the
    shared prefix's rows repeated, or an empty one."""
    e, rows = self.engine, rows or self.group
    if base is None:
      return self._run(("fresh", rows, width), functools.partial(
          programs.fresh_cache, e.cfg, rows=rows, length=width), ())
    return self._run(("copy", rows, width), functools.partial(programs.copy_cache, rows=rows),
                     (base, e._put(np.int32(start), ())))

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
