"""Every user-facing failure is one line naming the file and what to do, with a documented exit code."""
import contextlib
import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from humpback_jax import cli, user_errors

ROOT = Path(__file__).resolve().parents[2]
TOY = str(ROOT / "configs" / "toy.py")


def humpback(capsys, *argv):
  code = cli.main(list(argv))
  err = capsys.readouterr().err
  return code, [line for line in err.splitlines() if line.startswith("humpback ")], err


@contextlib.contextmanager
def tmpfs(path: Path, *options):
  """A small tmpfs at `path` (root only); the test is skipped where mounting is not allowed."""
  path.mkdir(parents=True, exist_ok=True)
  if subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(path)],
                    capture_output=True).returncode:
    pytest.skip("mounting a tmpfs needs root")
  try:
    yield path
  finally:
    subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_workdir_that_is_a_file_is_named(tmp_path, capsys):
  (tmp_path / "run").write_text("not a folder")
  code, lines, err = humpback(capsys, "train", f"--config={TOY}", f"--workdir={tmp_path / 'run'}")
  assert code == user_errors.FILESYSTEM and len(lines) == 1, err
  assert f"{tmp_path / 'run'}: exists and is not a folder" in lines[0]


def test_a_read_only_workdir_is_named(tmp_path, capsys):
  with tmpfs(tmp_path / "ro", "ro", "size=1m") as ro:
    code, lines, err = humpback(capsys, "train", f"--config={TOY}", f"--workdir={ro / 'run'}")
  assert code == user_errors.FILESYSTEM and len(lines) == 1, err
  assert f"{ro / 'run'}: on a read-only file system; use a workdir on a writable disk" in lines[0]


def test_a_full_disk_before_a_checkpoint_is_named_and_the_command_exits(tmp_path, capsys):
  with tmpfs(tmp_path / "small", "size=3m") as small:
    code, lines, err = humpback(capsys, "train", f"--config={TOY}", f"--workdir={small / 'run'}",
                                "--config.train.steps=2", "--config.train.checkpoint_every=1",
                                "--config.mesh.shape=(-1,1,1)")
  assert code == user_errors.FILESYSTEM and len(lines) == 1, err
  assert "run/checkpoints: the disk is full; free space" in lines[0] and "MiB free" in lines[0]


def test_a_disk_that_fills_during_a_checkpoint_save_exits_with_one_line(tmp_path):
  """Few inodes: the free-space check passes, then orbax's writer threads run out of room mid-save."""
  with tmpfs(tmp_path / "small", "size=64m", "nr_inodes=40") as small:
    done = subprocess.run([sys.executable, "-m", "humpback_jax.cli", "train", f"--config={TOY}",
                           f"--workdir={small / 'run'}", "--config.train.steps=2", "--config.train.checkpoint_every=1",
                           "--config.mesh.shape=(-1,1,1)"], cwd=ROOT, env=dict(os.environ, JAX_NUM_CPU_DEVICES="1"),
                          capture_output=True, text=True, timeout=600)
    interrupted = list(small.rglob("*.orbax-checkpoint-tmp"))
  lines = [line for line in done.stderr.split("\n") if line.strip() and "%|" not in line]  # not the progress bar
  # orbax's save was under way (not our free-space check): its temporary folder is left, or, when the
  # inodes ran out at that folder's creation, the message names it
  inside_orbax = interrupted or ".orbax-checkpoint-tmp: the disk is full" in done.stderr
  assert done.returncode == user_errors.FILESYSTEM and inside_orbax, done.stderr[-3000:]
  assert lines[-1].startswith("humpback train: error: ") and "the disk is full; free space" in lines[-1], lines[-20:]
  assert not [line for line in lines[:-1] if "orbax" in line], lines[:20]  # its writer threads' logs are held back


def test_verbose_adds_the_traceback(tmp_path, capsys):
  (tmp_path / "run").write_text("not a folder")
  code, lines, err = humpback(capsys, "train", f"--config={TOY}", f"--workdir={tmp_path / 'run'}", "--verbose")
  assert code == user_errors.FILESYSTEM and "Traceback (most recent call last)" in err and len(lines) == 1


def test_plan_with_zero_devices_is_a_usage_error(capsys):
  with pytest.raises(SystemExit) as exit_:
    cli.main(["plan", f"--config={TOY}", "--devices=0"])
  assert exit_.value.code == 2 and "--devices: must be at least 1, got 0" in capsys.readouterr().err


@pytest.mark.parametrize("exc, code, text", [
    (OSError(errno.ENOSPC, "No space left on device", "/w/x"), user_errors.FILESYSTEM, "/w/x: the disk is full"),
    (PermissionError(errno.EACCES, "Permission denied", "/w"), user_errors.FILESYSTEM, "/w: not writable"),
    (NotADirectoryError(errno.ENOTDIR, "Not a directory", "/w/f/x"), user_errors.FILESYSTEM, "/w/f/x: a file where a folder"),
    (ValueError("RESOURCE_EXHAUSTED: Failed writing ... No space left on device"), user_errors.FILESYSTEM,
     "/w: the disk is full"),
    (KeyError("x"), user_errors.INTERNAL, "internal error KeyError: 'x'; rerun with --verbose"),
])
def test_each_error_kind_has_its_exit_code_and_one_line(exc, code, text):
  got, message = user_errors.describe(exc, "/w")
  assert got == code and text in message and "\n" not in message


def test_the_exit_codes_are_documented_in_help_and_readme():
  help_text = cli.build_parser().format_help()
  readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
  for code in ("0", "1", "2", "3", "4", "5", "70"):
    assert f"{code} " in help_text.split("exit codes:")[1]
  assert "exit code" in readme.lower() and "| 3 |" in readme


def test_a_model_only_config_in_pipeline_names_the_missing_sections(tmp_path, capsys):
  code, lines, err = humpback(capsys, "pipeline", "--config=configs/llama.py:variant=65b", f"--workdir={tmp_path / 'run'}")
  assert code == user_errors.BAD_INPUT and len(lines) == 1, err
  assert "--config: not a pipeline config: it has no base, data, corpus, pipeline section(s)" in lines[0]
