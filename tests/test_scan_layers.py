"""`model.scan_layers`: the stacked layer form computes what the layer list computes (logits,
gradients, dropout, remat, KV-cache decoding), shards like it, and converts to and from it."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import LAYOUTS, layout, tiny_config
from humpback_jax.checkpoints import model_dir
from humpback_jax.model import build, stacking
from humpback_jax.model import cache as kv_cache

LAYERS = 3


def configs(**overrides):
  """(layer-list config, scanned config), otherwise equal."""
  return (tiny_config(num_layers=LAYERS, **overrides), tiny_config(num_layers=LAYERS, scan_layers=True, **overrides))


def stacked_copy(params, scanned_cfg, lay):
  return stacking.to_form(jax.tree.map(jnp.copy, params), scanned_cfg, build.param_shardings(scanned_cfg, lay))


@pytest.fixture(scope="module")
def tokens():
  return jnp.asarray(np.random.default_rng(0).integers(0, 128, (2, 24)), jnp.int32)


def test_a_seed_gives_the_same_weights_in_either_form():
  cfg, scanned = configs()
  flat, stacked = build.init_params(cfg, layout()), build.init_params(scanned, layout())
  assert stacked["layers"]["attn"]["q"].shape == (LAYERS, *flat["layers"][0]["attn"]["q"].shape)
  for i in range(LAYERS):
    for a, b in zip(jax.tree.leaves(flat["layers"][i]), jax.tree.leaves(stacked["layers"])):
      np.testing.assert_array_equal(a, b[i])
  np.testing.assert_array_equal(flat["embed"], stacked["embed"])


@pytest.mark.parametrize("remat", ["none", "dots_saveable"])
def test_scanned_and_unscanned_give_the_same_logits_and_gradients(remat, tokens):
  cfg, scanned = configs(dropout_rate=0.1, remat_policy=remat)
  lay = layout()
  params = build.init_params(cfg, lay)
  stacked = stacked_copy(params, scanned, lay)
  rng = jax.random.key(7)  # dropout on: each layer must draw the same mask in either form

  def loss_and_grads(cfg, params):
    loss = lambda p: jnp.mean(jax.nn.log_softmax(build.forward(cfg, p, tokens, dropout_rng=rng)[0])[..., 5])
    return jax.jit(jax.value_and_grad(loss))(params)

  loss, grads = loss_and_grads(cfg, params)
  scan_loss, scan_grads = loss_and_grads(scanned, stacked)
  np.testing.assert_allclose(scan_loss, loss, rtol=1e-6)
  expected = stacked_copy(grads, scanned, lay)
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(expected)[0], jax.tree.leaves(scan_grads)):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-7, err_msg=jax.tree_util.keystr(path))
  assert float(jnp.abs(scan_grads["layers"]["mlp"]["up"]).max()) > 0.0


def test_remat_policy_is_applied_inside_the_scanned_layer(tokens):
  _, scanned = configs(remat_policy="dots_saveable")
  logits = lambda p: build.forward(scanned, p, tokens)[0]
  scan_eqn = next(e for e in jax.make_jaxpr(logits)(build.abstract_params(scanned)).eqns if e.primitive.name == "scan")
  (layer,) = scan_eqn.params["jaxpr"].jaxpr.eqns  # the whole layer is one rematerialised call
  assert layer.primitive.name == "remat2"
  assert layer.params["policy"] is jax.checkpoint_policies.dots_saveable


def test_kv_cache_decoding_equals_the_layer_list(tokens):
  cfg, scanned = configs()
  lay = layout()
  params = build.init_params(cfg, lay)
  stacked = stacked_copy(params, scanned, lay)

  def prefill_and_step(cfg, params):
    cache = kv_cache.init_cache(cfg, tokens.shape[0], tokens.shape[1] + 1)
    _, cache = build.forward(cfg, params, tokens, cache=cache)
    position = jnp.full((tokens.shape[0], 1), tokens.shape[1], jnp.int32)
    logits, cache = build.forward(cfg, params, tokens[:, -1:], position, cache=cache)
    return logits, cache

  logits, cache = jax.jit(lambda p: prefill_and_step(cfg, p))(params)
  scan_logits, scan_cache = jax.jit(lambda p: prefill_and_step(scanned, p))(stacked)
  assert scan_cache.k.shape == (LAYERS, *cache.k[0].shape)
  np.testing.assert_allclose(scan_logits, logits, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(scan_cache.k, np.stack(cache.k), rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(scan_cache.v, np.stack(cache.v), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_stacked_params_and_cache_shard_like_the_layer_list(name):
  cfg, scanned = configs()
  lay = layout(LAYOUTS[name])
  flat, stacked = build.param_shardings(cfg, lay), build.param_shardings(scanned, lay)
  for a, b in zip(jax.tree.leaves(flat["layers"][0]), jax.tree.leaves(stacked["layers"])):
    assert tuple(b.spec) == (None, *a.spec) + (None,) * (len(b.spec) - 1 - len(a.spec))
  per_layer = kv_cache.cache_shardings(lay, cfg, 8, 16).k[0]
  assert tuple(kv_cache.cache_shardings(lay, scanned, 8, 16).k.spec) == (None, *per_layer.spec)


@pytest.mark.parametrize("saved_scanned", [False, True])
def test_our_folder_restores_into_either_form(saved_scanned, tmp_path):
  cfg, scanned = configs()
  lay = layout(LAYOUTS["fsdp_tensor"])
  saved_cfg, other_cfg = (scanned, cfg) if saved_scanned else (cfg, scanned)
  params = build.init_params(saved_cfg, lay)
  model_dir.save(tmp_path / "m", params, saved_cfg)
  assert model_dir.read_meta(tmp_path / "m")["model"].scan_layers == saved_scanned
  same = model_dir.restore_params(tmp_path / "m", saved_cfg, lay)
  other = model_dir.restore_params(tmp_path / "m", other_cfg, lay)
  assert stacking.is_stacked(other) == other_cfg.scan_layers
  back = stacking.to_form(other, saved_cfg, build.param_shardings(saved_cfg, lay))
  for a, b, c in zip(jax.tree.leaves(params), jax.tree.leaves(same), jax.tree.leaves(back)):
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)
    assert b.sharding == a.sharding and c.sharding == a.sharding
