"""`humpback <command>`: thin wrappers over the modules; all work happens in the library.

  humpback convert SRC DST [--from hf|gguf|ours] [--to ours|hf]
  humpback train --config=configs/toy.py --workdir=runs/m0 [--data=pairs.jsonl] [--config.train.steps=10]
  humpback generate --config=... --checkpoint=DIR --input=IN.jsonl --output=OUT_DIR
  humpback pipeline --config=configs/toy.py --workdir=runs/toy [--from=STAGE] [--until=STAGE]
  humpback eval-generate --checkpoint=DIR --prompts=alpaca_eval.json --output=model_outputs.json
  humpback plan --config=configs/llama.py:variant=65b,mesh=fsdp --devices=64 [--device-gib=80]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from humpback_jax.errors import ConfigError, DataError


def _config(args, overrides):
  from humpback_jax import configlib
  return configlib.load_config(args.config, overrides)


def _layout(cfg):
  import jax
  from humpback_jax import configlib, sharding
  configlib.check(cfg, jax.device_count())
  layout = sharding.Layout(sharding.make_mesh(cfg.mesh))
  sharding.validate_model_on_mesh(cfg.model, layout.mesh)
  return layout


def cmd_convert(args, overrides):
  from humpback_jax import api
  from humpback_jax.checkpoints import hf, model_dir
  layout = api.default_layout()
  cfg, params, tok, template = api.load_weights(Path(args.src), layout, fmt=getattr(args, "from"))
  if args.to == "hf":
    hf.save(Path(args.dst), params, cfg)
  else:
    tok_file = _tokenizer_file(Path(args.src), tok)
    model_dir.save(Path(args.dst), params, cfg, tokenizer_file=tok_file, chat_template=template)
  print(f"wrote {args.dst}")


def _tokenizer_file(src: Path, tok):
  if src.is_file() and src.suffix == ".gguf":
    return src
  for name in ("tokenizer.model", "tokenizer.json"):
    if (src / name).exists():
      return src / name
  if (src / "model.json").exists():
    meta = json.loads((src / "model.json").read_text())
    return src / meta["tokenizer"] if meta.get("tokenizer") else None
  return None


def cmd_train(args, overrides):
  from humpback_jax import api, tokenizer as tokenizer_lib
  from humpback_jax.data import seed
  from humpback_jax.method import finetune
  from humpback_jax.model import build
  cfg = _config(args, overrides)
  layout = _layout(cfg)
  data = args.data or cfg.data.seed_path
  rows, counts = seed.load_seed(data, fmt="auto", n=10**9, lang=cfg.data.seed_lang, seed=cfg.data.seed_shuffle,
                                on_error=cfg.train.on_bad_record)
  tok_path = Path(cfg.tokenizer.path or cfg.base.checkpoint)
  tok = tokenizer_lib.load_tokenizer(tok_path)
  pairs = [finetune.Pair(r["instruction"], r["output"]) for r in rows]
  examples, stats = finetune.pair_examples(tok, pairs, template=cfg.tokenizer.chat_template,
                                           seq_len=cfg.train.seq_len, policy=cfg.train.truncation)
  steps, batch = finetune.steps_and_batch(cfg.train, len(examples))
  if cfg.base.checkpoint:
    init = lambda: api.load_weights(Path(cfg.base.checkpoint), layout, fmt=cfg.base.format)[1]
  else:
    init = lambda: build.init_params(cfg.model, layout, seed=cfg.train.seed)
  summary = finetune.run(cfg, layout, tok, examples, init_params=init, workdir=Path(args.workdir),
                         steps=steps, batch_size=batch, tokenizer_file=tok_path)
  summary.update(read=counts, tokenize=stats.as_dict())
  print(json.dumps(summary, indent=2, default=str))


def cmd_generate(args, overrides):
  import jax
  from humpback_jax import api, distributed, generate, shards
  from humpback_jax.data.jsonl import read_jsonl
  cfg = _config(args, overrides)
  layout = _layout(cfg)
  model = api.load(args.checkpoint, layout=layout)
  records = [dict(r, id=str(r.get("id", line))) for line, r in read_jsonl(args.input, [args.field])]
  g = cfg.generate
  engine = generate.process_local_engine(model.cfg, model.params, layout, prompt_buckets=tuple(g.prompt_buckets),
                           batch_size=g.batch_size, too_long=g.too_long, on_empty="skip")
  sampling = generate.SamplingParams(temperature=g.temperature, top_p=g.top_p, top_k=g.top_k,
                                     max_new_tokens=g.max_new_tokens, seed=g.seed)
  offsets = {r["id"]: i for i, r in enumerate(records)}
  tok = model.tokenizer

  def work(batch):
    texts = [model.render(r[args.field]) if args.chat else r[args.field] for r in batch]
    outs = engine.generate_ids([tok.encode_prompt(t) for t in texts], sampling,
                               eos_ids=[tok.eos_id], index_offset=offsets[batch[0]["id"]])
    return [dict(id=r["id"], output=tok.decode(o) if o is not None else None) for r, o in zip(batch, outs)]

  out = Path(args.output)
  timing = shards.run(records, work, out / "shards", shard_size=g.shard_size,
                      process_index=jax.process_index(), process_count=jax.process_count(), desc="generate")
  distributed.barrier("generate_shards")  # process 0 merges every process's shards
  if jax.process_index() == 0:
    merged = shards.merge(out / "shards", [r["id"] for r in records])
    shards.write_atomic(out / "outputs.jsonl", merged)
  print(json.dumps(dict(records=len(records), **timing, tokens_per_s=engine.stats.tokens_per_second,
                        compiles=engine.stats.compiles, padding_share=engine.stats.padding_share)))


def cmd_pipeline(args, overrides):
  from humpback_jax.method import pipeline
  cfg = _config(args, overrides)
  layout = _layout(cfg)
  report = pipeline.run_pipeline(cfg, Path(args.workdir), layout, start=getattr(args, "from"), until=args.until)
  print(f"report: {report}")


def cmd_eval_generate(args, overrides):
  from humpback_jax.method import evaluate
  cfg = _config(args, overrides) if args.config else None
  n = evaluate.write_model_outputs(Path(args.checkpoint), Path(args.prompts), Path(args.output), cfg=cfg,
                                   generator=args.generator, limit=args.limit)
  print(f"wrote {n} outputs to {args.output}")


def cmd_plan(args, overrides):
  from humpback_jax import plan
  cfg = _config(args, overrides)
  result = plan.plan(cfg, args.devices, device_gib=args.device_gib, mode=args.mode)
  print(result.table())
  if not result.fits:
    raise SystemExit(1)


def build_parser() -> argparse.ArgumentParser:
  """The argument parser of every subcommand."""
  p = argparse.ArgumentParser(prog="humpback", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest="command", required=True)
  c = sub.add_parser("convert", help="convert between HF, GGUF and our checkpoint")
  c.add_argument("src")
  c.add_argument("dst")
  c.add_argument("--from", default="auto", choices=["auto", "hf", "gguf", "ours"])
  c.add_argument("--to", default="ours", choices=["ours", "hf"])
  t = sub.add_parser("train", help="fine-tune on instruction pairs")
  t.add_argument("--config", required=True)
  t.add_argument("--workdir", required=True)
  t.add_argument("--data", default=None, help="pairs JSONL or OASST export (default: config.data.seed_path)")
  g = sub.add_parser("generate", help="generate for every record of a JSONL file, resumably")
  g.add_argument("--config", required=True)
  g.add_argument("--checkpoint", required=True)
  g.add_argument("--input", required=True)
  g.add_argument("--output", required=True)
  g.add_argument("--field", default="prompt")
  g.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
  r = sub.add_parser("pipeline", help="run the whole method")
  r.add_argument("--config", required=True)
  r.add_argument("--workdir", required=True)
  r.add_argument("--from", default=None)
  r.add_argument("--until", default=None)
  e = sub.add_parser("eval-generate", help="AlpacaEval model_outputs.json for a checkpoint")
  e.add_argument("--checkpoint", required=True)
  e.add_argument("--prompts", required=True)
  e.add_argument("--output", required=True)
  e.add_argument("--config", default=None)
  e.add_argument("--generator", default=None)
  e.add_argument("--limit", type=int, default=None)
  pl = sub.add_parser("plan", help="per-device memory of a job, from shapes alone; exit 1 if it does not fit")
  pl.add_argument("--config", required=True)
  pl.add_argument("--devices", type=int, required=True)
  pl.add_argument("--device-gib", type=float, default=80.0)
  pl.add_argument("--mode", choices=["train", "generate"], default="train")
  for command in sub.choices.values():
    command.add_argument("--verbose", action="store_true", help="also show third-party output (tfds, absl)")
  return p


COMMANDS = {"convert": cmd_convert, "train": cmd_train, "generate": cmd_generate, "pipeline": cmd_pipeline,
            "eval-generate": cmd_eval_generate, "plan": cmd_plan}


def _shutdown_together() -> None:
  """Multi-process runs meet at a barrier before shutting down, so a slower process never trips
  the coordination service's shutdown timeout."""
  import jax
  from humpback_jax import distributed
  if jax.process_count() > 1:
    distributed.barrier("end")
    jax.distributed.shutdown()


def main(argv=None) -> int:
  """Entry point of the `humpback` console command."""
  if argv is None:  # the console command itself: restart once with the malloc settings
    from humpback_jax import malloc_env
    malloc_env.restart_with_settings()
  args, rest = build_parser().parse_known_args(argv)
  overrides = [a for a in rest if a.startswith("--config.")]
  unknown = [a for a in rest if not a.startswith("--config.")]
  if unknown:
    print(f"humpback {args.command}: unknown arguments {unknown}", file=sys.stderr)
    return 2
  from humpback_jax import quiet
  quiet.configure(args.verbose)
  try:
    if args.command != "plan":
      from humpback_jax import distributed
      distributed.initialize()
    COMMANDS[args.command](args, overrides)
    _shutdown_together()
  except (ConfigError, DataError) as e:
    print(f"humpback {args.command}: error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
