"""Shared prompt prefixes: which leading tokens a call's prompts share, and their KV kept per engine.

The method's prompts share long heads (the curation rubric, the backward prompt, the chat
template's system part). A call's prefix is the longest run of leading tokens that all its prompts
share, cut down to whole granules (16 tokens, as vLLM's blocks). Each token's KV depends only on
the tokens before it, and our kernels compute a row the same way wherever a chunk starts, so
reuse changes no result, only the work (tests/test_continuous.py checks tokens and scores).
"""
from __future__ import annotations

import collections
from typing import Sequence


def common_prefix_length(rows: Sequence[Sequence[int]]) -> int:
  """Length of the longest token run that starts every row (0 for no rows)."""
  if not rows:
    return 0
  first, n = rows[0], min(len(r) for r in rows)
  for row in rows[1:]:
    k = 0
    while k < n and row[k] == first[k]:
      k += 1
    n = k
  return n


def usable_prefix(rows: Sequence[Sequence[int]], *, granule: int, keep: Sequence[int]) -> int:
  """The shared prefix length to reuse: the common prefix, at most keep[i] tokens of row i (the rest
  must run through the model), rounded down to a multiple of `granule`; 0 when it is under one granule."""
  n = min([common_prefix_length(rows)] + list(keep))
  return n // granule * granule


class PrefixStore:
  """The KV of a few prefixes, keyed by (token ids, cache width), least recently used dropped first."""

  def __init__(self, capacity: int = 4):
    self.capacity = capacity
    self._entries: collections.OrderedDict[tuple, object] = collections.OrderedDict()

  def longest(self, rows: Sequence[Sequence[int]], width: int, limit: int):
    """(length, cache) of the longest stored prefix of every row, at most `limit` tokens; (0, None)."""
    best = (0, None)
    for (tokens, w), cache in self._entries.items():
      n = len(tokens)
      if w == width and best[0] < n <= limit and all(tuple(r[:n]) == tokens for r in rows):
        best = (n, cache)
    if best[1] is not None:
      self._entries.move_to_end(next(k for k, c in self._entries.items() if c is best[1]))
    return best

  def put(self, tokens: Sequence[int], width: int, cache) -> None:
    """Keeps `cache` (the KV of `tokens`) for later calls."""
    self._entries[tuple(tokens), width] = cache
    self._entries.move_to_end((tuple(tokens), width))
    while len(self._entries) > self.capacity:
      self._entries.popitem(last=False)
