"""The main job prints our own lines; tfds' and absl's chatter shows only with --verbose."""
import logging
from pathlib import Path

import pytest

from humpback_jax import cli, quiet

TOY = str(Path(__file__).resolve().parent.parent / "configs" / "toy.py")
THIRD_PARTY = ("Downloading and preparing dataset", "downloaded and prepared", "absl", "Variant folder",
               "Generating splits", "Shuffling", "examples/s")


@pytest.fixture
def restored_logging(monkeypatch):
  monkeypatch.setenv(quiet.VERBOSE_ENV, "0")  # configure() writes it; monkeypatch puts it back
  levels = {name: logging.getLogger(name).level for name in ("absl", "tensorflow_datasets")}
  yield
  for name, level in levels.items():
    logging.getLogger(name).setLevel(level)


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


def test_verbose_shows_what_tfds_prints(tmp_path, capfd, restored_logging):
  run_first_stages(tmp_path / "run", "--verbose")
  out, err = capfd.readouterr()
  assert "Downloading and preparing dataset" in out + err
