"""Supervised fine-tuning data: (instruction, output) -> tokens with a loss mask -> steps of B examples.

An example is `[bos] + encode(prompt) + encode(output) + eos` (bos when the tokenizer has one), the
prompt being the instruction (plus tags) in the chat template; prompt and output are encoded
separately so the mask starts exactly at the first output token. The loss covers the output tokens
and the final eos (the paper: loss on the output only). A step's batch holds exactly `batch_size` examples (the paper's
batch) laid into rows; batches are dicts of numpy arrays, all [rows, length]:
  tokens, targets (int32), loss_mask (float32), positions, segment_ids (int32),
with `targets[t] = tokens[t + 1]` and `loss_mask[t] = example_mask[t + 1]` inside one example; an
example's last position predicts nothing (mask 0). `segment_ids` number the examples of a row 1, 2, ...
(0 is padding) and `positions` restart at 0 in each example, so attention never crosses examples.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from humpback_jax.prompts import tagged_instruction
from humpback_jax.tokenizer import render_chat

POLICIES = ("truncate", "drop")
BATCHINGS = ("packing", "bucketing")
PACK_ROWS = ("step", "block")  # packed row count: each step's own, or the most any step of the block needs

Example = tuple[np.ndarray, np.ndarray]  # tokens int32 [n], loss_mask bool [n]
BatchPlan = tuple[int, list[list[int]]]  # (row length, example indices of each of the step's rows)


@dataclasses.dataclass
class TokenizeStats:
  """What tokenisation kept, cut and dropped; `policy` says what happens to over-long examples.

  "truncate": the output is cut to fit (no eos then); when the prompt alone leaves no room, the prompt
  keeps bos and its last tokens (its start, template prefix included, is lost) and one output token.
  "drop": over-long examples are dropped. Either way each one is counted.
  """
  policy: str = "truncate"
  examples: int = 0
  empty_output_skipped: int = 0
  truncated: int = 0
  dropped_too_long: int = 0
  tokens: int = 0

  def __post_init__(self):
    if self.policy not in POLICIES:
      raise ValueError(f"over-long policy {self.policy!r} is not one of {', '.join(POLICIES)}")

  @property
  def kept(self) -> int:
    """Examples that came out (possibly truncated)."""
    return self.examples - self.empty_output_skipped - self.dropped_too_long

  def as_dict(self) -> dict:
    """The counts, for manifests and run summaries."""
    return dict(dataclasses.asdict(self), kept=self.kept)


def tokenize_example(tokenizer, instruction: str, output: str, *, template: str, tags: Sequence[str] = (),
                     seq_len: int | None = None, stats: TokenizeStats | None = None) -> Example | None:
  """(tokens int32 [n], loss_mask bool [n]) with the loss on output + eos; None when skipped or dropped.

  Empty (whitespace-only) outputs are skipped; with `seq_len`, over-long examples follow `stats.policy`.
  """
  stats = TokenizeStats() if stats is None else stats
  stats.examples += 1
  if not output.strip():
    stats.empty_output_skipped += 1
    return None
  bos = [tokenizer.bos_id] if getattr(tokenizer, "add_bos", True) and tokenizer.bos_id is not None else []
  prompt = tokenizer.encode(render_chat(template, tagged_instruction(instruction, tags)))
  target = tokenizer.encode(output) + [tokenizer.eos_id]
  if seq_len is not None and len(bos) + len(prompt) + len(target) > seq_len:
    fitted = _fit(bos, prompt, target, seq_len, stats.policy)
    if fitted is None:
      stats.dropped_too_long += 1
      return None
    stats.truncated += 1
    prompt, target = fitted
  tokens = np.asarray(bos + prompt + target, np.int32)
  loss_mask = np.zeros(len(tokens), bool)
  loss_mask[len(bos) + len(prompt):] = True
  stats.tokens += len(tokens)
  return tokens, loss_mask


def _fit(bos: list[int], prompt: list[int], target: list[int], seq_len: int,
         policy: str) -> tuple[list[int], list[int]] | None:
  """(prompt, target) cut to `seq_len` with at least one target token, or None to drop."""
  if policy == "drop":
    return None
  room = seq_len - len(bos) - len(prompt)
  if room >= 1:
    return prompt, target[:room]
  keep = seq_len - len(bos) - 1
  if keep < 1:
    return None
  return prompt[-keep:], target[:1]


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def _first_fit_decreasing(indices: Sequence[int], lengths: Sequence[int], seq_len: int) -> list[list[int]]:
  """Rows of at most `seq_len` tokens holding `indices` (longest first, each into the first row with room)."""
  rows, free = [], []
  for i in sorted(indices, key=lambda i: -int(lengths[i])):
    n = int(lengths[i])
    row = next((r for r, room in enumerate(free) if room >= n), None)
    if row is None:
      rows.append([])
      free.append(seq_len)
      row = len(rows) - 1
    rows[row].append(i)
    free[row] -= n
  return rows


def _plan_packing(steps: Sequence[Sequence[int]], lengths: Sequence[int], seq_len: int,
                  row_multiple: int = 1, same_rows: bool = False) -> list[BatchPlan]:
  """Each step's examples packed into as many rows of `seq_len` as they need, rounded up to
  `row_multiple` with empty (fully masked) rows: the step trains on exactly its examples."""
  plans = []
  for step in steps:
    for i in step:
      _check_length(int(i), int(lengths[i]), seq_len)
    plans.append((seq_len, _first_fit_decreasing(step, lengths, seq_len)))
  most = max((len(rows) for _, rows in plans), default=1)
  for _, rows in plans:  # `same_rows`: one compiled shape for all the steps, at some padding's cost
    rows += [[] for _ in range(_round_up(most if same_rows else max(len(rows), 1), row_multiple) - len(rows))]
  return plans


def default_buckets(seq_len: int) -> tuple[int, ...]:
  """Four bucket lengths, seq_len / 8, / 4, / 2 and seq_len: few shapes to compile."""
  return tuple(sorted({max(1, seq_len // d) for d in (8, 4, 2, 1)}))


def _plan_bucketing(pool: Sequence[int], lengths: Sequence[int], seq_len: int, batch_size: int,
                    buckets: Sequence[int] | None, row_multiple: int = 1) -> list[BatchPlan]:
  """One example per row: the pool's examples sorted (stably) by the smallest bucket that fits them,
  cut into steps of `batch_size`, each step padded to the bucket of its longest example."""
  bucket_lengths = sorted(set(buckets or default_buckets(seq_len)) | {seq_len})
  bucket_lengths = [b for b in bucket_lengths if b <= seq_len]
  for i in pool:
    _check_length(int(i), int(lengths[i]), seq_len)
  bucket_of = {int(i): next(b for b in bucket_lengths if b >= lengths[i]) for i in pool}
  ordered = sorted(pool, key=lambda i: bucket_of[int(i)])
  plans = []
  for start in range(0, len(ordered), batch_size):
    step = ordered[start:start + batch_size]
    rows = [[int(i)] for i in step]
    rows += [[] for _ in range(_round_up(len(rows), row_multiple) - len(rows))]
    plans.append((max(bucket_of[int(i)] for i in step), rows))
  return plans


def _check_length(index: int, length: int, seq_len: int) -> None:
  if not 1 <= length <= seq_len:
    raise ValueError(f"example {index} has {length} tokens, outside [1, seq_len={seq_len}]: "
                     "tokenize with seq_len so over-long examples are truncated or dropped")


def _rows_to_batch(examples: Sequence[Example], rows: Sequence[Sequence[int]], row_len: int) -> dict:
  """Batch arrays [len(rows), row_len] with the examples of each row laid end to end."""
  shape = (len(rows), row_len)
  batch = dict(tokens=np.zeros(shape, np.int32), targets=np.zeros(shape, np.int32),
               loss_mask=np.zeros(shape, np.float32), positions=np.zeros(shape, np.int32),
               segment_ids=np.zeros(shape, np.int32))
  for r, row in enumerate(rows):
    offset = 0
    for segment, index in enumerate(row, start=1):
      tokens, mask = examples[index]
      n = len(tokens)
      span = slice(offset, offset + n)
      batch["tokens"][r, span] = tokens
      batch["targets"][r, offset:offset + n - 1] = tokens[1:]
      batch["loss_mask"][r, offset:offset + n - 1] = mask[1:]
      batch["positions"][r, span] = np.arange(n)
      batch["segment_ids"][r, span] = segment
      offset += n
  return batch


def pack(examples: Sequence[Example], seq_len: int, batch_size: int, row_multiple: int = 1) -> Iterator[dict]:
  """Steps of `batch_size` examples in input order, each packed into the rows it needs
  [rows, seq_len] (rows rounded up to `row_multiple`); no example is split."""
  lengths = [len(t) for t, _ in examples]
  steps = [range(i, min(i + batch_size, len(examples))) for i in range(0, len(examples), batch_size)]
  for row_len, rows in _plan_packing(steps, lengths, seq_len, row_multiple):
    yield _rows_to_batch(examples, rows, row_len)


def bucket(examples: Sequence[Example], seq_len: int, batch_size: int,
           buckets: Sequence[int] | None = None, row_multiple: int = 1) -> Iterator[dict]:
  """Steps of `batch_size` examples, one per row, grouped by bucket length [rows, bucket_len]."""
  lengths = [len(t) for t, _ in examples]
  for row_len, rows in _plan_bucketing(range(len(examples)), lengths, seq_len, batch_size, buckets, row_multiple):
    yield _rows_to_batch(examples, rows, row_len)


def efficiency(batches: Iterable[dict]) -> float:
  """Share of non-padding token slots over all `batches` (1.0 = no padding)."""
  real = total = 0
  for batch in batches:
    real += int(np.count_nonzero(batch["segment_ids"]))
    total += batch["segment_ids"].size
  return real / total if total else 0.0


class SFTLoader:
  """Infinite, deterministic, resumable iterator over this process's rows of each global step.

  A step trains on exactly `batch_size` examples (the paper's batch is examples, not rows). The
  examples form one stream, epoch after epoch, each epoch shuffled with
  `np.random.default_rng([seed, epoch])`; step s takes stream positions [s * B, (s + 1) * B), so an
  epoch is N / B steps. Packing lays a step's examples into the rows they need (rounded up to
  `row_multiple`, which the data-parallel devices, micro-batches and processes must divide; with
  `pack_rows="block"` to the most any step of its block needs, one compiled shape per block; extra rows
  are empty and masked). Bucketing sorts a block of ceil(N / B) steps' examples by length bucket and
  cuts it into steps, one example per row. Every process plans the same steps from the lengths alone
  and builds only its share of the rows; the union over processes is the single-process batch.
  """

  def __init__(self, examples: Sequence[Example], *, seq_len: int, batch_size: int, seed: int,
               batching: str = "packing", process_index: int = 0, process_count: int = 1,
               buckets: Sequence[int] | None = None, row_multiple: int = 1, pack_rows: str = "step"):
    if not examples:
      raise ValueError("SFTLoader got no examples: every pair was skipped or dropped")
    if batching not in BATCHINGS:
      raise ValueError(f"batching {batching!r} is not one of {', '.join(BATCHINGS)}")
    if pack_rows not in PACK_ROWS:
      raise ValueError(f"pack_rows {pack_rows!r} is not one of {', '.join(PACK_ROWS)}")
    if batch_size < 1 or not 0 <= process_index < process_count:
      raise ValueError(f"batch_size {batch_size} must be >= 1 and process_index {process_index} lie in "
                       f"[0, {process_count})")
    self._examples = examples
    self._lengths = np.array([len(t) for t, _ in examples])
    for index, length in enumerate(self._lengths):
      _check_length(index, int(length), seq_len)
    self._seq_len, self._batch_size, self._seed = seq_len, batch_size, seed
    self._batching, self._buckets, self._same_rows = batching, buckets, pack_rows == "block"
    self._row_multiple = math.lcm(max(row_multiple, 1), process_count)
    self._process = (process_index, process_count)
    self._block_steps = -(-len(examples) // batch_size)  # planning unit: about one epoch of steps
    self._step = 0
    self._orders: dict[int, np.ndarray] = {}
    self._plan_cache: tuple[int, list[BatchPlan]] | None = None

  def _order(self, epoch: int) -> np.ndarray:
    if epoch not in self._orders:
      if len(self._orders) > 4:
        self._orders.clear()
      self._orders[epoch] = np.random.default_rng([self._seed, epoch]).permutation(len(self._examples))
    return self._orders[epoch]

  def _stream(self, start: int, stop: int) -> np.ndarray:
    """Example indices at stream positions [start, stop): epoch after epoch, each shuffled."""
    n = len(self._examples)
    epochs = range(start // n, (stop - 1) // n + 1)
    joined = np.concatenate([self._order(e) for e in epochs])
    return joined[start - epochs[0] * n:stop - epochs[0] * n]

  def _plan(self, block: int) -> list[BatchPlan]:
    """The block's global steps, as example indices into `examples`."""
    if self._plan_cache is None or self._plan_cache[0] != block:
      b = self._batch_size
      first = block * self._block_steps * b
      pool = [int(i) for i in self._stream(first, first + self._block_steps * b)]
      if self._batching == "packing":
        steps = [pool[i:i + b] for i in range(0, len(pool), b)]
        plans = _plan_packing(steps, self._lengths, self._seq_len, self._row_multiple, self._same_rows)
      else:
        plans = _plan_bucketing(pool, self._lengths, self._seq_len, b, self._buckets, self._row_multiple)
        shuffle = np.random.default_rng([self._seed, block, 1]).permutation(len(plans))
        plans = [plans[i] for i in shuffle]  # length-sorted steps would make the loss drift over a block
      self._plan_cache = (block, plans)
    return self._plan_cache[1]

  def __iter__(self) -> SFTLoader:
    return self

  def __next__(self) -> dict:
    row_len, rows = self._plan(self._step // self._block_steps)[self._step % self._block_steps]
    self._step += 1
    index, count = self._process
    share = len(rows) // count
    return _rows_to_batch(self._examples, rows[index * share:(index + 1) * share], row_len)

  def steps_per_epoch(self) -> float:
    """Steps that together see every example once: N / batch_size."""
    return len(self._examples) / self._batch_size

  def epochs(self, steps: int) -> float:
    """How many passes over the examples `steps` steps make."""
    return steps / self.steps_per_epoch()

  def efficiency(self) -> float:
    """Share of non-padding token slots in the current block's global steps."""
    plans = self._plan(self._step // self._block_steps)
    real = sum(int(self._lengths[i]) for _, rows in plans for row in rows for i in row)
    return real / sum(row_len * len(rows) for row_len, rows in plans)

  def get_state(self) -> dict:
    """JSON-serialisable position: the next step is `step` (epoch is informative)."""
    return dict(step=self._step, epoch=self.epochs(self._step), seed=self._seed, batching=self._batching,
                batch_size=self._batch_size, num_examples=len(self._examples))

  def set_state(self, state: dict) -> None:
    """Resumes at the saved position; refuses a state saved for another seed, batching, batch or data."""
    if "step" not in state:
      raise ValueError("loader state has no 'step': it was saved by a loader that counted rows, not "
                       "examples; restart this training stage (delete its checkpoints/)")
    for key, mine in (("seed", self._seed), ("batching", self._batching), ("batch_size", self._batch_size),
                      ("num_examples", len(self._examples))):
      if key in state and state[key] != mine:
        raise ValueError(f"loader state field {key!r}: saved {state[key]!r}, this loader has {mine!r}")
    self._step = int(state["step"])
