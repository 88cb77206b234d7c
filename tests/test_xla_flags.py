"""Our XLA:CPU defaults are added to XLA_FLAGS where the CPU backend runs, never override the user's,
and can be switched off."""
from humpback_jax import xla_flags


def test_defaults_are_added_to_empty_flags():
  env = {}
  xla_flags.apply_cpu_defaults(env, accelerator_files=())
  assert env["XLA_FLAGS"].split() == list(xla_flags.CPU_FLAGS)


def test_a_flag_the_user_set_is_kept_as_set():
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_cpu_use_xnnpack=true"}
  xla_flags.apply_cpu_defaults(env, accelerator_files=())
  flags = env["XLA_FLAGS"].split()
  assert "--xla_cpu_use_xnnpack=true" in flags and "--xla_cpu_use_xnnpack=false" not in flags
  assert flags[0] == "--xla_force_host_platform_device_count=8"
  assert "--xla_cpu_experimental_ynn_fusion_type=" in flags


def test_applying_twice_adds_nothing():
  env = {}
  xla_flags.apply_cpu_defaults(env, accelerator_files=())
  once = env["XLA_FLAGS"]
  xla_flags.apply_cpu_defaults(env, accelerator_files=())
  assert env["XLA_FLAGS"] == once


def test_opt_out_leaves_the_flags_alone():
  env = {"HUMPBACK_XLA_DEFAULTS": "0", "XLA_FLAGS": "--xla_cpu_use_xnnpack=true"}
  xla_flags.apply_cpu_defaults(env)
  assert env["XLA_FLAGS"] == "--xla_cpu_use_xnnpack=true"



def test_a_tpu_or_gpu_process_keeps_its_flags():
  env = {"JAX_PLATFORMS": "tpu", "XLA_FLAGS": "--xla_dump_to=/tmp/x"}
  xla_flags.apply_cpu_defaults(env)
  assert env["XLA_FLAGS"] == "--xla_dump_to=/tmp/x"
  env = {}
  xla_flags.apply_cpu_defaults(env, accelerator_files=(__file__,))  # a device file that exists
  assert "XLA_FLAGS" not in env


def test_jax_platforms_cpu_applies_them_even_beside_an_accelerator():
  env = {"JAX_PLATFORMS": "cpu"}
  xla_flags.apply_cpu_defaults(env, accelerator_files=(__file__,))
  assert env["XLA_FLAGS"].split() == list(xla_flags.CPU_FLAGS)


def test_a_machine_without_accelerators_pins_jax_to_the_cpu():
  env = {}
  xla_flags.pin_cpu_without_accelerator(env, accelerator_files=())
  assert env["JAX_PLATFORMS"] == "cpu"


def test_an_accelerator_or_the_users_choice_leaves_jax_platforms_alone():
  env = {}
  xla_flags.pin_cpu_without_accelerator(env, accelerator_files=(__file__,))  # a device file that exists
  assert "JAX_PLATFORMS" not in env
  env = {"JAX_PLATFORMS": "tpu"}
  xla_flags.pin_cpu_without_accelerator(env, accelerator_files=())
  assert env["JAX_PLATFORMS"] == "tpu"
