"""SFT data: the loss mask, over-long and empty examples, packing, bucketing and the resumable loader."""
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from humpback_jax.data import sft
from humpback_jax.prompts import tagged_instruction
from humpback_jax.tokenizer import render_chat

TEMPLATE = "[INST] {instruction} [/INST]"


class ByteTokenizer:
  """One id per UTF-8 byte (id = byte + 3); 0 pad, 1 bos, 2 eos. Deterministic and exact."""
  pad_id, bos_id, eos_id, vocab_size = 0, 1, 2, 259

  def encode(self, text, *, add_bos=False, add_eos=False):
    return [self.bos_id] * add_bos + [b + 3 for b in text.encode("utf-8")] + [self.eos_id] * add_eos

  def decode(self, ids):
    return bytes(i - 3 for i in ids if i >= 3).decode("utf-8")


TOK = ByteTokenizer()
non_blank = st.text(min_size=1, max_size=80).filter(str.strip)


def example(index: int, length: int) -> sft.Example:
  """A recognisable example: every token is `index + 10`; the loss covers its second half."""
  mask = np.arange(length) >= length // 2
  return np.full(length, index + 10, np.int32), mask


def examples_in(batch: dict) -> list[tuple[int, int]]:
  """(id, length) of each example laid out in `batch`, checking it is contiguous within one row."""
  found = []
  for r in range(batch["tokens"].shape[0]):
    segments = batch["segment_ids"][r]
    for s in range(1, segments.max() + 1):
      where = np.flatnonzero(segments == s)
      assert np.array_equal(where, np.arange(where[0], where[0] + len(where))), "segment is not contiguous"
      assert np.array_equal(batch["positions"][r, where], np.arange(len(where)))
      tokens = batch["tokens"][r, where]
      assert np.all(tokens == tokens[0])
      found.append((int(tokens[0]) - 10, len(where)))
  return found


def mixed_examples(n=60, seed=0, max_len=40):
  lengths = np.random.default_rng(seed).integers(1, max_len + 1, n)
  return [example(i, int(length)) for i, length in enumerate(lengths)]


# --- tokenisation and the loss mask ---------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(instruction=st.text(max_size=80), output=non_blank,
       tags=st.lists(st.sampled_from(["T1.", "T2."]), max_size=2))
def test_loss_mask_covers_exactly_the_output_and_eos(instruction, output, tags):
  tokens, mask = sft.tokenize_example(TOK, instruction, output, template=TEMPLATE, tags=tags)
  prompt = render_chat(TEMPLATE, tagged_instruction(instruction, tags))
  assert tokens[0] == TOK.bos_id and tokens[-1] == TOK.eos_id
  assert TOK.decode(tokens[~mask][1:]) == prompt
  assert TOK.decode(tokens[mask][:-1]) == output
  assert np.array_equal(mask, np.sort(mask)), "the mask is not one suffix"


@settings(max_examples=200, deadline=None)
@given(instruction=st.text(max_size=80), output=non_blank, seq_len=st.integers(3, 120))
def test_truncated_examples_fit_and_keep_at_least_one_target_token(instruction, output, seq_len):
  tokens, mask = sft.tokenize_example(TOK, instruction, output, template=TEMPLATE, seq_len=seq_len,
                                      stats=sft.TokenizeStats(policy="truncate"))
  assert len(tokens) <= seq_len and mask.sum() >= 1
  assert tokens[0] == TOK.bos_id and np.array_equal(mask, np.sort(mask))


def test_truncate_cuts_the_output_without_eos_and_counts_it():
  stats = sft.TokenizeStats(policy="truncate")
  prompt_len = 1 + len(TOK.encode(render_chat(TEMPLATE, "hi")))
  tokens, mask = sft.tokenize_example(TOK, "hi", "abcdefgh", template=TEMPLATE, seq_len=prompt_len + 3,
                                      stats=stats)
  assert TOK.decode(tokens[mask]) == "abc" and tokens[-1] != TOK.eos_id
  assert (stats.truncated, stats.dropped_too_long, stats.kept) == (1, 0, 1)


def test_truncate_keeps_the_end_of_a_prompt_that_alone_is_too_long():
  tokens, mask = sft.tokenize_example(TOK, "x" * 50 + "END", "out", template=TEMPLATE, seq_len=13)
  assert len(tokens) == 13 and tokens[0] == TOK.bos_id
  assert TOK.decode(tokens[1:-1]) == "END [/INST]"
  assert mask.tolist() == [False] * 12 + [True] and TOK.decode(tokens[-1:]) == "o"


def test_drop_policy_drops_over_long_examples_and_counts_them():
  stats = sft.TokenizeStats(policy="drop")
  kept = [sft.tokenize_example(TOK, "q", out, template=TEMPLATE, seq_len=30, stats=stats)
          for out in ("short", "long " * 20)]
  assert kept[0] is not None and kept[1] is None
  assert (stats.examples, stats.dropped_too_long, stats.truncated, stats.kept) == (2, 1, 0, 1)
  assert stats.tokens == len(kept[0][0])


def test_empty_outputs_are_skipped_and_counted():
  stats = sft.TokenizeStats()
  assert sft.tokenize_example(TOK, "q", "  \n", template=TEMPLATE, stats=stats) is None
  assert (stats.examples, stats.empty_output_skipped, stats.kept, stats.tokens) == (1, 1, 0, 0)


def test_an_unknown_over_long_policy_is_rejected():
  with pytest.raises(ValueError, match="'cut'.*truncate, drop"):
    sft.TokenizeStats(policy="cut")


# --- packing ----------------------------------------------------------------------------------------

def test_packing_numbers_segments_and_restarts_positions():
  a = (np.array([1, 5, 6], np.int32), np.array([False, True, True]))
  b = (np.array([1, 7], np.int32), np.array([False, True]))
  (batch,) = sft.pack([a, b], seq_len=6, batch_size=2)
  assert batch["tokens"].tolist() == [[1, 5, 6, 1, 7, 0]]
  assert batch["segment_ids"].tolist() == [[1, 1, 1, 2, 2, 0]]
  assert batch["positions"].tolist() == [[0, 1, 2, 0, 1, 0]]
  # Position t predicts token t + 1 of the same example; an example's last position predicts nothing.
  assert batch["targets"].tolist() == [[5, 6, 0, 7, 0, 0]]
  assert batch["loss_mask"].tolist() == [[1, 1, 0, 1, 0, 0]]
  assert {k: v.dtype for k, v in batch.items()} == dict(
      tokens=np.int32, targets=np.int32, loss_mask=np.float32, positions=np.int32, segment_ids=np.int32)


def test_packing_places_every_example_once_and_never_splits_one():
  examples = mixed_examples()
  batches = list(sft.pack(examples, seq_len=48, batch_size=4))
  assert all(b["tokens"].shape[1] == 48 for b in batches)
  found = [e for b in batches for e in examples_in(b)]
  assert sorted(found) == [(i, len(t)) for i, (t, _) in enumerate(examples)]


def test_packing_gives_each_step_its_examples_in_as_many_rows_as_they_need():
  examples = [example(0, 30), example(1, 30), example(2, 10), example(3, 5)]
  batches = list(sft.pack(examples, seq_len=48, batch_size=4, row_multiple=4))
  (batch,) = batches
  assert batch["tokens"].shape == (4, 48)  # two rows hold the four examples; two masked rows pad to 4
  assert sorted(examples_in(batch)) == [(0, 30), (1, 30), (2, 10), (3, 5)]
  assert not batch["segment_ids"][2:].any() and not batch["loss_mask"][2:].any()


def test_packing_rejects_an_example_longer_than_a_row():
  with pytest.raises(ValueError, match="example 1 has 9 tokens"):
    list(sft.pack([example(0, 3), example(1, 9)], seq_len=8, batch_size=2))


# --- bucketing --------------------------------------------------------------------------------------

def test_bucketing_pads_each_step_to_the_bucket_of_its_longest_example():
  examples = [example(0, 3), example(1, 10), example(2, 4), example(3, 30)]
  batches = list(sft.bucket(examples, seq_len=32, batch_size=2, buckets=(4, 16)))
  shapes_and_ids = [(b["tokens"].shape, sorted(i for i, _ in examples_in(b))) for b in batches]
  assert shapes_and_ids == [((2, 4), [0, 2]), ((2, 32), [1, 3])]


def test_bucketing_places_every_example_once_one_per_row():
  examples = mixed_examples()
  batches = list(sft.bucket(examples, seq_len=48, batch_size=4))
  assert all(b["segment_ids"].max(axis=1).max() <= 1 for b in batches)
  found = [e for b in batches for e in examples_in(b)]
  assert sorted(found) == [(i, len(t)) for i, (t, _) in enumerate(examples)]


def test_packing_wastes_less_than_bucketing_on_mixed_lengths():
  examples = mixed_examples(n=200)
  packed = sft.efficiency(sft.pack(examples, seq_len=48, batch_size=4))
  bucketed = sft.efficiency(sft.bucket(examples, seq_len=48, batch_size=4))
  assert 0 < bucketed <= packed <= 1
  for batch in sft.pack(examples, seq_len=48, batch_size=4):  # no step takes more than one row beyond its tokens
    assert batch["tokens"].shape[0] <= -(-int(np.count_nonzero(batch["segment_ids"])) // 48) + 1


# --- the loader -------------------------------------------------------------------------------------

def take(loader, n):
  return [next(loader) for _ in range(n)]


def assert_same_batches(xs, ys):
  assert len(xs) == len(ys)
  for x, y in zip(xs, ys):
    assert x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)


def test_loader_is_deterministic_for_a_seed_and_differs_across_seeds():
  examples = mixed_examples()
  run = lambda seed: take(sft.SFTLoader(examples, seq_len=48, batch_size=4, seed=seed), 6)
  assert_same_batches(run(3), run(3))
  assert not np.array_equal(run(3)[0]["tokens"], run(4)[0]["tokens"])


@pytest.mark.parametrize("batching", sft.BATCHINGS)
def test_loader_serves_every_example_once_per_epoch_then_reshuffles(batching):
  examples = mixed_examples()
  loader = sft.SFTLoader(examples, seq_len=48, batch_size=4, seed=0, batching=batching)
  epochs = []
  for _ in range(2):
    epochs.append([e for b in take(loader, int(loader.steps_per_epoch())) for e in examples_in(b)])
  for found in epochs:
    assert sorted(found) == [(i, len(t)) for i, (t, _) in enumerate(examples)]
  assert epochs[0] != epochs[1]


@pytest.mark.parametrize("batching", sft.BATCHINGS)
def test_loader_resumes_at_exactly_the_next_batch(batching):
  examples = mixed_examples(n=30)
  kwargs = dict(seq_len=48, batch_size=4, seed=7, batching=batching)
  uninterrupted = take(sft.SFTLoader(examples, **kwargs), 15)  # crosses epoch boundaries
  first = sft.SFTLoader(examples, **kwargs)
  take(first, 5)
  saved = json.loads(json.dumps(first.get_state()))
  resumed = sft.SFTLoader(examples, **kwargs)
  resumed.set_state(saved)
  assert_same_batches(take(resumed, 10), uninterrupted[5:])


def test_loader_refuses_a_state_saved_with_another_seed():
  loader = sft.SFTLoader(mixed_examples(), seq_len=48, batch_size=4, seed=1)
  state = sft.SFTLoader(mixed_examples(), seq_len=48, batch_size=4, seed=2).get_state()
  with pytest.raises(ValueError, match="'seed': saved 2"):
    loader.set_state(state)


@pytest.mark.parametrize("batching", sft.BATCHINGS)
def test_two_processes_together_see_the_single_process_batch(batching):
  examples = mixed_examples()
  kwargs = dict(seq_len=48, batch_size=4, seed=5, batching=batching)
  single = take(sft.SFTLoader(examples, row_multiple=2, **kwargs), 8)  # as many rows as two processes need
  halves = [take(sft.SFTLoader(examples, process_index=p, process_count=2, **kwargs), 8) for p in (0, 1)]
  joined = [{k: np.concatenate([h0[k], h1[k]]) for k in h0} for h0, h1 in zip(*halves)]
  assert all(2 * h["tokens"].shape[0] == s["tokens"].shape[0] for h, s in zip(halves[0], single))
  assert_same_batches(joined, single)


def test_loader_efficiency_matches_the_steps_of_an_epoch():
  loader = sft.SFTLoader(mixed_examples(), seq_len=48, batch_size=4, seed=0)
  expected = loader.efficiency()
  assert sft.efficiency(take(loader, int(loader.steps_per_epoch()))) == pytest.approx(expected)


# --- a step is the paper's batch of examples --------------------------------------------------------

def count_examples(batch: dict) -> int:
  return sum(int(row.max()) for row in batch["segment_ids"])


@pytest.mark.parametrize("batching", sft.BATCHINGS)
def test_3200_examples_at_batch_32_give_100_steps_per_epoch(batching):
  examples = mixed_examples(n=3200, max_len=60)  # many examples share a row of 256 when packed
  loader = sft.SFTLoader(examples, seq_len=256, batch_size=32, seed=0, batching=batching)
  steps = take(loader, 100)
  assert [count_examples(b) for b in steps] == [32] * 100
  assert sorted(e for b in steps for e in examples_in(b)) == [(i, len(t)) for i, (t, _) in enumerate(examples)]
  assert loader.steps_per_epoch() == 100 and loader.get_state()["epoch"] == 1.0


@pytest.mark.parametrize("batching", sft.BATCHINGS)
def test_every_step_has_exactly_batch_size_examples_across_epoch_boundaries(batching):
  examples = mixed_examples(n=30)  # 30 is no multiple of 4: steps straddle epochs
  loader = sft.SFTLoader(examples, seq_len=48, batch_size=4, seed=3, batching=batching, row_multiple=2)
  steps = take(loader, 15)
  assert [count_examples(b) for b in steps] == [4] * 15
  assert all(b["tokens"].shape[0] % 2 == 0 for b in steps)  # rows a multiple of the data-parallel ways
  assert loader.epochs(15) == 2.0
  if batching == "packing":  # steps follow the stream; bucketing reorders steps inside blocks of 8
    seen = sorted(e for b in steps for e in examples_in(b))
    assert seen == sorted([(i, len(t)) for i, (t, _) in enumerate(examples)] * 2)  # 60 examples = 2 epochs


def test_pack_rows_block_gives_every_step_of_a_block_one_row_count():
  examples = mixed_examples(n=60)
  per_step = take(sft.SFTLoader(examples, seq_len=48, batch_size=4, seed=0), 15)
  per_block = take(sft.SFTLoader(examples, seq_len=48, batch_size=4, seed=0, pack_rows="block"), 15)
  assert len({b["tokens"].shape for b in per_step}) > 1
  assert {b["tokens"].shape for b in per_block} == {(max(b["tokens"].shape[0] for b in per_step), 48)}
  assert [sorted(examples_in(b)) for b in per_block] == [sorted(examples_in(b)) for b in per_step]
