"""XLA:CPU settings we measured to be faster, applied before JAX starts its CPU backend.

jaxlib 0.10's XLA:CPU sends dots to YNNPACK/XNNPACK fusions by default. On the bench20m
training step (bench/train.py, 2 cores) its Eigen GEMMs were faster (bench/RESULTS.md), and
decode a few percent faster; YNN fusions also miscompiled one attention form
(see model/attention.py). Flags the user already set win; HUMPBACK_XLA_DEFAULTS=0 skips these.
"""
from __future__ import annotations

import os

CPU_FLAGS = ("--xla_cpu_use_xnnpack=false", "--xla_cpu_experimental_ynn_fusion_type=")


def with_cpu_defaults(xla_flags: str) -> str:
  """`xla_flags` plus each of CPU_FLAGS whose flag name it does not set already."""
  present = {f.split("=")[0] for f in xla_flags.split()}
  missing = [f for f in CPU_FLAGS if f.split("=")[0] not in present]
  return " ".join([xla_flags, *missing]).strip()


def apply_cpu_defaults(environ=os.environ) -> None:
  """Adds CPU_FLAGS to XLA_FLAGS in `environ` (read when the backend starts) unless opted out."""
  if environ.get("HUMPBACK_XLA_DEFAULTS", "1") != "0":
    environ["XLA_FLAGS"] = with_cpu_defaults(environ.get("XLA_FLAGS", ""))
