"""Our XLA:CPU decode kernels equal the plain-XLA computations they replace."""
import dataclasses
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs.common import model_preset
from humpback_jax import sharding
from humpback_jax.generate import GREEDY, Engine
from humpback_jax.kernels import cpu as cpu_kernels
from humpback_jax.model import build

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="CPU decode kernels unavailable here")
needs_vnni = pytest.mark.skipif(not cpu_kernels.greedy_head_built(), reason="the greedy head needs AVX-512 VNNI")


def _normal(rng, shape):
  return jnp.asarray(rng.normal(size=shape), jnp.float32)


@pytest.mark.parametrize("m,k,n", [(1, 64, 48), (5, 72, 40), (8, 512, 1376), (33, 96, 2048)])
def test_small_matmul_equals_xla_dot(m, k, n):
  rng = np.random.default_rng(m)
  x, w = _normal(rng, (m, k)), _normal(rng, (k, n))
  got = jax.jit(cpu_kernels.small_matmul)(x, w)
  np.testing.assert_allclose(got, jnp.dot(x, w, precision="highest"), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("m,k,f", [(1, 64, 24), (5, 72, 13), (8, 96, 40), (32, 576, 1536)])
def test_swiglu_matmul_equals_silu_gate_times_up(m, k, f):
  """The decode step's SwiGLU in the matmul epilogue, including a last strip of fewer than 8 pairs."""
  rng = np.random.default_rng(f)
  x, gate, up = _normal(rng, (m, k)), _normal(rng, (k, f)), _normal(rng, (k, f))
  got = jax.jit(cpu_kernels.small_swiglu_matmul)(x, jnp.stack([gate, up], axis=-1))
  expected = jax.nn.silu(jnp.dot(x, gate, precision="highest")) * jnp.dot(x, up, precision="highest")
  assert got.shape == (m, f)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4 * np.sqrt(k))


def _reference_attention(q, k, v, visible, scale):
  logits = jnp.einsum("bkgd,bskd->bkgs", q, k, precision="highest") * scale
  logits = jnp.where(visible[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
  return jnp.einsum("bkgs,bskd->bkgd", jax.nn.softmax(logits, axis=-1), v, precision="highest")


@pytest.mark.parametrize("kv,group,d", [(4, 2, 64), (3, 3, 64), (1, 1, 8), (2, 5, 16), (1, 8, 32)])
def test_decode_attention_equals_masked_softmax(kv, group, d):
  b, s = 4, 37
  rng = np.random.default_rng(d)
  q, k, v = _normal(rng, (b, kv, group, d)), _normal(rng, (b, s, kv, d)), _normal(rng, (b, s, kv, d))
  visible = rng.random((b, s)) < 0.6
  visible[1, :5] = False  # left padding
  visible[2] = False      # no visible slot: softmax over all-masked logits averages every slot
  visible = jnp.asarray(visible)
  got = jax.jit(cpu_kernels.decode_attention, static_argnums=4)(q, k, v, visible, d ** -0.5)
  np.testing.assert_allclose(got, _reference_attention(q, k, v, visible, d ** -0.5), rtol=1e-5, atol=1e-5)


def _rotate_half_like_transformers(x, cos, sin):
  half = x.shape[-1] // 2
  return x * cos + np.concatenate([-x[..., half:], x[..., :half]], axis=-1) * sin


@pytest.mark.parametrize("kv,group,d", [(3, 3, 64), (1, 5, 16)])
def test_decode_attention_step_rotates_writes_the_cache_then_attends(kv, group, d):
  b, s, index = 3, 21, 13
  rng = np.random.default_rng(d)
  qkv = rng.standard_normal((b, kv, group + 2, d)).astype(np.float32)
  k_cache, v_cache = _normal(rng, (b, s, kv, d)), _normal(rng, (b, s, kv, d))
  angles = rng.uniform(-20, 20, (b, 1, 1, d)).astype(np.float32)
  cos, sin = np.cos(angles), np.sin(angles)
  visible = np.arange(s)[None, :] <= np.array([[index], [index], [4]])
  visible[2, :2] = False  # left padding

  q = _rotate_half_like_transformers(qkv[:, :, :group], cos, sin)  # bit for bit as transformers
  k_expected = np.asarray(k_cache).copy()
  k_expected[:, index] = _rotate_half_like_transformers(qkv[:, :, group], cos[:, 0], sin[:, 0])
  v_expected = np.asarray(v_cache).copy()
  v_expected[:, index] = qkv[:, :, group + 1]
  out_expected = cpu_kernels.decode_attention(q, k_expected, v_expected, jnp.asarray(visible), d ** -0.5)

  step = jax.jit(cpu_kernels.decode_attention_step, static_argnums=7, donate_argnums=(3, 4))
  out, k_new, v_new = step(qkv, cos[:, 0, 0], sin[:, 0, 0], k_cache, v_cache, index, jnp.asarray(visible), d ** -0.5)
  np.testing.assert_array_equal(k_new, k_expected)
  np.testing.assert_array_equal(v_new, v_expected)
  np.testing.assert_array_equal(out, out_expected)


def _toy_engine(batch_size=2, **model_overrides):
  cfg = model_preset("toy", **model_overrides)
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(axes=("data", "fsdp", "tensor"), shape=(1, 1, 1))),
                            jax.devices()[:1])
  layout = sharding.Layout(mesh)
  return Engine(cfg, build.init_params(cfg, layout), layout, prompt_buckets=(8,), batch_size=batch_size)


def test_greedy_tokens_are_the_same_with_and_without_the_kernels():
  prompts = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15]]
  engine = _toy_engine(batch_size=3)
  with_kernels = engine.generate_ids(prompts, GREEDY, max_new_tokens=12)
  programs = {part: program.as_text() for (_, part), program in engine.programs().items()}
  assert "HumpbackGemm" in programs["prefill"] and "HumpbackAttentionForward" in programs["prefill"]
  assert all(f"Humpback{name}" in programs["decode"]
             for name in ("PackedMatmul", "DecodeAttention", "RmsNormForward", "Argmax"))
  engine = _toy_engine(batch_size=3, backend="xla")
  assert engine.generate_ids(prompts, GREEDY, max_new_tokens=12) == with_kernels
  assert all("Humpback" not in program.as_text() for program in engine.programs().values())


def test_argmax_is_the_first_maximum_and_nan_wins_like_jnp():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(6, 1003)).astype(np.float32)
  x[1, [5, 700]] = 9.0  # a tie: the first index
  x[2, 1001] = 9.0  # in the tail past the last full vector
  x[3, [10, 400]] = np.nan  # the first NaN
  x[4] = -np.inf
  x[5, 1002] = np.nan
  got = jax.jit(cpu_kernels.argmax)(x)
  np.testing.assert_array_equal(got, jnp.argmax(jnp.asarray(x), axis=-1))
  assert list(np.asarray(got)[1:]) == [5, 1001, 10, 0, 1002]


def test_scores_are_the_same_with_and_without_the_kernels():
  prompts, continuations = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15]], [[20, 21], [22], [23, 24, 25]]

  def scores(backend="auto"):
    engine = _toy_engine(batch_size=3, backend=backend)
    return (engine.loglikelihood(prompts, continuations), engine.next_token_probs(prompts, [30, 31, 32]),
            "\n".join(program.as_text() for program in engine.programs().values()))

  loglik, probs, hlo = scores()
  assert "HumpbackGemm" in hlo and "HumpbackAttentionForward" in hlo
  plain_loglik, plain_probs, hlo = scores("xla")
  assert "Humpback" not in hlo
  np.testing.assert_allclose(loglik, plain_loglik, rtol=1e-5)
  np.testing.assert_allclose(probs, plain_probs, rtol=1e-5)


@pytest.mark.parametrize("vocab", [2048, pytest.param(cpu_kernels.GREEDY_HEAD_MIN_VOCAB, marks=needs_vnni)])
def test_decode_loop_packs_each_weight_once_outside_the_loop(vocab):
  """The packed weights [n / 16, k, 16] (and the greedy head's tables, for a large vocabulary) are loop
  state of the decode while loop, not rebuilt per step."""
  engine = _toy_engine(vocab_size=vocab, num_layers=2)
  engine.generate_ids([[5, 6, 7], [8, 9]], GREEDY, max_new_tokens=3)
  (decode,) = [p for (_, part), p in engine.programs().items() if part == "decode"]
  hlo = decode.as_text()
  body_names = set(re.findall(r"while\(.*?body=%([\w.\-]+)", hlo))
  assert body_names
  for name in body_names:
    body = re.search(rf"^%{re.escape(name)} .*?^}}", hlo, re.S | re.M).group(0)
    built_here = [line for line in body.splitlines()  # packed [n / 16, k, 16] or tables made in the loop
                  if re.search(r"= (f32\[\d+,\d+,16\]|s8\[\d+,\d+,16,4\])\{[\d,]*\} (?!get-tuple-element\()", line)]
    assert not built_here, "packed weights are rebuilt inside the decode loop:\n" + "\n".join(built_here)
  assert "HumpbackPackedMatmul" in hlo and "HumpbackDecodeAttention" in hlo
  assert ("HumpbackGreedyHeadTables" in hlo) == (vocab >= cpu_kernels.GREEDY_HEAD_MIN_VOCAB)


@pytest.mark.parametrize("transpose_a,transpose_b", [(False, False), (False, True), (True, False), (True, True)])
@pytest.mark.parametrize("m,k,n", [(7, 5, 3), (100, 300, 33), (256, 600, 272)])
def test_gemm_equals_numpy_in_every_layout(m, k, n, transpose_a, transpose_b):
  rng = np.random.default_rng(m + k)
  a = rng.normal(size=(k, m) if transpose_a else (m, k)).astype(np.float32)
  b = rng.normal(size=(n, k) if transpose_b else (k, n)).astype(np.float32)
  expected = (a.T if transpose_a else a).astype(np.float64) @ (b.T if transpose_b else b).astype(np.float64)
  got = jax.jit(lambda a, b: cpu_kernels.gemm(a, b, transpose_a, transpose_b))(a, b)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4 * np.sqrt(k))


@pytest.mark.parametrize("m,n", [(24, 64), (31, 80), (12, 47), (5, 32)])
def test_gemm_tiles_compute_each_element_as_one_fma_chain(m, n):
  """Whatever tile covers an element (AVX-512's 12 x 32, the 6 x 16 edges: odd panels, short strips),
  a k <= 256 product is one FMA chain over k in order, bit for bit the decode kernel's."""
  rng = np.random.default_rng(m * n)
  a, b = _normal(rng, (m, 200)), _normal(rng, (200, n))
  gemm = jax.jit(cpu_kernels.gemm)(a, b)
  np.testing.assert_array_equal(np.asarray(gemm).view(np.int32),
                                np.asarray(jax.jit(cpu_kernels.small_matmul)(a, b)).view(np.int32))


def test_matmul_gradients_equal_xla():
  rng = np.random.default_rng(1)
  x, w, dy = _normal(rng, (70, 48)), _normal(rng, (48, 40)), _normal(rng, (70, 40))
  loss = lambda f: lambda x, w: jnp.sum(f(x, w) * dy)
  got = jax.grad(loss(cpu_kernels.matmul), argnums=(0, 1))(x, w)
  want = jax.grad(loss(lambda x, w: jnp.dot(x, w, precision="highest")), argnums=(0, 1))(x, w)
  for g, r in zip(got, want):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("t,heads,kv,d", [(70, 4, 2, 16), (130, 6, 2, 32), (256, 8, 4, 64)])
def test_sequence_attention_and_its_gradients_equal_xla(t, heads, kv, d):
  """Packed examples (a second segment restarts positions) and padding (segment 0: no visible key)."""
  from humpback_jax.model import attention
  b = 3
  rng = np.random.default_rng(t)
  q, k, v, w = (_normal(rng, (b, t, n, d)) for n in (heads, kv, kv, heads))
  positions = np.tile(np.arange(t), (b, 1))
  segments = np.ones((b, t), np.int32)
  positions[0, t // 3:], segments[0, t // 3:] = np.arange(t - t // 3), 2
  positions[-1, -5:], segments[-1, -5:] = 0, 0
  mask = attention.attention_mask(jnp.asarray(positions), jnp.asarray(segments),
                                  jnp.asarray(positions), jnp.asarray(segments))
  ours = lambda q, k, v: cpu_kernels.sequence_attention(q, k, v, mask[:, 0], 1.0 / d ** 0.5)
  xla = lambda q, k, v: attention._grouped_attention(q, k, v, mask)
  np.testing.assert_allclose(jax.jit(ours)(q, k, v), jax.jit(xla)(q, k, v), rtol=1e-5, atol=1e-5)
  loss = lambda f: lambda q, k, v: jnp.sum(f(q, k, v) * w)
  got = jax.jit(jax.grad(loss(ours), argnums=(0, 1, 2)))(q, k, v)
  want = jax.jit(jax.grad(loss(xla), argnums=(0, 1, 2)))(q, k, v)
  for g, r in zip(got, want):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows,d", [(7, 40), (130, 512)])
def test_rms_norm_and_its_gradients_equal_xla(rows, d):
  rng = np.random.default_rng(rows)
  x, scale, dy = _normal(rng, (2, rows, d)), _normal(rng, (d,)), _normal(rng, (2, rows, d))

  def plain(x, scale):
    return scale * (x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-5))

  def pulled(norm):
    y, vjp = jax.vjp(norm, x, scale)
    return (y, *vjp(dy))

  got = jax.jit(lambda: pulled(lambda x, s: cpu_kernels.rms_norm(x, s, 1e-5)))()
  want = jax.jit(lambda: pulled(plain))()
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def _train_losses(shape=(1, 1, 1), steps=3, backend="auto"):
  from configs import common
  from helpers import layout
  from humpback_jax import train
  cfg = common.model_preset("toy", num_layers=2, backend=backend)
  rng = np.random.RandomState(0)
  tokens = rng.randint(3, cfg.vocab_size, (8, 129)).astype(np.int32)
  batch = dict(tokens=tokens[:, :-1], targets=tokens[:, 1:], loss_mask=np.ones((8, 128), np.float32),
               positions=np.tile(np.arange(128, dtype=np.int32), (8, 1)), segment_ids=np.ones((8, 128), np.int32))
  lay = layout(shape)
  fns = train.build_step(cfg, lay, train.make_optimizer(common.train_config(learning_rate=1e-2), 100))
  state = fns.init(build.init_params(cfg, lay, seed=0))
  hlo = fns.step.lower(state, train.put_batch(batch, fns.batch_sharding)).as_text()
  losses = []
  for _ in range(steps):
    state, metrics = fns.step(state, train.put_batch(batch, fns.batch_sharding))
    losses.append(float(metrics["loss"]))
  return np.array(losses), hlo


def test_train_step_losses_are_the_same_with_and_without_the_kernels():
  with_kernels, hlo = _train_losses()
  assert "HumpbackGemm" in hlo and "HumpbackAttentionBackward" in hlo and "HumpbackRmsNormBackward" in hlo
  without, hlo = _train_losses(backend="xla")
  assert "Humpback" not in hlo
  np.testing.assert_allclose(with_kernels, without, rtol=1e-5)


def test_sharded_train_step_keeps_plain_xla():
  """Under a multi-device mesh XLA would gather every kernel operand onto each device."""
  _, hlo = _train_losses(shape=(1, 2, 1), steps=0)
  assert "Humpback" not in hlo


def _greedy_head_ids(x, w):
  """Greedy-head ids and argmax over every logit of x @ w as the decode loop computes them."""
  every = jax.jit(lambda x, w: cpu_kernels.argmax(cpu_kernels.small_matmul(x, w)))(x, w)
  pruned = jax.jit(lambda x, w: cpu_kernels.greedy_head(x, cpu_kernels.greedy_head_tables(w.T), w.T))(x, w)
  return np.asarray(pruned), np.asarray(every)


def _trained_like(rng, m, k, n):
  """Rows with a few dimensions far larger than the rest (as trained models' final hidden states
  have) and a head whose logits single out a token, plus rows of near-ties."""
  x = rng.normal(size=(m, k)).astype(np.float32)
  x[:, :3] *= 30.0
  w = (rng.normal(size=(k, n)) * 0.05).astype(np.float32)
  return x, w


@needs_vnni
@pytest.mark.parametrize("m,k,n", [(1, 3, 17), (5, 70, 1000), (33, 96, 4099), (32, 576, 16384)])
def test_greedy_head_picks_the_argmax_of_every_logit(m, k, n):
  """Same token, bit for bit, as argmax over all logits: k not a multiple of 4, n not of 16, tiles
  of 1..8 rows, flat (random) and peaked (outlier dimensions) logits."""
  rng = np.random.default_rng(n)
  for x, w in [(rng.normal(size=(m, k)).astype(np.float32), rng.normal(size=(k, n)).astype(np.float32)),
               _trained_like(rng, m, k, n)]:
    pruned, every = _greedy_head_ids(x, w)
    np.testing.assert_array_equal(pruned, every)


@needs_vnni
def test_greedy_head_breaks_ties_nans_and_infinities_as_argmax_does():
  rng = np.random.default_rng(0)
  x, w = _trained_like(rng, 6, 64, 300)
  w[:, 250] = w[:, 40]                   # two equal columns: whichever wins, the first index
  x[0] = w[:, 40] * 100.0                # ... and row 0 makes them win
  x[1, 5] = np.nan                       # a NaN row: every logit NaN, index 0
  x[2] = 0.0                             # all logits 0: index 0
  x[3, 7] = np.inf
  x[4] *= 1e37                           # logits beyond the float range: infinities, as argmax sees them
  pruned, every = _greedy_head_ids(x, w)
  np.testing.assert_array_equal(pruned, every)
  assert pruned[0] == 40 and pruned[1] == 0 and pruned[2] == 0
  w[9, 123] = np.inf                     # a non-finite head: every row takes every exact logit
  pruned, every = _greedy_head_ids(x, w)
  np.testing.assert_array_equal(pruned, every)


@needs_vnni
def test_greedy_decoding_of_a_large_vocabulary_takes_the_greedy_head_with_the_same_tokens(monkeypatch):
  vocab = cpu_kernels.GREEDY_HEAD_MIN_VOCAB
  prompts = [[5, 6, 7, 8, 9, 10], [11, 12], [vocab - 1, 14, 15]]
  engine = _toy_engine(3, vocab_size=vocab, num_layers=2)
  pruned = engine.generate_ids(prompts, GREEDY, max_new_tokens=12)
  sampled = engine.generate_ids(prompts, dataclasses.replace(GREEDY, temperature=0.7), max_new_tokens=4)
  programs = {(key[-1], part): program.as_text() for (key, part), program in engine.programs().items()}
  assert "HumpbackGreedyHead" in programs[True, "decode"] and "HumpbackArgmax" not in programs[True, "decode"]
  assert "HumpbackGreedyHead" not in programs[False, "decode"] and all(len(row) == 4 for row in sampled)
  monkeypatch.setattr(cpu_kernels, "GREEDY_HEAD_MIN_VOCAB", vocab + 1)
  engine = _toy_engine(3, vocab_size=vocab, num_layers=2)
  assert engine.generate_ids(prompts, GREEDY, max_new_tokens=12) == pruned
  assert all("HumpbackGreedyHead" not in program.as_text() for program in engine.programs().values())


def test_without_avx512_vnni_greedy_decoding_keeps_every_logit(monkeypatch):
  """AVX2's 8-bit products gain nothing over the float32 head (bench/RESULTS.md): the plain path."""
  monkeypatch.setattr(cpu_kernels, "greedy_head_built", lambda: False)
  engine = _toy_engine(3, vocab_size=cpu_kernels.GREEDY_HEAD_MIN_VOCAB, num_layers=2)
  engine.generate_ids([[5, 6, 7]], GREEDY, max_new_tokens=2)
  (decode,) = [p.as_text() for (_, part), p in engine.programs().items() if part == "decode"]
  assert "HumpbackArgmax" in decode and "HumpbackGreedyHead" not in decode
