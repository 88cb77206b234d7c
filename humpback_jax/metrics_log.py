"""Where training metrics go: a JSONL file, TensorBoard event files and a loss-curve PNG.

Only process 0 writes; other processes get a writer that does nothing.
"""
from __future__ import annotations

import json
from pathlib import Path

import jax

from humpback_jax.errors import DataError


class MetricsLog:
  """Appends one JSON line and one TensorBoard scalar set per logged step."""

  def __init__(self, workdir: Path):
    self.enabled = jax.process_index() == 0
    self.path = Path(workdir) / "metrics.jsonl"
    self._tb = None
    if self.enabled:
      from tensorboardX import SummaryWriter
      self.path.parent.mkdir(parents=True, exist_ok=True)
      _drop_torn_tail(self.path)
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


def _drop_torn_tail(path: Path) -> None:
  """Cuts a last line left unfinished by a killed run, so the resumed run appends whole lines
  (the step it held is logged again after the resume)."""
  if not path.exists():
    return
  data = path.read_bytes()
  if data and not data.endswith(b"\n"):
    with open(path, "r+b") as f:
      f.truncate(data.rfind(b"\n") + 1)


def read_metrics(path: Path) -> list[dict]:
  """The metric lines written so far, the last one per step (a resumed run rewrites some steps).
  An unfinished last line (a killed write) is left out; a damaged earlier line is named."""
  by_step = {}
  if Path(path).exists():
    text = Path(path).read_text()
    lines = text.splitlines()
    for n, line in enumerate(lines, 1):
      if not line.strip():
        continue
      try:
        rec = json.loads(line)
        by_step[rec["step"]] = rec
      except (json.JSONDecodeError, KeyError, TypeError) as e:
        if n == len(lines) and not text.endswith("\n"):
          break
        raise DataError(f"{path}:{n}: not a metrics record ({type(e).__name__}: {e}); delete the line or the "
                        "file (it only feeds the loss curve and the report)", path=path, line=n) from None
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
