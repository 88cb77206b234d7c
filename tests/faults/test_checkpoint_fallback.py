"""A newest checkpoint that does not restore is set aside, named, and the previous complete one is used."""
from pathlib import Path

import jax
import numpy as np
import pytest

from humpback_jax.errors import DataError
from test_train_loop import run  # the tiny training run of the loop's own tests (tests/ is on the path)


def damage(step_dir: Path) -> None:
  """Overwrites every data file of a checkpoint step with garbage of the same size."""
  for f in step_dir.rglob("*"):
    if f.is_file():
      f.write_bytes(b"\x00garbage" * (f.stat().st_size // 8 + 1))


def params_equal(a, b) -> bool:
  return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one_and_says_so(tmp_path, capsys):
  uninterrupted = run(tmp_path / "straight", steps=6)
  run(tmp_path / "run", steps=4)  # checkpoints at steps 2 and 4
  damage(tmp_path / "run" / "checkpoints" / "4")
  resumed = run(tmp_path / "run", steps=6)
  err = capsys.readouterr().err
  assert "checkpoints/4 does not restore" in err and "falling back to the previous one" in err
  assert "resumed from checkpoint" in err and "checkpoints/2" in err
  assert resumed["resumed_from"] == 2
  assert params_equal(resumed["params"], uninterrupted["params"])
  assert list((tmp_path / "run" / "checkpoints.corrupt").glob("4-*"))


def test_when_no_checkpoint_restores_the_folder_is_named(tmp_path):
  run(tmp_path / "run", steps=2, keep_checkpoints=1)
  damage(tmp_path / "run" / "checkpoints" / "2")
  with pytest.raises(DataError, match=r"checkpoints: none of the checkpoints \[2\] restores"):
    run(tmp_path / "run", steps=4)
