"""On a machine that can run our CPU kernels, they build: a compile error fails here instead of
quietly turning the kernel tests into skips (tests/test_kernels.py skips where they cannot run)."""
import os
import platform

import pytest

from humpback_jax.kernels import cpu as cpu_kernels

CAN_RUN = (platform.machine().lower() in ("x86_64", "amd64") and {"avx2", "fma"} <= cpu_kernels._cpu_flags()
           and cpu_kernels._compiler() is not None and os.environ.get("HUMPBACK_CPU_KERNELS", "1") != "0")


@pytest.mark.skipif(not CAN_RUN, reason="no x86-64 AVX2/FMA CPU or no C++ compiler, or kernels switched off")
def test_kernels_compile_and_register_where_they_can_run(tmp_path, monkeypatch):
  monkeypatch.setenv("HUMPBACK_KERNEL_CACHE", str(tmp_path))  # a fresh build, not a cached library
  library = cpu_kernels.build(cpu_kernels._compiler())  # raises with the compiler's log on an error
  assert library.exists() and library.parent == tmp_path
  assert cpu_kernels.available()
