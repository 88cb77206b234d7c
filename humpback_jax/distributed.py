"""The one place that starts JAX's multi-controller runtime, and logs the topology once.

On TPU VMs, SLURM and Open MPI `jax.distributed.initialize()` finds the coordinator itself;
elsewhere pass it explicitly (`launch/local_cpu.sh` does, for N processes on one machine).
"""
from __future__ import annotations

import os

# Variables that mean this process is one of several (set by launch/local_cpu.sh, SLURM, Open MPI, TPU VMs).
MULTI_PROCESS_ENV = ("HUMPBACK_COORDINATOR", "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES")


def launched_multi_process() -> bool:
  """True when the environment says this process is part of a multi-process job (no JAX import)."""
  return any(v in os.environ for v in MULTI_PROCESS_ENV)


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               local_device_ids: list[int] | None = None) -> None:
  """Initialises jax.distributed from arguments or HUMPBACK_* variables; no-op for one process."""
  import jax
  coordinator = coordinator or os.environ.get("HUMPBACK_COORDINATOR")
  num_processes = num_processes or _int_env("HUMPBACK_NUM_PROCESSES")
  process_id = process_id if process_id is not None else _int_env("HUMPBACK_PROCESS_ID")
  auto = any(v in os.environ for v in MULTI_PROCESS_ENV[1:])
  if coordinator:
    jax.distributed.initialize(coordinator, num_processes, process_id, local_device_ids=local_device_ids)
  elif auto:
    jax.distributed.initialize(local_device_ids=local_device_ids)
  else:
    return
  if jax.process_index() == 0:
    print(f"jax.distributed: {jax.process_count()} processes, {jax.device_count()} devices "
          f"({jax.local_device_count()} local, {jax.devices()[0].platform})", flush=True)


def _int_env(name: str) -> int | None:
  value = os.environ.get(name)
  return int(value) if value else None


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier `name` (nothing to wait for with one process)."""
  import jax
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(f"humpback:{name}")
