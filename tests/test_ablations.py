"""The paper's ablation switches: tags in training and at inference, iterations T, fresh-from-base vs
continuing from M_{t-1}, and the uncurated control (seed + all of A)."""
import json

import pytest
from helpers import finished_augment

from humpback_jax import configlib
from humpback_jax.errors import ConfigError
from humpback_jax import prompts
from humpback_jax.method import ablations, artifacts, pipeline

SEED = [dict(id="s0", instruction="seed q", output="seed a")]
CURATED = [dict(id="c0", instruction="web q", output="web a")]


def finished(work, stage, outputs):
  """A stage folder as a finished stage leaves it: its records and a manifest with their digests."""
  (work / stage).mkdir(parents=True, exist_ok=True)
  digests = {name: artifacts.write_records(work / stage / name, rows) for name, rows in outputs.items()}
  artifacts.write_manifest(work / stage, stage=stage, config_hash="", counts={}, outputs=digests, seconds=0.0)


def config(*overrides):
  return configlib.load_config("configs/toy.py", [f"--config.pipeline.{o}" for o in overrides])


@pytest.mark.parametrize("choice, seed_tags, web_tags", [
    ("none", (), ()), ("seed", (prompts.SEED_TAG,), ()), ("web", (), (prompts.WEB_TAG,)),
    ("both", (prompts.SEED_TAG,), (prompts.WEB_TAG,))])
def test_train_tags_choose_which_part_of_the_mixture_is_tagged(choice, seed_tags, web_tags):
  seed, web = ablations.training_pairs(config(f"train_tags={choice}"), SEED, CURATED, t=1)
  assert (seed.instruction, tuple(seed.tags)) == ("seed q", seed_tags)
  assert (web.instruction, tuple(web.tags)) == ("web q", web_tags)


def test_m0_trains_on_the_seed_alone_with_its_own_tags():
  assert [(p.output, tuple(p.tags)) for p in ablations.training_pairs(config(), SEED, CURATED, t=0)] == [
      ("seed a", ())]


@pytest.mark.parametrize("choice, tags", [
    ("none", ()), ("seed", (prompts.SEED_TAG,)), ("web", (prompts.WEB_TAG,)),
    ("both", (prompts.SEED_TAG, prompts.WEB_TAG))])
def test_inference_tags_follow_the_switch_seed_tag_first(choice, tags):
  assert ablations.inference_tags(config(f"inference_tags={choice}")) == tags


def test_an_unknown_tag_choice_names_the_field_and_the_choices():
  with pytest.raises(ConfigError, match="pipeline.train_tags: 'all' is not one of none, seed, web, both"):
    ablations.check(config("train_tags=all"))


@pytest.mark.parametrize("t_iterations", [1, 3])
def test_iterations_set_how_many_models_are_trained_on_curated_data(t_iterations):
  names = pipeline.stage_names(config(f"iterations={t_iterations}"))
  assert [n for n in names if n.startswith("train_m")] == [f"train_m{t}" for t in range(t_iterations + 1)]
  assert [n for n in names if n.startswith("curate_m")] == [f"curate_m{t}" for t in range(t_iterations)]


def test_zero_iterations_are_refused():
  with pytest.raises(ConfigError, match="pipeline.iterations: 0"):
    ablations.check(config("iterations=0"))


def test_fresh_from_base_starts_every_model_from_the_base_and_continue_from_the_previous_one():
  assert [ablations.start_stage(config("fresh_from_base=True"), t) for t in (0, 1, 2)] == [None, None, None]
  assert [ablations.start_stage(config("fresh_from_base=False"), t) for t in (0, 1, 2)] == [
      None, "train_m0", "train_m1"]


def test_continuing_m1_initialises_from_m0s_weights(tmp_path, monkeypatch):
  started = {}
  monkeypatch.setattr(pipeline.Run, "_model_params", lambda self, stage: f"weights of {stage}")
  monkeypatch.setattr(pipeline.Run, "_base_params", lambda self: "base weights")
  monkeypatch.setattr(pipeline.Run, "_finetune", lambda self, name, pairs, init: started.update({name: init()}))
  finished(tmp_path, "prepare_seed", {artifacts.SEED: [artifacts.SeedPair(**SEED[0])]})
  finished(tmp_path, "curate_m0", {artifacts.CURATED: [artifacts.CuratedPair(**CURATED[0])]})
  for fresh in (True, False):
    pipeline.Run(config(f"fresh_from_base={fresh}"), tmp_path, None, progress=False)._train("train_m1")
    assert started["train_m1"] == ("base weights" if fresh else "weights of train_m0")


def test_uncurated_control_keeps_all_of_a_without_judging(tmp_path, monkeypatch):
  monkeypatch.setattr(pipeline.Run, "_judge", lambda *a: pytest.fail("the uncurated control ran the judge"))
  candidates = [artifacts.Candidate(id=f"c{i}", instruction=f"q{i}", output=f"a{i}") for i in range(5)]
  finished_augment(tmp_path, candidates)
  (tmp_path / "curate_m0").mkdir()
  counts = pipeline.Run(config("curation_mode=none"), tmp_path, None, progress=False)._curate("curate_m0")
  curated = [json.loads(l) for l in (tmp_path / "curate_m0" / "curated.jsonl").read_text().splitlines()]
  assert [(c["id"], c["output"]) for c in curated] == [(c.id, c.output) for c in candidates]
  assert counts["curated"] == 5 and counts["threshold_used"] is None
  pairs = ablations.training_pairs(config("curation_mode=none"), SEED, curated, t=1)
  assert [p.output for p in pairs] == ["seed a", "a0", "a1", "a2", "a3", "a4"]


def test_the_tag_separator_is_a_config_field():
  (seed, web) = ablations.training_pairs(config("tag_separator=' | '"), SEED, CURATED, t=1)
  assert prompts.tagged_instruction(seed.instruction, seed.tags, seed.sep) == f"seed q | {prompts.SEED_TAG}"
