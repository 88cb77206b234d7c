"""Which candidates self-curation keeps: scores >= k, optionally capped at the best-scored fraction."""
import pytest

from humpback_jax.errors import ConfigError
from humpback_jax.method import curate

SCORED = [dict(id="a", score=5, expected_score=2.50), dict(id="b", score=4, expected_score=2.41),
          dict(id="c", score=4, expected_score=2.47), dict(id="d", score=None, expected_score=None),
          dict(id="e", score=2, expected_score=2.38)]


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
