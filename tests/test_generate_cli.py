"""`humpback generate` at corpus scale: killed and rerun it gives every input once, and two
processes (launch/local_cpu.sh) produce exactly the single-process output."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import layout
from humpback_jax import configlib
from humpback_jax.checkpoints import model_dir
from humpback_jax import prompts as method_prompts
from humpback_jax.model import build

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "humpback_jax" / "assets" / "toy" / "tokenizer.model"
SEGMENTS = 200
FAST = ["--config=configs/toy.py", "--config.generate.max_new_tokens=8", "--config.generate.temperature=0.0",
        "--config.generate.batch_size=8", "--config.generate.shard_size=20",
        "--config.generate.prompt_buckets=(128,256)", "--config.mesh.shape=(-1,1,1)"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  """A random-weight toy backward model in our folder format."""
  cfg = configlib.load_config("configs/toy.py")
  path = tmp_path_factory.mktemp("model") / "toy"
  model_dir.save(path, build.init_params(cfg.model, layout(), seed=3), cfg.model, tokenizer_file=TOKENIZER)
  return path


@pytest.fixture(scope="module")
def segments_file(tmp_path_factory):
  """200 backtranslation prompts (the paper's backward prompt around short corpus-like segments)."""
  path = tmp_path_factory.mktemp("input") / "segments.jsonl"
  with open(path, "w") as f:
    for i in range(SEGMENTS):
      text = f"Section {i}: the kettle boils water in {2 + i % 7} minutes when it holds {i % 5 + 1} cups."
      f.write(json.dumps(dict(id=f"seg-{i:03d}", prompt=method_prompts.backward_instruction(text))) + "\n")
  return path


def command(checkpoint, segments_file, out):
  return ["generate", *FAST, f"--checkpoint={checkpoint}", f"--input={segments_file}", f"--output={out}", "--chat"]


def outputs(out: Path) -> list[dict]:
  return [json.loads(line) for line in (out / "outputs.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def single_run(checkpoint, segments_file, tmp_path_factory):
  out = tmp_path_factory.mktemp("single") / "out"
  done = subprocess.run([sys.executable, "-m", "humpback_jax.cli", *command(checkpoint, segments_file, out)],
                        cwd=ROOT, env=dict(os.environ, JAX_NUM_CPU_DEVICES="8"), capture_output=True,
                        text=True, timeout=900)
  assert done.returncode == 0, done.stderr[-3000:]
  rows = outputs(out)
  assert [r["id"] for r in rows] == [f"seg-{i:03d}" for i in range(SEGMENTS)]
  return rows


def test_killed_generate_rerun_gives_every_input_once_and_the_same_outputs(
    checkpoint, segments_file, single_run, tmp_path):
  out = tmp_path / "out"
  argv = [sys.executable, "-m", "humpback_jax.cli", *command(checkpoint, segments_file, out)]
  env = dict(os.environ, JAX_NUM_CPU_DEVICES="8")
  proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 600
  while proc.poll() is None and time.time() < deadline and len(list((out / "shards").glob("part-*.jsonl"))) < 3:
    time.sleep(0.05)
  assert proc.poll() is None, "the run ended before it could be killed"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not (out / "outputs.jsonl").exists()
  done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert done.returncode == 0, done.stderr[-3000:]
  assert '"shards_skipped": ' in done.stdout and '"shards_skipped": 0' not in done.stdout
  assert outputs(out) == single_run


def test_two_processes_augment_200_segments_exactly_like_one(checkpoint, segments_file, single_run, tmp_path):
  out = tmp_path / "out"
  env = dict(os.environ, HUMPBACK_LOG_DIR=str(tmp_path / "logs"), HUMPBACK_DEVICES_PER_PROCESS="4")
  done = subprocess.run(["launch/local_cpu.sh", "2", "humpback", *command(checkpoint, segments_file, out)],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  logs = "".join(p.read_text() for p in sorted((tmp_path / "logs").glob("*.log")))
  assert done.returncode == 0, logs[-4000:]
  assert "jax.distributed: 2 processes, 8 devices (4 local, cpu)" in logs
  written = [json.loads(line)["records_written"] for line in logs.splitlines() if line.startswith("{")]
  assert sorted(written) == [100, 100], "each process takes its own half"
  assert outputs(out) == single_run
