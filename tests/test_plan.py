"""The planner tells from shapes alone whether a job fits, before anything is launched."""
import pytest

from humpback_jax import configlib, plan
from humpback_jax.errors import ConfigError

# LLaMA-65B by hand: embed + head 2 x 32000 x 8192; per layer 4 x 8192^2 (attention)
# + 3 x 8192 x 22016 (MLP) + 2 x 8192 (norms); final norm 8192.
LLAMA_65B_PARAMS = 2 * 32000 * 8192 + 80 * (4 * 8192**2 + 3 * 8192 * 22016 + 2 * 8192) + 8192


def config(mesh, *overrides):
  return configlib.load_config(f"configs/llama.py:variant=65b,mesh={mesh}",
                               ["config.model.remat_policy='full'", "config.train.batch_size=64", *overrides])


def test_65b_full_finetune_does_not_fit_eight_80gb_devices():
  p = plan.plan(config("gpu8"), 8, device_gib=80)
  assert not p.fits
  assert "does NOT fit" in p.table()


def test_65b_full_finetune_fits_a_64_device_fsdp_mesh():
  p = plan.plan(config("fsdp"), 64, device_gib=80)
  assert p.fits


def test_per_device_parameter_bytes_match_hand_computation():
  p = plan.plan(config("fsdp"), 64)
  # Every 65B weight matrix divides by 64 along its fsdp (embed) axis; the 1-D norms stay whole.
  norms = (2 * 80 + 1) * 8192
  expected = ((LLAMA_65B_PARAMS - norms) // 64 + norms) * 4
  assert p.params == expected
  assert p.optimizer == 2 * expected and p.gradients == expected


def test_mesh_that_does_not_divide_the_devices_fails_first():
  with pytest.raises(ConfigError, match=r"mesh.shape: product of \(1, 8, 1\) is 8, but there are 6 devices"):
    plan.plan(config("gpu8"), 6)
