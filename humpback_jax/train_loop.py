"""The training loop: resume, step, log, checkpoint, and stop cleanly on SIGTERM or a bad loss.

Checkpoints (orbax CheckpointManager, asynchronous, keep-last-K, atomic) hold the train state and
the data loader's position; the dropout RNG is derived from the step. A resumed run therefore
produces exactly the losses the uninterrupted run would have.
"""
from __future__ import annotations

import errno
import shutil
import signal
import sys
import time
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from tqdm import tqdm

from humpback_jax import chips, distributed, metrics_log, sharding, train
from humpback_jax.errors import DataError, Preempted, TrainingDiverged


class _SigtermFlag:
  """Turns SIGTERM into a flag checked between steps (TPU preemption notice)."""

  def __init__(self):
    self.raised = False
    self._old = None

  def __enter__(self):
    try:
      self._old = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread: leave signals alone
      self._old = None
    return self

  def _handle(self, signum, frame):
    self.raised = True

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


def checkpoint_manager(workdir: Path, every: int, keep: int) -> ocp.CheckpointManager:
  """Asynchronous, keep-last-K manager of train-state + loader-state checkpoints under workdir."""
  options = ocp.CheckpointManagerOptions(save_interval_steps=every, max_to_keep=keep,
                                         enable_async_checkpointing=True)
  return ocp.CheckpointManager(Path(workdir).absolute() / "checkpoints", options=options)


def run(model_cfg, train_cfg, layout: sharding.Layout, loader, init_params, workdir: Path, *,
        total_steps: int, seq_len: int, progress: bool = True, desc: str = "train") -> dict:
  """Trains for `total_steps`, resuming from the newest checkpoint in `workdir`; returns final params and a summary.
  The progress bar is labelled `desc` (a pipeline stage's name).

  `loader` yields this process's rows of each global batch and has get_state()/set_state();
  `init_params()` is called only when there is nothing to resume.
  """
  workdir = Path(workdir)
  optimizer = train.make_optimizer(train_cfg, total_steps)
  fns = train.build_step(model_cfg, layout, optimizer, micro_batches=train_cfg.micro_batches,
                         dropout_rate=train_cfg.dropout_rate, seed=train_cfg.seed)
  manager = checkpoint_manager(workdir, train_cfg.checkpoint_every, train_cfg.keep_checkpoints)
  state, start = _restore_or_init(manager, fns, loader, init_params)
  log = metrics_log.MetricsLog(workdir)
  bar = tqdm(total=total_steps, initial=start, desc=desc, unit="step", disable=not progress or jax.process_index() != 0,
             dynamic_ncols=True)
  window_tokens, window_start = 0.0, time.perf_counter()
  peak = chips.peak_flops(jax.devices()[0].device_kind, train_cfg.peak_flops)  # per device, for MFU
  last_loss = _logged_loss(log.path, start)  # a run resumed at its last step runs none
  state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
  try:
    with _SigtermFlag() as sigterm:
      for step in range(start + 1, total_steps + 1):
        batch = train.put_batch(next(loader), fns.batch_sharding, jax.process_count())
        state, metrics = fns.step(state, batch)
        metrics = jax.device_get(metrics)
        last_loss = float(metrics["loss"])
        if not train.is_finite(last_loss):
          manager.wait_until_finished()
          good = manager.latest_step()
          where = f"{manager.directory}/{good}" if good is not None else "none (no checkpoint yet)"
          raise TrainingDiverged(f"step {step}: loss is {last_loss}; stopped. Last good checkpoint: {where}")
        window_tokens += float(metrics["tokens"])
        if manager.should_save(step):
          _check_space(Path(manager.directory), state_bytes)
        manager.save(step, args=_save_args(state, loader))
        bar.update(1)
        bar.set_postfix(loss=f"{last_loss:.4f}")
        if step % train_cfg.log_every == 0 or step == total_steps:
          elapsed = time.perf_counter() - window_start
          tok_s = window_tokens / max(elapsed, 1e-9)
          log.write(step, dict(loss=last_loss, grad_norm=float(metrics["grad_norm"]),
                               learning_rate=float(optimizer_lr(train_cfg, total_steps, step - 1)),
                               tokens_per_s=tok_s,
                               mfu=train.mfu(model_cfg, tok_s, seq_len, peak, jax.device_count())))
          window_tokens, window_start = 0.0, time.perf_counter()
        if sigterm.raised:
          manager.save(step, args=_save_args(state, loader), force=True)
          manager.wait_until_finished()
          raise Preempted(f"SIGTERM at step {step}: checkpoint saved in {manager.directory}/{step}")
    manager.wait_until_finished()
  finally:
    bar.close()
    log.close()
    manager.close()
  if jax.process_index() == 0 and log.path.exists():
    metrics_log.plot_loss(log.path, workdir / "loss.png")
  return dict(params=state["params"], final_loss=last_loss, steps=total_steps, resumed_from=start)


def _logged_loss(metrics_path: Path, step: int) -> float:
  """The loss the metrics log holds for `step` (NaN when it holds none)."""
  return next((float(r["loss"]) for r in metrics_log.read_metrics(metrics_path) if r["step"] == step), float("nan"))


def optimizer_lr(train_cfg, total_steps: int, step: int) -> float:
  """The learning rate the schedule gives at `step`."""
  return float(train.learning_rate_schedule(train_cfg, total_steps)(step))


def _save_args(state, loader):
  return ocp.args.Composite(state=ocp.args.StandardSave(state),
                            loader=ocp.args.JsonSave(loader.get_state()))


def _restore_or_init(manager, fns, loader, init_params):
  """Resumes from the newest checkpoint that restores; one that does not is set aside (named on
  stderr) and the previous complete one is tried, so a corrupt newest checkpoint costs only steps."""
  steps = sorted(manager.all_steps(), reverse=True)
  if not steps:
    return fns.init(init_params()), 0
  abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                          _abstract_state(fns), fns.state_shardings)
  for step in steps:
    try:
      restored = manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract), loader=ocp.args.JsonRestore()))
    except Exception as e:  # orbax and tensorstore raise many types for a damaged checkpoint
      aside = _set_aside(Path(manager.directory), step)
      print(f"warning: checkpoint {manager.directory}/{step} does not restore ({type(e).__name__}: "
            f"{' '.join(str(e).split())[:200]}); moved to {aside}, falling back to the previous one",
            file=sys.stderr, flush=True)
      manager.reload()
      continue
    if step != steps[0]:
      print(f"resumed from checkpoint {manager.directory}/{step}, the newest one that restores", file=sys.stderr)
    loader.set_state(restored["loader"])
    return restored["state"], int(step)
  raise DataError(f"{manager.directory}: none of the checkpoints {steps} restores (they were moved to "
                  f"{Path(manager.directory).parent / 'checkpoints.corrupt'}); delete the stage folder to "
                  "train this stage from the start", path=manager.directory)


def _check_space(directory: Path, needed: int) -> None:
  """Raises ENOSPC naming the folder before a checkpoint that cannot fit is started: a save that
  runs out of space fails inside orbax's writer threads, which print pages of tracebacks."""
  directory.mkdir(parents=True, exist_ok=True)
  free = shutil.disk_usage(directory).free
  if free < needed:
    raise OSError(errno.ENOSPC, f"No space left for a {needed / 2**20:.1f} MiB checkpoint "
                  f"({free / 2**20:.1f} MiB free)", str(directory))


def _set_aside(directory: Path, step: int) -> Path:
  """Moves a damaged checkpoint out of the manager's folder (kept for inspection, never reused)."""
  aside = directory.parent / "checkpoints.corrupt" / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
  if jax.process_index() == 0:
    aside.parent.mkdir(parents=True, exist_ok=True)
    (directory / str(step)).rename(aside)
  distributed.barrier(f"set_aside:{directory}:{step}")
  return aside


def _abstract_state(fns):
  return jax.eval_shape(fns.init, fns.abstract_params)
