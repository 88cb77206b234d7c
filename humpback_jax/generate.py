"""Generation and scoring over token ids: sampling, jitted prefill + `while_loop` decode, and
log-likelihood / next-token probabilities, all batched, length-bucketed and sharded.

The engine never sees text (the tokenizer and stop strings live in the text layer). Prompts are
sorted by length, cut into batches of `batch_size` and left-padded to the smallest bucket, so
only a few (batch, bucket, max_new) shapes are ever compiled. Prefill writes all but the last
prompt token into the KV cache (its logits are dead code, so XLA drops the vocab projection);
the decode loop then feeds the last prompt token and one new token per step, on device, until
every row hit an EOS id or its own `max_new_tokens`. Each row samples with a key folded from
(seed, its index in the input), so a row's tokens do not depend on which rows share its batch.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from humpback_jax import sharding
from humpback_jax.engine import slots
from humpback_jax.engine.sampling import SAMPLING_CANDIDATES, sample_next  # noqa: F401 (public here too)
from humpback_jax.model import build
from humpback_jax.model import cache as kv_cache
from humpback_jax.model import ops

TOO_LONG_POLICIES = ("truncate_left", "skip")
SCHEDULERS = ("static", "continuous")
EMPTY_POLICIES = ("raise", "skip")
_EOS_SLOTS = 8  # EOS ids are padded to a multiple of this, so their number rarely changes a shape


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """Decoding knobs. temperature 0 = greedy; top_p 1.0 and top_k 0 switch those filters off."""
  temperature: float = 0.7
  top_p: float = 0.9
  top_k: int = 0
  max_new_tokens: int = 512
  seed: int = 0


GREEDY = SamplingParams(temperature=0.0, top_p=1.0)


@dataclasses.dataclass
class EngineStats:
  """Counters over an engine's lifetime (compiles, padding, tokens, time, skipped inputs)."""
  compiles: int = 0         # distinct (kind, batch, bucket, max_new, greedy) shapes compiled
  compile_seconds: float = 0.0
  compile_cpu_seconds: float = 0.0  # user + sys of this process while compiling (wall differs on a busy host)
  batches: int = 0
  prompt_slots: int = 0     # prompt tokens + padding, over every batch (dummy rows included)
  padding_slots: int = 0
  new_tokens: int = 0
  seconds: float = 0.0      # wall time of the calls, compiles included
  truncated: int = 0
  skipped_too_long: int = 0
  skipped_empty: int = 0
  prefill_tokens_saved: int = 0  # prompt tokens whose KV came from a shared prefix (continuous engine)
  useful_row_steps: int = 0      # decode row-steps of live rows / all row-steps run: slot utilisation
  decode_row_steps: int = 0

  @property
  def padding_share(self) -> float:
    """Fraction of prompt slots that were padding."""
    return self.padding_slots / max(self.prompt_slots, 1)

  @property
  def tokens_per_second(self) -> float:
    """New tokens per second of wall time, compiles excluded."""
    return self.new_tokens / max(self.seconds - self.compile_seconds, 1e-9)

  @property
  def slot_utilisation(self) -> float:
    """Share of decode row-steps that served a live row (continuous engine)."""
    return self.useful_row_steps / max(self.decode_row_steps, 1)


# --------------------------------------------------------------------------- pure functions


def prefill(cfg, layout, params, tokens_bt, positions_bt, *, cache_len: int, backend=ops.XLA):
  """Runs left-padded prompts [b, t] (position -1 = pad) into a fresh cache of `cache_len` slots."""
  cache = kv_cache.init_cache(cfg, tokens_bt.shape[0], cache_len)
  _, cache = build.forward(cfg, params, tokens_bt, positions_bt, cache=cache, layout=layout, backend=backend)
  return cache


def decode(cfg, layout, params, cache, token_b, position_b, row_ids_b, max_new_b, eos_ids, seed,
           temperature, top_p, top_k, *, max_new: int, greedy: bool = False, backend=ops.XLA):
  """Feeds `token_b` at `position_b`, then samples up to `max_new` tokens per row in a while_loop.

  `greedy` (static) promises temperature 0: with the CPU kernels the loop then picks each token with
  `ops.greedy_head`, which computes only the logits that could be the largest.
  Returns (tokens [b, max_new], counts [b] of new tokens before EOS or the row's limit, cache).
  """
  b = token_b.shape[0]
  base = jax.random.key(seed)
  row_keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(row_ids_b)
  backend = backend.in_decode_loop()  # few-row kernels, weights packed once per loop
  head_tables = None
  if greedy:  # the greedy head's tables: built once, outside the loop
    head_nk = build.head_weight(cfg, params).T  # [vocab, dim]: the tied embedding itself, no copy
    head_tables = ops.greedy_head_tables(head_nk, backend)

  def next_tokens(token, position, cache, step, live):
    if head_tables is None:
      logits, cache = build.forward(cfg, params, token[:, None], position[:, None], cache=cache, layout=layout,
                                    backend=backend)
      return sample_next(logits[:, 0], row_keys, temperature, top_p, top_k, step=step, backend=backend,
                         live=live), cache
    hidden, cache = build.forward(cfg, params, token[:, None], position[:, None], cache=cache, layout=layout,
                                  hidden_only=True, backend=backend)
    return ops.greedy_head(hidden[:, 0], head_tables, head_nk), cache

  def body(carry):
    step, token, position, cache, out, counts, done = carry
    new, cache = next_tokens(token, position, cache, step, ~done)
    is_eos = jnp.isin(new, eos_ids)
    out = jax.lax.dynamic_update_slice(out, new[:, None], (0, step))
    counts += (~done & ~is_eos).astype(jnp.int32)
    done |= is_eos | (step + 1 >= max_new_b)
    return step + 1, new, position + 1, cache, out, counts, done

  def cond(carry):
    step, done = carry[0], carry[-1]
    return (step < max_new) & ~jnp.all(done)

  carry = (jnp.zeros((), jnp.int32), token_b, position_b, cache, jnp.full((b, max_new), -1, jnp.int32),
           jnp.zeros((b,), jnp.int32), max_new_b <= 0)
  _, _, _, cache, out, counts, _ = jax.lax.while_loop(cond, body, carry)
  return out, counts, cache


def continuation_logprob(cfg, layout, params, tokens_bt, segment_ids_bt, target_mask_bt, *, backend=ops.XLA):
  """Sum over marked tokens of log p(token | tokens before it), for right-padded rows [b, t]."""
  logits, _ = build.forward(cfg, params, tokens_bt, None, segment_ids_bt, layout=layout, backend=backend)
  logits, targets = logits[:, :-1], tokens_bt[:, 1:]
  picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  logp = picked - jax.nn.logsumexp(logits, axis=-1)
  return jnp.sum(jnp.where(target_mask_bt[:, 1:] > 0, logp, 0.0), axis=-1)


def next_token_probs(cfg, layout, params, tokens_bt, positions_bt, candidate_ids, *, backend=ops.XLA):
  """Full-vocab softmax after left-padded prompts [b, t], read at `candidate_ids` -> [b, c].

  All but the last token go through the cache path, so the vocab projection runs only once per row.
  """
  cache = prefill(cfg, layout, params, tokens_bt[:, :-1], positions_bt[:, :-1], cache_len=tokens_bt.shape[1],
                  backend=backend)
  logits, _ = build.forward(cfg, params, tokens_bt[:, -1:], positions_bt[:, -1:], cache=cache, layout=layout,
                            backend=backend)
  return jax.nn.softmax(logits[:, 0], axis=-1)[:, candidate_ids]


def truncate_at_stop(text: str, stop_strings: Sequence[str]) -> str:
  """`text` cut before the earliest occurrence of any stop string (unchanged when none occurs)."""
  cuts = [text.find(s) for s in stop_strings if s]
  cuts = [c for c in cuts if c >= 0]
  return text[:min(cuts)] if cuts else text


# --------------------------------------------------------------------------- host-side helpers


def _left_pad(rows, width):
  """Rows of ids -> tokens [b, width] padded with 0 on the left, positions with -1 on pads."""
  tokens = np.zeros((len(rows), width), np.int32)
  positions = np.full((len(rows), width), -1, np.int32)
  for r, row in enumerate(rows):
    if len(row):
      tokens[r, width - len(row):] = row
      positions[r, width - len(row):] = np.arange(len(row))
  return tokens, positions


def _right_pad(rows, width):
  """Rows of ids -> tokens [b, width] padded with 0 on the right, segment ids (1 = token, 0 = pad)."""
  tokens = np.zeros((len(rows), width), np.int32)
  segments = np.zeros((len(rows), width), np.int32)
  for r, row in enumerate(rows):
    tokens[r, :len(row)] = row
    segments[r, :len(row)] = 1
  return tokens, segments


def _batches(lengths, batch_size):
  """Input indices sorted by length, cut into consecutive groups of `batch_size`."""
  order = np.argsort(np.asarray(lengths), kind="stable")
  return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


class Engine:
  """Batched, bucketed, sharded generation and scoring for one model on one layout.

  A prompt may use `cfg.max_seq_len - max_new` positions (scoring: the whole context); the
  buckets below that limit, plus the limit itself, are the padded widths. Longer prompts are
  cut to their last tokens (`too_long="truncate_left"`) or skipped (`"skip"`); empty prompts
  raise (`on_empty="raise"`) or are skipped; both are counted in `stats`.
  """

  def __init__(self, cfg, params, layout, *, prompt_buckets=(64, 128, 256, 512, 1024, 2048),
               batch_size: int = 32, too_long: str = "truncate_left", on_empty: str = "raise",
               scheduler: str = "static", decode_slots: int | None = None, decode_steps: int = 8,
               prefill_chunk: int = 64, prefix_reuse: bool = True, prefix_granule: int = 16,
               prefill_rows: int = 0, refill_slots: int = 0):
    if too_long not in TOO_LONG_POLICIES:
      raise ValueError(f"too_long={too_long!r}: expected one of {TOO_LONG_POLICIES}")
    if on_empty not in EMPTY_POLICIES:
      raise ValueError(f"on_empty={on_empty!r}: expected one of {EMPTY_POLICIES}")
    if scheduler not in SCHEDULERS:
      raise ValueError(f"scheduler={scheduler!r}: expected one of {SCHEDULERS}")
    if batch_size < 1 or min(prompt_buckets) < 2:
      raise ValueError(f"batch_size ({batch_size}) must be >= 1 and prompt_buckets {prompt_buckets} >= 2")
    self.cfg, self.layout = cfg, layout
    self.backend = ops.for_model(cfg, layout)  # the kernels of every program of this engine
    self.params = jax.device_put(params, build.param_shardings(cfg, layout))
    self.buckets = tuple(sorted(prompt_buckets))
    self.batch_size, self.too_long, self.on_empty = batch_size, too_long, on_empty
    self.stats = EngineStats()
    self._programs: dict[tuple, object] = {}
    self.scheduler = None  # static batches; else the continuous engine's slots and chunked prefill
    if scheduler == "continuous":
      self.scheduler = slots.Scheduler(self, slots=decode_slots or batch_size, steps=decode_steps,
                                       chunk=prefill_chunk, prefix_reuse=prefix_reuse, granule=prefix_granule,
                                       prefill_rows=prefill_rows, refill=refill_slots)

  # ----------------------------------------------------------------- public API

  def programs(self) -> dict[tuple[tuple, str], object]:
    """The programs compiled so far, by (shape key, part), e.g. to read their HLO (`.as_text()`);
    generation programs are parts "prefill" and "decode" of a shape key ending in the greedy flag. A copy."""
    return dict(self._programs)

  def generate_ids(self, prompts, sampling: SamplingParams = GREEDY, eos_ids: Sequence[int] = (),
                   max_new_tokens=None, index_offset: int = 0, stop=None) -> list[list[int] | None]:
    """New token ids per prompt (EOS excluded), in input order; None for prompts skipped by policy.

    `max_new_tokens`: None (sampling's), an int, or one int per prompt. Row i samples with
    fold_in(seed, index_offset + i), so results do not depend on batching or sharding. `stop(i, ids)`
    lets the continuous engine free row i's slot early (its ids then end once the test holds).
    """
    start = time.perf_counter()
    limits = self._max_new_per_row(len(prompts), sampling, max_new_tokens)
    max_new = max(max(limits, default=1), 1)  # static: one program serves every row's own limit
    rows = self._checked(prompts, lambda i: self.cfg.max_seq_len - max_new)
    live = [i for i, row in enumerate(rows) if row is not None]
    eos = self._eos_array(eos_ids)
    knobs = self._put((np.int32(sampling.seed), np.float32(sampling.temperature),
                       np.float32(sampling.top_p), np.int32(sampling.top_k)), ())
    if self.scheduler is not None:
      results = self.scheduler.generate(rows, limits, [index_offset + i for i in range(len(rows))], eos, knobs,
                                        bool(sampling.temperature <= 0), stop)
      self.stats.seconds += time.perf_counter() - start
      return results
    pending = []
    for group in _batches([len(rows[i]) for i in live], self.batch_size):
      idx = [live[g] for g in group]
      pending.append((idx, self._generate_batch([rows[i] for i in idx], [limits[i] for i in idx],
                                                [index_offset + i for i in idx], max_new, eos, knobs, sampling)))
    results: list[list[int] | None] = [None] * len(prompts)
    for idx, arrays in pending:  # fetched only now, so host work overlaps the device's
      out, counts = jax.device_get(arrays)
      for r, i in enumerate(idx):
        results[i] = out[r, :counts[r]].tolist()
        self.stats.new_tokens += int(counts[r])
    self.stats.seconds += time.perf_counter() - start
    return results

  def loglikelihood(self, prompts, continuations) -> np.ndarray:
    """Sum of log p(continuation | prompt) per pair; NaN for pairs skipped by policy."""
    if len(prompts) != len(continuations):
      raise ValueError(f"{len(prompts)} prompts but {len(continuations)} continuations")
    start = time.perf_counter()
    limit = self.cfg.max_seq_len
    conts = [self._checked_ids(c, i, "continuation") for i, c in enumerate(continuations)]
    rows = self._checked(prompts, lambda i: limit - len(conts[i]))
    live = [i for i, row in enumerate(rows) if row is not None]
    out = np.full(len(prompts), np.nan, np.float64)
    if self.scheduler is not None:
      self.scheduler.loglikelihood(rows, conts, out)
      live = []
    for group in _batches([len(rows[i]) + len(conts[i]) for i in live], self.batch_size):
      idx = [live[g] for g in group]
      pad = self.batch_size - len(idx)
      seqs = [rows[i] + conts[i] for i in idx] + [[0]] * pad
      width = self._bucket(max(len(s) for s in seqs), limit)
      tokens, segments = _right_pad(seqs, width)
      targets = np.zeros_like(tokens)
      for r, i in enumerate(idx):
        targets[r, len(rows[i]):len(seqs[r])] = 1
      self._count_padding(segments)
      args = (self.params, *self._put((tokens, segments, targets), ("batch", "length")))
      program = self._program(("loglikelihood", self.batch_size, width), "",
                              functools.partial(continuation_logprob, self.cfg, self.layout, backend=self.backend), args)
      out[idx] = jax.device_get(program(*args))[:len(idx)]
    self.stats.seconds += time.perf_counter() - start
    return out

  def next_token_probs(self, prompts, candidate_ids: Sequence[int]) -> np.ndarray:
    """Probabilities [n, len(candidate_ids)] of the candidates after each prompt (full-vocab softmax).

    Rows of prompts skipped by policy are NaN.
    """
    start = time.perf_counter()
    candidates = self._put(np.asarray(self._checked_ids(candidate_ids, 0, "candidate_ids"), np.int32), ())
    limit = self.cfg.max_seq_len
    rows = self._checked(prompts, lambda i: limit)
    live = [i for i, row in enumerate(rows) if row is not None]
    out = np.full((len(prompts), candidates.shape[0]), np.nan, np.float64)
    if self.scheduler is not None:
      self.scheduler.next_token_probs(rows, candidates, out)
      live = []
    for group in _batches([len(rows[i]) for i in live], self.batch_size):
      idx = [live[g] for g in group]
      seqs = [rows[i] for i in idx] + [[0]] * (self.batch_size - len(idx))
      tokens, positions = _left_pad(seqs, self._bucket(max(len(s) for s in seqs), limit))
      self._count_padding(positions >= 0)
      args = (self.params, *self._put((tokens, positions), ("batch", "length")), candidates)
      program = self._program(("next_token_probs", *tokens.shape, candidates.shape[0]), "",
                              functools.partial(next_token_probs, self.cfg, self.layout, backend=self.backend), args)
      out[idx] = jax.device_get(program(*args))[:len(idx)]
    self.stats.seconds += time.perf_counter() - start
    return out

  # ----------------------------------------------------------------- internals

  def _generate_batch(self, rows, limits, row_ids, max_new, eos, knobs, sampling):
    """Dispatches prefill + decode for one batch; returns device arrays (tokens, counts)."""
    dummies = self.batch_size - len(rows)  # dummy rows: one token, nothing to generate
    rows, limits, row_ids = rows + [[0]] * dummies, limits + [0] * dummies, row_ids + [0] * dummies
    width = self._bucket(max(len(r) for r in rows), self.cfg.max_seq_len - max_new)
    tokens, positions = _left_pad(rows, width)
    self._count_padding(positions >= 0)
    head = (self.params, *self._put((tokens[:, :-1], positions[:, :-1]), ("batch", "length")))
    greedy = bool(sampling.temperature <= 0)  # its own program: on CPU, no logits but the argmax's
    shape = ("generate", self.batch_size, width, max_new, greedy)
    run_prefill = self._program(shape, "prefill", functools.partial(
        prefill, self.cfg, self.layout, cache_len=width - 1 + max_new, backend=self.backend), head)
    last = self._put((tokens[:, -1], positions[:, -1], np.asarray(row_ids, np.int32),
                      np.asarray(limits, np.int32)), ("batch",))
    args = (self.params, run_prefill(*head), *last, eos, *knobs)
    run_decode = self._program(shape, "decode", functools.partial(
        decode, self.cfg, self.layout, max_new=max_new, greedy=greedy, backend=self.backend), args, donate=(1,))
    out, counts, _ = run_decode(*args)
    self.stats.batches += 1
    return out, counts

  def _program(self, shape, part, fn, args, donate=()):
    """The `part` program of a `shape` key, compiled ahead of time on first use.

    Inputs keep the shardings they were placed with; outputs are sharded over the batch (a
    returned cache by `cache_shardings`). `stats.compiles` counts distinct shapes.
    """
    if (shape, part) not in self._programs:
      start, cpu = time.perf_counter(), time.process_time()
      in_shardings = jax.tree.map(lambda a: a.sharding, args)
      out_shardings = jax.tree.map(self._output_sharding, jax.eval_shape(fn, *args),
                                   is_leaf=lambda x: isinstance(x, kv_cache.KVCache))
      jitted = jax.jit(fn, in_shardings=in_shardings, out_shardings=out_shardings, donate_argnums=donate)
      self._programs[shape, part] = jitted.lower(*args).compile()
      self.stats.compiles = len({s for s, _ in self._programs})
      self.stats.compile_seconds += time.perf_counter() - start
      self.stats.compile_cpu_seconds += time.process_time() - cpu
    return self._programs[shape, part]

  def _output_sharding(self, out):
    if isinstance(out, kv_cache.KVCache):
      return kv_cache.cache_shardings(self.layout, self.cfg, out.positions.shape[0], out.max_len)
    return self.layout.sharding(("batch",) + (None,) * (out.ndim - 1) if out.ndim else (), out.shape)

  def _put(self, arrays, names):
    """Explicit host -> device transfer of one array or a tuple, sharded by logical `names`."""
    if isinstance(arrays, tuple):
      return tuple(self._put(a, names) for a in arrays)
    return jax.device_put(arrays, self.layout.sharding(names, np.shape(arrays)))

  def _bucket(self, length: int, limit: int) -> int:
    """The smallest bucket >= length among the buckets below `limit`, and `limit` itself."""
    return next(b for b in (*[b for b in self.buckets if b < limit], limit) if b >= length)

  def _count_padding(self, filled):
    self.stats.prompt_slots += filled.size
    self.stats.padding_slots += int(filled.size - np.count_nonzero(filled))

  def _eos_array(self, eos_ids):
    eos = np.full(-(-max(len(eos_ids), 1) // _EOS_SLOTS) * _EOS_SLOTS, -1, np.int32)
    eos[:len(eos_ids)] = np.asarray(self._checked_ids(list(eos_ids), 0, "eos_ids"), np.int32).reshape(-1)
    return self._put(eos, ())

  def _max_new_per_row(self, n, sampling, max_new_tokens) -> list[int]:
    if max_new_tokens is None:
      max_new_tokens = sampling.max_new_tokens
    if isinstance(max_new_tokens, (int, np.integer)):
      return [int(max_new_tokens)] * n
    if len(max_new_tokens) != n:
      raise ValueError(f"max_new_tokens has {len(max_new_tokens)} entries for {n} prompts")
    return [int(m) for m in max_new_tokens]

  def _checked_ids(self, ids, index, what="prompt"):
    """`ids` as a list, or ValueError naming the input index and the first id outside the vocab."""
    ids = np.asarray(ids, np.int64).reshape(-1)
    bad = ids[(ids < 0) | (ids >= self.cfg.vocab_size)]
    if bad.size:
      raise ValueError(f"{what} {index}: token id {int(bad[0])} is outside the vocabulary "
                       f"[0, {self.cfg.vocab_size})")
    return ids.tolist()

  def _checked(self, prompts, limit_of) -> list[list[int] | None]:
    """Validated prompts: bad ids raise; empty and too-long ones follow the engine's policies (None = skip)."""
    rows = []
    for i, prompt in enumerate(prompts):
      ids = self._checked_ids(prompt, i)
      limit = limit_of(i)
      if not ids:
        if self.on_empty == "raise":
          raise ValueError(f"prompt {i} is empty; pass at least one token id (or use on_empty='skip')")
        self.stats.skipped_empty += 1
        ids = None
      elif len(ids) > limit and (self.too_long == "skip" or limit < 1):
        self.stats.skipped_too_long += 1
        ids = None
      elif len(ids) > limit:
        self.stats.truncated += 1
        ids = ids[len(ids) - limit:]
      rows.append(ids)
    return rows


def process_local_engine(cfg, params, layout, **engine_kwargs) -> Engine:
  """An Engine on this process's devices only (`sharding.process_local`), params copied there.

  Generation is embarrassingly parallel: each process decodes its own shards of the input alone.
  With one process this is `Engine(cfg, params, layout, ...)`.
  """
  local = sharding.process_local(layout)
  if local is not layout:
    params = sharding.to_layout(params, build.param_shardings(cfg, local))
  return Engine(cfg, params, local, **engine_kwargs)
