"""XLA:CPU settings we measured to be faster, applied before JAX starts its CPU backend.

jaxlib 0.10's XLA:CPU sends dots to YNNPACK/XNNPACK fusions by default. On the bench20m
training step (bench/train.py, 2 cores) its Eigen GEMMs were faster (bench/RESULTS.md), and
decode a few percent faster; YNN fusions also miscompiled one attention form
(see model/attention.py). Flags the user already set win; HUMPBACK_XLA_DEFAULTS=0 skips these.
They are added only where the CPU is the backend JAX will use: `JAX_PLATFORMS` names cpu first, or
it is unset and the machine has no TPU or GPU device file (a TPU VM or GPU node keeps its flags).

On such a machine `JAX_PLATFORMS` is also pinned to cpu when unset: with libtpu installed (the
`tpu` and `test` extras) JAX would otherwise start libtpu, which prints a block of "Failed to find
host bounds" errors on a host without TPU chips before JAX falls back to the CPU.
"""
from __future__ import annotations

import os

CPU_FLAGS = ("--xla_cpu_use_xnnpack=false", "--xla_cpu_experimental_ynn_fusion_type=")
ACCELERATOR_FILES = ("/dev/accel0", "/dev/vfio/0", "/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg", "/dev/kfd")


def with_cpu_defaults(xla_flags: str) -> str:
  """`xla_flags` plus each of CPU_FLAGS whose flag name it does not set already."""
  present = {f.split("=")[0] for f in xla_flags.split()}
  missing = [f for f in CPU_FLAGS if f.split("=")[0] not in present]
  return " ".join([xla_flags, *missing]).strip()


def uses_cpu_backend(environ=os.environ, accelerator_files=ACCELERATOR_FILES) -> bool:
  """Whether JAX will run on its CPU backend, told without starting any backend."""
  platforms = environ.get("JAX_PLATFORMS", "").strip()
  if platforms:
    return platforms.split(",")[0].strip() == "cpu"
  return not any(os.path.exists(f) for f in accelerator_files)


def apply_cpu_defaults(environ=os.environ, accelerator_files=ACCELERATOR_FILES) -> None:
  """Adds CPU_FLAGS to XLA_FLAGS in `environ` (read when the backend starts) unless opted out or
  the process will run on an accelerator."""
  if environ.get("HUMPBACK_XLA_DEFAULTS", "1") != "0" and uses_cpu_backend(environ, accelerator_files):
    environ["XLA_FLAGS"] = with_cpu_defaults(environ.get("XLA_FLAGS", ""))


def pin_cpu_without_accelerator(environ=os.environ, accelerator_files=ACCELERATOR_FILES) -> None:
  """Sets JAX_PLATFORMS=cpu where it is unset and no accelerator device file exists (the CPU is all
  JAX could use), so no TPU or GPU runtime is started only to fail; a user's setting is kept."""
  if not environ.get("JAX_PLATFORMS", "").strip() and not any(os.path.exists(f) for f in accelerator_files):
    environ["JAX_PLATFORMS"] = "cpu"
