"""The backend seam (model/ops.py): one explicit value picks every kernel, and each kernel equals XLA."""
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import layout, tiny_config
from humpback_jax.errors import ConfigError
from humpback_jax.model import attention, build, ops, splash

ROOT = Path(__file__).resolve().parents[1]


def _qkv_and_segments(b=2, t=200, n=4, kv=2, d=64, seed=0):
  """Random q/k/v and two packed rows: two examples in row 0, one example and right padding in row 1."""
  rng = np.random.default_rng(seed)
  q, k, v = (jnp.asarray(rng.normal(size=(b, t, h, d)), jnp.float32) for h in (n, kv, kv))
  segments = np.ones((b, t), np.int32)
  segments[0, 80:] = 2
  segments[1, 150:] = 0
  positions = np.tile(np.arange(t, dtype=np.int32), (b, 1))
  positions[0, 80:] -= 80
  return q, k, v, jnp.asarray(positions), jnp.asarray(segments)


def test_splash_in_interpret_mode_equals_xla_attention():
  q, k, v, positions, segments = _qkv_and_segments()
  mask = attention.self_attention_mask(positions, segments)
  got = splash.attention(q, k, v, segments, segments, interpret=True)
  want = attention.xla_attention(q, k, v, mask)
  real = np.asarray(segments) > 0  # padding rows attend nothing in XLA's mask; nobody reads them
  np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=1e-5, rtol=1e-5)


def test_splash_gradients_under_a_sharded_mesh_equal_xla():
  """shard_map over (fsdp, tensor): rows and heads split, no gather; the backward pass matches XLA's."""
  q, k, v, positions, segments = _qkv_and_segments(b=4, t=128, n=4, kv=2, d=32)
  mask = attention.self_attention_mask(positions, segments)
  keep = jnp.asarray(segments > 0, jnp.float32)[:, :, None, None]
  lay = layout((1, 2, 2))
  splash_loss = lambda q, k, v: jnp.sum(splash.attention(q, k, v, segments, segments, layout=lay,
                                                         interpret=True) * keep)
  xla_loss = lambda q, k, v: jnp.sum(attention.xla_attention(q, k, v, mask) * keep)
  got = jax.jit(jax.grad(splash_loss, argnums=(0, 1, 2)))(q, k, v)
  want = jax.grad(xla_loss, argnums=(0, 1, 2))(q, k, v)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5)


def test_the_accelerators_xla_line_equals_the_cpu_forms():
  """`jax.nn.dot_product_attention(implementation="xla")`, what TPU and GPU run, executed here."""
  q, k, v, positions, segments = _qkv_and_segments()
  mask = attention.self_attention_mask(positions, segments)
  real = np.asarray(segments) > 0
  accelerator = attention.xla_attention(q, k, v, mask, cpu_forms=False)
  np.testing.assert_allclose(np.asarray(accelerator)[real], np.asarray(attention.xla_attention(q, k, v, mask))[real],
                             atol=1e-5, rtol=1e-5)


def test_a_model_on_the_pallas_backend_computes_the_xla_logits():
  cfg = tiny_config(num_layers=1)
  lay = layout()
  params = build.init_params(cfg, lay, seed=1)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 96)), jnp.int32)
  logits = {name: jax.jit(lambda p, t: build.forward(cfg, p, t, layout=lay, backend=ops.resolve(name, lay))[0])(
      params, tokens) for name in ("xla", "pallas_tpu")}
  np.testing.assert_allclose(logits["pallas_tpu"], logits["xla"], atol=1e-5, rtol=1e-5)


def test_auto_picks_by_the_meshs_platform():
  from jax.experimental import topologies
  cpu = ops.resolve("auto", layout())
  assert cpu.kind in ("cpu_kernels", "xla") and cpu.platform == "cpu" and cpu.whole_sequences
  assert not ops.resolve("auto", layout((1, 2, 1))).whole_sequences  # sharded: no whole-sequence CPU kernels
  from humpback_jax import sharding
  devices = topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu").devices
  tpu = sharding.Layout(jax.sharding.Mesh(np.array(devices).reshape(1, 4, 1), sharding.MESH_AXES))
  assert ops.resolve("auto", tpu) == ops.Backend("pallas_tpu", "tpu", False, False, tpu)
  with pytest.raises(ConfigError, match="model.backend: cpu_kernels run on CPU only"):
    ops.resolve("cpu_kernels", tpu)
  with pytest.raises(ConfigError, match="model.backend: 'flash' is not one of"):
    ops.resolve("flash", tpu)


def test_model_train_and_generate_import_no_kernel_module():
  for name in ("model/llama.py", "generate.py", "train.py"):
    source = (ROOT / "humpback_jax" / name).read_text()
    imports = [line for line in source.splitlines() if re.match(r"\s*(from|import)\s", line)]
    assert not [line for line in imports if "kernels" in line], name
    assert "default_backend" not in source, name
