"""Engine results must not depend on batch size or on how many rows each device holds.

Regression: jaxlib 0.10.2's XLA:CPU `__ynn_fusion` miscompiled the broadcast-multiply-reduce form
of q @ K in single-query (decode) attention when a device held one row and head_dim >= 32, so
SmolLM2-135M (head_dim 64) gave garbage next-token probabilities and tokens with batch_size 1, or
with batch_size == device count (8 simulated devices here). Both tests run that XLA form on an
explicit `xla` backend (model/ops.py), and check that no CPU kernel took its place.
"""
import jax
import numpy as np
import pytest

from humpback_jax import generate
from humpback_jax.model import attention, ops

PROMPTS = ["The capital of France is", "One, two, three, four,",
           "My favourite colour is definitely the colour that people call"]
CANDIDATES = [" Paris", " five", " blue"]


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 64), (4, 2, 32), (4, 4, 128), (4, 2, 16)])
def test_single_query_attention_matches_reference(batch, heads, kv_heads, head_dim):
  rng = np.random.default_rng(0)
  s = 16
  q = rng.normal(size=(batch, 1, heads, head_dim)).astype(np.float32)
  k = rng.normal(size=(batch, s, kv_heads, head_dim)).astype(np.float32)
  v = rng.normal(size=(batch, s, kv_heads, head_dim)).astype(np.float32)
  mask = np.zeros((batch, 1, 1, s), bool)
  mask[..., 10:] = True  # left padding, as in the cache
  group = heads // kv_heads
  ref = jax.nn.dot_product_attention(q, np.repeat(k, group, 2), np.repeat(v, group, 2), mask=mask)
  xla_decode = jax.jit(lambda q, k, v, mask: ops.decode_attention(q, k, v, attention.Mask(mask), backend=ops.XLA))
  assert "Humpback" not in xla_decode.lower(q, k, v, mask).compile().as_text()  # the XLA form, not our kernel
  out = xla_decode(q, k, v, mask)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5)


@pytest.fixture(scope="module")
def smollm2():
  from humpback_jax import api
  from humpback_jax.assets_fetch import smollm2_gguf_path
  return api.load(smollm2_gguf_path(), layout=api.default_layout())


@pytest.mark.smollm2
@pytest.mark.slow  # ~70 s on 2 cores: full run only
def test_next_token_probs_do_not_depend_on_batch_size(smollm2):
  model, tok = smollm2, smollm2.tokenizer
  ids = [tok.encode_prompt(t) for t in PROMPTS]
  cand = [tok.encode(c)[0] for c in CANDIDATES]

  padded = np.zeros((len(ids), 16), np.int32)  # right padding: causal, so the last real logits are exact
  for r, row in enumerate(ids):
    padded[r, :len(row)] = row
  logits = model.logits(padded)[np.arange(len(ids)), [len(row) - 1 for row in ids]]
  ref = np.asarray(jax.nn.softmax(logits, axis=-1))[:, cand]
  assert ref.max() > 0.1  # the reference is meaningful, not all near zero

  xla_cfg = model.cfg.copy_and_resolve_references()
  xla_cfg.backend = "xla"  # the XLA attention forms this test guards, not the CPU kernels
  for bs in (1, 3, 8):
    engine = generate.Engine(xla_cfg, model.params, model.layout, prompt_buckets=(16,), batch_size=bs)
    probs = engine.next_token_probs(ids, cand)
    assert all("Humpback" not in p.as_text() for p in engine.programs().values())
    np.testing.assert_allclose(probs, ref, atol=1e-5, err_msg=f"batch_size={bs}")
