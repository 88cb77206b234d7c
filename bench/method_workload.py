"""The method's three generation workloads on real text: static vs continuous engine vs transformers.

    python bench/method_workload.py              # 256 segments, best of 3 interleaved runs
    python bench/method_workload.py --quick      # 24 segments, 1 run (a smoke test, minutes)

Segments are what our corpus preparation cuts from Debian's python3-doc HTML
(/usr/share/doc/python3-doc/html); the model is SmolLM2-135M (GGUF, fp32) with the main job's
config (configs/smollm2_135m.py). Workloads: (a) backtranslation with the backward prompt,
T=0.7, top-p 0.9, <= 128 new tokens; (b) paper-faithful curation, greedy, <= 256 new tokens,
judging (a)'s instructions; (c) expected-score curation (next-token probabilities of 1..5).
Engines: `static` (sorted, bucketed batches of the config's batch_size), `static_wide` (the same,
batches as wide as the continuous engine's decode slots), `continuous` (decode slots refilled as
rows stop, chunked prefill in groups), `prefix` (continuous + shared-prefix reuse), `hf`
(transformers batched generate / forward, left-padded batches sorted by length). Speedups are
against the faster static row, so giving the continuous engine more slots earns it nothing the
static engine could have had by a wider batch. Runs interleave the engines; each of
ours keeps its best of `--repeats` runs, its first run's compiles subtracted (wall and CPU), and
transformers runs `--hf-runs` times (once by default: it is the slowest part and no ratio in the
last line uses it). CPU s is user + sys of the process (all threads), the figure to compare when
other jobs share the host. Useful tokens are new tokens (a, b) or real prompt tokens scored (c).
Slot utilisation = live row-steps / all decode row-steps. The last line is the smallest wall-time
speedup of the best continuous variant over the static engine across the workloads.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from humpback_jax import malloc_env  # noqa: E402  (before JAX starts: restarts once with the settings)

malloc_env.restart_with_settings()

import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs import smollm2_135m  # noqa: E402
from humpback_jax import api, generate  # noqa: E402
from humpback_jax.data import corpus  # noqa: E402
from humpback_jax.method import backtranslate, curate  # noqa: E402

DOCS = Path("/usr/share/doc/python3-doc/html")
ENGINES = ("static", "static_wide", "continuous", "prefix", "hf")
STATIC = ("static", "static_wide")


def load_segments(n: int) -> list[str]:
  """The first `n` segments our corpus preparation keeps from the python3-doc HTML (sorted files),
  cached under ~/.cache/humpback_jax (parsing the HTML takes minutes on a busy 2-core host)."""
  cache = Path.home() / ".cache" / "humpback_jax" / f"python3_doc_segments_{n}.json"
  if cache.exists():
    return json.loads(cache.read_text())
  files = sorted(DOCS.rglob("*.html"))
  if not files:
    sys.exit(f"{DOCS}: no HTML (apt-get install python3-doc)")
  raw, kept = [], []
  for file in files:
    raw += corpus.segments_from_html(file.read_bytes(), file.relative_to(DOCS).as_posix())
    if len(raw) >= 4 * n or file == files[-1]:
      kept, _ = corpus.prepare_corpus(raw, dict(smollm2_135m.get_config().corpus))
      if len(kept) >= n:
        break
  texts = [s.text for s in kept[:n]]
  cache.parent.mkdir(parents=True, exist_ok=True)
  cache.write_text(json.dumps(texts))
  return texts


class Ours:
  """One of our engines (static, continuous or continuous + prefix reuse), compiled across runs."""

  def __init__(self, model, cfg, kind: str, slots: int):
    g = cfg.generate
    self.rows = slots if kind == "static" else (g.decode_slots or slots)
    self.engine = generate.Engine(model.cfg, model.params, model.layout, prompt_buckets=tuple(g.prompt_buckets),
                                  batch_size=self.rows, decode_slots=self.rows,
                                  scheduler="static" if kind in STATIC else "continuous",
                                  decode_steps=g.decode_steps, prefill_chunk=g.prefill_chunk,
                                  prefill_rows=g.prefill_rows, refill_slots=g.refill_slots,
                                  prefix_reuse=kind == "prefix")

  def generate(self, ids, sampling, eos):
    return self.engine.generate_ids(ids, sampling, eos_ids=[eos])

  def probs(self, ids, candidates):
    return self.engine.next_token_probs(ids, candidates)


class HF:
  """transformers' batched generate / forward on the same weights, left-padded sorted batches."""

  def __init__(self, model, batch: int):
    import torch
    import transformers
    from humpback_jax.checkpoints import hf
    self.torch, self.batch, self.dir = torch, batch, tempfile.TemporaryDirectory()
    hf.save(Path(self.dir.name), model.params, model.cfg)
    self.model = transformers.LlamaForCausalLM.from_pretrained(self.dir.name, dtype=torch.float32).eval()

  def _batches(self, ids):
    order = np.argsort([len(r) for r in ids], kind="stable")
    for g in range(0, len(order), self.batch):
      idx = order[g:g + self.batch]
      width = max(len(ids[i]) for i in idx)
      tokens = np.zeros((len(idx), width), np.int64)
      mask = np.zeros_like(tokens)
      for r, i in enumerate(idx):
        tokens[r, width - len(ids[i]):], mask[r, width - len(ids[i]):] = ids[i], 1
      yield idx, self.torch.as_tensor(tokens), self.torch.as_tensor(mask)

  def generate(self, ids, sampling, eos):
    out = [None] * len(ids)
    self.torch.manual_seed(sampling.seed)
    sample = dict(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p) \
        if sampling.temperature > 0 else dict(do_sample=False)
    with self.torch.inference_mode():
      for idx, tokens, mask in self._batches(ids):
        new = self.model.generate(tokens, attention_mask=mask, max_new_tokens=sampling.max_new_tokens,
                                  eos_token_id=eos, pad_token_id=eos, top_k=None, **sample)[:, tokens.shape[1]:]
        for r, i in enumerate(idx):
          row = new[r].tolist()
          out[i] = row[:row.index(eos)] if eos in row else row
    return out

  def probs(self, ids, candidates):
    out = np.zeros((len(ids), len(candidates)))
    with self.torch.inference_mode():
      for idx, tokens, mask in self._batches(ids):
        logits = self.model(tokens, attention_mask=mask).logits[:, -1]
        out[idx] = self.torch.softmax(logits, -1)[:, candidates].numpy()
    return out


def workloads(model, cfg, texts, instructions):
  """{name: (kind, prompt ids, sampling or candidates)} for the three workloads."""
  tok = model.tokenizer
  back = [tok.encode_prompt(backtranslate.backward_user_turn(cfg, t)) for t in texts]
  judge = [tok.encode_prompt(curate.judge_turn(cfg, i, t)) for i, t in zip(instructions, texts)]
  scored = [curate.score_prompt_and_candidates(tok, curate.judge_turn(cfg, i, t)) for i, t in zip(instructions, texts)]
  g = cfg.generate
  return {
      "a backtranslate": ("gen", back, generate.SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=128,
                                                               seed=g.seed)),
      "b curate (judge)": ("gen", judge, generate.SamplingParams(temperature=0.0, top_p=1.0, max_new_tokens=256)),
      "c curate (expected)": ("probs", [s[0] for s in scored], scored[0][1]),
  }


def run_once(runner, kind, ids, arg, eos):
  """(wall seconds, CPU seconds (user + sys of this process's threads), outputs) of one run, our
  compiles subtracted from both."""
  def compiles():
    stats = runner.engine.stats if isinstance(runner, Ours) else None
    return (stats.compile_seconds, stats.compile_cpu_seconds) if stats else (0.0, 0.0)

  before, cpu, start = compiles(), time.process_time(), time.perf_counter()
  out = runner.generate(ids, arg, eos) if kind == "gen" else runner.probs(ids, arg)
  wall, cpu = time.perf_counter() - start, time.process_time() - cpu
  after = compiles()
  return wall - (after[0] - before[0]), cpu - (after[1] - before[1]), out


def static_utilisation(outputs, limits, batch: int) -> float:
  """Live row-steps / all row-steps of sorted static batches (a row lives until EOS or its limit)."""
  steps = [min(len(o) + 1, lim) for o, lim in zip(outputs, limits)]
  useful = sum(steps)
  return useful / max(sum(batch * max(steps[i:i + batch]) for i in range(0, len(steps), batch)), 1)


def measure(runners, kind, ids, arg, eos, repeats: int, hf_runs: int):
  """Interleaved runs of every engine: ({engine: best wall}, {engine: best CPU}, outputs, stats of
  each of our engines' last run). Our first run compiles (compile time subtracted); the stored
  prefixes persist across runs, as they do across the shards of a pipeline stage."""
  best, cpu, outs, stats = {}, {}, {}, {}
  for k in range(repeats):
    for n, r in runners.items():
      if n == "hf" and k >= hf_runs:
        continue
      before = dict(vars(r.engine.stats)) if isinstance(r, Ours) else None
      wall, seconds, outs[n] = run_once(r, kind, ids, arg, eos)
      best[n], cpu[n] = min(best.get(n, np.inf), wall), min(cpu.get(n, np.inf), seconds)
      if before is not None:
        stats[n] = {key: v - before[key] for key, v in vars(r.engine.stats).items()}
  return best, cpu, outs, stats


def print_table(runners, kind, lengths, arg, best, cpu, outs, stats):
  base = min((n for n in STATIC if n in best), key=best.get, default=None)
  base_cpu = min((cpu[n] for n in STATIC if n in cpu), default=None)
  useful = (lambda n: sum(len(o) for o in outs[n])) if kind == "gen" else (lambda n: sum(lengths))
  print(f"{'engine':<12}{'rows':>5}{'wall s':>9}{'CPU s':>9}{'useful tok/s':>14}{'vs static':>11}"
        f"{'CPU vs static':>15}{'slot util':>11}{'prefill saved':>15}{'padding':>9}{'compiles':>10}")
  for n in runners:
    s = stats.get(n)
    util = "-" if kind != "gen" or n == "hf" else (
        f"{static_utilisation(outs[n], [arg.max_new_tokens] * len(lengths), runners[n].rows):.0%}" if n in STATIC
        else f"{s['useful_row_steps'] / max(s['decode_row_steps'], 1):.0%}")
    saved = f"{s['prefill_tokens_saved'] / max(s['prompt_slots'] + s['prefill_tokens_saved'], 1):.0%}" if s else "-"
    pad = f"{s['padding_slots'] / max(s['prompt_slots'], 1):.0%}" if s else "-"
    ratio = f"{best[base] / best[n]:.2f}x" if base else "-"
    cpu_ratio = f"{base_cpu / cpu[n]:.2f}x" if base_cpu else "-"
    rows = runners[n].rows if n != "hf" else runners[n].batch
    print(f"{n:<12}{rows:>5}{best[n]:>9.1f}{cpu[n]:>9.1f}{useful(n) / best[n]:>14.0f}{ratio:>11}{cpu_ratio:>15}{util:>11}"
          f"{saved:>15}{pad:>9}{(runners[n].engine.stats.compiles if n != 'hf' else '-'):>10}")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--segments", type=int, default=256)
  parser.add_argument("--repeats", type=int, default=3, help="interleaved timed runs (the best is kept)")
  parser.add_argument("--hf-runs", type=int, default=1,
                      help="runs of the transformers reference (its slowest part; one run by default)")
  parser.add_argument("--slots", type=int, default=0,
                      help="the static engine's batch (0 = the config's batch_size); the continuous engine "
                           "decodes the config's decode_slots rows (0 = the same)")
  parser.add_argument("--engines", default=",".join(ENGINES))
  parser.add_argument("--workloads", default="a,b,c")
  parser.add_argument("--quick", action="store_true", help="24 segments, 1 run")
  args = parser.parse_args()
  if args.quick:
    args.segments, args.repeats = 24, 1
  cfg = smollm2_135m.get_config()
  slots = args.slots or cfg.generate.batch_size
  model = api.load(cfg.base.checkpoint, layout=api.default_layout())
  texts = load_segments(args.segments)
  tok = model.tokenizer
  names = args.engines.split(",")
  chosen = args.workloads.split(",")
  runners = {n: HF(model, slots) if n == "hf" else Ours(model, cfg, n, slots) for n in names}
  hf_note = f" (transformers: {min(args.hf_runs, args.repeats)})" if "hf" in runners else ""
  print(f"jax {jax.__version__}, {len(texts)} segments, best of {args.repeats}{hf_note}; "
        f"CPU: {cpu_model()}")
  speedups, instructions = [], None
  for name in ("a backtranslate", "b curate (judge)", "c curate (expected)"):
    if name[0] not in chosen:
      continue
    if name[0] != "a" and instructions is None:  # (b), (c) judge the instructions (a) writes
      back = workloads(model, cfg, texts, [""] * len(texts))["a backtranslate"]
      first = next(r for n, r in runners.items() if n != "hf")
      instructions = [tok.decode(o).strip() or "Explain this." for o in first.generate(back[1], back[2], tok.eos_id)]
    kind, ids, arg = workloads(model, cfg, texts, instructions or [""] * len(texts))[name]
    lengths = [len(i) for i in ids]
    print(f"\n{name}: {len(ids)} prompts of {min(lengths)}-{max(lengths)} tokens (mean {np.mean(lengths):.0f})",
          flush=True)
    best, cpu, outs, stats = measure(runners, kind, ids, arg, tok.eos_id, args.repeats, args.hf_runs)
    print_table(runners, kind, lengths, arg, best, cpu, outs, stats)
    ours = [best[n] for n in ("continuous", "prefix") if n in best]
    statics = [best[n] for n in STATIC if n in best]
    if statics and ours:
      speedups.append(min(statics) / min(ours))
    if kind == "gen" and "static" in outs:
      same = {n: np.mean([a == b for a, b in zip(outs[n], outs["static"])]) for n in outs if n != "hf"}
      print("rows equal to static: " + ", ".join(f"{n} {v:.0%}" for n, v in same.items()), flush=True)
      if name[0] == "a":
        instructions = [tok.decode(o).strip() or "Explain this." for o in outs["static"]]
  print(f"\nspeedup vs static engine: {min(speedups):.2f}x" if speedups else "\nspeedup vs static engine: n/a")


def cpu_model() -> str:
  for line in Path("/proc/cpuinfo").read_text().splitlines():
    if line.startswith("model name"):
      return line.split(":", 1)[1].strip()
  return "unknown"


if __name__ == "__main__":
  main()
