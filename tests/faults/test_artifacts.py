"""A finished stage's artifacts are checked against its manifest before any later stage uses them."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from humpback_jax.errors import DataError
from humpback_jax.method import artifacts
from humpback_jax.method.artifacts import Candidate

ROOT = Path(__file__).resolve().parents[2]
CANDIDATES = [Candidate(id=f"c{i}", instruction=f"question {i}?", output=f"answer {i}.") for i in range(87)]


@pytest.fixture
def workdir(tmp_path):
  """A workdir whose `augment` stage finished with 87 candidates."""
  digest = artifacts.write_records(tmp_path / "augment" / artifacts.CANDIDATES, CANDIDATES)
  artifacts.write_manifest(tmp_path / "augment", stage="augment", config_hash="abc", counts={},
                           outputs={artifacts.CANDIDATES: digest}, seconds=1.0)
  return artifacts.Workdir(tmp_path)


def test_an_intact_artifact_reads_back_as_typed_records(workdir):
  assert workdir.read("augment", artifacts.CANDIDATES, Candidate) == CANDIDATES


def test_a_shortened_artifact_stops_naming_the_file_and_both_counts(workdir):
  path = workdir.stage("augment") / artifacts.CANDIDATES
  path.write_text("".join(path.read_text().splitlines(keepends=True)[:60]))
  with pytest.raises(DataError, match=r"candidates.jsonl: has 60 records .* augment manifest records 87 .*--from=augment"):
    workdir.read("augment", artifacts.CANDIDATES, Candidate)


def test_an_edited_artifact_with_the_same_count_is_caught_by_its_hash(workdir):
  path = workdir.stage("augment") / artifacts.CANDIDATES
  path.write_text(path.read_text().replace("question 5?", "question 6?"))
  with pytest.raises(DataError, match=r"candidates.jsonl: has 87 records \(sha256 \w+\), but the augment manifest records 87"):
    workdir.read("augment", artifacts.CANDIDATES, Candidate)


def test_a_torn_line_names_the_file_and_line(tmp_path):
  path = tmp_path / "candidates.jsonl"
  artifacts.write_records(path, CANDIDATES[:3])
  path.write_bytes(path.read_bytes()[:-20])
  with pytest.raises(DataError, match=r"candidates.jsonl:3: not a complete JSON record"):
    artifacts.read_records(path, Candidate)


def test_an_unknown_field_names_the_file_line_and_field(tmp_path):
  path = tmp_path / "candidates.jsonl"
  path.write_text(json.dumps(dict(id="a", instruction="q", output="o", colour="red")) + "\n")
  with pytest.raises(DataError, match=r"candidates.jsonl:1: unknown field\(s\) \['colour'\] for a Candidate"):
    artifacts.read_records(path, Candidate)


def test_an_invalid_manifest_names_the_file(workdir):
  (workdir.stage("augment") / artifacts.MANIFEST).write_text('{"stage": "augment", "config_')
  with pytest.raises(DataError, match=r"augment/manifest.json: not valid JSON .* delete it to run stage augment again"):
    workdir.manifest("augment")


def test_an_unfinished_stage_is_named(workdir):
  with pytest.raises(DataError, match=r"stage curate_m0 has not finished \(no manifest.json\)"):
    workdir.read("curate_m0", artifacts.SCORES, artifacts.Score)


def test_a_changed_model_file_is_named(tmp_path):
  model = tmp_path / "train_m0" / artifacts.MODEL
  (model / "params").mkdir(parents=True)
  (model / "model.json").write_text("{}")
  (model / "params" / "data").write_bytes(b"\0" * 64)
  artifacts.write_manifest(tmp_path / "train_m0", stage="train_m0", config_hash="abc", counts={},
                           outputs={artifacts.MODEL: artifacts.folder_digest(model)}, seconds=1.0)
  assert artifacts.Workdir(tmp_path).model("train_m0") == model
  (model / "params" / "data").write_bytes(b"\0" * 32)
  with pytest.raises(DataError, match=r"params/data: has 32 bytes .* the manifest records 64"):
    artifacts.Workdir(tmp_path).model("train_m0")


def humpback(*args, workdir):
  return subprocess.run([sys.executable, "-m", "humpback_jax.cli", *args, f"--workdir={workdir}", "--config=configs/toy.py"],
                        cwd=ROOT, env=dict(os.environ, JAX_NUM_CPU_DEVICES="1"), capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  """A toy workdir through prepare_corpus (no model needed)."""
  work = tmp_path_factory.mktemp("prepared") / "run"
  done = humpback("pipeline", "--until=prepare_corpus", workdir=work)
  assert done.returncode == 0, done.stderr[-2000:]
  return work


@pytest.mark.parametrize("corrupt, message", [
    (lambda w: (w / "prepare_seed" / "seed.jsonl").write_text(
        "".join((w / "prepare_seed" / "seed.jsonl").read_text().splitlines(keepends=True)[:-2])),
     r"prepare_seed/seed.jsonl: has \d+ records .* the prepare_seed manifest records"),
    (lambda w: (w / "prepare_seed" / "manifest.json").write_text("{not json"),
     r"prepare_seed/manifest.json: not valid JSON"),
])
def test_the_pipeline_stops_with_one_line_naming_a_corrupt_artifact(prepared, tmp_path, corrupt, message):
  import shutil
  work = tmp_path / "run"
  shutil.copytree(prepared, work)
  corrupt(work)
  done = humpback("pipeline", "--from=report", workdir=work)
  assert done.returncode == 2, done.stderr[-2000:]
  lines = done.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("humpback pipeline: error: "), done.stderr[-2000:]
  assert __import__("re").search(message, lines[0]), lines[0]
