"""One writer per workdir: a second run is refused naming the holder; a dead holder's lock is taken over."""
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from humpback_jax import workdir_lock
from humpback_jax.errors import LockError

ROOT = Path(__file__).resolve().parents[2]


def dead_pid() -> int:
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()
  return proc.pid


def test_a_second_holder_is_refused_naming_the_first(tmp_path):
  with workdir_lock.hold(tmp_path, "humpback pipeline") as me:
    with pytest.raises(LockError, match=rf"in use by another run \(pid {os.getpid()} on \S+, started .*humpback pipeline"):
      workdir_lock.acquire(tmp_path, "humpback train")
    assert workdir_lock.read_holder(tmp_path) == me
  assert workdir_lock.read_holder(tmp_path) is None  # released at the end


def test_a_lock_of_a_dead_process_is_taken_over_with_a_warning(tmp_path, capsys):
  stale = workdir_lock.Holder(pid=dead_pid(), host=os.uname().nodename, started="yesterday", command="humpback pipeline")
  workdir_lock.lock_path(tmp_path).write_text(json.dumps(dataclasses.asdict(stale)))
  me = workdir_lock.acquire(tmp_path, "humpback pipeline")
  assert me.pid == os.getpid() and workdir_lock.read_holder(tmp_path) == me
  assert f"taking over the lock of pid {stale.pid}" in capsys.readouterr().err


def test_a_lock_held_on_another_host_is_never_judged_stale(tmp_path):
  other = workdir_lock.Holder(pid=dead_pid(), host="another-host", started="now", command="humpback pipeline")
  workdir_lock.lock_path(tmp_path).write_text(json.dumps(dataclasses.asdict(other)))
  with pytest.raises(LockError, match=f"pid {other.pid} on another-host"):
    workdir_lock.acquire(tmp_path, "humpback pipeline")


def test_release_leaves_a_lock_taken_over_by_another_run_alone(tmp_path):
  me = workdir_lock.acquire(tmp_path, "humpback pipeline")
  other = dataclasses.replace(me, pid=me.pid + 1)
  workdir_lock.lock_path(tmp_path).write_text(json.dumps(dataclasses.asdict(other)))
  workdir_lock.release(tmp_path, me)
  assert workdir_lock.read_holder(tmp_path) == other


FAST = ["--config=configs/toy.py", "--until=prepare_corpus"]
# Through the first trained models and the augmentation (minutes on 2 cores): `-m slow`.
THROUGH_AUGMENT = ["--config=configs/toy.py", "--until=augment", "--config.pretrain.steps=4", "--config.train.steps=2",
                   "--config.generate.max_new_tokens=4", "--config.generate.shard_size=32",
                   "--config.generate.batch_size=16", "--config.generate.prompt_buckets=(512,1024,2048)"]


def pipeline(workdir, flags=FAST):
  return subprocess.Popen([sys.executable, "-m", "humpback_jax.cli", "pipeline", f"--workdir={workdir}", *flags],
                          cwd=ROOT, env=dict(os.environ, JAX_NUM_CPU_DEVICES="1"), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def artifacts(workdir: Path) -> dict:
  """Each finished stage's outputs as its manifest records them (record counts and sha256)."""
  return {p.parent.name: json.loads(p.read_text())["outputs"] for p in sorted(workdir.glob("*/manifest.json"))}


def two_at_once_then_alone(tmp_path, flags) -> tuple[dict, dict]:
  """Starts two pipelines on one workdir at once, checks one ran and one was refused, then runs one
  alone on a fresh workdir; returns both workdirs' recorded outputs."""
  first, second = pipeline(tmp_path / "run", flags), pipeline(tmp_path / "run", flags)
  results = [(p, *p.communicate(timeout=1800)) for p in (first, second)]
  codes = sorted(p.returncode for p, _, _ in results)
  assert codes == [0, 3], [(p.returncode, err[-2000:]) for p, _, err in results]
  (_, _, refused_err), = [r for r in results if r[0].returncode == 3]
  assert "in use by another run (pid " in refused_err and len(refused_err.strip().splitlines()) == 1
  alone = pipeline(tmp_path / "alone", flags)
  assert alone.wait(timeout=1800) == 0
  assert not workdir_lock.lock_path(tmp_path / "run").exists()
  return artifacts(tmp_path / "run"), artifacts(tmp_path / "alone")


def test_two_pipelines_started_at_once_one_runs_the_other_exits_naming_the_holder(tmp_path):
  together, alone = two_at_once_then_alone(tmp_path, FAST)
  assert together == alone and set(together) == {"prepare_seed", "prepare_corpus"}


@pytest.mark.slow
def test_two_pipelines_through_augmentation_give_the_uninterrupted_candidates(tmp_path):
  together, alone = two_at_once_then_alone(tmp_path, THROUGH_AUGMENT)
  assert together["augment"] == alone["augment"] and together["augment"]["candidates.jsonl"]["records"] > 0


def test_a_run_refused_by_the_lock_stops_before_touching_the_workdir(tmp_path):
  with workdir_lock.hold(tmp_path / "run", "humpback pipeline"):
    start = time.time()
    done = subprocess.run([sys.executable, "-m", "humpback_jax.cli", "train", f"--workdir={tmp_path / 'run'}",
                           "--config=configs/toy.py"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 3, done.stderr[-2000:]
    assert f"in use by another run (pid {os.getpid()}" in done.stderr
    assert all(p.name.startswith(".humpback.lock") for p in (tmp_path / "run").iterdir())
    print(f"refused after {time.time() - start:.1f} s")


def test_a_two_process_job_on_a_held_workdir_stops_on_every_process(tmp_path):
  env = dict(os.environ, HUMPBACK_LOG_DIR=str(tmp_path / "logs"), HUMPBACK_DEVICES_PER_PROCESS="1")
  with workdir_lock.hold(tmp_path / "run", "humpback pipeline"):
    done = subprocess.run(["launch/local_cpu.sh", "2", sys.executable, "-m", "humpback_jax.cli", "train",
                           "--config=configs/toy.py", f"--workdir={tmp_path / 'run'}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  logs = {p.name: p.read_text() for p in sorted((tmp_path / "logs").glob("*.log"))}
  assert done.returncode != 0 and len(logs) == 2, logs
  assert f"in use by another run (pid {os.getpid()}" in logs["process_0.log"]
  assert "process 0 could not take the workdir lock" in logs["process_1.log"]
