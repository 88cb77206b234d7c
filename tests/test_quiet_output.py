"""The main job prints our own lines; tfds' and absl's chatter shows only with --verbose."""
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from humpback_jax import cli, quiet

ROOT = Path(__file__).resolve().parent.parent
TOY = str(ROOT / "configs" / "toy.py")
THIRD_PARTY = ("Downloading and preparing dataset", "downloaded and prepared", "absl", "Variant folder",
               "Generating splits", "Shuffling", "examples/s")
LIBTPU = ("TPU", "libtpu", "InitGoogle", "E0000")


@pytest.fixture
def restored_logging(monkeypatch):
  monkeypatch.setenv(quiet.VERBOSE_ENV, "0")  # configure() writes it; monkeypatch puts it back
  loggers = [logging.getLogger(name) for name in ("absl", "tensorflow_datasets")]
  saved = [(logger.level, list(logger.handlers)) for logger in loggers]
  yield
  for logger, (level, handlers) in zip(loggers, saved):
    logger.setLevel(level)
    logger.handlers[:] = handlers


def run_first_stages(workdir, *flags) -> None:
  argv = ["pipeline", f"--config={TOY}", f"--workdir={workdir}", "--until=prepare_corpus",
          "--config.mesh.shape=(-1,1,1)", *flags]  # 8 test devices
  assert cli.main(argv) == 0


def test_a_pipeline_run_prints_no_tfds_or_absl_line(tmp_path, capfd, restored_logging):
  run_first_stages(tmp_path / "run")
  out, err = capfd.readouterr()
  lines = (out + err).replace("\r", "\n").splitlines()
  assert any(line.startswith("[prepare_seed] done") for line in lines)
  assert any(line.startswith("[prepare_corpus] done") for line in lines)
  noise = [line for line in lines if any(marker in line for marker in THIRD_PARTY)]
  assert not noise, "third-party output in a quiet run:\n" + "\n".join(noise)


def test_verbose_shows_what_tfds_logs(tmp_path, capfd, restored_logging):
  run_first_stages(tmp_path / "run", "--verbose")
  out, err = capfd.readouterr()
  assert "INFO:absl:Load dataset info from" in out + err  # tfds opening the segments dataset


def test_the_command_on_a_host_without_tpu_prints_no_libtpu_errors(tmp_path):
  # libtpu is installed (the test extra); without a pinned platform JAX would start it, and on a host
  # without TPU chips it prints "Failed to find host bounds ..." errors. ALLOW_MULTIPLE_LIBTPU_LOAD lets
  # it start even while another test process holds libtpu.
  env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", quiet.VERBOSE_ENV)}
  env.update(ALLOW_MULTIPLE_LIBTPU_LOAD="1", JAX_NUM_CPU_DEVICES="1", PYTHONPATH=str(ROOT))
  done = subprocess.run([sys.executable, "-m", "humpback_jax.cli", "pipeline", f"--config={TOY}",
                         f"--workdir={tmp_path / 'run'}", "--until=prepare_seed"], env=env, cwd=ROOT,
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr
  lines = (done.stdout + done.stderr).replace("\r", "\n").splitlines()
  noise = [line for line in lines if any(marker in line for marker in THIRD_PARTY + LIBTPU)]
  assert not noise, "third-party output in a quiet run:\n" + "\n".join(noise)
  assert any(line.startswith("[prepare_seed] done") for line in lines)
