"""Fault harness: kill `humpback train` and `humpback generate` with SIGKILL or SIGTERM at seeded
random points, rerun the same command, and require the uninterrupted run's artifacts exactly.

One train and one generate cycle run in CI; the rest (14 cycles in all: 6 train, 6 generate,
2 pipeline killed at a random shard of augmentation or curation) run with `-m slow`.
"""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from helpers import layout
from humpback_jax import configlib
from humpback_jax.checkpoints import model_dir
from humpback_jax.metrics_log import read_metrics
from humpback_jax.model import build

ROOT = Path(__file__).resolve().parents[2]
TOKENIZER = ROOT / "humpback_jax" / "assets" / "toy" / "tokenizer.model"
CLI = [sys.executable, "-m", "humpback_jax.cli"]
ENV = dict(os.environ, JAX_NUM_CPU_DEVICES="1", PYTHONUNBUFFERED="1")
TRAIN_STEPS, GENERATE_SHARDS = 12, 10


def cycles(command: str, n: int):
  """n (seed, signal) cases for one command; the first runs in CI, the others are marked slow."""
  out = []
  for seed in range(n):
    sig = (signal.SIGTERM, signal.SIGKILL)[seed % 2]
    marks = () if seed == 0 else (pytest.mark.slow,)
    out.append(pytest.param(seed, sig, marks=marks, id=f"{command}-{sig.name}-seed{seed}"))
  return out


def kill_when(argv, progress, threshold: int, sig) -> None:
  """Starts `argv`, sends `sig` once progress() >= threshold, and waits for it to end."""
  proc = subprocess.Popen(argv, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 600
  while proc.poll() is None and time.time() < deadline and progress() < threshold:
    time.sleep(0.02)
  assert proc.poll() is None, f"the run ended before progress {threshold}"
  proc.send_signal(sig)
  proc.wait(timeout=300)


def run_to_end(argv) -> str:
  done = subprocess.run(argv, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
  assert done.returncode == 0, done.stderr[-3000:]
  return done.stdout


# --------------------------------------------------------------------------- train


def train_argv(workdir):
  return [*CLI, "train", "--config=configs/toy.py", f"--workdir={workdir}", f"--config.train.steps={TRAIN_STEPS}",
          "--config.train.checkpoint_every=3", "--config.train.log_every=1", "--config.train.seq_len=256",
          "--config.train.small_data_batch_size=4"]


def logged_steps(workdir) -> int:
  """The last step in metrics.jsonl (0 while a line is half written)."""
  try:
    return max((r["step"] for r in read_metrics(Path(workdir) / "metrics.jsonl")), default=0)
  except json.JSONDecodeError:
    return 0


def final_params(workdir):
  path = Path(workdir) / "model"
  return model_dir.restore_params(path, model_dir.read_meta(path)["model"], layout())


@pytest.fixture(scope="module")
def train_reference(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("train_reference")
  run_to_end(train_argv(workdir))
  losses = {r["step"]: r["loss"] for r in read_metrics(workdir / "metrics.jsonl")}
  return losses, final_params(workdir)


@pytest.mark.parametrize("seed, sig", cycles("train", 6))
def test_train_killed_anywhere_ends_with_the_uninterrupted_params(seed, sig, train_reference, tmp_path):
  threshold = random.Random(seed).randint(2, TRAIN_STEPS - 1)
  kill_when(train_argv(tmp_path), lambda: logged_steps(tmp_path), threshold, sig)
  assert not (tmp_path / "model" / "model.json").exists(), "the final model appeared before the end"
  run_to_end(train_argv(tmp_path))
  losses = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "metrics.jsonl")}
  ref_losses, ref_params = train_reference
  assert sorted(losses) == sorted(ref_losses), "a step was lost or logged twice"
  np.testing.assert_allclose([losses[s] for s in sorted(losses)], [ref_losses[s] for s in sorted(losses)], rtol=1e-6)
  for a, b in zip(jax.tree.leaves(final_params(tmp_path)), jax.tree.leaves(ref_params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------- generate


@pytest.fixture(scope="module")
def generate_inputs(tmp_path_factory):
  cfg = configlib.load_config("configs/toy.py")
  root = tmp_path_factory.mktemp("generate_inputs")
  model_dir.save(root / "model", build.init_params(cfg.model, layout(), seed=5), cfg.model, tokenizer_file=TOKENIZER)
  with open(root / "prompts.jsonl", "w") as f:
    for i in range(GENERATE_SHARDS * 8):
      f.write(json.dumps(dict(id=f"p{i}", prompt=f"Question {i}: how many legs do {i % 9} spiders have?")) + "\n")
  return root


def generate_argv(inputs, out):
  # sampled (T=0.7, top-p 0.9) with a fixed seed: a resumed run must reproduce the same samples
  return [*CLI, "generate", "--config=configs/toy.py", f"--checkpoint={inputs / 'model'}",
          f"--input={inputs / 'prompts.jsonl'}", f"--output={out}", "--chat", "--config.generate.max_new_tokens=6",
          "--config.generate.batch_size=8", "--config.generate.shard_size=8", "--config.generate.seed=11",
          "--config.generate.prompt_buckets=(64,128)",
          "--config.generate.scheduler=continuous"]  # the engine of the SmolLM2 main job (slots, chunked prefill)


def shard_count(out) -> int:
  return len(list((Path(out) / "shards").glob("part-*.jsonl")))


@pytest.fixture(scope="module")
def generate_reference(generate_inputs, tmp_path_factory):
  out = tmp_path_factory.mktemp("generate_reference") / "out"
  run_to_end(generate_argv(generate_inputs, out))
  return (out / "outputs.jsonl").read_text()


@pytest.mark.parametrize("seed, sig", cycles("generate", 6))
def test_generate_killed_anywhere_gives_the_uninterrupted_outputs(seed, sig, generate_inputs, generate_reference,
                                                                  tmp_path):
  out = tmp_path / "out"
  threshold = random.Random(100 + seed).randint(1, GENERATE_SHARDS - 1)
  kill_when(generate_argv(generate_inputs, out), lambda: shard_count(out), threshold, sig)
  assert not (out / "outputs.jsonl").exists()
  run_to_end(generate_argv(generate_inputs, out))
  assert (out / "outputs.jsonl").read_text() == generate_reference
  ids = [json.loads(line)["id"] for line in generate_reference.splitlines()]
  assert len(ids) == len(set(ids)) == GENERATE_SHARDS * 8


# --------------------------------------------------------------------------- pipeline

PIPELINE_FAST = ["--config.pretrain.steps=10", "--config.train.steps=3", "--config.generate.max_new_tokens=8",
                 "--config.pipeline.judge_max_new_tokens=6", "--config.generate.shard_size=8",
                 "--config.generate.batch_size=8", "--config.pipeline.iterations=1",
                 "--config.generate.prompt_buckets=(512,1024,2048)"]
PIPELINE_ARTIFACTS = ("augment/candidates.jsonl", "curate_m0/scores.jsonl", "curate_m0/curated.jsonl")


def pipeline_argv(workdir):
  return [*CLI, "pipeline", "--config=configs/toy.py", f"--workdir={workdir}", *PIPELINE_FAST]


@pytest.fixture(scope="module")
def pipeline_reference(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("pipeline_reference")
  run_to_end(pipeline_argv(workdir))
  return {name: (workdir / name).read_text() for name in PIPELINE_ARTIFACTS}


@pytest.mark.slow
@pytest.mark.parametrize("seed, sig", [(0, signal.SIGTERM), (1, signal.SIGKILL)], ids=["SIGTERM", "SIGKILL"])
def test_pipeline_killed_in_a_generation_stage_ends_with_the_uninterrupted_artifacts(
    seed, sig, pipeline_reference, tmp_path):
  rng = random.Random(200 + seed)
  stage = rng.choice(["augment", "curate_m0"])
  threshold = rng.randint(1, 4)
  kill_when(pipeline_argv(tmp_path), lambda: shard_count(tmp_path / stage), threshold, sig)
  assert not (tmp_path / stage / "manifest.json").exists()
  run_to_end(pipeline_argv(tmp_path))
  for name, reference in pipeline_reference.items():
    assert (tmp_path / name).read_text() == reference, f"{name} differs after a kill during {stage}"
