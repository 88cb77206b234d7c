"""The continuous engine (decode slots, chunked prefill, shared-prefix reuse) gives the static
engine's results: greedy tokens equal, sampled tokens independent of slot count, and prefix reuse
changing nothing but the work (tokens and scores). One tiny random GQA model, random weights.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import layout, tiny_config
from humpback_jax.generate import GREEDY, Engine, SamplingParams
from humpback_jax.model import build, stacking

SAMPLED = SamplingParams(temperature=1.0, top_p=0.9, seed=5, max_new_tokens=24)
SHARED = [7, 3, 9, 12, 5, 8, 100, 2, 44, 6, 17, 90, 31, 4, 60, 11, 23, 77, 50, 51, 52]  # 21: 5 granules of 4


@pytest.fixture(scope="module")
def model():
  cfg = tiny_config(max_seq_len=256)
  params = build.init_params(cfg, layout(), seed=0)
  return cfg, params


def prompts(n=11, seed=0):
  """Mixed lengths, some sharing the SHARED head (as curation prompts share the rubric)."""
  rng = np.random.default_rng(seed)
  rows = []
  for i in range(n):
    tail = rng.integers(1, 128, size=int(rng.integers(1, 40))).tolist()
    rows.append(SHARED + tail if i % 3 else tail)
  return rows


_ENGINES = {}


def engine(model, shape=(1, 1, 1), **kwargs):
  """One engine per (mesh, settings) for the whole module: tests share its compiled programs."""
  cfg, params = model
  kwargs = {"prompt_buckets": (16, 32, 64), "batch_size": 4, "scheduler": "continuous", "decode_steps": 3,
            "prefill_chunk": 8, "prefix_granule": 4, "decode_slots": 3, **kwargs}
  key = (shape, tuple(sorted(kwargs.items())))
  if key not in _ENGINES:
    _ENGINES[key] = Engine(cfg, params, layout(shape), **kwargs)
  return _ENGINES[key]


def test_greedy_tokens_equal_the_static_engine_with_mixed_lengths_and_limits(model):
  rows = prompts()
  limits = [1, 5, 17, 24, 0, 3, 9, 24, 2, 12, 7]
  static = engine(model, scheduler="static").generate_ids(rows, GREEDY, eos_ids=[24], max_new_tokens=limits)
  cont = engine(model)
  assert cont.generate_ids(rows, GREEDY, eos_ids=[24], max_new_tokens=limits) == static
  assert [len(t) for t in static] != limits  # some rows stopped at EOS, the rest at their own limits
  assert 0 < cont.stats.slot_utilisation <= 1


@pytest.mark.parametrize("shape,slots", [((1, 1, 1), 1), ((1, 1, 1), 3), ((1, 1, 1), 8), ((2, 1, 1), 6), ((8, 1, 1), 8)])
def test_sampled_tokens_do_not_depend_on_slot_count_or_mesh(model, shape, slots):
  rows = prompts(seed=1)
  ref = engine(model, scheduler="static").generate_ids(rows, SAMPLED, eos_ids=[4], index_offset=40)
  got = engine(model, shape, decode_slots=slots).generate_ids(rows, SAMPLED, eos_ids=[4], index_offset=40)
  assert got == ref


def test_prefix_reuse_changes_no_token_and_saves_prefill(model):
  rows = [SHARED + [i + 1, 2 * i + 5] * (i + 1) for i in range(6)]
  with_reuse, without = engine(model), engine(model, prefix_reuse=False)
  saved_before = with_reuse.stats.prefill_tokens_saved
  for sampling in (GREEDY, SAMPLED):
    tokens = with_reuse.generate_ids(rows, sampling, max_new_tokens=10)
    assert tokens == without.generate_ids(rows, sampling, max_new_tokens=10) and all(tokens)
  saved = with_reuse.stats.prefill_tokens_saved - saved_before
  assert saved == 2 * 20 * len(rows)  # SHARED in whole granules: 20 tokens, not whole chunks of 8
  assert without.stats.prefill_tokens_saved == 0


def test_prefix_reuse_changes_no_score(model):
  rows = [SHARED + [i + 1] * (i + 2) for i in range(5)]
  conts = [[5, 6, 7][:i % 3 + 1] for i in range(5)]
  with_reuse, without, static = engine(model), engine(model, prefix_reuse=False), engine(model, scheduler="static")
  probs = with_reuse.next_token_probs(rows, [3, 5, 9])
  np.testing.assert_array_equal(probs, without.next_token_probs(rows, [3, 5, 9]))
  np.testing.assert_allclose(probs, static.next_token_probs(rows, [3, 5, 9]), rtol=1e-5, atol=1e-7)
  ll = with_reuse.loglikelihood(rows, conts)
  np.testing.assert_array_equal(ll, without.loglikelihood(rows, conts))
  np.testing.assert_allclose(ll, static.loglikelihood(rows, conts), rtol=1e-5)
  assert with_reuse.stats.prefill_tokens_saved > 0


def test_stop_test_frees_a_slot_early(model):
  rows = prompts(n=4)
  full = engine(model, scheduler="static").generate_ids(rows, GREEDY, max_new_tokens=20)
  stopped = engine(model).generate_ids(rows, GREEDY, max_new_tokens=20,
                                                      stop=lambda i, ids: len(ids) >= 4)
  for f, s in zip(full, stopped):
    assert 4 <= len(s) <= 4 + 3 - 1 and s == f[:len(s)]  # stops at the first decode call that meets it


def test_compiles_stay_few_across_calls(model):
  cfg, params = model
  eng = Engine(cfg, params, layout(), prompt_buckets=(64,), scheduler="continuous", decode_slots=3,
               decode_steps=3, prefill_chunk=8)
  eng.generate_ids(prompts(seed=0), GREEDY, max_new_tokens=8)
  first = eng.stats.compiles
  for seed in (1, 2):
    eng.generate_ids(prompts(seed=seed), GREEDY, max_new_tokens=8)
  # slot cache and decode, then per prefill group size (3 slots: groups of 2 and 1 prompts) its group
  # cache, chunk and insert programs (no common prefix)
  assert eng.stats.compiles == first == 2 + 2 * 3


@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 4, 2)], ids=["single", "fsdp_x_tensor"])
def test_scanned_layers_give_the_layer_lists_tokens_and_scores(model, shape):
  """`scan_layers`: the slot and group caches are stacked [layers, ...]; insertion and prefix copies
  move every layer's rows at once."""
  cfg, params = model
  scanned_cfg = tiny_config(max_seq_len=256, scan_layers=True)
  lay = layout(shape)
  stacked = stacking.to_form(jax.tree.map(jnp.copy, params), scanned_cfg, build.param_shardings(scanned_cfg, lay))
  scanned = Engine(scanned_cfg, stacked, lay, prompt_buckets=(16, 32, 64), batch_size=4, scheduler="continuous",
                   decode_steps=3, prefill_chunk=8, prefix_granule=4, decode_slots=3)
  rows = prompts()
  assert scanned.generate_ids(rows, GREEDY, max_new_tokens=8) == engine(model).generate_ids(rows, GREEDY, max_new_tokens=8)
  shared = [SHARED + [i + 1] * (i + 2) for i in range(5)]  # scored on top of a stored shared prefix
  conts = [[5, 6, 7][:i % 3 + 1] for i in range(5)]
  np.testing.assert_allclose(scanned.loglikelihood(shared, conts), engine(model).loglikelihood(shared, conts), rtol=1e-5)
  assert scanned.stats.prefill_tokens_saved > 0
