"""Supervised fine-tuning data: (instruction, output) -> tokens with a loss mask -> fixed-size batches.

An example is `[bos] + encode(prompt) + encode(output) + eos` (bos when the tokenizer has one), the
prompt being the instruction (plus tags) in the chat template; prompt and output are encoded
separately so the mask starts exactly at the first output token. The loss covers the output tokens
and the final eos (the paper: loss on the output only). Batches are dicts of numpy arrays, all
[batch, length]:
  tokens, targets (int32), loss_mask (float32), positions, segment_ids (int32),
with `targets[t] = tokens[t + 1]` and `loss_mask[t] = example_mask[t + 1]` inside one example; an
example's last position predicts nothing (mask 0). `segment_ids` number the examples of a row 1, 2, ...
(0 is padding) and `positions` restart at 0 in each example, so attention never crosses examples.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from humpback_jax.method.prompts import tagged_instruction
from humpback_jax.tokenizer import render_chat

POLICIES = ("truncate", "drop")
BATCHINGS = ("packing", "bucketing")

Example = tuple[np.ndarray, np.ndarray]  # tokens int32 [n], loss_mask bool [n]
BatchPlan = tuple[int, list[list[int]]]  # (row length, example indices of each of the batch's rows)
# Packing looks for room in this many open rows: wide enough to fill rows well, narrow enough to
# keep planning linear in the number of examples.
PACK_WINDOW_ROWS = 64


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


def _plan_packing(lengths: Sequence[int], seq_len: int, batch_size: int,
                  window: int = PACK_WINDOW_ROWS) -> list[BatchPlan]:
  """Greedy first-fit in input order over the `window` most recently opened rows; when the window is
  full the oldest row is closed. Closed rows form batches of `batch_size`, the last one padded."""
  closed, open_rows, free = [], [], np.zeros(0, np.int64)
  for index, length in enumerate(lengths):
    _check_length(index, length, seq_len)
    fits = np.flatnonzero(free >= length)
    if len(fits):
      row = int(fits[0])
    else:
      if len(open_rows) == max(window, 1):
        closed.append(open_rows.pop(0))
        free = free[1:]
      open_rows.append([])
      free = np.append(free, seq_len)
      row = len(open_rows) - 1
    open_rows[row].append(index)
    free[row] -= length
  rows = closed + open_rows
  rows += [[] for _ in range(-len(rows) % batch_size)]
  return [(seq_len, rows[i:i + batch_size]) for i in range(0, len(rows), batch_size)]


def default_buckets(seq_len: int) -> tuple[int, ...]:
  """Four bucket lengths, seq_len / 8, / 4, / 2 and seq_len: few shapes to compile."""
  return tuple(sorted({max(1, seq_len // d) for d in (8, 4, 2, 1)}))


def _plan_bucketing(lengths: Sequence[int], seq_len: int, batch_size: int,
                    buckets: Sequence[int] | None) -> list[BatchPlan]:
  """One example per row, in the smallest bucket that fits; a batch is emitted when its bucket holds
  `batch_size` examples, and the partly filled buckets at the end, shortest first."""
  bucket_lengths = sorted(set(buckets or default_buckets(seq_len)) | {seq_len})
  bucket_lengths = [b for b in bucket_lengths if b <= seq_len]
  pending = {b: [] for b in bucket_lengths}
  plans = []
  for index, length in enumerate(lengths):
    _check_length(index, length, seq_len)
    row_len = next(b for b in bucket_lengths if b >= length)
    pending[row_len].append(index)
    if len(pending[row_len]) == batch_size:
      plans.append((row_len, [[i] for i in pending[row_len]]))
      pending[row_len] = []
  for row_len, indices in pending.items():
    if indices:
      plans.append((row_len, [[i] for i in indices] + [[] for _ in range(batch_size - len(indices))]))
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


def pack(examples: Sequence[Example], seq_len: int, batch_size: int) -> Iterator[dict]:
  """Packed batches [batch_size, seq_len] (greedy first-fit in input order over a window of open
  rows); no example is split."""
  for row_len, rows in _plan_packing([len(t) for t, _ in examples], seq_len, batch_size):
    yield _rows_to_batch(examples, rows, row_len)


def bucket(examples: Sequence[Example], seq_len: int, batch_size: int,
           buckets: Sequence[int] | None = None) -> Iterator[dict]:
  """Padded batches [batch_size, bucket_len], one example per row, batches formed within a bucket."""
  for row_len, rows in _plan_bucketing([len(t) for t, _ in examples], seq_len, batch_size, buckets):
    yield _rows_to_batch(examples, rows, row_len)


def efficiency(batches: Iterable[dict]) -> float:
  """Share of non-padding token slots over all `batches` (1.0 = no padding)."""
  real = total = 0
  for batch in batches:
    real += int(np.count_nonzero(batch["segment_ids"]))
    total += batch["segment_ids"].size
  return real / total if total else 0.0


class SFTLoader:
  """Infinite, deterministic, resumable iterator over this process's rows of each global batch.

  Each epoch shuffles the examples with `np.random.default_rng([seed, epoch])` and plans its global
  batches from the lengths alone; every process plans the same batches and builds only its rows,
  [i * B / P, (i + 1) * B / P), so the union over processes is the single-process batch. This needs
  all tokenised examples on every host, which the method's data sizes allow.
  """

  def __init__(self, examples: Sequence[Example], *, seq_len: int, batch_size: int, seed: int,
               batching: str = "packing", process_index: int = 0, process_count: int = 1,
               buckets: Sequence[int] | None = None):
    if not examples:
      raise ValueError("SFTLoader got no examples: every pair was skipped or dropped")
    if batching not in BATCHINGS:
      raise ValueError(f"batching {batching!r} is not one of {', '.join(BATCHINGS)}")
    if batch_size % process_count or not 0 <= process_index < process_count:
      raise ValueError(f"batch_size {batch_size} must split evenly over process_count {process_count}, "
                       f"and process_index {process_index} lie in [0, {process_count})")
    self._examples = examples
    self._lengths = np.array([len(t) for t, _ in examples])
    for index, length in enumerate(self._lengths):
      _check_length(index, int(length), seq_len)
    self._seq_len, self._batch_size, self._seed = seq_len, batch_size, seed
    self._batching, self._buckets = batching, buckets
    rows_per_process = batch_size // process_count
    self._rows = slice(process_index * rows_per_process, (process_index + 1) * rows_per_process)
    self._epoch, self._step = 0, 0
    self._plan_cache: tuple[int, list[BatchPlan]] | None = None

  def _plan(self, epoch: int) -> list[BatchPlan]:
    """The epoch's global batches, as example indices into `examples`."""
    if self._plan_cache is None or self._plan_cache[0] != epoch:
      order = np.random.default_rng([self._seed, epoch]).permutation(len(self._examples))
      lengths = self._lengths[order]
      if self._batching == "packing":
        plans = _plan_packing(lengths, self._seq_len, self._batch_size)
      else:
        plans = _plan_bucketing(lengths, self._seq_len, self._batch_size, self._buckets)
      plans = [(row_len, [[int(order[i]) for i in row] for row in rows]) for row_len, rows in plans]
      self._plan_cache = (epoch, plans)
    return self._plan_cache[1]

  def __iter__(self) -> SFTLoader:
    return self

  def __next__(self) -> dict:
    if self._step >= len(self._plan(self._epoch)):
      self._epoch, self._step = self._epoch + 1, 0
    plans = self._plan(self._epoch)
    row_len, rows = plans[self._step]
    self._step += 1
    if self._step == len(plans):  # the saved position after an epoch's last batch is the next epoch
      self._epoch, self._step = self._epoch + 1, 0
    return _rows_to_batch(self._examples, rows[self._rows], row_len)

  def batches_per_epoch(self) -> int:
    """Global batches in the current epoch (packing makes it vary slightly between epochs)."""
    return len(self._plan(self._epoch))

  def efficiency(self) -> float:
    """Share of non-padding token slots in the current epoch's global batches."""
    plans = self._plan(self._epoch)
    real = sum(int(self._lengths[i]) for _, rows in plans for row in rows for i in row)
    return real / sum(row_len * len(rows) for row_len, rows in plans)

  def get_state(self) -> dict:
    """JSON-serialisable position: the next batch is batch `step_in_epoch` of `epoch`."""
    return dict(epoch=self._epoch, step_in_epoch=self._step, seed=self._seed, batching=self._batching,
                num_examples=len(self._examples))

  def set_state(self, state: dict) -> None:
    """Resumes at the saved position; refuses a state saved for another seed, batching or data."""
    for key, mine in (("seed", self._seed), ("batching", self._batching),
                      ("num_examples", len(self._examples))):
      if key in state and state[key] != mine:
        raise ValueError(f"loader state field {key!r}: saved {state[key]!r}, this loader has {mine!r}")
    self._epoch, self._step = int(state["epoch"]), int(state["step_in_epoch"])
