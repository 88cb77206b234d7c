"""The paper's models on real TPU slices: `humpback plan --compile` on the smallest slice each fits.

  ALLOW_MULTIPLE_LIBTPU_LOAD=1 nice python bench/tpu_plans.py [--models llama1_7b,...] [--modes train,generate]
      [--families v4,v5e,v5p,v6e] [--compile-families v5p,...] [--jobs 2] [--timeout 1800]
      [--store compiled.json] > table.md

Per (model, mode, chip family) our estimate picks the smallest slice it says fits; for the families
in --compile-families that slice is compiled (configs/humpback.py: bf16 compute over float32 master
weights, scanned layers, full remat, fsdp, splash attention), walking up the sizes until XLA says it
fits; the other rows are the estimate alone (no compile: minutes each on a small host), or with
--stored-only every row shows what --store holds for its slice. Training: batch 32 x 2048 tokens;
generation: batch 256, 1,024 prompt + 512 new tokens, by the static engine (`generate`) or the continuous one
(`continuous`: 256 slots, prefill groups of 16 x 512 tokens). Each compile is its own `humpback plan` process (libtpu holds its memory).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from humpback_jax import chips  # noqa: E402

SLICES = {  # smallest first; v4 and v5p count chips of 2 TensorCores (megacore)
    "v4": ["v4:2x2x1", "v4:2x2x2", "v4:2x2x4", "v4:2x4x4", "v4:4x4x4", "v4:4x4x8"],
    "v5e": ["v5e:2x2", "v5e:2x4", "v5e:4x4", "v5e:4x8", "v5e:8x8", "v5e:8x16", "v5e:16x16"],
    "v5p": ["v5p:2x2x1", "v5p:2x2x2", "v5p:2x2x4", "v5p:2x4x4", "v5p:4x4x4", "v5p:4x4x8"],
    "v6e": ["v6e:2x2", "v6e:2x4", "v6e:4x4", "v6e:4x8", "v6e:8x8", "v6e:8x16", "v6e:16x16"],
}
STORE, STORE_PATH, STORE_LOCK, STORED_ONLY = {}, None, threading.Lock(), False  # --store: compile results by "model mode topology"
KINDS = {"v4": "TPU v4", "v5e": "TPU v5 lite", "v5p": "TPU v5", "v6e": "TPU v6 lite"}  # chips.py's keys
MODELS = ("llama1_7b", "llama1_13b", "llama1_33b", "llama1_65b", "llama2_70b", "llama3_8b")
MODES = {
    "train": ["--config.train.batch_size=32", "--config.train.seq_len=2048"],
    "generate": ["--mode=generate", "--config.generate.batch_size=256", "--config.generate.max_new_tokens=512",
                 "--prompt-len=1024"],
}
# The continuous engine on the same job: 256 decode slots, prompts prefilled 16 at a time in 512-token chunks.
MODES["continuous"] = [*MODES["generate"], "--config.generate.scheduler=continuous", "--config.generate.prefill_rows=16",
                       "--config.generate.prefill_chunk=512"]


def mesh_override(mode: str, topology: str) -> str:
  """fsdp over as many devices as the batch has rows (a row cannot split), tensor parallel over the rest."""
  n = chips_of(topology)
  fsdp = min(n, 32 if mode == "train" else 256)
  return f"--config.mesh.shape=(1,{fsdp},{n // fsdp})"


def overrides(mode: str, topology: str) -> list[str]:
  return [*MODES[mode], mesh_override(mode, topology)]


def chips_of(topology: str) -> int:
  n = 1
  for d in topology.split(":")[1].split("x"):
    n *= int(d)
  return n


def compile_plan(model: str, mode: str, topology: str, timeout: float) -> dict:
  """One `humpback plan --compile` run (or its record in --store): verdict, GiB per device, compile s."""
  key = f"{model} {mode} {topology}"
  if key in STORE or STORED_ONLY:
    return STORE.get(key)
  result = _compile_plan(model, mode, topology, timeout)
  if STORE_PATH and result["verdict"] != "timeout":
    with STORE_LOCK:
      STORE[key] = result
      STORE_PATH.write_text(json.dumps(STORE, indent=1, sort_keys=True))
  return result


def _compile_plan(model: str, mode: str, topology: str, timeout: float) -> dict:
  cmd = [sys.executable, "-m", "humpback_jax.cli", "plan", f"--config=configs/humpback.py:model={model},mesh=fsdp",
         f"--topology={topology}", "--compile", *overrides(mode, topology)]
  start = time.perf_counter()
  try:
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
  except subprocess.TimeoutExpired:
    return dict(verdict="timeout", seconds=time.perf_counter() - start)
  out = done.stdout
  last = out.strip().splitlines()[-1] if out.strip() else done.stderr.strip().splitlines()[-1][:200]
  result = dict(verdict=last, seconds=time.perf_counter() - start, fits=last.startswith("compiled: fits"))
  gib = re.search(r"\(([\d.]+) GiB", last)
  result["gib"] = float(gib.group(1)) if gib else None
  flops = re.search(r"FLOPs per \w+: ([\d.e+]+) .*at peak ([\d.e+-]+) s", out)
  if flops:
    result["flops"], result["step_s"] = float(flops.group(1)), float(flops.group(2))
  result["compile_s"] = sum(float(m) for m in re.findall(r"\| [\d.]+ \| ([\d.]+) \| [\d.e+-]+ \|$", out, re.M))
  return result


def estimate_gib(model: str, mode: str, topology: str) -> float | None:
  """Our estimate of GiB per device on this slice, None where the mesh does not divide the model."""
  from humpback_jax import configlib, plan
  from humpback_jax.errors import ConfigError
  cfg = configlib.load_config(f"configs/humpback.py:model={model},mesh=fsdp",
                              [o.removeprefix("--") for o in overrides(mode, topology) if o.startswith("--config.")])
  batch, seq, prompt = (None, None, None) if mode == "train" else (256, 1023 + 512, 1024)
  try:
    return plan.plan(cfg, chips_of(topology), mode="train" if mode == "train" else "generate", batch=batch,
                     seq_len=seq, prompt_len=prompt).total / 2**30
  except ConfigError:
    return None


def smallest_estimated(model: str, mode: str, family: str) -> tuple[int, float | None]:
  """Index in SLICES[family] of the smallest slice our estimate says fits (the last if none), and its GiB."""
  for i, topology in enumerate(SLICES[family]):
    gib = estimate_gib(model, mode, topology)
    if gib is not None and gib <= chips.CHIPS[KINDS[family]].hbm_bytes / 2**30:
      return i, gib
  return len(SLICES[family]) - 1, estimate_gib(model, mode, SLICES[family][-1])


def smallest_fit(model: str, mode: str, family: str, start: int, timeout: float) -> tuple[str, dict]:
  """The smallest slice of `family` from SLICES[family][start] up that the compiled program fits."""
  for topology in SLICES[family][start:]:
    result = compile_plan(model, mode, topology, timeout)
    if result is None:  # --stored-only, not stored
      return SLICES[family][start], {}
    print(f"# {model} {mode} {topology}: {result['verdict']} ({result['seconds']:.0f} s)", file=sys.stderr, flush=True)
    if result.get("fits") or result["verdict"] == "timeout" or "does not fit" not in result["verdict"]:
      return topology, result
  return topology, result


def cell(model: str, mode: str, family: str, compile_it: bool, timeout: float, topology: str = "") -> str:
  """One family's cell: its smallest slice (chips): XLA's GiB per device in bold where compiled, our
  estimate (in parentheses beside XLA's), the step seconds at peak, the compile seconds."""
  start, est = smallest_estimated(model, mode, family)
  if topology:  # a stored slice
    start, est = SLICES[family].index(topology), estimate_gib(model, mode, topology)
  topology, r = SLICES[family][start], {}
  if compile_it or STORED_ONLY:
    topology, r = smallest_fit(model, mode, family, start, timeout)
    est = estimate_gib(model, mode, topology)
  step_s = model_flops(model, mode) / (chips_of(topology) * chips.CHIPS[KINDS[family]].peak_flops)
  head = f"{topology.split(':')[1]} ({chips_of(topology)}): "
  if not r:
    stored = [t for t in SLICES[family] if STORE.get(f"{model} {mode} {t}", {}).get("fits")]
    if stored:  # a larger slice was compiled (before the estimate pointed lower)
      return head + f"{est or 0:.1f}; " + cell(model, mode, family, False, 0, topology=stored[0])
    return head + f"{est or 0:.1f}, {step_s:.2g}"
  if not r.get("fits"):
    return head + r["verdict"][:60]
  return head + f"**{r['gib']:.1f}** ({est or 0:.1f}), {step_s:.2g}, {r['compile_s']:.0f}"


def model_flops(model: str, mode: str) -> float:
  """The model's FLOPs per training step or generation batch (as `humpback plan --compile` prints them)."""
  from humpback_jax import configlib, train
  m = configlib.load_config(f"configs/humpback.py:model={model},mesh=fsdp").model
  if mode == "train":
    return train.model_flops_per_token(m, 2048) * 32 * 2048
  return train.model_flops_per_token(m, 1536) / 3 * 256 * 1536


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--models", default=",".join(MODELS))
  p.add_argument("--modes", default="train,generate")
  p.add_argument("--families", default="v4,v5e,v5p,v6e")
  p.add_argument("--compile-families", default="v4,v5e,v5p,v6e", help="families whose slices are compiled")
  p.add_argument("--jobs", type=int, default=1, help="compiles at once")
  p.add_argument("--timeout", type=float, default=1800.0, help="seconds per compile")
  p.add_argument("--store", default="", help="JSON file of compile results: reused, and new ones added "
                 "(estimates are always recomputed)")
  p.add_argument("--stored-only", action="store_true", help="compile nothing: rows from --store or the estimate")
  args = p.parse_args()
  global STORED_ONLY
  STORED_ONLY = args.stored_only
  if args.store:
    global STORE_PATH
    STORE_PATH = Path(args.store)
    STORE.update(json.loads(STORE_PATH.read_text()) if STORE_PATH.exists() else {})
  cells = [(model, mode, family, family in args.compile_families.split(","))
           for model in args.models.split(",") for mode in args.modes.split(",") for family in args.families.split(",")]
  families = args.families.split(",")
  print(f"| model | job | TFLOP | {' | '.join(families)} |")
  print("|---" * (3 + len(families)) + "|")
  with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:  # each compile is its own process
    done = list(pool.map(lambda c: cell(*c, args.timeout), cells))
  for k in range(0, len(cells), len(families)):
    model, mode = cells[k][:2]
    print(f"| {model} | {mode} | {model_flops(model, mode) / 1e12:,.0f} | {' | '.join(done[k:k + len(families)])} |")


if __name__ == "__main__":
  main()
