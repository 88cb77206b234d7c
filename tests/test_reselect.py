"""Re-thresholding: a changed k re-selects a curate stage from its stored scores (the judge never runs
again) and every later stage runs again; the report's histogram is of the score the threshold compared."""
import json
from pathlib import Path

import pytest
from helpers import finished_augment

from humpback_jax import configlib
from humpback_jax.cli import build_parser
from humpback_jax.errors import ConfigError
from humpback_jax.method import artifacts, pipeline, report, selection

# Ten candidates; c0..c9 scored 1, 2, 3, 4, 5, 1, 2, 3, 4, 5 by the judge (expected: score - 0.4).
IDS = [f"c{i}" for i in range(10)]
SCORES = [1 + i % 5 for i in range(10)]


def config(mode="generate", k=5.0, fraction=1.0):
  return configlib.load_config("configs/toy.py", [
      f"--config.pipeline.curation_mode={mode}", f"--config.pipeline.threshold_k={k}",
      f"--config.pipeline.keep_top_fraction={fraction}", "--config.pipeline.iterations=1"])


def read_ids(path: Path):
  return [json.loads(l)["id"] for l in path.read_text().splitlines() if l.strip()]


def finished_run(work: Path, cfg):
  """A workdir as a finished run under `cfg` leaves it: every manifest (with its outputs' digests),
  candidates, scores, curated set, and a training folder for M_1 (a stand-in checkpoint)."""
  run = pipeline.Run(cfg, work, layout=None, progress=False)
  candidates = [artifacts.Candidate(id=i, instruction=f"q {i}", output=f"a {i}") for i in IDS]
  scored = [artifacts.Score(id=i, score=s, expected_score=s - 0.4) for i, s in zip(IDS, SCORES)]
  kept, k = selection.select(candidates, scored, selection.of(cfg))
  curated = [artifacts.CuratedPair(id=c.id, instruction=c.instruction, output=c.output) for c in kept]
  outputs = {"prepare_seed": {artifacts.SEED: []}, "curate_m0": {artifacts.SCORES: scored, artifacts.CURATED: curated}}
  (work / "train_m1" / "checkpoints").mkdir(parents=True)
  (work / "train_m1" / "checkpoints" / "old").write_text("M_1 trained on the old curated set")
  names = pipeline.stage_names(cfg)
  finished_augment(work, candidates, run.hash)
  for name in names:
    (work / name).mkdir(parents=True, exist_ok=True)
    if name == "augment":  # written above, with the dataset curation reads
      continue
    digests = {f: artifacts.write_records(work / name / f, rows) for f, rows in outputs.get(name, {}).items()}
    after_curation = names.index(name) >= names.index("curate_m0")
    counts = dict(mode=cfg.pipeline.curation_mode, threshold_used=k) if name == "curate_m0" else {}
    artifacts.write_manifest(work / name, stage=name, config_hash=run.hash, counts=counts, outputs=digests,
                             seconds=0.0, selection=selection.of(cfg) if after_curation else None)
  return run


@pytest.fixture
def stages(monkeypatch):
  """Stage functions replaced by recorders; the judge and every stage before curation must not run."""
  ran = []

  def forbidden(self, name, *args):
    raise AssertionError(f"{name} ran, but nothing it depends on changed")

  for fn in ("_prepare_seed", "_prepare_corpus", "_pretrain", "_train_backward", "_augment"):
    monkeypatch.setattr(pipeline.Run, fn, forbidden)
  monkeypatch.setattr(pipeline.Run, "_engine", lambda self, stage: forbidden(self, f"a judge engine of {stage}"))

  def train(self, name):
    ran.append(name)
    return {}

  monkeypatch.setattr(pipeline.Run, "_train", train)
  monkeypatch.setattr(pipeline.Run, "_report", lambda self, name: ran.append(name) or {})
  return ran


def test_a_lower_k_reselects_from_stored_scores_and_reruns_the_later_stages(tmp_path, stages):
  finished_run(tmp_path, config(k=5.0))
  assert read_ids(tmp_path / "curate_m0" / "curated.jsonl") == ["c4", "c9"]

  pipeline.Run(config(k=4.0), tmp_path, layout=None, progress=False).run()

  assert read_ids(tmp_path / "curate_m0" / "curated.jsonl") == ["c3", "c4", "c8", "c9"]
  assert stages == ["train_m1", "report"]
  assert not (tmp_path / "train_m1" / "checkpoints" / "old").exists(), "M_1 would resume from the old run"
  manifest = json.loads((tmp_path / "curate_m0" / "manifest.json").read_text())
  assert manifest["selection"]["threshold_k"] == 4.0 and manifest["counts"]["curated"] == 4
  assert manifest["counts"]["judged"] is False


def test_an_unchanged_config_reruns_nothing(tmp_path, stages):
  finished_run(tmp_path, config(k=5.0))
  pipeline.Run(config(k=5.0), tmp_path, layout=None, progress=False).run()
  assert stages == []


def test_any_other_change_is_still_refused(tmp_path, stages):
  finished_run(tmp_path, config(k=5.0))
  changed = config(k=4.0)
  with changed.unlocked():
    changed.train.learning_rate = 2e-5
  with pytest.raises(ConfigError, match="stage prepare_seed .* was made with another config"):
    pipeline.Run(changed, tmp_path, layout=None, progress=False).run()


def test_curate_command_reselects_one_stage_with_the_workdirs_saved_config(tmp_path, stages):
  finished_run(tmp_path, config(mode="expected", k=5.0))
  pipeline.Run(config(mode="expected", k=5.0), tmp_path, layout=None, progress=False).run()  # saves config.json
  assert read_ids(tmp_path / "curate_m0" / "curated.jsonl") == []  # expected scores top out at 4.6

  args = build_parser().parse_args(["curate", f"--workdir={tmp_path}", "--stage=curate_m0", "--k=4"])
  saved = pipeline.saved_config(tmp_path)
  assert pipeline.config_hash(saved) == pipeline.config_hash(config(mode="expected"))
  pipeline.reselect(saved, Path(args.workdir), None, args.stage, k=args.k, progress=False)

  assert read_ids(tmp_path / "curate_m0" / "curated.jsonl") == ["c4", "c9"]  # expected 4.6 >= 4; argmax 4 is 3.6
  assert stages == ["train_m1", "report"]


def test_curate_command_refuses_a_stage_that_is_not_curation(tmp_path):
  with pytest.raises(ConfigError, match="--stage=train_m1: not a curate stage .* curate_m0"):
    pipeline.reselect(config(), tmp_path, None, "train_m1", k=4)


def test_report_histograms_the_expected_score_and_marks_the_threshold(tmp_path, stages):
  run = finished_run(tmp_path, config(mode="expected", k=4.0))
  summary = report.write(tmp_path, [n for n in pipeline.stage_names(run.cfg) if n != "report"])
  assert summary["iterations"] == 1
  it = json.loads((tmp_path / "report" / "report.json").read_text())["iterations"]["curate_m0"]
  assert it["mode"] == "expected" and it["threshold"] == 4.0
  # Expected scores 0.6 (clipped to 1), 1.6, 2.6, 3.6, 4.6, twice each: never the argmax 1..5.
  assert {lo: n for lo, n in it["histogram"]["bins"].items() if n} == {
      "1.00": 2, "1.50": 2, "2.50": 2, "3.50": 2, "4.50": 2}
  assert it["curated"] == 2 and it["at_least_4"] == 2
  md = (tmp_path / "report" / "report.md").read_text()
  assert "| 4.50 | 2 | >= kept |" in md and "| 3.50 | 2 |  |" in md
  assert "| curate_m0 | expected | 4 |" in md
