"""`humpback <command>`: thin wrappers over the modules; all work happens in the library.

  humpback convert SRC DST [--from hf|gguf|ours] [--to ours|hf] [--scan-layers|--no-scan-layers]
  humpback train --config=configs/toy.py --workdir=runs/m0 [--data=pairs.jsonl] [--config.train.steps=10]
  humpback generate --config=... --checkpoint=DIR --input=IN.jsonl --output=OUT_DIR
  humpback pipeline --config=configs/toy.py --workdir=runs/toy [--from=STAGE] [--until=STAGE]
  humpback curate --workdir=runs/toy --stage=curate_m0 --k=4 [--keep-top-fraction=F] [--config=...]
  humpback eval-generate --checkpoint=DIR --prompts=alpaca_eval.json --output=model_outputs.json
  humpback eval-judge --checkpoint=DIR|FILE.gguf --labels=judge_dev.jsonl --mode=generate|expected|both
  humpback plan --config=configs/llama.py:variant=65b,mesh=fsdp --devices=64 [--device-gib=80]
  humpback plan --config=configs/llama.py:variant=7b,mesh=fsdp --topology=v5p:2x2x2 [--slices=2] --compile [--mode=generate]

Every command that writes a workdir (train, generate's --output, pipeline) holds it alone: a second
run on it stops at once naming the holder. A failure prints one line naming the file and what to do;
--verbose adds the traceback (and third-party output: tfds, absl).

exit codes: 0 success; 1 plan: does not fit; 2 usage, config or input error; 3 workdir in use by
another run; 4 file-system error (missing, not a folder, not writable, disk full); 5 training
stopped (loss diverged, or SIGTERM saved a checkpoint: rerun to resume); 70 internal error.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from humpback_jax import user_errors


def _config(args, overrides):
  from humpback_jax import configlib
  return configlib.load_config(args.config, overrides)


def _layout(cfg):
  import jax
  from humpback_jax import config, sharding
  config.check(cfg, jax.device_count())  # the mesh's tensor split included
  return sharding.Layout(sharding.make_mesh(cfg.mesh))


def cmd_convert(args, overrides):
  from humpback_jax import api
  from humpback_jax.checkpoints import hf, model_dir
  layout = api.default_layout()
  cfg, params, tok, template = api.load_weights(Path(args.src), layout, fmt=getattr(args, "from"),
                                                scan_layers=args.scan_layers)
  if args.to == "hf":
    hf.save(Path(args.dst), params, cfg)
  else:
    tok_file = model_dir.tokenizer_file_of(Path(args.src))
    model_dir.save(Path(args.dst), params, cfg, tokenizer_file=tok_file, chat_template=template)
  print(f"wrote {args.dst}")


def cmd_train(args, overrides):
  from humpback_jax import api, tokenizer as tokenizer_lib
  from humpback_jax.data import seed
  from humpback_jax.method import finetune
  from humpback_jax.checkpoints import model_dir
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
    init = lambda: api.load_weights(Path(cfg.base.checkpoint), layout, fmt=cfg.base.format,
                                    scan_layers=cfg.model.scan_layers)[1]
  else:
    init = lambda: build.init_params(cfg.model, layout, seed=cfg.train.seed)
  summary = finetune.run(cfg, layout, tok, examples, init_params=init, workdir=Path(args.workdir),
                         steps=steps, batch_size=batch, tokenizer_file=model_dir.tokenizer_file_of(tok_path))
  summary.update(read=counts, tokenize=stats.as_dict())
  print(json.dumps(summary, indent=2, default=str))


def cmd_generate(args, overrides):
  import jax
  from humpback_jax import api, distributed, shards
  from humpback_jax.data import prompt_file
  from humpback_jax.method import engines
  cfg = _config(args, overrides)
  records = prompt_file.read_prompts(args.input, args.field)  # every input checked before any model runs
  layout = _layout(cfg)
  model = api.load(args.checkpoint, layout=layout)
  engine = engines.engine(cfg, model.cfg, model.params, layout)
  sampling = engines.sampling(cfg)
  tok = model.tokenizer
  limit = model.cfg.max_seq_len - sampling.max_new_tokens

  def work(batch, first_index):
    live = [r for r in batch if r[args.field].strip()]  # empty is judged on the user's text, not the template's
    ids = {r["id"]: tok.encode_prompt(model.render(r[args.field]) if args.chat else r[args.field]) for r in live}
    outs = dict(zip(ids, engine.generate_ids(list(ids.values()), sampling, eos_ids=[tok.eos_id],
                                             index_offset=first_index)))
    rows = []
    for r in batch:
      out = outs.get(r["id"])
      status = ("skipped_empty" if r["id"] not in ids else "skipped_too_long" if out is None else
                "truncated" if len(ids[r["id"]]) > limit else "ok")
      rows.append(dict(id=r["id"], output=tok.decode(out) if out is not None else None, status=status))
    return rows

  out = Path(args.output)
  timing = shards.run(records, work, out / "shards", shard_size=cfg.generate.shard_size,
                      process_index=jax.process_index(), process_count=jax.process_count(), desc="generate")
  distributed.barrier("generate_shards")  # process 0 merges every process's shards
  summary = dict(records=len(records))
  if jax.process_index() == 0:
    statuses = dict.fromkeys(("ok", "truncated", "skipped_too_long", "skipped_empty"), 0)

    def counted(rows):
      for row in rows:
        statuses[row["status"]] += 1
        yield row

    # streamed: one shard in memory at a time
    shards.write_atomic(out / "outputs.jsonl", counted(shards.merged(out / "shards", [r["id"] for r in records])))
    summary.update(statuses)
  print(json.dumps(dict(summary, **timing, tokens_per_s=engine.stats.tokens_per_second,
                        compiles=engine.stats.compiles, padding_share=engine.stats.padding_share)))


def cmd_pipeline(args, overrides):
  from humpback_jax.method import pipeline
  cfg = _config(args, overrides)
  pipeline.check_pipeline_config(cfg)  # required fields named before any device or model is touched
  layout = _layout(cfg)
  report = pipeline.run_pipeline(cfg, Path(args.workdir), layout, start=getattr(args, "from"), until=args.until)
  print(f"report: {report}")


def cmd_curate(args, overrides):
  from humpback_jax import configlib
  from humpback_jax.method import pipeline
  if args.config:
    cfg = _config(args, overrides)
  else:
    cfg = pipeline.saved_config(Path(args.workdir))
    configlib.apply_overrides(cfg, overrides)
  layout = _layout(cfg)
  report = pipeline.reselect(cfg, Path(args.workdir), layout, args.stage, k=args.k,
                             keep_top_fraction=args.keep_top_fraction)
  print(f"report: {report}")


def cmd_eval_generate(args, overrides):
  from humpback_jax.method import evaluate
  cfg = _config(args, overrides) if args.config else None
  n = evaluate.write_model_outputs(Path(args.checkpoint), Path(args.prompts), Path(args.output), cfg=cfg,
                                   generator=args.generator, limit=args.limit)
  print(f"wrote {n} outputs to {args.output}")


def cmd_eval_judge(args, overrides):
  from humpback_jax import api
  from humpback_jax.method import judge_eval
  rows = judge_eval.read_labels(Path(args.labels))[:args.limit]
  model = api.load(args.checkpoint)
  cfg = (_config(args, overrides) if args.config  # the run's own template and judge settings
         else judge_eval.judge_settings(model.chat_template, args.max_new_tokens))
  modes = judge_eval.MODES if args.mode == "both" else (args.mode,)
  rep, pairs = judge_eval.run(model, cfg, rows, modes, batch_size=args.batch_size)
  print(judge_eval.format_report(rep))
  if args.output:
    Path(args.output).write_text(json.dumps(dict(report=rep, pairs=pairs), indent=1))


def cmd_plan(args, overrides):
  from humpback_jax import plan
  from humpback_jax.errors import ConfigError
  cfg = _config(args, overrides)
  if args.topology and args.devices is not None:
    raise ConfigError("--devices: a --topology fixes the device count; pass one or the other")
  if args.compile and not args.topology:
    raise ConfigError("--compile: needs --topology=NAME (e.g. v5p:2x2x2) to compile for")
  if args.compile:
    report, fits = plan.compiled_report(cfg, args.topology, args.slices, args.mode, args.prompt_len)
    print(report)
  else:
    devices, gib = plan.config_devices(cfg, args.devices), args.device_gib
    if args.topology:
      devices, gib = plan.topology_size(args.topology, args.slices)
    batch = seq = prompt = None
    if args.mode == "generate":
      batch, prompt, new = plan.generate_shape(cfg, args.prompt_len)
      seq = prompt - 1 + new  # the cache: prefill writes all but the last prompt token
    result = plan.plan(cfg, devices, device_gib=gib, mode=args.mode, batch=batch, seq_len=seq, prompt_len=prompt)
    print(result.table())
    fits = result.fits
  if not fits:
    raise SystemExit(1)


def build_parser() -> argparse.ArgumentParser:
  """The argument parser of every subcommand."""
  p = argparse.ArgumentParser(prog="humpback", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument("--verbose", action="store_true",
                      help="also show third-party output (tfds, absl) and, on failure, the traceback")
  sub = p.add_subparsers(dest="command", required=True)
  add = lambda name, **kw: sub.add_parser(name, parents=[common], **kw)
  c = add("convert", help="convert between HF, GGUF and our checkpoint")
  c.add_argument("src")
  c.add_argument("dst")
  c.add_argument("--from", default="auto", choices=["auto", "hf", "gguf", "ours"])
  c.add_argument("--to", default="ours", choices=["ours", "hf"])
  c.add_argument("--scan-layers", dest="scan_layers", action=argparse.BooleanOptionalAction, default=None,
                 help="store our checkpoint's layers stacked (model.scan_layers) or as a list; default: as the source")
  t = add("train", help="fine-tune on instruction pairs")
  t.add_argument("--config", required=True)
  t.add_argument("--workdir", required=True)
  t.add_argument("--data", default=None, help="pairs JSONL or OASST export (default: config.data.seed_path)")
  g = add("generate", help="generate for every record of a JSONL file, resumably")
  g.add_argument("--config", required=True)
  g.add_argument("--checkpoint", required=True)
  g.add_argument("--input", required=True)
  g.add_argument("--output", required=True)
  g.add_argument("--field", default="prompt")
  g.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
  r = add("pipeline", help="run the whole method")
  r.add_argument("--config", required=True)
  r.add_argument("--workdir", required=True)
  r.add_argument("--from", default=None)
  r.add_argument("--until", default=None)
  cu = add("curate", help="re-select a curate stage at another threshold from its stored scores "
                           "(no judge), then rerun the stages after it")
  cu.add_argument("--workdir", required=True)
  cu.add_argument("--stage", required=True, help="curate_m0, curate_m1, ...")
  cu.add_argument("--k", type=float, default=None, help="threshold (default: the config's pipeline.threshold_k)")
  cu.add_argument("--keep-top-fraction", type=float, default=None)
  cu.add_argument("--config", default=None, help="default: the workdir's config.json from its last run")
  e = add("eval-generate", help="AlpacaEval model_outputs.json for a checkpoint")
  e.add_argument("--checkpoint", required=True)
  e.add_argument("--prompts", required=True)
  e.add_argument("--output", required=True)
  e.add_argument("--config", default=None)
  e.add_argument("--generator", default=None)
  e.add_argument("--limit", type=int, default=None)
  j = add("eval-judge", help="a judge's curation scores against labelled pairs: precision, recall, AUC")
  j.add_argument("--checkpoint", required=True)
  j.add_argument("--labels", required=True, help="JSONL of {instruction, output, label 1..5}")
  j.add_argument("--mode", choices=["generate", "expected", "both"], default="both")
  j.add_argument("--config", default=None, help="take the chat template and judge settings from a run's config")
  j.add_argument("--max-new-tokens", type=int, default=256, help="judge tokens in generate mode (no --config)")
  j.add_argument("--batch-size", type=int, default=16)
  j.add_argument("--limit", type=int, default=None)
  j.add_argument("--output", default=None, help="write the report and every pair's scores as JSON")
  pl = add("plan", help="per-device memory of a job from shapes, or compiled for a TPU topology; exit 1 if it does not fit")
  pl.add_argument("--config", required=True)
  pl.add_argument("--devices", type=_positive_int, default=None, help="default: the config mesh's own size")
  pl.add_argument("--device-gib", type=float, default=80.0)
  pl.add_argument("--mode", choices=["train", "generate"], default="train")
  pl.add_argument("--topology", default=None, help="a TPU slice, e.g. v5p:2x2x2, v5e:16x16 (needs libtpu: .[tpu])")
  pl.add_argument("--slices", type=_positive_int, default=1, help="slices of --topology (multi-slice over DCN)")
  pl.add_argument("--compile", action="store_true", help="AOT-compile the real programs for --topology "
                  "and print XLA's per-device memory and FLOPs")
  pl.add_argument("--prompt-len", type=_positive_int, default=None,
                  help="generate mode: prompt tokens (default: the longest prompt bucket that fits)")
  return p


def _positive_int(text: str) -> int:
  value = int(text)
  if value < 1:
    raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
  return value


COMMANDS = {"convert": cmd_convert, "train": cmd_train, "generate": cmd_generate, "pipeline": cmd_pipeline, "curate": cmd_curate,
            "eval-generate": cmd_eval_generate, "eval-judge": cmd_eval_judge, "plan": cmd_plan}
# The folder each command writes, held by one run at a time (humpback_jax/workdir_lock.py).
WRITES = {"train": "workdir", "pipeline": "workdir", "curate": "workdir", "generate": "output"}


def _shutdown_together() -> None:
  """Multi-process runs meet at a barrier before shutting down, so a slower process never trips
  the coordination service's shutdown timeout."""
  import jax
  from humpback_jax import distributed
  if jax.process_count() > 1:
    distributed.barrier("end")
    jax.distributed.shutdown()


def _run(args, overrides) -> None:
  """Runs one command, holding the folder it writes for the whole run. A single process takes the
  lock before JAX even loads, so a refused run stops at once; a multi-process job takes it from
  process 0 once the processes can agree on the verdict."""
  if args.command == "plan":
    return COMMANDS[args.command](args, overrides)
  from humpback_jax import distributed, workdir_lock
  flag = WRITES.get(args.command)
  folder = Path(getattr(args, flag)) if flag else None
  holder = f"humpback {args.command} --{flag}={folder}"
  if folder is None:
    distributed.initialize()
    COMMANDS[args.command](args, overrides)
  elif distributed.launched_multi_process():
    distributed.initialize()
    import jax
    with workdir_lock.hold(folder, holder, process_index=jax.process_index(), process_count=jax.process_count()):
      COMMANDS[args.command](args, overrides)
  else:
    with workdir_lock.hold(folder, holder):
      distributed.initialize()
      COMMANDS[args.command](args, overrides)
  _shutdown_together()


def main(argv=None) -> int:
  """Entry point of the `humpback` console command; returns the exit code (see the module doc)."""
  console = argv is None
  if console:  # the console command itself: restart once with the malloc settings
    from humpback_jax import malloc_env
    malloc_env.restart_with_settings()
  args, rest = build_parser().parse_known_args(argv)
  overrides = [a for a in rest if a.startswith("--config.")]
  unknown = [a for a in rest if not a.startswith("--config.")]
  if unknown:
    print(f"humpback {args.command}: unknown arguments {unknown}", file=sys.stderr)
    return user_errors.BAD_INPUT
  from humpback_jax import quiet
  quiet.configure(args.verbose)
  try:
    _run(args, overrides)
  except Exception as e:  # every failure becomes one line (and an exit code), never a raw traceback
    where = getattr(args, "workdir", None) or getattr(args, "output", None) or ""
    code, message = user_errors.describe(e, where)
    if args.verbose:
      import traceback
      traceback.print_exc()
    print(f"humpback {args.command}: error: {message}", file=sys.stderr, flush=True)
    if console:  # threads (orbax's async savers, the coordination client) must not keep a failed run alive
      sys.stdout.flush()
      os._exit(code)
    return code
  return user_errors.OK


if __name__ == "__main__":
  sys.exit(main())
