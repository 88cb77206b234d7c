"""Which candidates self-curation keeps: scores >= k, optionally capped at the best-scored fraction."""
from pathlib import Path

import ml_collections
import numpy as np
import pytest

from humpback_jax.data import sft
from humpback_jax.errors import ConfigError
from humpback_jax import prompts
from humpback_jax.method import curate
from humpback_jax.method.artifacts import Score
from humpback_jax.tokenizer import CHATML, LLAMA2_INST, load_tokenizer, tokenizer_from_gguf

TOY_TOKENIZER = Path(__file__).resolve().parents[1] / "humpback_jax" / "assets" / "toy" / "tokenizer.model"


@pytest.fixture(scope="module")
def toy_tokenizer():
  return load_tokenizer(TOY_TOKENIZER)


SCORED = [Score(id="a", score=5, expected_score=2.50), Score(id="b", score=4, expected_score=2.41),
          Score(id="c", score=4, expected_score=2.47), Score(id="d", score=None, expected_score=None),
          Score(id="e", score=2, expected_score=2.38)]


def test_the_paper_threshold_keeps_every_score_at_or_above_k():
  k = curate.threshold(SCORED, 4, "generate")
  assert k == 4 and curate.selected(SCORED, k, "generate") == {"a", "b", "c"}


def test_a_top_fraction_raises_the_threshold_to_the_best_scored_share():
  k = curate.threshold(SCORED, 1.0, "expected", keep_top_fraction=0.5)  # 4 scored: the best 2
  assert k == 2.47 and curate.selected(SCORED, k, "expected") == {"a", "c"}


def test_ties_at_the_cut_are_all_kept():
  k = curate.threshold(SCORED, 1, "generate", keep_top_fraction=0.5)  # cut at the 2nd best: a 4
  assert curate.selected(SCORED, k, "generate") == {"a", "b", "c"}


def test_a_top_fraction_never_lowers_k():
  assert curate.threshold(SCORED, 6, "generate", keep_top_fraction=0.5) == 6


def test_a_top_fraction_outside_zero_to_one_is_a_config_error():
  with pytest.raises(ConfigError, match=r"pipeline.keep_top_fraction: must be in \(0, 1\], got 0"):
    curate.threshold(SCORED, 1, "generate", keep_top_fraction=0)


def _check_expected_mode_matches_training(tokenizer, template):
  cfg = ml_collections.ConfigDict(dict(tokenizer=dict(chat_template=template)))
  turn = curate.judge_turn(cfg, "Name a prime.", "7 is a prime.")
  prompt_ids, candidates = curate.score_prompt_and_candidates(tokenizer, turn)
  trained = []
  for d in curate.SCORES:
    tokens, loss_mask = sft.tokenize_example(tokenizer, prompts.curation_prompt("Name a prime.", "7 is a prime."),
                                             f"Score: {d}", template=template)
    trained.append(tokens.tolist())
    assert trained[-1][:len(prompt_ids) + 1] == prompt_ids + [candidates[int(d) - 1]]
    assert int(np.argmax(loss_mask)) == len(tokenizer.encode_prompt(turn))  # where training's output starts
  shared = next(i for i in range(len(trained[0])) if len({t[i] for t in trained}) > 1)
  assert shared == len(prompt_ids) and candidates == [t[shared] for t in trained]


@pytest.mark.parametrize("template", [LLAMA2_INST, CHATML])
def test_expected_mode_asks_for_the_score_in_the_tokens_training_produces(toy_tokenizer, template):
  """The prompt plus each candidate is the start of what training makes of (judge turn, "Score: d"),
  and the candidates are where those training encodings of "Score: 1".."Score: 5" first differ."""
  _check_expected_mode_matches_training(toy_tokenizer, template)


@pytest.mark.smollm2
def test_expected_mode_matches_training_with_smollm2s_byte_level_bpe():
  """The same with SmolLM2's tokenizer, which splits digits off: the candidate is the digit after " "."""
  from humpback_jax.assets_fetch import smollm2_gguf_path
  _check_expected_mode_matches_training(tokenizer_from_gguf(smollm2_gguf_path()), CHATML)
