"""Config mistakes fail before anything compiles, with a message naming the field."""
import pytest

from humpback_jax import config, configlib, sharding
from humpback_jax.config import model_config, validate_model
from humpback_jax.errors import ConfigError


def load(arg="toy", *overrides):
  return configlib.load_config(f"configs/llama.py:{arg}", list(overrides))


def test_mesh_product_must_equal_device_count():
  cfg = load("variant=toy,mesh=cpu8_data")
  with pytest.raises(ConfigError, match=r"mesh.shape: product of \(8, 1, 1\) is 8, but there are 4 devices"):
    config.check(cfg, num_devices=4)


def test_mesh_fill_axis_must_divide_devices():
  with pytest.raises(ConfigError, match=r"mesh.shape: \(3, -1, 1\) cannot fill 8 devices"):
    sharding.resolve_mesh_shape((3, -1, 1), 8)


def test_only_one_mesh_axis_may_be_minus_one():
  with pytest.raises(ConfigError, match="mesh.shape: at most one axis may be -1"):
    sharding.resolve_mesh_shape((-1, -1, 1), 8)


def test_heads_must_divide_over_tensor_axis():
  cfg = load("variant=smollm2_135m,mesh=cpu8_fsdp_tensor")
  with pytest.raises(ConfigError, match=r"model.num_heads: 9 heads cannot be split over the tensor axis of size 2"):
    config.check(cfg, num_devices=8)


def test_unknown_model_preset_lists_the_known_ones():
  with pytest.raises(ConfigError, match=r"model preset '7c' is unknown; known: .*65b"):
    load("7c")


def test_unknown_mesh_preset():
  with pytest.raises(ConfigError, match=r"mesh preset 'tpu_v9' is unknown"):
    load("variant=7b,mesh=tpu_v9")


def test_unknown_override_key_is_named():
  with pytest.raises(ConfigError, match=r"config.model.num_layerz: unknown field"):
    load("toy", "config.model.num_layerz=2")


def test_override_type_is_checked():
  with pytest.raises(ConfigError, match=r"config.model.num_layers: expected int"):
    load("toy", "config.model.num_layers=two")


def test_overrides_apply():
  cfg = load("7b", "config.model.num_layers=2", "config.mesh.shape=(1,8,1)")
  assert (cfg.model.num_layers, cfg.model.dim, tuple(cfg.mesh.shape)) == (2, 4096, (1, 8, 1))


def test_kv_heads_must_divide_heads():
  with pytest.raises(ConfigError, match="model.num_kv_heads: 3 does not divide model.num_heads=8"):
    validate_model(model_config(num_heads=8, num_kv_heads=3, dim=64))


def test_micro_batches_must_divide_batch():
  cfg = load("toy", "config.train.micro_batches=3")
  with pytest.raises(ConfigError, match="train.micro_batches: 3 must divide train.batch_size=32"):
    config.check(cfg, num_devices=8)


def test_batch_must_split_over_data_devices():
  cfg = load("variant=toy,mesh=cpu8_data", "config.train.batch_size=4")
  with pytest.raises(ConfigError, match="train.batch_size: a micro-batch of 4 examples cannot be split over 8"):
    config.check(cfg, num_devices=8)


def test_curation_share_must_be_a_fraction():
  cfg = configlib.load_config("configs/toy.py", ["config.pipeline.keep_top_fraction=1.5"])
  with pytest.raises(ConfigError, match=r"pipeline.keep_top_fraction: must be in \(0, 1\], got 1.5"):
    config.check(cfg, num_devices=1)


def test_unknown_model_field_in_code():
  with pytest.raises(ConfigError, match="model.hidden: unknown model field"):
    model_config(hidden=3)
