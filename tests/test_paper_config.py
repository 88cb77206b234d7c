"""configs/humpback.py: the whole method at paper scale for every model preset; a missing input is
named before any model runs, and with a tiny random-weight HF base and the toy data it runs to the end."""
import os
import shutil
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest

from configs import common
from humpback_jax import configlib
from humpback_jax.errors import ConfigError
from humpback_jax.method import pipeline

ROOT = Path(__file__).resolve().parents[1]
TOY = resources.files("humpback_jax") / "assets" / "toy"
LLAMAS = sorted(name for name in common.MODELS if name.startswith("llama"))
INPUTS = [f"config.data.seed_path={TOY / 'seed.jsonl'}", f"config.data.corpus_path={TOY / 'corpus'}"]


def paper(model="llama1_7b", *overrides, mesh="fsdp"):
  return configlib.load_config(f"configs/humpback.py:model={model},mesh={mesh}", list(overrides))


@pytest.mark.parametrize("model", LLAMAS)
def test_every_llama_preset_has_the_papers_method(model):
  cfg = paper(model)
  assert (cfg.pipeline.curation_mode, cfg.pipeline.threshold_k, cfg.pipeline.iterations) == ("generate", 5.0, 2)
  assert cfg.model.dim == common.MODELS[model]["dim"] and cfg.train.batch_size == 32
  with pytest.raises(ConfigError, match=r"base.checkpoint: empty.*e.g. --config.base.checkpoint="):
    pipeline.check_pipeline_config(cfg)


@pytest.mark.parametrize("missing,field", [("config.data.seed_path=''", "data.seed_path"),
                                           ("config.data.corpus_path=''", "data.corpus_path")])
def test_a_missing_input_is_named_with_an_example(missing, field):
  cfg = paper("llama1_7b", "config.base.checkpoint=/ckpt/llama-7b-hf", *INPUTS, missing)
  with pytest.raises(ConfigError, match=rf"{field}: empty.*e.g. --config.{field}="):
    pipeline.check_pipeline_config(cfg)


def test_the_cli_stops_on_the_missing_base_before_any_model_runs(tmp_path):
  done = subprocess.run([sys.executable, "-m", "humpback_jax.cli", "pipeline", "--config=configs/humpback.py:llama1_65b",
                         f"--workdir={tmp_path / 'run'}"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, JAX_NUM_CPU_DEVICES="1"))
  assert done.returncode == 2 and "base.checkpoint: empty" in done.stderr, done.stderr[-2000:]


def _tiny_hf_base(folder):
  from hf_reference import make_hf_model, save_hf_model
  save_hf_model(make_hf_model("gqa", vocab_size=2048, max_position_embeddings=2048), folder)
  shutil.copy(TOY / "tokenizer.model", folder / "tokenizer.model")
  # The same shapes in our config: the test shrinks the 7B preset to the checkpoint it is given.
  return ["config.model.vocab_size=2048", "config.model.dim=64", "config.model.num_layers=2",
          "config.model.num_heads=4", "config.model.num_kv_heads=2", "config.model.mlp_dim=96",
          "config.model.norm_eps=1e-5", "config.model.max_seq_len=2048", "config.model.dtype='float32'"]


def test_the_paper_config_runs_to_the_end_from_a_tiny_hf_base(tmp_path):
  base = tmp_path / "base"
  shrink = _tiny_hf_base(base)
  fast = ["config.train.steps=2", "config.train.seq_len=512", "config.generate.max_new_tokens=8",
          "config.pipeline.judge_max_new_tokens=6", "config.generate.batch_size=8", "config.generate.shard_size=32"]
  args = [f"--{o}" for o in [f"config.base.checkpoint={base}", *INPUTS, *shrink, *fast]]
  done = subprocess.run([sys.executable, "-m", "humpback_jax.cli", "pipeline",
                         "--config=configs/humpback.py:model=llama1_7b,mesh=single", f"--workdir={tmp_path / 'run'}",
                         *args], cwd=ROOT, capture_output=True, text=True, timeout=1500,
                        env=dict(os.environ, JAX_NUM_CPU_DEVICES="1"))
  assert done.returncode == 0, done.stderr[-3000:]
  report = (tmp_path / "run" / "report" / "report.md").read_text()
  assert "curate_m1" in report or "M2" in report or "m2" in report
