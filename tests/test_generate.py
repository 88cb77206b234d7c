"""The generation engine: greedy decoding equals transformers token for token, sharding and
batching change nothing, sampling filters hold, per-row stops work, scoring matches references.

All engines share one tiny random GQA LLaMA; most tests reuse the module's compiled programs.
"""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch

from hf_reference import hf_logits, make_hf_model, save_hf_model
from humpback_jax import sharding
from humpback_jax.checkpoints import hf
from humpback_jax.generate import SAMPLING_CANDIDATES, GREEDY, Engine, SamplingParams, sample_next, truncate_at_stop
from humpback_jax.model import build

NEW = 32
BUCKETS = (16, 32)
SAMPLED = SamplingParams(temperature=1.0, top_p=0.9, seed=3)


def layout_of(shape):
  mesh_cfg = ml_collections.ConfigDict(dict(axes=("data", "fsdp", "tensor"), shape=shape))
  return sharding.Layout(sharding.make_mesh(mesh_cfg, jax.devices()[:math.prod(shape)]))


@pytest.fixture(scope="module")
def hf_model():
  return make_hf_model("gqa", seed=0)


@pytest.fixture(scope="module")
def folder(hf_model, tmp_path_factory):
  path = tmp_path_factory.mktemp("tiny_llama")
  save_hf_model(hf_model, path)
  return path


@pytest.fixture(scope="module")
def cfg(folder):
  return hf.read_config(folder)


def make_engine(folder, cfg, shape=(1, 1, 1), **kwargs):
  layout = layout_of(shape)
  kwargs = {"prompt_buckets": BUCKETS, "batch_size": 4, **kwargs}
  return Engine(cfg, hf.load_params(folder, cfg, layout), layout, **kwargs)


@pytest.fixture(scope="module")
def engine(folder, cfg):
  return make_engine(folder, cfg)


@pytest.fixture(scope="module")
def engine_batch1(folder, cfg):
  return make_engine(folder, cfg, batch_size=1)


@pytest.fixture(scope="module")
def prompts(cfg):
  rng = np.random.default_rng(0)
  return [rng.integers(3, cfg.vocab_size, n).tolist() for n in (3, 7, 12, 20)]


@pytest.fixture(scope="module")
def greedy(engine, prompts):
  return engine.generate_ids(prompts, GREEDY, max_new_tokens=NEW)


def test_greedy_equals_transformers_generate(hf_model, prompts, greedy):
  hf_model.generation_config.eos_token_id = None  # never stop early
  for prompt, ours in zip(prompts, greedy):
    with torch.no_grad():
      out = hf_model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=NEW, pad_token_id=0)
    assert ours == out[0, len(prompt):].tolist()


def test_batched_results_equal_one_at_a_time(engine_batch1, prompts, greedy):
  assert engine_batch1.generate_ids(prompts, GREEDY, max_new_tokens=NEW) == greedy


@pytest.mark.parametrize("shape", [(8, 1, 1), (1, 4, 2)], ids=["data", "fsdp_x_tensor"])
def test_sharded_generation_equals_unsharded(folder, cfg, prompts, greedy, shape):
  sharded = make_engine(folder, cfg, shape, batch_size=8)
  assert sharded.generate_ids(prompts, GREEDY, max_new_tokens=NEW) == greedy


@pytest.mark.parametrize("shape", [(1, 1, 1), (1, 4, 2)], ids=["single", "fsdp_x_tensor"])
def test_scanned_layers_decode_and_score_as_the_layer_list(folder, cfg, engine, prompts, greedy, shape):
  """With `scan_layers` the cache is one stacked buffer carried through the scan over the layers."""
  scanned_cfg = cfg.copy_and_resolve_references()
  scanned_cfg.scan_layers = True
  scanned = make_engine(folder, scanned_cfg, shape, batch_size=4 * shape[1])
  assert scanned.generate_ids(prompts, GREEDY, max_new_tokens=NEW) == greedy
  conts = [p[:3] for p in prompts]
  np.testing.assert_allclose(scanned.loglikelihood(prompts, conts), engine.loglikelihood(prompts, conts), rtol=1e-5)


def test_sampling_with_a_seed_is_reproducible(engine, prompts):
  first = engine.generate_ids(prompts, SAMPLED, max_new_tokens=NEW)
  assert engine.generate_ids(prompts, SAMPLED, max_new_tokens=NEW) == first
  assert engine.generate_ids(prompts, SamplingParams(temperature=1.0, seed=4), max_new_tokens=NEW) != first


def test_a_rows_sample_does_not_depend_on_its_batch(engine, engine_batch1, prompts):
  together = engine.generate_ids(prompts, SAMPLED, max_new_tokens=NEW)
  assert engine_batch1.generate_ids(prompts, SAMPLED, max_new_tokens=NEW) == together
  shard = engine_batch1.generate_ids(prompts[2:], SAMPLED, max_new_tokens=NEW, index_offset=2)
  assert shard == together[2:]  # resuming at prompt 2 reproduces its samples


def test_changing_sampling_knobs_does_not_recompile(engine, prompts, greedy):
  compiles = engine.stats.compiles
  engine.generate_ids(prompts, SamplingParams(temperature=0.3, top_p=0.5, top_k=7, seed=9), max_new_tokens=NEW)
  assert engine.stats.compiles == compiles


def test_top_k_1_equals_greedy(engine, prompts, greedy):
  top1 = SamplingParams(temperature=1.0, top_p=1.0, top_k=1, seed=5)
  assert engine.generate_ids(prompts, top1, max_new_tokens=NEW) == greedy


def test_temperature_zero_is_argmax_whatever_the_filters():
  logits = jax.random.normal(jax.random.key(0), (16, 50))
  tokens = sample_next(logits, jax.random.key(1), 0.0, 0.5, 3)
  np.testing.assert_array_equal(tokens, jnp.argmax(logits, axis=-1))


@jax.jit
def _draws(logits, key, top_p, top_k):
  rows = jnp.broadcast_to(logits, (4000, logits.shape[-1]))
  return sample_next(rows, key, 1.0, top_p, top_k)


@pytest.mark.parametrize("top_p, nucleus", [(0.7, {0, 1}), (0.85, {0, 1, 2}), (0.3, {0})])
def test_top_p_never_samples_outside_the_nucleus(top_p, nucleus):
  logits = jnp.log(jnp.array([0.15, 0.5, 0.05, 0.3]))[jnp.array([1, 3, 0, 2])]  # probs .5 .3 .15 .05
  drawn = set(np.asarray(_draws(logits, jax.random.key(0), top_p, 0)).tolist())
  assert drawn == nucleus


def test_top_k_never_samples_outside_the_k_most_likely():
  logits = jnp.log(jnp.array([0.5, 0.3, 0.15, 0.05]))
  drawn = set(np.asarray(_draws(logits, jax.random.key(0), 1.0, 2)).tolist())
  assert drawn == {0, 1}


def test_temperature_alone_samples_the_whole_distribution():
  probs = np.array([0.5, 0.3, 0.15, 0.05])
  drawn = np.asarray(_draws(jnp.log(jnp.asarray(probs)), jax.random.key(0), 1.0, 0))
  np.testing.assert_allclose(np.bincount(drawn, minlength=4) / drawn.size, probs, atol=0.03)


def test_top_p_samples_a_nucleus_wider_than_the_ranked_candidates():
  logits = jnp.linspace(0.0, -1.0, 300)  # nearly flat: the 0.9 nucleus holds ~260 tokens, past the 64 candidates
  probs = np.asarray(jax.nn.softmax(logits))
  nucleus = int(np.searchsorted(np.cumsum(probs), 0.9)) + 1
  drawn = set(np.asarray(_draws(logits, jax.random.key(0), 0.9, 0)).tolist())
  assert max(drawn) < nucleus and len(drawn) > SAMPLING_CANDIDATES


def test_a_rows_sample_does_not_depend_on_the_rows_beside_it():
  peaked = jnp.zeros(300).at[7].set(10.0).at[11].set(9.5)  # nucleus of two tokens: within the candidates
  flat = jnp.linspace(0.0, -1.0, 300)                    # needs the whole vocabulary sorted
  keys = jax.random.split(jax.random.key(3), 64)
  alone = jax.jit(lambda k: sample_next(jnp.broadcast_to(peaked, (64, 300)), k, 1.0, 0.9, 0))(keys)
  mixed = jax.jit(lambda k: sample_next(jnp.stack([peaked] * 63 + [flat]), k, 1.0, 0.9, 0))(keys)
  np.testing.assert_array_equal(alone[:63], mixed[:63])
  assert len(set(np.asarray(alone).tolist())) > 1  # the draws do vary with the key
  # A row marked not live (a finished row, an empty decode slot) keeps the rest off the whole-vocabulary
  # path; the live rows' draws stay the same, and so does the dead row's own when it fits the candidates.
  live = jnp.arange(64) < 63
  masked = jax.jit(lambda k: sample_next(jnp.stack([peaked] * 63 + [flat]), k, 1.0, 0.9, 0, live=live))(keys)
  np.testing.assert_array_equal(masked[:63], alone[:63])
  dead_peaked = jax.jit(lambda k: sample_next(jnp.broadcast_to(peaked, (64, 300)), k, 1.0, 0.9, 0, live=live))(keys)
  np.testing.assert_array_equal(dead_peaked, alone)


def test_each_row_stops_at_its_first_eos(engine, prompts, greedy):
  eos = greedy[0][5]
  expected = [row[:row.index(eos)] if eos in row else row for row in greedy]
  assert engine.generate_ids(prompts, GREEDY, eos_ids=[eos, 0], max_new_tokens=NEW) == expected


def test_each_row_respects_its_own_max_new_tokens(engine, prompts, greedy):
  limits = [1, 5, 0, NEW]
  out = engine.generate_ids(prompts, GREEDY, max_new_tokens=limits)
  assert out == [row[:n] for row, n in zip(greedy, limits)]


def test_stats_count_padding_and_new_tokens_without_recompiling(engine, prompts, greedy):
  before = dict(vars(engine.stats))
  engine.generate_ids(prompts, GREEDY, max_new_tokens=NEW)
  after = vars(engine.stats)
  assert after["compiles"] == before["compiles"]
  assert after["new_tokens"] - before["new_tokens"] == 4 * NEW
  assert after["prompt_slots"] - before["prompt_slots"] == 4 * 32
  assert after["padding_slots"] - before["padding_slots"] == 4 * 32 - sum(map(len, prompts))


def test_generation_makes_no_implicit_host_transfers(engine, prompts, greedy):
  with jax.transfer_guard("disallow"):
    assert engine.generate_ids(prompts, GREEDY, max_new_tokens=NEW) == greedy


def test_loglikelihood_equals_log_softmax_of_forward_and_transformers(engine, hf_model, cfg, prompts):
  rng = np.random.default_rng(1)
  conts = [rng.integers(3, cfg.vocab_size, n).tolist() for n in (4, 1, 9, 5)]
  ours = engine.loglikelihood(prompts, conts)
  batch = np.zeros((len(prompts), 32), np.int32)  # right padding: causal, so real positions are exact
  for r, (p, c) in enumerate(zip(prompts, conts)):
    batch[r, :len(p) + len(c)] = p + c
  logits, _ = jax.jit(lambda params, tokens: build.forward(cfg, params, tokens))(engine.params, batch)
  ref_ours = np.asarray(jax.nn.log_softmax(logits, -1))
  for r, (p, c, got) in enumerate(zip(prompts, conts, ours)):
    ref_hf = torch.log_softmax(torch.as_tensor(hf_logits(hf_model, [p + c])[0]), -1).numpy()
    at = np.arange(len(p) - 1, len(p) + len(c) - 1)  # logits at i predict token i + 1
    np.testing.assert_allclose(got, ref_hf[at, c].sum(), rtol=1e-4)
    np.testing.assert_allclose(got, ref_ours[r, at, c].sum(), rtol=1e-5)


def test_next_token_probs_equal_softmax_of_transformers_last_logits(engine, hf_model, prompts):
  candidates = [5, 17, 42, 100]
  ours = engine.next_token_probs(prompts, candidates)
  for prompt, got in zip(prompts, ours):
    ref = torch.softmax(torch.as_tensor(hf_logits(hf_model, [prompt])[0, -1]), -1).numpy()
    np.testing.assert_allclose(got, ref[candidates], rtol=1e-4, atol=1e-7)


def test_empty_prompt_is_an_error_naming_its_index(engine, prompts):
  with pytest.raises(ValueError, match="prompt 1 is empty"):
    engine.generate_ids([prompts[0], [], prompts[2]], GREEDY, max_new_tokens=NEW)


def test_empty_prompt_is_skipped_and_counted_under_skip_policy(folder, cfg):
  skipping = make_engine(folder, cfg, on_empty="skip")
  assert skipping.generate_ids([[]], GREEDY, max_new_tokens=NEW) == [None]
  assert skipping.stats.skipped_empty == 1


def test_out_of_vocab_id_is_an_error_naming_prompt_and_id(engine, prompts, cfg):
  with pytest.raises(ValueError, match=f"prompt 2: token id {cfg.vocab_size} is outside"):
    engine.generate_ids([prompts[0], prompts[1], [4, cfg.vocab_size]], GREEDY, max_new_tokens=NEW)


def test_too_long_prompt_keeps_its_last_tokens(engine, cfg):
  limit = cfg.max_seq_len - NEW
  long = np.random.default_rng(2).integers(3, cfg.vocab_size, limit + 5).tolist()
  truncated = engine.stats.truncated
  out = engine.generate_ids([long, long[-limit:]], GREEDY, max_new_tokens=NEW)
  assert out[0] == out[1]
  assert engine.stats.truncated == truncated + 1


def test_too_long_prompt_is_skipped_and_counted_under_skip_policy(folder, cfg):
  skipping = make_engine(folder, cfg, too_long="skip")
  long = [3] * (cfg.max_seq_len - NEW + 1)
  assert skipping.generate_ids([long], GREEDY, max_new_tokens=NEW) == [None]
  assert skipping.stats.skipped_too_long == 1


def test_truncate_at_stop_cuts_before_the_earliest_stop_string():
  assert truncate_at_stop("answer</s> more\n\nUser:", ["\n\nUser:", "</s>"]) == "answer"
  assert truncate_at_stop("no stop here", ["</s>"]) == "no stop here"
