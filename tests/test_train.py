"""The train step: it learns, it masks, it shards, and it accumulates exactly."""
import jax
import numpy as np
import pytest

from configs import common
from helpers import LAYOUTS, layout, tiny_config
from humpback_jax import train
from humpback_jax.model import build


def random_batch(rng, batch=8, length=16, vocab=128):
  return dict(tokens=rng.randint(0, vocab, (batch, length)).astype(np.int32),
              targets=rng.randint(0, vocab, (batch, length)).astype(np.int32),
              loss_mask=(rng.rand(batch, length) > 0.3).astype(np.float32),
              positions=np.tile(np.arange(length, dtype=np.int32), (batch, 1)),
              segment_ids=np.ones((batch, length), np.int32))


def run_steps(cfg, batch, shape=(1, 1, 1), steps=5, micro_batches=1, stop_below=None, **train_overrides):
  lay = layout(shape)
  tc = common.train_config(**{**dict(learning_rate=1e-2, end_learning_rate=1e-2), **train_overrides})
  fns = train.build_step(cfg, lay, train.make_optimizer(tc, 100), micro_batches=micro_batches)
  state = fns.init(build.init_params(cfg, lay, seed=0))
  losses = []
  for _ in range(steps):
    state, metrics = fns.step(state, train.put_batch(batch, fns.batch_sharding))
    losses.append(float(metrics["loss"]))
    if stop_below is not None and losses[-1] < stop_below:
      break
  return np.array(losses), state


def test_toy_model_overfits_sixteen_examples():
  cfg = common.model_preset("toy")
  rng = np.random.RandomState(0)
  tokens = rng.randint(3, cfg.vocab_size, (16, 33)).astype(np.int32)
  batch = dict(tokens=tokens[:, :-1], targets=tokens[:, 1:],
               loss_mask=np.ones((16, 32), np.float32),
               positions=np.tile(np.arange(32, dtype=np.int32), (16, 1)),
               segment_ids=np.ones((16, 32), np.int32))
  losses, _ = run_steps(cfg, batch, steps=150, stop_below=0.1, learning_rate=3e-3,
                        weight_decay=0.0, schedule="constant")
  assert losses[0] > 5.0
  assert losses[-1] < 0.1, f"loss after {len(losses)} steps: {losses[-1]}"


def test_changing_instruction_targets_does_not_change_the_loss():
  cfg = tiny_config()
  batch = random_batch(np.random.RandomState(1))
  params = build.init_params(cfg, layout(), seed=0)
  nll = jax.jit(lambda p, b: train.token_nll(cfg, p, b))
  loss = lambda b: float(np.divide(*nll(params, b)))
  other = dict(batch, targets=np.where(batch["loss_mask"] > 0, batch["targets"], (batch["targets"] + 7) % 128))
  assert loss(other) == loss(batch)


def test_changing_output_targets_changes_the_loss():
  cfg = tiny_config()
  batch = random_batch(np.random.RandomState(1))
  params = build.init_params(cfg, layout(), seed=0)
  nll = jax.jit(lambda p, b: train.token_nll(cfg, p, b))
  loss = lambda b: float(np.divide(*nll(params, b)))
  other = dict(batch, targets=np.where(batch["loss_mask"] > 0, (batch["targets"] + 7) % 128, batch["targets"]))
  assert loss(other) != loss(batch)


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_sharded_steps_equal_single_device(name):
  cfg = tiny_config()
  batch = random_batch(np.random.RandomState(2))
  single, _ = run_steps(cfg, batch)
  sharded, state = run_steps(cfg, batch, shape=LAYOUTS[name])
  assert len(state["params"]["embed"].sharding.device_set) == 8
  np.testing.assert_allclose(sharded, single, rtol=1e-5)


def test_four_micro_batches_equal_one_big_batch():
  cfg = tiny_config()
  batch = random_batch(np.random.RandomState(3), batch=16)
  whole, s1 = run_steps(cfg, batch, steps=3)
  accumulated, s4 = run_steps(cfg, batch, steps=3, micro_batches=4)
  np.testing.assert_allclose(accumulated, whole, rtol=1e-5)


def test_paper_schedule_runs_from_1e5_to_9e6():
  schedule = train.learning_rate_schedule(common.train_config(), 500)
  assert float(schedule(0)) == pytest.approx(1e-5)
  assert float(schedule(500)) == pytest.approx(9e-6)


def test_paper_steps_and_batch_size_follow_the_table():
  assert [train.paper_steps(n) for n in (3200, 12800, 25600, 51200)] == [500, 600, 1200, 1600]
  tc = common.train_config()
  assert (train.paper_batch_size(tc, 2999), train.paper_batch_size(tc, 3200)) == (8, 32)


def test_no_weight_decay_on_norm_scales():
  cfg = tiny_config()
  params = build.init_params(cfg, layout(), seed=0)
  zero_grads = jax.tree.map(np.zeros_like, params)
  tc = common.train_config(learning_rate=1.0, end_learning_rate=1.0, weight_decay=0.5)
  opt = train.make_optimizer(tc, 10)
  updates, _ = jax.jit(lambda g, p: opt.update(g, opt.init(p), p))(zero_grads, params)
  assert float(np.abs(updates["final_norm"]["scale"]).max()) == 0.0
  assert float(np.abs(updates["layers"][0]["mlp"]["up"]).max()) > 0.0


@pytest.mark.parametrize("causal_block", [64, 8], ids=["one_block", "block_causal"])
def test_packed_batch_gives_the_same_per_example_losses_as_unpacked(causal_block, monkeypatch):
  from humpback_jax.data import sft
  from humpback_jax.model import attention
  monkeypatch.setattr(attention, "CAUSAL_BLOCK", causal_block)  # rows of 32: 4 query blocks at 8
  cfg = tiny_config()
  params = build.init_params(cfg, layout(), seed=0)
  rng = np.random.RandomState(4)
  examples = []
  for n in (9, 17, 5, 30, 12, 21):
    tokens = rng.randint(3, 128, n).astype(np.int32)
    mask = np.arange(n) >= n // 3  # the last two thirds are "output"
    examples.append((tokens, mask))
  alone = {}
  for tokens, mask in examples:
    (batch,) = list(sft.pack([(tokens, mask)], seq_len=32, batch_size=1))
    alone[tokens.tobytes()] = float(train.per_example_nll(cfg, params, batch)[0, 1])
  packed = {}
  for batch in sft.pack(examples, seq_len=32, batch_size=4):
    nll = np.asarray(train.per_example_nll(cfg, params, batch))
    for row in range(batch["tokens"].shape[0]):
      for seg in set(batch["segment_ids"][row].tolist()) - {0}:
        tokens = batch["tokens"][row][batch["segment_ids"][row] == seg]
        packed[tokens.tobytes()] = float(nll[row, seg])
  assert max(int(np.max(b["segment_ids"])) for b in sft.pack(examples, 32, 4)) > 1, "nothing was packed"
  assert packed.keys() == alone.keys()
  for key in alone:
    assert packed[key] == pytest.approx(alone[key], rel=1e-5)
