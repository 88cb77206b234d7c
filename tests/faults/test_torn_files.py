"""Small side files a killed or damaged run leaves behind are named or repaired, never a bare JSONDecodeError."""
import json

import pytest

from humpback_jax import cli, metrics_log, tokenizer
from humpback_jax.errors import DataError
from humpback_jax.method import pipeline


def test_a_metrics_line_torn_by_a_kill_is_dropped_and_the_resumed_run_appends_whole_lines(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
  assert [r["step"] for r in metrics_log.read_metrics(path)] == [1, 2]
  log = metrics_log.MetricsLog(tmp_path)  # the resumed run
  log.write(3, dict(loss=1.25))
  log.close()
  assert metrics_log.read_metrics(path) == [dict(step=1, loss=2.0), dict(step=2, loss=1.5), dict(step=3, loss=1.25)]


def test_a_damaged_metrics_line_is_named_with_file_and_line(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo\n{"step": 3, "loss": 1.0}\n')
  with pytest.raises(DataError, match=r"metrics.jsonl:2: not a metrics record"):
    metrics_log.read_metrics(path)


def test_a_damaged_workdir_config_is_named_by_curate(tmp_path, capsys):
  (tmp_path / pipeline.CONFIG_FILE).write_text('{"model": {')
  code = cli.main(["curate", f"--workdir={tmp_path}", "--stage=curate_m0", "--k=4"])
  err = capsys.readouterr().err
  assert code == 2 and f"{tmp_path / pipeline.CONFIG_FILE}: not valid JSON" in err, err


def test_a_damaged_tokenizer_config_is_named(tmp_path):
  (tmp_path / "tokenizer_config.json").write_text("{oops")
  with pytest.raises(DataError, match=r"tokenizer_config.json: not valid JSON"):
    tokenizer._special_id(None, tmp_path, "eos")
