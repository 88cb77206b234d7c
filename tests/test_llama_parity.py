"""Our LLaMA computes the same logits as Hugging Face transformers, and survives the round trip."""
import jax
import numpy as np
import pytest

from hf_reference import VARIANTS, hf_logits, make_hf_model, save_hf_model
from helpers import LAYOUTS, layout
from humpback_jax.checkpoints import hf, safetensors_io
from humpback_jax.model import build


def forward_logits(cfg, params, tokens, lay=None):
  return np.asarray(jax.jit(lambda p, t: build.forward(cfg, p, t, layout=lay)[0])(params, tokens))


@pytest.fixture(scope="module")
def tokens():
  return np.random.RandomState(0).randint(0, 101, size=(3, 40)).astype(np.int32)


def read_config(folder, scan):
  cfg = hf.read_config(folder)
  cfg.scan_layers = scan
  return cfg


SCAN = pytest.mark.parametrize("scan", [False, True], ids=["layer_list", "scan_layers"])


@SCAN
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_match_transformers(variant, scan, tokens, tmp_path):
  model = make_hf_model(variant)
  save_hf_model(model, tmp_path)
  cfg = read_config(tmp_path, scan)
  params = hf.load_params(tmp_path, cfg, layout())
  diff = np.abs(forward_logits(cfg, params, tokens) - hf_logits(model, tokens)).max()
  assert diff <= 1e-4, f"{variant}: max |logit diff| {diff}"


def test_block_causal_attention_matches_transformers(tokens, tmp_path, monkeypatch):
  from humpback_jax.model import attention
  monkeypatch.setattr(attention, "CAUSAL_BLOCK", 8)  # 40 tokens: five query blocks
  model = make_hf_model("gqa")
  save_hf_model(model, tmp_path)
  cfg = hf.read_config(tmp_path)
  params = hf.load_params(tmp_path, cfg, layout())
  assert np.abs(forward_logits(cfg, params, tokens) - hf_logits(model, tokens)).max() <= 1e-4


def test_config_json_is_read_faithfully(tmp_path):
  save_hf_model(make_hf_model("llama3_rope"), tmp_path)
  cfg = hf.read_config(tmp_path)
  assert (cfg.num_kv_heads, cfg.rope_theta, cfg.rope_scaling.factor) == (2, 500000.0, 8.0)
  assert cfg.rope_scaling.original_max_position_embeddings == 32


@SCAN
@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_sharded_logits_equal_unsharded(name, scan, tokens, tmp_path):
  model = make_hf_model("gqa", num_attention_heads=8, num_key_value_heads=4)
  save_hf_model(model, tmp_path)
  cfg = read_config(tmp_path, scan)
  single = forward_logits(cfg, hf.load_params(tmp_path, cfg, layout()), tokens)
  lay = layout(LAYOUTS[name])
  params = hf.load_params(tmp_path, cfg, lay)
  up = params["layers"]["mlp"]["up"] if scan else params["layers"][0]["mlp"]["up"]
  assert len(up.sharding.device_set) == 8
  tokens8 = np.resize(tokens, (8, 40))
  sharded = forward_logits(cfg, params, tokens8, lay)
  unsharded = forward_logits(cfg, hf.load_params(tmp_path, cfg, layout()), tokens8)
  assert np.abs(sharded - unsharded).max() <= 1e-5
  assert np.abs(unsharded[:3] - single).max() <= 1e-5


@SCAN
@pytest.mark.parametrize("variant", ["gqa", "tied"])
def test_hf_round_trip_is_bit_exact(variant, scan, tmp_path):
  save_hf_model(make_hf_model(variant), tmp_path / "in")
  cfg = read_config(tmp_path / "in", scan)
  params = hf.load_params(tmp_path / "in", cfg, layout(LAYOUTS["fsdp_tensor"]))
  hf.save(tmp_path / "out", params, cfg)
  before = hf.open_hf_tensors(tmp_path / "in")
  after = hf.open_hf_tensors(tmp_path / "out")
  assert sorted(before) == sorted(after)
  for name in before:
    assert before[name].dtype == after[name].dtype and before[name].shape == after[name].shape, name
    assert np.array_equal(before[name].view(np.uint8), after[name].view(np.uint8)), name


def test_sharded_export_writes_an_index_that_loads_back(tmp_path):
  save_hf_model(make_hf_model("gqa"), tmp_path / "in")
  cfg = hf.read_config(tmp_path / "in")
  params = hf.load_params(tmp_path / "in", cfg, layout())
  hf.save(tmp_path / "out", params, cfg, max_shard_bytes=50_000)
  assert (tmp_path / "out" / "model.safetensors.index.json").exists()
  assert len(list((tmp_path / "out").glob("model-*.safetensors"))) > 1
  again = hf.load_params(tmp_path / "out", cfg, layout())
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again)):
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_exported_folder_loads_in_transformers(tmp_path, tokens):
  import transformers
  model = make_hf_model("tied")
  save_hf_model(model, tmp_path / "in")
  cfg = hf.read_config(tmp_path / "in")
  hf.save(tmp_path / "out", hf.load_params(tmp_path / "in", cfg, layout()), cfg)
  again = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
  assert np.abs(hf_logits(again, tokens) - hf_logits(model, tokens)).max() == 0.0


@SCAN
def test_missing_tensor_is_named(scan, tmp_path):
  save_hf_model(make_hf_model("gqa"), tmp_path)
  f = tmp_path / "model.safetensors"
  tensors = {k: np.array(v) for k, v in safetensors_io.open_tensors(f).items()
             if k != "model.layers.1.mlp.up_proj.weight"}
  safetensors_io.write(f, tensors)
  cfg = read_config(tmp_path, scan)
  with pytest.raises(ValueError, match="model.layers.1.mlp.up_proj.weight"):
    hf.load_params(tmp_path, cfg, layout())


def test_qkv_split_gradient_equals_autodiff_of_the_slices():
  from humpback_jax.model import llama
  rng = np.random.default_rng(0)
  y = jax.numpy.asarray(rng.normal(size=(2, 5, 3, 4, 8)).astype(np.float32))  # [b, t, kv, g + 2, h]
  cotangents = tuple(jax.numpy.asarray(rng.normal(size=s).astype(np.float32))
                     for s in ((2, 5, 3, 2, 8), (2, 5, 3, 8), (2, 5, 3, 8)))
  plain = lambda y: (y[..., :-2, :], y[..., -2, :], y[..., -1, :])
  out, custom_vjp = jax.vjp(llama._split_qkv, y)
  expected_out, plain_vjp = jax.vjp(plain, y)
  for a, b in zip(out, expected_out):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(custom_vjp(cotangents)[0], plain_vjp(cotangents)[0])


def test_gate_up_split_has_the_autodiff_gradient():
  """The fused gate/up GEMM's output [..., mlp, 2] splits with a stack as its gradient; same values."""
  from humpback_jax.model import ops
  rng = np.random.default_rng(1)
  y = jax.numpy.asarray(rng.normal(size=(2, 5, 7, 2)).astype(np.float32))
  cotangents = tuple(jax.numpy.asarray(rng.normal(size=(2, 5, 7)).astype(np.float32)) for _ in range(2))
  out, custom_vjp = jax.vjp(ops._split_pair, y)
  expected_out, plain_vjp = jax.vjp(lambda y: (y[..., 0], y[..., 1]), y)
  for a, b in zip(out, expected_out):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(custom_vjp(cotangents)[0], plain_vjp(cotangents)[0])
