"""The whole method on the toy config: it runs to the end, survives kills, and keeps every id once."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from humpback_jax import configlib
from humpback_jax.errors import ConfigError
from humpback_jax.data import tfds_datasets
from humpback_jax.method import pipeline

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--config.pretrain.steps=10", "--config.train.steps=3",
        "--config.generate.max_new_tokens=8", "--config.pipeline.judge_max_new_tokens=6",
        "--config.generate.shard_size=8", "--config.generate.batch_size=8", "--config.pipeline.iterations=1",
        "--config.generate.prompt_buckets=(512,1024,2048)"]


def command(workdir, *extra):
  return [sys.executable, "-m", "humpback_jax.cli", "pipeline", "--config=configs/toy.py",
          f"--workdir={workdir}", *FAST, *extra]


def env():
  return dict(os.environ, JAX_NUM_CPU_DEVICES="1", PYTHONUNBUFFERED="1")


def kill_when(proc, condition, timeout=900):
  deadline = time.time() + timeout
  while time.time() < deadline and proc.poll() is None:
    if condition():
      proc.send_signal(signal.SIGKILL)
      proc.wait()
      return True
    time.sleep(0.05)
  return False


def ids(path):
  return [json.loads(line)["id"] for line in Path(path).read_text().splitlines() if line.strip()]


def test_stage_list_follows_the_config():
  cfg = configlib.load_config("configs/toy.py")
  assert pipeline.stage_names(cfg) == [
      "prepare_seed", "prepare_corpus", "pretrain", "train_backward", "augment", "train_m0", "curate_m0",
      "train_m1", "curate_m1", "train_m2", "report"]


def test_unknown_stage_names_the_known_ones():
  cfg = configlib.load_config("configs/toy.py")
  with pytest.raises(ConfigError, match="--until=curate_m7: unknown stage; stages of this config: prepare_seed"):
    pipeline.select_stages(cfg, None, "curate_m7")


def test_killed_during_augmentation_and_curation_completes_with_every_id_once(tmp_path):
  work = tmp_path / "run"
  proc = subprocess.Popen(command(work), cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  augment_shards = work / "augment" / "shards"
  assert kill_when(proc, lambda: len(list(augment_shards.glob("part-*.jsonl"))) >= 2), "augmentation never started"
  assert not (work / "augment" / "manifest.json").exists()

  proc = subprocess.Popen(command(work), cwd=ROOT, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  curate_shards = work / "curate_m0" / "shards"
  assert kill_when(proc, lambda: len(list(curate_shards.glob("part-*.jsonl"))) >= 1), "curation never started"
  assert not (work / "curate_m0" / "manifest.json").exists()

  done = subprocess.run(command(work), cwd=ROOT, env=env(), capture_output=True, text=True)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "report: " in done.stdout
  segments = [r["id"] for r in tfds_datasets.read_dataset(work / "datasets", "segments")]  # prepare_corpus's output
  augmented = [i for p in sorted(augment_shards.glob("part-*.jsonl")) for i in ids(p)]
  assert sorted(augmented) == sorted(segments) and len(set(augmented)) == len(augmented)
  candidates = ids(work / "augment" / "candidates.jsonl")
  for stage in ("curate_m0",):
    scored = ids(work / stage / "scores.jsonl")
    assert sorted(scored) == sorted(candidates) and len(set(scored)) == len(scored)
  curated = ids(work / "curate_m0" / "curated.jsonl")
  assert len(set(curated)) == len(curated) and set(curated) <= set(candidates)
  report = (work / "report" / "report.md").read_text()
  assert "Self-curation" in report and (work / "report" / "score_histogram.png").exists()
  for stage in ("train_backward", "train_m0", "train_m1"):  # the paper's batch is examples: epochs follow
    counts = json.loads((work / stage / "manifest.json").read_text())["counts"]
    assert counts["epochs"] == round(counts["steps"] * counts["batch_size"] / counts["examples"], 3)

  # Re-curating at a threshold no score reaches keeps nothing, and says so with the score range; the
  # judge does not run again: the stored scores are re-selected.
  scores = (work / "curate_m0" / "scores.jsonl").read_bytes()
  strict = subprocess.run(command(work, "--until=curate_m0", "--config.pipeline.threshold_k=6"),
                          cwd=ROOT, env=env(), capture_output=True, text=True)
  assert strict.returncode == 0, strict.stderr[-3000:]
  assert "[curate_m0] selection changed: re-selecting from the stored scores, no judge" in strict.stdout
  assert (work / "curate_m0" / "scores.jsonl").read_bytes() == scores
  counts = json.loads((work / "curate_m0" / "manifest.json").read_text())["counts"]
  assert counts["judged"] is False
  assert counts["curated"] == 0 and 1 <= counts["score_min"] <= counts["score_median"] <= counts["score_max"] <= 5
  assert (f"[curate_m0] warning: no candidate reached threshold_k=6.0 (expected scores "
          f"{counts['score_min']:.2f}-{counts['score_max']:.2f}); train_m1 trains on the seed alone") in strict.stderr
