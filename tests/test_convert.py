"""`humpback convert` and `humpback_jax.load`: one handle over HF folders and our checkpoints."""
import json

import numpy as np
import pytest

import humpback_jax
from hf_reference import hf_logits, make_hf_model, save_hf_model
from humpback_jax import cli
from humpback_jax.checkpoints import hf


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
  folder = tmp_path_factory.mktemp("hf")
  model = make_hf_model("gqa")
  save_hf_model(model, folder)
  return folder, model


def test_hf_folder_loads_and_gives_transformers_logits(hf_folder):
  folder, model = hf_folder
  tokens = np.arange(3, 23, dtype=np.int32)[None]
  assert np.abs(humpback_jax.load(folder).logits(tokens) - hf_logits(model, tokens)).max() <= 1e-4


@pytest.mark.parametrize("scan", [False, True], ids=["layer_list", "scan_layers"])
def test_convert_to_ours_and_back_keeps_the_model(hf_folder, tmp_path, scan):
  folder, model = hf_folder
  flag = ["--scan-layers"] if scan else []
  assert cli.main(["convert", str(folder), str(tmp_path / "ours"), *flag]) == 0
  assert json.loads((tmp_path / "ours" / "model.json").read_text())["model"]["scan_layers"] == scan
  tokens = np.arange(3, 23, dtype=np.int32)[None]
  assert np.abs(humpback_jax.load(tmp_path / "ours").logits(tokens) - hf_logits(model, tokens)).max() <= 1e-4
  assert cli.main(["convert", str(tmp_path / "ours"), str(tmp_path / "back"), "--to=hf"]) == 0
  before, after = hf.open_hf_tensors(folder), hf.open_hf_tensors(tmp_path / "back")
  assert all(np.array_equal(before[k], after[k]) for k in before) and before.keys() == after.keys()


def test_load_can_ask_for_either_layer_form(hf_folder, tmp_path):
  folder, model = hf_folder
  assert cli.main(["convert", str(folder), str(tmp_path / "ours"), "--scan-layers"]) == 0
  tokens = np.arange(3, 23, dtype=np.int32)[None]
  for source, scan in ((folder, True), (tmp_path / "ours", False)):
    loaded = humpback_jax.load(source, scan_layers=scan)
    assert loaded.cfg.scan_layers == scan and (0 not in loaded.params["layers"]) == scan
    assert np.abs(loaded.logits(tokens) - hf_logits(model, tokens)).max() <= 1e-4


def test_unknown_path_is_a_clear_error(tmp_path):
  with pytest.raises(ValueError, match="not a model: expected our checkpoint"):
    humpback_jax.load(tmp_path)
