"""Self-curation: the current forward model rates each candidate pair on the paper's 5-point scale.

Two modes, both storing a per-candidate score so any threshold can be applied later:
- `generate` (paper-faithful): the judge writes its reasoning and "Score: N", parsed robustly;
  an unparsable answer gets no score, is counted and is kept out.
- `expected`: one forward pass; the judge's next-token probabilities of "1".."5" after the
  prompt and "Score:" give an expected score (and its argmax). No sampling, no parsing. Prompt and
  "Score:" are tokenized apart, as training tokenizes a prompt and its output.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np

from humpback_jax import generate
from humpback_jax.errors import ConfigError
from humpback_jax import prompts
from humpback_jax.method.artifacts import Candidate, Score
from humpback_jax.method.score_parser import parse_score
from humpback_jax.tokenizer import render_chat

SCORES = ("1", "2", "3", "4", "5")


def judge_turn(cfg, instruction: str, response: str) -> str:
  """The curation prompt for one pair, wrapped by the run's chat template."""
  return render_chat(cfg.tokenizer.chat_template, prompts.curation_prompt(instruction, response))


def score_candidates_by_generation(engine, tokenizer, cfg, rows: list[Candidate], index_offset: int) -> list[Score]:
  """Paper mode: judge text + parsed score (None when unparsable) per candidate."""
  c = cfg.pipeline
  ids = [tokenizer.encode_prompt(judge_turn(cfg, r.instruction, r.output)) for r in rows]
  sampling = generate.SamplingParams(temperature=c.judge_temperature, top_p=cfg.generate.top_p, top_k=0,
                                     max_new_tokens=c.judge_max_new_tokens, seed=cfg.generate.seed)
  outs = engine.generate_ids(ids, sampling, eos_ids=[tokenizer.eos_id], index_offset=index_offset)
  result = []
  for r, out in zip(rows, outs):
    text = tokenizer.decode(out) if out is not None else None
    result.append(Score(id=r.id, score=parse_score(text) if text is not None else None, judge_output=text))
  return result


def score_prompt_and_candidates(tokenizer, prompt_text: str) -> tuple[list[int], list[int]]:
  """Token ids of the judge's turn followed by "Score:", and the ids of the five score tokens next.

  Encoded as training encodes a pair (data/sft.py): the templated prompt on its own (BOS in front
  when the model uses one), the answer "Score: d" on its own, so the judge is asked in exactly the
  tokens it was trained on. The answer's tokens shared by every digit join the prompt; the token
  after them must differ per digit. Tokenizer-agnostic (sentencepiece, byte-level BPE).
  """
  answers = [tokenizer.encode(f"Score: {d}") for d in SCORES]
  n = 0
  while all(len(a) > n for a in answers) and len({a[n] for a in answers}) == 1:
    n += 1
  candidates = [a[n] if len(a) > n else -1 for a in answers]
  if len(set(candidates)) != len(SCORES) or -1 in candidates:
    raise ValueError("the tokenizer does not give the digits 1-5 distinct tokens after 'Score:'")
  return tokenizer.encode_prompt(prompt_text) + answers[0][:n], candidates


def score_candidates_by_expectation(engine, tokenizer, cfg, rows: list[Candidate]) -> list[Score]:
  """Expected-score mode: E[score] and argmax from p("1".."5" | prompt, "Score:"), renormalised."""
  prompt_ids, candidates = [], None
  for r in rows:
    ids, cand = score_prompt_and_candidates(tokenizer, judge_turn(cfg, r.instruction, r.output))
    prompt_ids.append(ids)
    candidates = cand
  if not rows:
    return []
  probs = engine.next_token_probs(prompt_ids, candidates)
  result = []
  for r, p in zip(rows, probs):
    if np.isnan(p).any():
      result.append(Score(id=r.id, score=None))
      continue
    mass = float(p.sum())
    q = p / mass
    result.append(Score(id=r.id, expected_score=float(np.dot(q, np.arange(1, 6))),
                        score=int(np.argmax(q)) + 1, score_mass=mass, probs=[float(x) for x in q]))
  return result


def _score_key(mode: str) -> str:
  return "expected_score" if mode == "expected" else "score"


def threshold(scored: Iterable[Score], k: float, mode: str, keep_top_fraction: float = 1.0) -> float:
  """The score a candidate needs: k, raised to the score of the best `keep_top_fraction` of the scored
  candidates when that is higher (ties at the cut are all kept). 1.0 is the paper's absolute k."""
  key = _score_key(mode)
  return threshold_of_values([getattr(s, key) for s in scored if getattr(s, key) is not None], k, keep_top_fraction)


def threshold_of_values(values: Sequence[float], k: float, keep_top_fraction: float = 1.0) -> float:
  """`threshold` from the scored candidates' values alone (any order): what a streamed curation keeps."""
  if not 0 < keep_top_fraction <= 1:
    raise ConfigError(f"pipeline.keep_top_fraction: must be in (0, 1], got {keep_top_fraction}")
  if keep_top_fraction == 1 or not len(values):
    return k
  values = sorted(values, reverse=True)
  return max(k, values[math.ceil(keep_top_fraction * len(values)) - 1])


def passes(score: Score, k: float, mode: str) -> bool:
  """Whether one candidate is kept at threshold k: score >= k (generate mode) or expected score >= k."""
  value = getattr(score, _score_key(mode))
  return value is not None and value >= k


def selected(scored: Iterable[Score], k: float, mode: str) -> set[str]:
  """Ids kept at threshold k (see `passes`)."""
  return {s.id for s in scored if passes(s, k, mode)}
