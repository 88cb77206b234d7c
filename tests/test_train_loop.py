"""The training loop's guards: preemption saves, divergence stops, and every run leaves its logs."""
import signal

import numpy as np
import pytest

from configs import common
from helpers import layout, tiny_config
from humpback_jax import train_loop
from humpback_jax.data import sft
from humpback_jax.model import build


def examples(n=32, seed=0):
  rng = np.random.RandomState(seed)
  out = []
  for _ in range(n):
    length = rng.randint(8, 24)
    out.append((rng.randint(3, 128, length).astype(np.int32), np.arange(length) >= length // 2))
  return out


def loader():
  return sft.SFTLoader(examples(), seq_len=32, batch_size=8, seed=0)


def run(workdir, steps=6, loader_=None, progress=False, desc="train", **train_overrides):
  cfg = tiny_config()
  lay = layout()
  tc = common.train_config(**{**dict(checkpoint_every=2, log_every=1, learning_rate=1e-3,
                                     end_learning_rate=1e-3), **train_overrides})
  return train_loop.run(cfg, tc, lay, loader_ or loader(), lambda: build.init_params(cfg, lay, seed=0),
                        workdir, total_steps=steps, seq_len=32, progress=progress, desc=desc)


def test_a_run_writes_metrics_events_a_loss_curve_and_a_progress_bar_named_for_its_stage(tmp_path, capfd):
  result = run(tmp_path, progress=True, desc="train_m0")  # one training run (compiles are slow) for all four
  bar = capfd.readouterr().err.replace("\r", "\n").splitlines()
  assert any(line.startswith("train_m0: 100%") for line in bar) and not any(line.startswith("train:") for line in bar)
  assert np.isfinite(result["final_loss"])
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert len(lines) == 6 and all(k in lines[0] for k in ("loss", "learning_rate", "grad_norm", "tokens_per_s", "mfu"))
  assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
  assert (tmp_path / "loss.png").stat().st_size > 1000


def test_a_run_resumed_after_its_last_step_reports_that_steps_loss(tmp_path):
  first = run(tmp_path)
  again = run(tmp_path)  # e.g. killed while saving the model: every step is already checkpointed
  assert again["resumed_from"] == 6 and again["final_loss"] == pytest.approx(first["final_loss"])


def test_nan_loss_stops_and_names_the_step_and_last_good_checkpoint(tmp_path):
  with pytest.raises(train_loop.TrainingDiverged, match=r"step \d+: loss is (nan|inf).*Last good checkpoint: .*checkpoints/\d+"):
    run(tmp_path, steps=40, learning_rate=1e9, end_learning_rate=1e9, grad_clip=1e30)


class SigtermAtStep3:
  """A loader that delivers SIGTERM to this process while the third batch is being read."""

  def __init__(self):
    self.inner, self.calls = loader(), 0

  def __next__(self):
    self.calls += 1
    if self.calls == 3:
      signal.raise_signal(signal.SIGTERM)
    return next(self.inner)

  def get_state(self):
    return self.inner.get_state()

  def set_state(self, state):
    self.inner.set_state(state)


def test_sigterm_saves_the_current_step_then_stops(tmp_path):
  with pytest.raises(train_loop.Preempted, match="SIGTERM at step 3"):
    run(tmp_path, steps=6, loader_=SigtermAtStep3())
  assert (tmp_path / "checkpoints" / "3").is_dir()
  resumed = run(tmp_path, steps=6)
  assert resumed["resumed_from"] == 3
