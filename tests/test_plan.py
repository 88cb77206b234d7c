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


def _continuous(*overrides):
  return configlib.load_config("configs/llama.py:variant=7b,mesh=fsdp", [
      "config.generate.scheduler='continuous'", "config.generate.batch_size=64", "config.generate.max_new_tokens=512",
      "config.generate.prefill_chunk=512", *overrides])


def test_the_continuous_engines_shapes_are_the_schedulers():
  c = plan.continuous_shape(_continuous("config.generate.prefill_rows=24"), 8, 1024)
  # groups are the batch shards times a power of two (8, 16; not 24); the group cache is the bucket in
  # whole chunks plus one chunk, the ring that plus the new tokens
  assert (c.slots, c.rows, c.chunk, c.width, c.max_new) == (64, 16, 512, 1536, 512)


def test_the_continuous_engines_cache_is_its_slot_ring_plus_a_prefill_group_and_a_prefix():
  cfg = _continuous("config.generate.prefill_rows=16")
  p = plan.plan(cfg, 8, mode="generate", batch=64, seq_len=1023 + 512, prompt_len=1024)
  slot = 2 * 32 * 32 * 128 * 4  # LLaMA-7B: layers x kv heads x head_dim, k and v, float32
  assert p.kv_cache == (64 // 8 * (1536 + 512) + (16 // 8 + 1) * 1536) * slot
  assert p.global_batch == 64


def test_slots_that_do_not_split_over_the_batch_shards_name_the_field():
  with pytest.raises(ConfigError, match=r"generate.decode_slots: 60 slots do not split over 8 batch shards"):
    plan.continuous_shape(_continuous("config.generate.decode_slots=60"), 8, 1024)
