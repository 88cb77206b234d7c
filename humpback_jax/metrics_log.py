"""Where training metrics go: a JSONL file, TensorBoard event files and a loss-curve PNG.

Only process 0 writes; other processes get a writer that does nothing.
"""
from __future__ import annotations

import json
from pathlib import Path

import jax


class MetricsLog:
  """Appends one JSON line and one TensorBoard scalar set per logged step."""

  def __init__(self, workdir: Path):
    self.enabled = jax.process_index() == 0
    self.path = Path(workdir) / "metrics.jsonl"
    self._tb = None
    if self.enabled:
      from tensorboardX import SummaryWriter
      self.path.parent.mkdir(parents=True, exist_ok=True)
      self._tb = SummaryWriter(str(Path(workdir) / "tensorboard"))

  def write(self, step: int, metrics: dict) -> None:
    """Records `metrics` (floats) at `step`."""
    if not self.enabled:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps(dict(step=step, **metrics)) + "\n")
    for k, v in metrics.items():
      self._tb.add_scalar(f"train/{k}", v, step)

  def close(self) -> None:
    """Flushes the event files."""
    if self._tb is not None:
      self._tb.close()


def read_metrics(path: Path) -> list[dict]:
  """The metric lines written so far, the last one per step (a resumed run rewrites some steps)."""
  by_step = {}
  if Path(path).exists():
    for line in Path(path).read_text().splitlines():
      if line.strip():
        rec = json.loads(line)
        by_step[rec["step"]] = rec
  return [by_step[s] for s in sorted(by_step)]


def plot_loss(metrics_path: Path, png_path: Path) -> None:
  """Draws the loss curve of a metrics JSONL file into a PNG."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  rows = read_metrics(metrics_path)
  fig, ax = plt.subplots(figsize=(6, 4))
  ax.plot([r["step"] for r in rows], [r["loss"] for r in rows])
  ax.set_xlabel("step")
  ax.set_ylabel("loss (output tokens)")
  ax.set_yscale("log")
  ax.grid(True, alpha=0.3)
  fig.tight_layout()
  fig.savefig(png_path, dpi=100)
  plt.close(fig)
