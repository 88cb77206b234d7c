"""Accelerators by device kind: memory per chip and peak dense bf16 FLOP/s (vendors' data sheets).

The planner compares compiled programs against `hbm_bytes`; training's MFU divides by
`peak_flops`. Keys are JAX's `device.device_kind` strings.
"""
from __future__ import annotations

import dataclasses

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  """One accelerator chip: its name as people say it, HBM bytes, peak dense bf16 FLOP/s."""
  name: str
  hbm_bytes: int
  peak_flops: float


CHIPS = {
    "TPU v4": Chip("TPU v4", 32 * GIB, 275e12),
    "TPU v5 lite": Chip("TPU v5e", 16 * GIB, 197e12),
    "TPU v5": Chip("TPU v5p", 95 * GIB, 459e12),
    "TPU v6 lite": Chip("TPU v6e", 32 * GIB, 918e12),
    "NVIDIA H100 80GB HBM3": Chip("H100 SXM", 80 * 10**9, 989e12),
    "NVIDIA H200": Chip("H200 SXM", 141 * 10**9, 989e12),
    "NVIDIA A100-SXM4-80GB": Chip("A100 80GB", 80 * 10**9, 312e12),
}


def chip(device_kind: str) -> Chip | None:
  """The chip of a JAX device kind, or None where the table has none (CPUs, other parts)."""
  return CHIPS.get(device_kind)


def peak_flops(device_kind: str, fallback: float) -> float:
  """Peak FLOP/s per device for MFU: the table's for a known chip, else `fallback` (the config's
  `train.peak_flops`, which is for CPUs)."""
  found = chip(device_kind)
  return found.peak_flops if found else fallback
