"""Deduplication with an order-independent keep rule, shared by the local and the Beam engine.

Exact: segments whose text is equal ignoring case and spacing share a `content_key`; the one
with the smallest id is kept. Near: MinHash signatures of word shingles, cut into LSH bands;
segments sharing a band are candidate pairs, and a pair is an edge when the exact Jaccard of
their shingle sets reaches the threshold (so LSH only costs recall, never precision). Visiting
segments by ascending id, a segment is kept unless an edge joins it to one already kept. The
result depends on the ids alone, never on input order or how the work was split, and every
dropped segment has a kept near-duplicate.
"""
from __future__ import annotations

import functools
import hashlib
import itertools
import re
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from humpback_jax.data.segment import Segment, normalise


def content_key(text: str) -> bytes:
  """The exact-dedup key: a hash of the text with case and spacing ignored."""
  return hashlib.sha1(normalise(text).lower().encode("utf-8")).digest()


def minhash_seeds(num_perm: int, minhash_seed: int) -> np.ndarray:
  """[num_perm] per-permutation seeds of the MinHash."""
  return _mix64(np.arange(num_perm, dtype=np.uint64) + np.uint64(minhash_seed) * np.uint64(num_perm))


def band_keys(shingles: np.ndarray, seeds: np.ndarray, bands: int) -> list[bytes]:
  """The LSH bucket of each band: the band index and its rows of the MinHash signature."""
  if shingles.size == 0:
    return []  # no words: only exact dedup applies
  signature = _minhash(shingles, seeds)
  rows = len(seeds) // bands
  return [band.to_bytes(2, "little") + signature[band * rows:(band + 1) * rows].tobytes()
          for band in range(bands)]


def bucket_pairs(ids: Iterable[str]) -> list[tuple[str, str]]:
  """Every (smaller id, larger id) pair of one LSH bucket's members."""
  return list(itertools.combinations(sorted(set(ids)), 2))


def dropped_by_id_order(edges: Iterable[tuple[str, str]]) -> set[str]:
  """The ids (among those on an edge) to drop: by ascending id, each joined to a kept one."""
  neighbours: dict[str, list[str]] = {}
  for a, b in edges:
    neighbours.setdefault(a, []).append(b)
    neighbours.setdefault(b, []).append(a)
  kept, dropped = set(), set()
  for node in sorted(neighbours):
    if any(n in kept for n in neighbours[node]):
      dropped.add(node)
    else:
      kept.add(node)
  return dropped


def dedup_exact(segments: Iterable[Segment]) -> list[Segment]:
  """The segments (in input order) that have the smallest id among those with the same content_key."""
  segments = list(segments)
  smallest: dict[bytes, str] = {}
  for s in segments:
    key = content_key(s.text)
    smallest[key] = min(smallest.get(key, s.id), s.id)
  keep = set(smallest.values())
  return [s for s in segments if s.id in keep]


def near_duplicate_ids(segments: Sequence[Segment], cfg: Mapping) -> set[str]:
  """Ids of the segments dropped as near-duplicates (module docstring), all in one process."""
  seeds = minhash_seeds(cfg["num_perm"], cfg["minhash_seed"])
  shingles = {s.id: shingle_hashes(s.text, cfg["shingle_words"]) for s in segments}
  buckets: dict[bytes, list[str]] = {}
  for segment_id, sh in shingles.items():
    for key in band_keys(sh, seeds, cfg["bands"]):
      buckets.setdefault(key, []).append(segment_id)
  candidates = {pair for members in buckets.values() if len(members) > 1 for pair in bucket_pairs(members)}
  edges = [(a, b) for a, b in candidates if jaccard(shingles[a], shingles[b]) >= cfg["near_dup_threshold"]]
  return dropped_by_id_order(edges)


def dedup_near(segments: Iterable[Segment], threshold: float = 0.8, shingle_words: int = 5,
               num_perm: int = 128, bands: int = 16, minhash_seed: int = 0) -> list[Segment]:
  """The segments (in input order) not dropped as near-duplicates of a kept one."""
  segments = list(segments)
  dropped = near_duplicate_ids(segments, dict(near_dup_threshold=threshold, shingle_words=shingle_words,
                                              num_perm=num_perm, bands=bands, minhash_seed=minhash_seed))
  return [s for s in segments if s.id not in dropped]


def shingle_hashes(text: str, shingle_words: int = 5) -> np.ndarray:
  """Sorted unique 64-bit hashes of the lower-cased word `shingle_words`-grams of `text`.

  A text shorter than one shingle is a single shingle of all its words; no words, no shingles.
  """
  words = re.findall(r"\w+", text.lower())
  if not words:
    return np.zeros((0,), np.uint64)
  width = min(shingle_words, len(words))
  word_hashes = np.array([_hash64(w) for w in words], np.uint64)
  count = len(words) - width + 1
  combined = np.zeros((count,), np.uint64)
  with np.errstate(over="ignore"):
    for offset in range(width):  # polynomial hash of the word hashes, wrapping mod 2**64
      combined = combined * np.uint64(0x100000001B3) + word_hashes[offset:offset + count]
  return np.unique(_mix64(combined))


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
  """|a & b| / |a | b| of two sorted unique hash arrays; 0.0 when both are empty."""
  inter = np.intersect1d(a, b, assume_unique=True).size
  union = a.size + b.size - inter
  return inter / union if union else 0.0


def _minhash(shingles: np.ndarray, seeds: np.ndarray) -> np.ndarray:
  """[num_perm] minimum of each seeded hash over the shingles."""
  return _mix64(shingles[None, :] ^ seeds[:, None]).min(axis=1)


@functools.lru_cache(maxsize=1 << 20)  # word frequencies are Zipfian: most lookups hit
def _hash64(word: str) -> np.uint64:
  return np.uint64(int.from_bytes(hashlib.blake2b(word.encode("utf-8"), digest_size=8).digest(), "little"))


def _mix64(x: np.ndarray) -> np.ndarray:
  """SplitMix64's finaliser: a bijective, well-mixed 64-bit hash, wrapping arithmetic."""
  x = np.asarray(x, np.uint64)
  with np.errstate(over="ignore"):
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))
