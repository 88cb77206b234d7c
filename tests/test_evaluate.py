"""`humpback eval-generate` writes AlpacaEval's model_outputs.json format for the evaluation prompts."""
import json
from pathlib import Path

import pytest

from helpers import layout, tiny_config
from humpback_jax.checkpoints import model_dir
from humpback_jax.errors import DataError
from humpback_jax.method import evaluate
from humpback_jax.model import build

ALPACA = Path(__file__).resolve().parents[2] / "shared" / "data" / "alpaca_eval" / "text_davinci_003_outputs.json"
TOY_TOKENIZER = Path(__file__).resolve().parents[1] / "humpback_jax" / "assets" / "toy" / "tokenizer.model"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  cfg = tiny_config(vocab_size=2048)
  path = tmp_path_factory.mktemp("ckpt") / "model"
  model_dir.save(path, build.init_params(cfg, layout(), seed=0), cfg, tokenizer_file=TOY_TOKENIZER,
                 chat_template="[INST] {instruction} [/INST]")
  return path


def test_outputs_follow_the_alpaca_eval_format(checkpoint, tmp_path):
  if not ALPACA.exists():
    pytest.skip(f"{ALPACA} is not beside this checkout")
  out = tmp_path / "model_outputs.json"
  n = evaluate.write_model_outputs(checkpoint, ALPACA, out, generator="toy", limit=4)
  rows = json.loads(out.read_text())
  prompts = json.loads(ALPACA.read_text())[:4]
  assert n == len(rows) == 4
  assert [r["instruction"] for r in rows] == [p["instruction"] for p in prompts]
  assert [r["dataset"] for r in rows] == [p["dataset"] for p in prompts]
  assert all(set(r) == {"dataset", "instruction", "output", "generator"} and r["generator"] == "toy" for r in rows)
  assert all(isinstance(r["output"], str) for r in rows)


def test_a_prompt_without_instruction_is_named(tmp_path):
  bad = tmp_path / "prompts.json"
  bad.write_text(json.dumps([{"instruction": "ok"}, {"dataset": "x"}]))
  with pytest.raises(DataError, match=r"prompts.json: entry 1: field 'instruction' missing"):
    evaluate.read_prompts(bad)
