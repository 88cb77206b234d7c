"""Our XLA:CPU decode kernels equal the plain-XLA computations they replace."""
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


def _normal(rng, shape):
  return jnp.asarray(rng.normal(size=shape), jnp.float32)


@pytest.mark.parametrize("m,k,n", [(1, 64, 48), (5, 72, 40), (8, 512, 1376), (33, 96, 2048)])
def test_small_matmul_equals_xla_dot(m, k, n):
  rng = np.random.default_rng(m)
  x, w = _normal(rng, (m, k)), _normal(rng, (k, n))
  got = jax.jit(cpu_kernels.small_matmul)(x, w)
  np.testing.assert_allclose(got, jnp.dot(x, w, precision="highest"), rtol=1e-5, atol=1e-4)


def _reference_attention(q, k, v, visible, scale):
  logits = jnp.einsum("bkgd,bskd->bkgs", q, k, precision="highest") * scale
  logits = jnp.where(visible[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
  return jnp.einsum("bkgs,bskd->bkgd", jax.nn.softmax(logits, axis=-1), v, precision="highest")


@pytest.mark.parametrize("kv,group,d", [(4, 2, 64), (3, 3, 64), (1, 1, 8)])
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


def _toy_engine(batch_size=2):
  cfg = model_preset("toy")
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(axes=("data", "fsdp", "tensor"), shape=(1, 1, 1))),
                            jax.devices()[:1])
  layout = sharding.Layout(mesh)
  return Engine(cfg, build.init_params(cfg, layout), layout, prompt_buckets=(8,), batch_size=batch_size)


def test_greedy_tokens_are_the_same_with_and_without_the_kernels(monkeypatch):
  prompts = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15]]
  with_kernels = _toy_engine(batch_size=3).generate_ids(prompts, GREEDY, max_new_tokens=12)
  monkeypatch.setattr(cpu_kernels, "available", lambda: False)
  engine = _toy_engine(batch_size=3)
  assert engine.generate_ids(prompts, GREEDY, max_new_tokens=12) == with_kernels
  assert all("Humpback" not in program.as_text() for program in engine._programs.values())


def test_decode_loop_packs_each_weight_once_outside_the_loop():
  """The packed weights [n / 16, k, 16] are loop state of the decode while loop, not rebuilt per step."""
  engine = _toy_engine()
  engine.generate_ids([[5, 6, 7], [8, 9]], GREEDY, max_new_tokens=3)
  (decode,) = [p for (_, part), p in engine._programs.items() if part == "decode"]
  hlo = decode.as_text()
  body_names = set(re.findall(r"while\(.*?body=%([\w.\-]+)", hlo))
  assert body_names
  for name in body_names:
    body = re.search(rf"^%{re.escape(name)} .*?^}}", hlo, re.S | re.M).group(0)
    built_here = [line for line in body.splitlines()  # [n / 16, k, 16] made by anything but unpacking loop state
                  if re.search(r"= f32\[\d+,\d+,16\]\{[\d,]*\} (?!get-tuple-element\()", line)]
    assert not built_here, "packed weights are rebuilt inside the decode loop:\n" + "\n".join(built_here)
  assert "HumpbackPackedMatmul" in hlo and "HumpbackDecodeAttention" in hlo
