"""Two processes x 4 CPU devices (jax.distributed over gloo) train exactly like one process x 8."""
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from humpback_jax.metrics_log import read_metrics

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ["humpback", "train", "--config=configs/toy.py", "--config.train.steps=10", "--config.train.log_every=1",
         "--config.train.checkpoint_every=5", "--config.train.seq_len=256", "--config.mesh.shape=(-1,1,1)"]


def losses(workdir):
  return np.array([r["loss"] for r in read_metrics(Path(workdir) / "metrics.jsonl")])


@pytest.mark.slow  # ~100 s on 2 cores: full run only (bash launch/setup_and_test.sh -m slow)
def test_two_processes_give_the_single_process_losses(tmp_path):
  env = dict(os.environ, HUMPBACK_LOG_DIR=str(tmp_path / "logs"), HUMPBACK_DEVICES_PER_PROCESS="4")
  multi = subprocess.run(["launch/local_cpu.sh", "2", *TRAIN, f"--workdir={tmp_path / 'multi'}"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=600)
  assert multi.returncode == 0, multi.stdout[-2000:] + multi.stderr[-2000:]
  assert "jax.distributed: 2 processes, 8 devices (4 local, cpu)" in (tmp_path / "logs" / "process_0.log").read_text()
  single = subprocess.run([*TRAIN, f"--workdir={tmp_path / 'single'}"], cwd=ROOT,
                          env=dict(os.environ, JAX_NUM_CPU_DEVICES="8"), capture_output=True, text=True, timeout=600)
  assert single.returncode == 0, single.stderr[-2000:]
  a, b = losses(tmp_path / "multi"), losses(tmp_path / "single")
  assert len(a) == len(b) == 10
  np.testing.assert_allclose(a, b, rtol=1e-5)
