"""LLaMA in Flax NNX: RMSNorm, rotary embeddings (with LLaMA-3 scaling), grouped-query
attention, SwiGLU, tied or untied head, dropout, rematerialisation and a static KV cache.

Why NNX: it is Flax's recommended API, modules are plain Python objects whose parameters carry
their own metadata (here: logical sharding axes), and `nnx.split` gives the (graphdef, state)
pair that every jitted function of ours takes, so training and generation stay pure functions
over a parameter pytree. Layers are a Python list (one HF layer = one module) or, with
`scan_layers`, one Block whose parameters carry a leading `layers` axis, run by `jax.lax.scan`: an
80-layer model then traces and compiles one layer, not 80 (checkpoints/ map both forms to HF).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from humpback_jax import config
from humpback_jax.config import head_dim
from humpback_jax.model import attention
from humpback_jax.model import cache as kv_cache
from humpback_jax.model import ops

# jax.checkpoint policies by the config's names (config.REMAT_POLICIES; "none" runs without remat).
REMAT_POLICIES = {name: None if name == "full" else getattr(jax.checkpoint_policies, name)
                  for name in config.REMAT_POLICIES if name != "none"}


def _param(rngs, shape, axes, dtype, std=0.02):
  return nnx.Param(std * jax.random.normal(rngs.params(), shape, dtype), axes=axes)


def _noconstraint(x, names):
  return x


class RMSNorm(nnx.Module):
  """x / rms(x) * scale, normalised in float32 as Hugging Face does."""

  def __init__(self, dim, eps, param_dtype):
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype), axes=("norm",))

  def __call__(self, x, backend=ops.XLA):
    return ops.rms_norm(x, self.scale[...], self.eps, backend)


def rope_frequencies(cfg) -> np.ndarray:
  """Inverse frequencies [head_dim/2] in float32, with LLaMA-3 `rope_scaling` when configured."""
  d = head_dim(cfg)
  inv = (1.0 / (np.float32(cfg.rope_theta) ** (np.arange(0, d, 2, dtype=np.float32) / np.float32(d))))
  inv = inv.astype(np.float32)
  s = cfg.rope_scaling
  if not s.factor:
    return inv
  old = s.original_max_position_embeddings
  low_wavelen, high_wavelen = old / s.low_freq_factor, old / s.high_freq_factor
  wavelen = 2 * np.pi / inv
  scaled = np.where(wavelen > low_wavelen, inv / s.factor, inv)
  smooth = (old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
  smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
  medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def rotary(x_btnh, cos_bth, sin_bth):
  """Applies rotary embeddings in the rotate-half layout that Hugging Face LLaMA uses."""
  half = x_btnh.shape[-1] // 2
  x1, x2 = x_btnh[..., :half], x_btnh[..., half:]
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  cos = cos_bth[:, :, None, :].astype(x_btnh.dtype)
  sin = sin_bth[:, :, None, :].astype(x_btnh.dtype)
  return x_btnh * cos + rotated * sin


def rope_tables(inv_freq, positions_bt, max_len: int):
  """cos/sin [batch, len, head_dim] for integer positions in [0, max_len) (negative = padding; NaN past).

  Looked up in [max_len, head_dim] tables: computed from the positions directly, XLA fuses cos/sin
  into every layer's rotary and evaluates them once per head and layer;
  the tables do not depend on the tokens, so a decode loop computes them once.
  """
  angles = jnp.arange(max_len, dtype=jnp.float32)[:, None] * jnp.asarray(inv_freq, jnp.float32)
  angles = jnp.concatenate([angles, angles], axis=-1)
  rows = jnp.maximum(positions_bt, 0)  # padding's rotation is never seen: its slots are masked
  return jnp.take(jnp.cos(angles), rows, axis=0), jnp.take(jnp.sin(angles), rows, axis=0)


class Attention(nnx.Module):
  """Multi-head, grouped-query or multi-query attention (by num_kv_heads)."""

  def __init__(self, cfg, rngs):
    d, n, k, h = cfg.dim, cfg.num_heads, cfg.num_kv_heads, head_dim(cfg)
    pd = jnp.dtype(cfg.param_dtype)
    self.q = _param(rngs, (d, n, h), ("embed", "heads", "head_dim"), pd)
    self.k = _param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), pd)
    self.v = _param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), pd)
    self.o = _param(rngs, (n, h, d), ("heads", "head_dim", "embed"), pd)

  def __call__(self, x, cos, sin, mask, kv=None, index=None, constrain=_noconstraint, backend=ops.XLA,
               layer=None):
    """`kv` is this layer's (k, v) cache, or with `layer` (scanned) every layer's stacked cache."""
    dt = x.dtype
    qkv = ops.dense(x, self._qkv_weight(), backend)  # one GEMM: [b, t, kv_heads, group + 2, head_dim]
    if kv is not None and layer is None and ops.fuses_decode_step(qkv, *kv, backend):  # rotary, cache write, attention
      out, *kv = ops.decode_attention_step(qkv, cos, sin, *kv, index, mask)
      return ops.dense(out, self.o[...], backend, in_dims=2), tuple(kv)
    q, k, v = _split_qkv(qkv)
    q = constrain(rotary(q.reshape(*x.shape[:-1], -1, q.shape[-1]), cos, sin), ("batch", "length", "heads", "head_dim"))
    k = constrain(rotary(k, cos, sin), ("batch", "length", "kv_heads", "head_dim"))
    if kv is not None:  # decoding: append to the cache, attend over all of it
      kv = kv_cache.write(kv[0], kv[1], k, v, index, layer)
      k, v = (kv_cache.layer_of(buf, layer).astype(dt) for buf in kv)
    if kv is not None and q.shape[1] == 1:
      out = ops.decode_attention(q, k, v, mask, backend)
    else:
      out = ops.sequence_attention(q, k, v, mask, backend)
    return ops.dense(out, self.o[...], backend, in_dims=2), kv

  def _qkv_weight(self):
    """q, k and v weights grouped per KV head, [dim, kv_heads, group + 2, head_dim]."""
    d, n, h = self.q.shape
    kv = self.k.shape[1]
    return jnp.concatenate([self.q[...].reshape(d, kv, n // kv, h), self.k[...][:, :, None], self.v[...][:, :, None]],
                           axis=2)


@jax.custom_vjp
def _split_qkv(y):
  """[..., kv, g + 2, h] -> q [..., kv, g, h], k and v [..., kv, h]; its gradient is one concatenation.

  (Autodiff of the slices pads each gradient to the full shape and adds them: ~3x the memory
  traffic in the train step's backward.)
  """
  return y[..., :-2, :], y[..., -2, :], y[..., -1, :]


def _split_qkv_fwd(y):
  return _split_qkv(y), None


def _split_qkv_bwd(_, grads):
  dq, dk, dv = grads
  return (jnp.concatenate([dq, dk[..., None, :], dv[..., None, :]], axis=-2),)


_split_qkv.defvjp(_split_qkv_fwd, _split_qkv_bwd)


class MLP(nnx.Module):
  """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

  def __init__(self, cfg, rngs):
    pd = jnp.dtype(cfg.param_dtype)
    self.gate = _param(rngs, (cfg.dim, cfg.mlp_dim), ("embed", "mlp"), pd)
    self.up = _param(rngs, (cfg.dim, cfg.mlp_dim), ("embed", "mlp"), pd)
    self.down = _param(rngs, (cfg.mlp_dim, cfg.dim), ("mlp", "embed"), pd)

  def __call__(self, x, constrain=_noconstraint, backend=ops.XLA):
    # Gate and up as one GEMM over [dim, mlp, 2]: one larger matmul, and in the backward one dx GEMM
    # and one dW GEMM instead of two of each.
    h = ops.swiglu(x, jnp.stack([self.gate[...], self.up[...]], axis=-1), backend)
    return ops.dense(constrain(h, ("batch", "length", "mlp")), self.down[...], backend)


def _dropout(x, rate, rng):
  if rng is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


class Block(nnx.Module):
  """Pre-norm transformer block; dropout (training only) on each residual branch's output."""

  def __init__(self, cfg, rngs):
    pd = jnp.dtype(cfg.param_dtype)
    self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps, pd)
    self.attn = Attention(cfg, rngs)
    self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps, pd)
    self.mlp = MLP(cfg, rngs)
    self.dropout_rate = cfg.dropout_rate

  def __call__(self, x, cos, sin, mask, kv=None, index=None, dropout_rng=None, constrain=_noconstraint,
               backend=ops.XLA, layer=None):
    rngs = (None, None) if dropout_rng is None else jax.random.split(dropout_rng)
    h, kv = self.attn(self.attn_norm(x, backend), cos, sin, mask, kv, index, constrain, backend, layer)
    x = x + _dropout(h, self.dropout_rate, rngs[0])
    x = x + _dropout(self.mlp(self.mlp_norm(x, backend), constrain, backend), self.dropout_rate, rngs[1])
    return constrain(x, ("batch", "length", "embed")), kv


def stacked_blocks(cfg, rngs) -> Block:
  """One Block whose every parameter has a leading `layers` axis [num_layers, ...]: the list of
  Blocks stacked, so a seed gives the same weights in either layer form."""
  blocks = [Block(cfg, rngs) for _ in range(cfg.num_layers)]
  graphdef, _ = nnx.split(blocks[0])
  stacked = jax.tree.map(lambda *layers: jnp.stack(layers), *(nnx.state(b) for b in blocks))
  for _, var in nnx.iter_graph(stacked):
    if isinstance(var, nnx.Param):  # the sharding rules leave `layers` unsharded
      var.set_metadata(axes=("layers", *var.get_metadata()["axes"]))
  return nnx.merge(graphdef, stacked)


class Llama(nnx.Module):
  """The LLaMA decoder. Call with token ids; returns float32 logits and the updated cache."""

  def __init__(self, cfg, rngs: nnx.Rngs):
    pd = jnp.dtype(cfg.param_dtype)
    self.cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    self.embed = _param(rngs, (cfg.vocab_size, cfg.dim), ("vocab", "embed"), pd)
    self.scan_layers = bool(cfg.scan_layers)
    self.layers = (stacked_blocks(cfg, rngs) if self.scan_layers
                   else nnx.List([Block(cfg, rngs) for _ in range(cfg.num_layers)]))
    self.final_norm = RMSNorm(cfg.dim, cfg.norm_eps, pd)
    self.lm_head = None if cfg.tie_embeddings else _param(rngs, (cfg.dim, cfg.vocab_size), ("embed", "vocab"), pd)
    self.inv_freq = tuple(float(f) for f in rope_frequencies(cfg))  # static, not a parameter
    self.dtype = jnp.dtype(cfg.dtype)
    self.remat_policy = cfg.remat_policy

  def __call__(self, tokens_bt, positions_bt=None, segment_ids_bt=None, *, cache=None,
               dropout_rng=None, layout=None, hidden_only: bool = False, backend=ops.XLA):
    """tokens [batch, len] -> (logits [batch, len, vocab] float32, cache or None).

    Without a cache, `segment_ids` (0 = padding) keep packed examples apart. With a cache,
    `positions` of -1 mark left padding and the new tokens are written at `cache.index`.
    `hidden_only` returns the final-normed hidden states [batch, len, dim] in place of the logits
    (their product with `head_weight()`), for a caller that needs no more than the logits' argmax.
    `backend` (ops.py) picks the kernels.
    """
    b, t = tokens_bt.shape
    constrain = layout.constrain if layout is not None else _noconstraint
    if positions_bt is None:
      positions_bt = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    if segment_ids_bt is None:
      segment_ids_bt = jnp.ones((b, t), jnp.int32)
    x = jnp.take(self.embed[...], tokens_bt, axis=0).astype(self.dtype)
    x = constrain(x, ("batch", "length", "embed"))
    # Positions restart at 0 in each packed example (< t), and a cached token's is <= its slot.
    table_len = t if cache is None else cache.max_len
    cos, sin = rope_tables(self.inv_freq, positions_bt, table_len)
    if cache is None:
      mask = attention.self_attention_mask(positions_bt, segment_ids_bt)
    else:
      kv_pos = kv_cache.write_positions(cache, positions_bt)
      mask = attention.Mask(attention.attention_mask(positions_bt, jnp.ones_like(positions_bt), kv_pos,
                                                     (kv_pos >= 0).astype(jnp.int32)))
    run = self._scan_blocks if self.scan_layers else self._loop_blocks
    x, kv = run(x, cos, sin, mask, cache, dropout_rng, constrain, backend)
    x = self.final_norm(x, backend)
    if cache is not None:
      cache = kv_cache.KVCache(k=kv[0], v=kv[1], positions=kv_pos, index=cache.index + t)
    if hidden_only:
      return x, cache
    logits = ops.dense(x, self.head_weight(), backend, out_dtype=jnp.float32)
    return constrain(logits, ("batch", "length", "vocab")), cache

  def head_weight(self):
    """The output projection [dim, vocab]: the embedding's transpose when tied."""
    return self.embed[...].T if self.lm_head is None else self.lm_head[...]

  def _loop_blocks(self, x, cos, sin, mask, cache, dropout_rng, constrain, backend):
    """The layers one after another (a Python loop: each layer traced on its own)."""
    new_k, new_v = [], []
    for i, layer in enumerate(self.layers):
      rng = None if dropout_rng is None else jax.random.fold_in(dropout_rng, i)
      kv = None if cache is None else (cache.k[i], cache.v[i])
      x, kv = self._run_block(layer, x, cos, sin, mask, kv, None if cache is None else cache.index, rng, constrain,
                              backend)
      if kv is not None:
        new_k.append(kv[0])
        new_v.append(kv[1])
    return x, (None if cache is None else (tuple(new_k), tuple(new_v)))

  def _scan_blocks(self, x, cos, sin, mask, cache, dropout_rng, constrain, backend):
    """The stacked layers under `jax.lax.scan`: one layer traced, its parameters sliced per step.

    The stacked cache rides in the carry, so each layer writes only its new tokens in place.
    """
    graphdef, stacked = nnx.split(self.layers)
    index = None if cache is None else cache.index

    def body(carry, xs):
      x, kv = carry
      params, i = xs
      rng = None if dropout_rng is None else jax.random.fold_in(dropout_rng, i)
      block = nnx.merge(graphdef, params)
      return block(x, cos, sin, mask, kv, index, rng, constrain, backend, layer=i), None

    if self.remat_policy != "none" and cache is None:  # remat per layer: the policy inside the body
      body = jax.checkpoint(body, policy=REMAT_POLICIES[self.remat_policy], prevent_cse=False)
    kv = None if cache is None else (cache.k, cache.v)
    layers = jnp.arange(self.cfg["num_layers"], dtype=jnp.int32)
    (x, kv), _ = jax.lax.scan(body, (x, kv), (stacked, layers))
    return x, kv

  def _run_block(self, layer, x, cos, sin, mask, kv, index, rng, constrain, backend):
    if self.remat_policy == "none" or kv is not None:
      return layer(x, cos, sin, mask, kv, index, rng, constrain, backend)
    policy = REMAT_POLICIES[self.remat_policy]
    run = nnx.remat(lambda blk, x, cos, sin, mask, rng: blk(x, cos, sin, mask, None, None, rng, constrain, backend),
                    policy=policy)
    return run(layer, x, cos, sin, mask, rng)
