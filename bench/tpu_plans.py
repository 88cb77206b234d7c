"""The paper's models on real TPU slices: `humpback plan --compile` on the smallest slice each fits.

  ALLOW_MULTIPLE_LIBTPU_LOAD=1 nice python bench/tpu_plans.py [--models llama1_7b,...] [--modes train,generate]
      [--families v4,v5e,v5p,v6e] [--timeout 1800] > table.md

Per (model, mode, chip family) it starts at the smallest slice our estimate says fits, compiles
(configs/humpback.py: bf16 compute, full remat, fsdp, splash attention), and walks up the slice
sizes until XLA says it fits. Training: batch 32 x 2048 tokens; generation: batch 256, 1,024 prompt
+ 512 new tokens. Each compile is its own `humpback plan` process (libtpu holds its memory).
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SLICES = {  # smallest first; v4 and v5p count chips of 2 TensorCores (megacore)
    "v4": ["v4:2x2x1", "v4:2x2x2", "v4:2x2x4", "v4:2x4x4", "v4:4x4x4", "v4:4x4x8"],
    "v5e": ["v5e:2x2", "v5e:2x4", "v5e:4x4", "v5e:4x8", "v5e:8x8", "v5e:8x16", "v5e:16x16"],
    "v5p": ["v5p:2x2x1", "v5p:2x2x2", "v5p:2x2x4", "v5p:2x4x4", "v5p:4x4x4", "v5p:4x4x8"],
    "v6e": ["v6e:2x2", "v6e:2x4", "v6e:4x4", "v6e:4x8", "v6e:8x8", "v6e:8x16", "v6e:16x16"],
}
MODELS = ("llama1_7b", "llama1_13b", "llama1_33b", "llama1_65b", "llama2_70b", "llama3_8b")
MODES = {
    "train": ["--config.train.batch_size=32", "--config.train.seq_len=2048"],
    "generate": ["--mode=generate", "--config.generate.batch_size=256", "--config.generate.max_new_tokens=512",
                 "--prompt-len=1024"],
}


def chips_of(topology: str) -> int:
  n = 1
  for d in topology.split(":")[1].split("x"):
    n *= int(d)
  return n


def estimate_fits(model: str, mode: str, topology: str) -> bool:
  """Our shape-only estimate for this slice (cheap: no compile)."""
  from humpback_jax import chips, configlib, plan
  from humpback_jax.errors import ConfigError
  cfg = configlib.load_config(f"configs/humpback.py:model={model},mesh=fsdp",
                              [o.removeprefix("--") for o in MODES[mode] if o.startswith("--config.")])
  kind = {"v4": "TPU v4", "v5e": "TPU v5 lite", "v5p": "TPU v5", "v6e": "TPU v6 lite"}[topology.split(":")[0]]
  try:
    batch, seq = (None, None) if mode == "train" else (256, 1536)
    return plan.plan(cfg, chips_of(topology), device_gib=chips.CHIPS[kind].hbm_bytes / 2**30, mode=mode,
                     batch=batch, seq_len=seq).fits
  except ConfigError:
    return False


def compile_plan(model: str, mode: str, topology: str, timeout: float) -> dict:
  """One `humpback plan --compile` run: its verdict, GiB per device, compile seconds, FLOPs, step time."""
  cmd = [sys.executable, "-m", "humpback_jax.cli", "plan", f"--config=configs/humpback.py:model={model},mesh=fsdp",
         f"--topology={topology}", "--compile", *MODES[mode]]
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
  flops = re.search(r"XLA ([\d.e+]+) .*at peak ([\d.e+-]+) s", out)
  if flops:
    result["flops"], result["step_s"] = float(flops.group(1)), float(flops.group(2))
  result["compile_s"] = sum(float(m) for m in re.findall(r"\| [\d.]+ \| ([\d.]+) \| [\d.e+-]+ \|$", out, re.M))
  return result


def smallest_fit(model: str, mode: str, family: str, timeout: float) -> tuple[str, dict] | None:
  """The smallest slice of `family` the compiled program fits, starting where the estimate says."""
  sizes = SLICES[family]
  start = next((i for i, t in enumerate(sizes) if estimate_fits(model, mode, t)), len(sizes) - 1)
  for topology in sizes[start:]:
    result = compile_plan(model, mode, topology, timeout)
    print(f"# {model} {mode} {topology}: {result['verdict']} ({result['seconds']:.0f} s)", file=sys.stderr)
    if result.get("fits"):
      return topology, result
    if result["verdict"] == "timeout" or "does not fit" not in result["verdict"]:
      return topology, result
  return None


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--models", default=",".join(MODELS))
  p.add_argument("--modes", default="train,generate")
  p.add_argument("--families", default="v4,v5e,v5p,v6e")
  p.add_argument("--timeout", type=float, default=1800.0, help="seconds per compile")
  args = p.parse_args()
  print("| model | job | slice | chips | GiB per device | compile s | TFLOP per step | step at peak |")
  print("|---|---|---|---|---|---|---|---|")
  for model in args.models.split(","):
    for mode in args.modes.split(","):
      for family in args.families.split(","):
        found = smallest_fit(model, mode, family, args.timeout)
        if found is None:
          print(f"| {model} | {mode} | none of {family}'s up to {SLICES[family][-1]} | | | | | |", flush=True)
          continue
        topology, r = found
        if not r.get("fits"):
          print(f"| {model} | {mode} | {topology}: {r['verdict'][:60]} | | | | | |", flush=True)
          continue
        print(f"| {model} | {mode} | {topology} | {chips_of(topology)} | {r['gib']:.1f} | {r['compile_s']:.0f} | "
              f"{r.get('flops', 0) / 1e12:,.0f} | {r.get('step_s', 0):.3g} s |", flush=True)


if __name__ == "__main__":
  main()
