"""`humpback generate` checks its whole input before any model runs, and counts what it cuts or skips."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import layout
from humpback_jax import cli, configlib
from humpback_jax.checkpoints import model_dir
from humpback_jax.model import build

ROOT = Path(__file__).resolve().parents[2]
TOKENIZER = ROOT / "humpback_jax" / "assets" / "toy" / "tokenizer.model"
FAST = ["--config=configs/toy.py", "--config.generate.max_new_tokens=4", "--config.generate.temperature=0.0",
        "--config.generate.batch_size=4", "--config.generate.shard_size=4", "--config.generate.prompt_buckets=(64,)"]


def write_lines(path, *rows):
  path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
  return path


@pytest.mark.parametrize("rows, message", [
    ([dict(id="a", prompt="x"), dict(id="b", prompt="y"), dict(id="a", prompt="z")],
     r"in.jsonl:3: id 'a' already appears on line 1; ids must be unique"),
    ([dict(id="a", prompt="x"), dict(id=["b"], prompt="y")], r"in.jsonl:2: field 'id' must be a non-empty string or an integer"),
    ([dict(id="a", prompt="x"), '{"id": "b", "prompt": '], r"in.jsonl:2: invalid JSON"),
    ([dict(id="a", text="x")], r"in.jsonl:1: field 'prompt': missing"),
    ([dict(prompt="x"), dict(id="1", prompt="y")], r"in.jsonl:2: id '1' already appears on line 1"),
])
def test_bad_input_ids_are_named_before_any_model_runs(tmp_path, capsys, rows, message):
  path = write_lines(tmp_path / "in.jsonl", *rows)
  code = cli.main(["generate", *FAST, f"--checkpoint={tmp_path / 'no-model-here'}", f"--input={path}",
                   f"--output={tmp_path / 'out'}"])
  err = capsys.readouterr().err
  assert code == 2 and __import__("re").search(message, err), err
  assert "no-model-here" not in err  # the input failed first: no model was looked for


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  cfg = configlib.load_config("configs/toy.py")
  path = tmp_path_factory.mktemp("model") / "toy"
  model_dir.save(path, build.init_params(cfg.model, layout(), seed=3), cfg.model, tokenizer_file=TOKENIZER)
  return path


def test_empty_and_too_long_prompts_are_counted_by_what_the_user_wrote(tmp_path, checkpoint):
  long_text = "the kettle boils water quickly. " * 800  # several thousand tokens: beyond the toy model's context
  path = write_lines(tmp_path / "in.jsonl", dict(id="ok", prompt="How do I boil an egg?"), dict(id="blank", prompt="  "),
                     dict(id="long", prompt=long_text))
  out = tmp_path / "out"
  done = subprocess.run([sys.executable, "-m", "humpback_jax.cli", "generate", *FAST, f"--checkpoint={checkpoint}",
                         f"--input={path}", f"--output={out}", "--chat"], cwd=ROOT, capture_output=True, text=True,
                        env=dict(os.environ, JAX_NUM_CPU_DEVICES="1"), timeout=600)
  assert done.returncode == 0, done.stderr[-2000:]
  summary = json.loads(done.stdout.strip().splitlines()[-1])
  assert (summary["ok"], summary["skipped_empty"], summary["truncated"]) == (1, 1, 1), summary
  rows = {r["id"]: r for r in map(json.loads, (out / "outputs.jsonl").read_text().splitlines())}
  assert rows["blank"]["output"] is None and rows["blank"]["status"] == "skipped_empty"
  assert rows["long"]["status"] == "truncated" and rows["long"]["output"] is not None
