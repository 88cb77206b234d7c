"""Training throughput: our jitted sharded step vs transformers (PyTorch CPU), same model and batch.

  python bench/train.py [--steps 10] [--batch 8] [--seq 256]

Prints a table (tokens/s, MFU) for fp32 and bf16 and, last, `speedup vs transformers: <x>`
(the smallest ratio). Where a GPU is present, our rows are measured on it.

Both sides run one warm-up step (compile time excluded), then their timed steps alternate so
that a shared host's noise hits both alike; each figure is the best step. transformers' bf16
autocast is very slow on CPUs without native bf16 (~30 tok/s here), so its steps stop once
`--ref-budget` seconds are spent (at least one timed step).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from humpback_jax import malloc_env  # noqa: E402  (before JAX starts: restarts once with the settings)

malloc_env.restart_with_settings()

import jax
import numpy as np
import torch
import transformers

from configs import common
from humpback_jax import sharding, train
from humpback_jax.api import default_layout
from humpback_jax.checkpoints import hf

BENCH = common.MODELS["bench20m"]


def hf_config() -> transformers.LlamaConfig:
  return transformers.LlamaConfig(
      vocab_size=BENCH["vocab_size"], hidden_size=BENCH["dim"], intermediate_size=BENCH["mlp_dim"],
      num_hidden_layers=BENCH["num_layers"], num_attention_heads=BENCH["num_heads"],
      num_key_value_heads=BENCH["num_kv_heads"], max_position_embeddings=BENCH["max_seq_len"],
      rms_norm_eps=BENCH["norm_eps"], tie_word_embeddings=False)


def batch_arrays(batch: int, seq: int, vocab: int):
  rng = np.random.RandomState(0)
  tokens = rng.randint(3, vocab, (batch, seq + 1)).astype(np.int32)
  return dict(tokens=tokens[:, :-1], targets=tokens[:, 1:], loss_mask=np.ones((batch, seq), np.float32),
              positions=np.tile(np.arange(seq, dtype=np.int32), (batch, 1)), segment_ids=np.ones((batch, seq), np.int32))


def torch_step_fn(model, data, bf16: bool):
  """One transformers training step (forward, loss, backward, clip, AdamW) as a closure."""
  opt = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.1)
  tokens = torch.as_tensor(data["tokens"], dtype=torch.long)
  labels = torch.as_tensor(data["targets"], dtype=torch.long)

  def step():
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
      logits = model(tokens).logits
    loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
  return step


def our_step_fn(folder: Path, data, dtype: str, layout):
  """Our jitted sharded training step on the same weights and batch, as a closure."""
  cfg = hf.read_config(folder)
  cfg.dtype = dtype
  params = hf.load_params(folder, cfg, layout)
  fns = train.build_step(cfg, layout, train.make_optimizer(common.train_config(), 1000))
  state = {"s": fns.init(params)}
  batch = train.put_batch(data, fns.batch_sharding)

  def step():
    state["s"], metrics = fns.step(state["s"], batch)
    jax.block_until_ready(metrics)
  return step


def timed(step) -> float:
  time.sleep(0.5)  # lets the other side's worker threads stop spinning before the clock starts
  start = time.perf_counter()
  step()
  return time.perf_counter() - start


def best_step_seconds(ours, ref, steps: int, ref_budget: float) -> tuple[float, float]:
  """Warm-up both, then alternate timed steps; the best step of each (ref stops at its budget)."""
  ours(), ref()
  ours_t, ref_t = [], []
  for i in range(steps):
    ours_t.append(timed(ours))
    if sum(ref_t) < ref_budget:  # the first step always runs
      ref_t.append(timed(ref))
  return min(ours_t), min(ref_t)


def main():
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--steps", type=int, default=6)
  p.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated compute dtypes")
  p.add_argument("--ref-budget", type=float, default=120.0, help="seconds of timed reference steps per dtype")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq", type=int, default=256)
  p.add_argument("--peak", type=float, default=None, help="peak FLOP/s per device (default: 190e9 on CPU)")
  args = p.parse_args()
  torch.manual_seed(0)
  torch.set_num_threads(os.cpu_count() or 1)
  model_cfg = common.model_preset("bench20m")
  data = batch_arrays(args.batch, args.seq, model_cfg.vocab_size)
  on_gpu = jax.default_backend() == "gpu"
  peak = args.peak or (989e12 if on_gpu else 190e9)
  flops = train.model_flops_per_token(model_cfg, args.seq)
  layout = default_layout() if not on_gpu else sharding.Layout(
      sharding.make_mesh(common.mesh_preset("single"), jax.devices()[:1]))
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    hf_model = transformers.LlamaForCausalLM(hf_config()).train()
    hf_model.save_pretrained(tmp, safe_serialization=True)
    for dtype in args.dtypes.split(","):
      ours_s, ref_s = best_step_seconds(our_step_fn(Path(tmp), data, dtype, layout),
                                        torch_step_fn(hf_model, data, dtype == "bfloat16"),
                                        args.steps, args.ref_budget)
      rows.append((dtype, data["tokens"].size / ours_s, data["tokens"].size / ref_s))
  n_params = sum(p.numel() for p in hf_model.parameters())
  print(f"\nmodel bench20m: {n_params / 1e6:.1f}M params, batch {args.batch} x {args.seq} tokens, "
        f"best of {args.steps} interleaved steps, backend {jax.default_backend()}, {jax.device_count()} device(s)")
  print(f"| dtype | ours tok/s | transformers tok/s | ratio | ours MFU | transformers MFU |")
  print(f"|---|---|---|---|---|---|")
  for dtype, ours, ref in rows:
    print(f"| {dtype} | {ours:,.0f} | {ref:,.0f} | {ours / ref:.2f}x | {flops * ours / peak:.1%} | "
          f"{flops * ref / 190e9:.1%} |")
  print(f"speedup vs transformers: {min(o / r for _, o, r in rows):.2f}")


if __name__ == "__main__":
  main()
