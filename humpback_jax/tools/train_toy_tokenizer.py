"""Trains the toy sentencepiece model `assets/toy/tokenizer.model` from the toy corpus and seed.

    python -m humpback_jax.tools.train_toy_tokenizer [--out PATH]

Deterministic (one thread, no sampling, no shuffling, no file names stored in the model): two
runs with the same sentencepiece version write byte-identical files.
"""
from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import bs4
import sentencepiece as spm

TOY_DIR = Path(__file__).resolve().parents[1] / "assets" / "toy"
TRAINER_OPTIONS = dict(
    model_type="bpe", vocab_size=2048, character_coverage=1.0, byte_fallback=True,
    pad_id=0, bos_id=1, eos_id=2, unk_id=3, user_defined_symbols=["[INST]", "[/INST]"],
    # lossless like LLaMA's: no NFKC, keep runs of spaces, one piece per digit
    normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
    allow_whitespace_only_pieces=True,
    num_threads=1, input_sentence_size=0, shuffle_input_sentence=False,
)


def toy_text_lines(toy_dir: Path = TOY_DIR) -> list[str]:
  """Non-empty lines of the toy corpus (HTML stripped) and of the seed pairs, in a fixed order."""
  texts = [bs4.BeautifulSoup(p.read_text(encoding="utf-8"), "lxml").get_text("\n")
           for p in sorted((toy_dir / "corpus").glob("*.html"))]
  for n, line in enumerate((toy_dir / "seed.jsonl").read_text(encoding="utf-8").splitlines(), 1):
    try:
      record = json.loads(line)
      texts += [record["instruction"], record["output"]]
    except (ValueError, KeyError) as e:
      raise ValueError(f"{toy_dir / 'seed.jsonl'}:{n}: need a JSON object with instruction and output ({e})")
  return [s.strip() for text in texts for s in text.splitlines() if s.strip()]


def train_toy_tokenizer(out_path: Path, toy_dir: Path = TOY_DIR) -> Path:
  """Trains the toy model on `toy_text_lines(toy_dir)` and writes it to `out_path`."""
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(toy_text_lines(toy_dir)), model_writer=model,
                                 minloglevel=2, **TRAINER_OPTIONS)
  out_path = Path(out_path)
  out_path.write_bytes(model.getvalue())
  return out_path


def main(argv: list[str] | None = None) -> None:
  """Command line entry: trains into `--out` (default: the shipped asset)."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", type=Path, default=TOY_DIR / "tokenizer.model")
  print(train_toy_tokenizer(parser.parse_args(argv).out))


if __name__ == "__main__":
  main()
