"""`humpback train` killed with SIGKILL resumes from its last checkpoint and reproduces the losses."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from humpback_jax.metrics_log import read_metrics

ROOT = Path(__file__).resolve().parents[1]


def train_command(workdir):
  return [sys.executable, "-m", "humpback_jax.cli", "train", "--config=configs/toy.py", f"--workdir={workdir}",
          "--config.train.steps=12", "--config.train.checkpoint_every=5", "--config.train.log_every=1",
          "--config.train.small_data_batch_size=8"]


def env():
  return dict(os.environ, JAX_NUM_CPU_DEVICES="1", PYTHONUNBUFFERED="1")


def losses(workdir):
  return {r["step"]: r["loss"] for r in read_metrics(Path(workdir) / "metrics.jsonl")}


def test_sigkill_after_step_7_resumes_at_5_with_identical_losses(tmp_path):
  subprocess.run(train_command(tmp_path / "full"), cwd=ROOT, env=env(), check=True, capture_output=True)
  reference = losses(tmp_path / "full")
  assert sorted(reference) == list(range(1, 13))

  killed = tmp_path / "killed"
  proc = subprocess.Popen(train_command(killed), cwd=ROOT, env=env(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if 7 in losses(killed) and (killed / "checkpoints" / "5").exists():
      proc.send_signal(signal.SIGKILL)
      break
    time.sleep(0.01)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
  assert max(losses(killed)) < 12

  rerun = subprocess.run(train_command(killed), cwd=ROOT, env=env(), check=True, capture_output=True, text=True)
  assert '"resumed_from": 5' in rerun.stdout
  resumed = losses(killed)
  steps = list(range(6, 13))
  np.testing.assert_allclose([resumed[s] for s in steps], [reference[s] for s in steps], rtol=1e-6)
