"""`humpback eval-judge`: a judge's keep decisions against human labels, checked by hand."""
import json
from pathlib import Path

import pytest

from helpers import layout, tiny_config
from humpback_jax import cli
from humpback_jax.checkpoints import model_dir
from humpback_jax.errors import DataError
from humpback_jax.method import judge_eval
from humpback_jax.model import build

TOY_TOKENIZER = Path(__file__).resolve().parents[1] / "humpback_jax" / "assets" / "toy" / "tokenizer.model"
DEV_SET = Path(__file__).resolve().parents[1] / "humpback_jax" / "assets" / "judge_dev.jsonl"

LABELS = [5, 4, 3, 2, 1, 5]
SCORES = [5, 3, 4, None, 1, 4]


def test_keep_metrics_at_k4_match_a_hand_count():
  # label >= 4: pairs 0, 1, 5; score >= 4: pairs 0, 2, 5 -> tp 2 (0, 5), fp 1 (2), fn 1 (1)
  m = judge_eval.keep_metrics(LABELS, SCORES, 4)
  assert (m["tp"], m["fp"], m["fn"], m["positives"], m["kept"]) == (2, 1, 1, 3, 3)
  assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 3)
  assert m["f1"] == pytest.approx(2 / 3)


def test_auc_counts_ties_half_and_no_score_lowest():
  # positives score 5, 3, 4 against negatives 4, None, 1: 3 + 2 + 2.5 wins of 9
  assert judge_eval.roc_auc(LABELS, SCORES, 4) == pytest.approx(7.5 / 9)


def test_confusion_floors_expected_scores_and_keeps_a_column_for_no_score():
  table = judge_eval.confusion([5, 5, 3, 1], [4.99, 5.0, None, 1.0])
  assert table[5][4] == 1 and table[5][5] == 1 and table[3][None] == 1 and table[1][1] == 1
  assert sum(sum(row.values()) for row in table.values()) == 4


def test_agreement_is_the_share_of_equal_keep_decisions():
  assert judge_eval.agreement([5, 3, None, 4], [4.2, 4.5, 1.0, 4.0], 4) == pytest.approx(3 / 4)


def test_a_label_off_the_scale_names_the_line(tmp_path):
  path = tmp_path / "labels.jsonl"
  path.write_text('{"instruction": "q", "output": "a", "label": 3}\n{"instruction": "q", "output": "a", "label": 7}\n')
  with pytest.raises(DataError, match=r"labels\.jsonl:2: field 'label' must be an integer 1\.\.5, got 7"):
    judge_eval.read_labels(path)


def test_the_shipped_dev_set_covers_every_label_and_gives_reasons():
  rows = judge_eval.read_labels(DEV_SET)
  assert len(rows) >= 200 and len({r["id"] for r in rows}) == len(rows)
  assert {r["label"] for r in rows} == set(judge_eval.LABELS)
  assert all(isinstance(r.get("reason"), str) and r["reason"].strip() for r in rows)


def _hand_metrics(labels, values, k):
  kept = [v is not None and v >= k for v in values]
  truth = [l >= k for l in labels]
  tp = sum(a and b for a, b in zip(kept, truth))
  precision = tp / sum(kept) if sum(kept) else None
  recall = tp / sum(truth) if sum(truth) else None
  low = lambda v: -1.0 if v is None else v
  pairs = [(low(p), low(n)) for p, lp in zip(values, labels) if lp >= k for n, ln in zip(values, labels) if ln < k]
  auc = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in pairs) / len(pairs) if pairs else None
  return precision, recall, auc


@pytest.fixture(scope="module")
def toy_checkpoint(tmp_path_factory):
  cfg = tiny_config(vocab_size=2048, max_seq_len=2048)  # the judge prompt is ~1,000 toy tokens
  path = tmp_path_factory.mktemp("judge") / "model"
  model_dir.save(path, build.init_params(cfg, layout(), seed=0), cfg, tokenizer_file=TOY_TOKENIZER,
                 chat_template="[INST] {instruction} [/INST]")
  return path


def test_eval_judge_on_a_toy_model_reports_what_its_scores_give_by_hand(toy_checkpoint, tmp_path, capsys):
  labels = tmp_path / "labels.jsonl"
  dev = judge_eval.read_labels(DEV_SET)
  # the shortest answer of each label: every toy prompt then fits one bucket (one compile per program)
  picked = [min((r for r in dev if r["label"] == label), key=lambda r: len(r["output"])) for label in judge_eval.LABELS]
  labels.write_text("".join(json.dumps(r) + "\n" for r in picked))
  out = tmp_path / "eval.json"
  assert cli.main(["eval-judge", f"--checkpoint={toy_checkpoint}", f"--labels={labels}", "--mode=both",
                   "--max-new-tokens=2", "--batch-size=8", f"--output={out}"]) == 0
  printed = capsys.readouterr().out
  assert "mode generate" in printed and "mode expected" in printed and "agreement" in printed
  result = json.loads(out.read_text())
  pairs, rep = result["pairs"], result["report"]
  gold = [p["label"] for p in pairs]
  assert all(1 <= p["expected"] <= 5 for p in pairs)
  for mode in ("generate", "expected"):
    for row in rep["modes"][mode]["at_k"]:
      precision, recall, auc = _hand_metrics(gold, [p[mode] for p in pairs], row["k"])
      for got, want in ((row["precision"], precision), (row["recall"], recall), (row["auc"], auc)):
        assert (want is None and got != got) or got == pytest.approx(want)
  same = [(g is not None and g >= 4) == (e >= 4) for g, e in ((p["generate"], p["expected"]) for p in pairs)]
  assert rep["agreement"]["4"] == pytest.approx(sum(same) / len(same))


def test_categories_report_mean_label_and_mean_scored_value():
  rep = judge_eval.report([5, 1, 1], {"expected": [4.0, 2.0, 3.0], "generate": [5, None, 2]},
                          ["assistant", "off_topic", "off_topic"])
  assert rep["categories"]["off_topic"] == dict(pairs=2, label=1.0, expected=2.5, generate=2.0)
  assert rep["categories"]["assistant"] == dict(pairs=1, label=5.0, expected=4.0, generate=5.0)
