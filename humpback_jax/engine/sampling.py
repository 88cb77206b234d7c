"""Next-token sampling from logits: greedy, temperature, top-k and top-p, per-row keys."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from humpback_jax.model import ops

SAMPLING_CANDIDATES = 64  # most likely tokens that sampling ranks before it sorts the whole vocabulary


def sample_next(logits, key, temperature, top_p, top_k, step=None, backend=ops.XLA, live=None):
  """Next tokens [b] from float32 logits [b, vocab]; greedy when temperature == 0.

  Otherwise temperature, then top-k (0 = off), then top-p (the smallest set of most likely tokens
  whose mass reaches top_p; the top token always stays), then a categorical draw. `key` is one
  typed key or one per row [b]; a `step`, when given, is folded into each row's key first, on the
  sampling branch only (greedy decoding never pays for the hashing). The knobs may be traced
  scalars: changing them never recompiles. `live` [b] (bool), when given, marks the rows whose token
  is used: a finished row or an empty decode slot (a near-flat distribution) then never makes the
  live rows sort the whole vocabulary.
  """
  def greedy():
    return ops.argmax(logits, backend)

  def sample():
    b, vocab = logits.shape
    keys = key if jnp.ndim(key) else jax.random.split(key, b)
    if step is not None:
      keys = jax.vmap(jax.random.fold_in, (0, None))(keys, step)
    scaled = logits / temperature
    # The most likely SAMPLING_CANDIDATES tokens first (lax.top_k: sorted, ties keep the lower id
    # first, as argmax does); the whole vocabulary is sorted only when some row's kept set reaches
    # past them (a full sort per step is far slower on CPU: bench/RESULTS.md).
    n = min(vocab, SAMPLING_CANDIDATES)
    head, head_ids = jax.lax.top_k(scaled, n)
    head_norm = jax.nn.logsumexp(jnp.where(jnp.arange(n) < top_k, head, -jnp.inf), axis=-1)
    log_norm = jnp.where(top_k > 0, head_norm, jax.nn.logsumexp(scaled, axis=-1))  # of the kept mass
    head_keep, head_mass = _kept_by_top_k_and_top_p(head, log_norm, top_p, top_k)
    fits = (n == vocab) | ((top_k > 0) & (top_k <= n)) | ((top_k <= 0) & (top_p < 1.0) & (head_mass >= top_p))
    if live is not None:
      fits |= ~live
    # Gumbel-max draws: the same noise on the candidates in both branches, so a row's token does not
    # depend on whether another row of its batch needed the whole vocabulary.
    head_noise = jax.vmap(lambda k: jax.random.gumbel(k, (n,)))(keys)

    def from_head():
      return _pick(head_ids, head, head_keep, head_noise)

    def from_vocab():
      ranked, ids = jax.lax.top_k(scaled, vocab)
      in_top_k = jnp.arange(vocab) < top_k
      norm = jnp.where(top_k > n, jax.nn.logsumexp(jnp.where(in_top_k, ranked, -jnp.inf), axis=-1), log_norm)
      keep, _ = _kept_by_top_k_and_top_p(ranked, norm, top_p, top_k)
      keep = jnp.where(fits[:, None], jnp.pad(head_keep, ((0, 0), (0, vocab - n))), keep)
      tail_noise = jax.vmap(lambda k: jax.random.gumbel(jax.random.fold_in(k, 1), (vocab - n,)))(keys)
      return _pick(ids, ranked, keep, jnp.concatenate([head_noise, tail_noise], axis=-1))

    def unfiltered():  # temperature alone: a draw over the whole vocabulary needs no ranking
      return jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)

    def filtered():
      return jax.lax.cond(jnp.all(fits), from_head, from_vocab)

    return jax.lax.cond((top_k <= 0) & (top_p >= 1.0), unfiltered, filtered)

  return jax.lax.cond(temperature > 0, sample, greedy)


def _kept_by_top_k_and_top_p(ranked, log_norm, top_p, top_k):
  """Which of the most likely tokens [b, n] (sorted, probabilities exp(ranked - log_norm)) top-k and
  top-p keep (the top one always), and their whole mass [b]."""
  rank = jnp.arange(ranked.shape[-1])
  keep = (top_k <= 0) | (rank < top_k)
  probs = jnp.where(keep, jnp.exp(ranked - log_norm[:, None]), 0.0)
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  keep &= (mass_before < top_p) | (top_p >= 1.0) | (rank == 0)
  return keep, mass_before[:, -1] + probs[:, -1]


def _pick(ids, ranked, keep, gumbel_noise):
  """The kept token with the largest logit + Gumbel noise: a draw from the kept tokens' softmax."""
  choice = jnp.argmax(jnp.where(keep, ranked + gumbel_noise, -jnp.inf), axis=-1)
  return jnp.take_along_axis(ids, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
