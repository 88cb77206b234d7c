"""Tokenizers behind one interface: sentencepiece (`*.model`) and byte-level BPE (`tokenizer.json`
or a GGUF's metadata), plus chat templates as plain format strings.
"""
from __future__ import annotations

import abc
import json
from pathlib import Path
from typing import Sequence

import gguf
import sentencepiece as spm
import tokenizers
from tokenizers import decoders, models, pre_tokenizers

from humpback_jax.errors import DataError

# Chat templates: Python format strings with `{instruction}` and optionally `{system}`.
LLAMA2_INST = "[INST] {instruction} [/INST]"
# What SmolLM2's own jinja template renders for one user turn and no system message: it adds
# its default system turn itself, so that turn is part of the template.
CHATML = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
          "<|im_end|>\n<|im_start|>user\n{instruction}<|im_end|>\n<|im_start|>assistant\n")
CHATML_SYSTEM = ("<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{instruction}<|im_end|>\n"
                 "<|im_start|>assistant\n")

# llama.cpp's `tokenizer.ggml.pre` -> how text is split before byte-level BPE.
_BYTE_LEVEL = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
_DIGITS_THEN_BYTE_LEVEL = pre_tokenizers.Sequence(
    [pre_tokenizers.Digits(individual_digits=True), _BYTE_LEVEL])
GGUF_PRE_TOKENIZERS = {
    "default": _BYTE_LEVEL, "gpt2": _BYTE_LEVEL,
    # llama.cpp splits off every digit (`\p{N}`) before the GPT-2 regex for these.
    "smollm": _DIGITS_THEN_BYTE_LEVEL, "starcoder": _DIGITS_THEN_BYTE_LEVEL,
    "refact": _DIGITS_THEN_BYTE_LEVEL,
}
GGUF_CONTROL, GGUF_USER_DEFINED = 3, 4  # llama.cpp token types


def render_chat(template: str, instruction: str, system: str | None = None) -> str:
  """The prompt text for one user turn: `template` with `{instruction}` (and `{system}`) filled in."""
  if ("{system}" in template) != (system is not None):
    raise ValueError(f"chat template {template!r} and system={system!r} disagree: "
                     "pass a system message exactly when the template has a {system} field")
  return template.format(instruction=instruction, system=system)


class Tokenizer(abc.ABC):
  """Text <-> token ids, with the special ids the rest of the code needs."""

  bos_id: int | None
  eos_id: int
  pad_id: int
  add_bos: bool = True  # whether the model expects BOS in front of a prompt (SmolLM2's GGUF says no)

  @abc.abstractmethod
  def _encode(self, text: str) -> list[int]:
    """Ids of `text`, special tokens not added."""

  @abc.abstractmethod
  def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
    """Text of `ids`; special tokens dropped when `skip_special`."""

  @property
  @abc.abstractmethod
  def vocab_size(self) -> int:
    """Number of ids, special tokens included."""

  def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
    """Ids of `text`, with BOS in front and/or EOS at the end when asked."""
    if add_bos and self.bos_id is None:
      raise ValueError(f"{type(self).__name__} has no BOS token; encode with add_bos=False")
    return [self.bos_id] * add_bos + self._encode(text) + [self.eos_id] * add_eos

  def encode_prompt(self, text: str) -> list[int]:
    """Ids of a prompt as the model expects it: BOS in front when the model uses one."""
    return self.encode(text, add_bos=self.add_bos and self.bos_id is not None)


class SentencePieceTokenizer(Tokenizer):
  """A sentencepiece `*.model` file."""

  def __init__(self, model_path: str | Path):
    self.path = Path(model_path)
    self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
    if self.sp.eos_id() < 0:
      raise ValueError(f"{self.path}: sentencepiece model has no EOS piece (trainer eos_id=-1)")
    self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None
    self.eos_id = self.sp.eos_id()
    self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eos_id

  def _encode(self, text: str) -> list[int]:
    return self.sp.encode(text)

  def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
    """Text of `ids`; with `skip_special=False` control pieces (`<s>`, `</s>`, ...) appear as text."""
    ids = [int(i) for i in ids]
    if skip_special:
      return self.sp.decode(ids)
    parts, run = [], []
    for i in ids + [None]:
      if i is not None and not self.sp.is_control(i):
        run.append(i)
        continue
      parts.append(self.sp.decode(run))
      run = []
      if i is not None:
        parts.append(self.sp.id_to_piece(i))
    return "".join(parts)

  @property
  def vocab_size(self) -> int:
    """Number of pieces, control and byte pieces included."""
    return self.sp.get_piece_size()


class HFTokenizer(Tokenizer):
  """A `tokenizers.Tokenizer` (e.g. from `tokenizer.json`); special ids given, since the file may not say."""

  def __init__(self, tokenizer: str | Path | tokenizers.Tokenizer, bos_id: int | None, eos_id: int,
               pad_id: int | None = None, add_bos: bool = True):
    if not isinstance(tokenizer, tokenizers.Tokenizer):
      tokenizer = tokenizers.Tokenizer.from_file(str(tokenizer))
    self.tok = tokenizer
    self.bos_id, self.eos_id, self.add_bos = bos_id, eos_id, add_bos
    self.pad_id = eos_id if pad_id is None or pad_id < 0 else pad_id

  def _encode(self, text: str) -> list[int]:
    return self.tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
    """Text of `ids`; added special tokens dropped when `skip_special`."""
    return self.tok.decode([int(i) for i in ids], skip_special_tokens=skip_special)

  @property
  def vocab_size(self) -> int:
    """Number of ids, added tokens included."""
    return self.tok.get_vocab_size(with_added_tokens=True)


def _gguf_fields(path: Path) -> dict:
  """The `tokenizer.*` metadata of a GGUF file, as Python values."""
  reader = gguf.GGUFReader(path)
  fields = {}
  for name, field in reader.fields.items():
    if not name.startswith("tokenizer."):
      continue
    if field.types[0] == gguf.GGUFValueType.ARRAY and field.types[-1] == gguf.GGUFValueType.STRING:
      fields[name] = [bytes(field.parts[i]).decode("utf-8") for i in field.data]
    else:
      fields[name] = field.contents()
  return fields


def tokenizer_from_gguf(path: str | Path) -> HFTokenizer:
  """The byte-level BPE tokenizer described by a GGUF's `tokenizer.ggml.*` metadata."""
  path = Path(path)
  meta = _gguf_fields(path)
  for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.eos_token_id"):
    if key not in meta:
      raise ValueError(f"{path}: GGUF metadata has no {key}; need a byte-level BPE (gpt2) tokenizer")
  if meta.get("tokenizer.ggml.model") != "gpt2":
    raise ValueError(f"{path}: tokenizer.ggml.model is {meta.get('tokenizer.ggml.model')!r}; "
                     "only byte-level BPE ('gpt2') GGUF tokenizers are supported")
  pre = meta.get("tokenizer.ggml.pre", "default")
  if pre not in GGUF_PRE_TOKENIZERS:
    raise ValueError(f"{path}: tokenizer.ggml.pre is {pre!r}; supported: {sorted(GGUF_PRE_TOKENIZERS)}")
  tokens = meta["tokenizer.ggml.tokens"]
  merges = [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]
  tok = tokenizers.Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
  tok.pre_tokenizer = GGUF_PRE_TOKENIZERS[pre]
  tok.decoder = decoders.ByteLevel()
  types = meta.get("tokenizer.ggml.token_type", [])
  tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False)
                          for t, k in zip(tokens, types) if k == GGUF_CONTROL])
  tok.add_tokens([tokenizers.AddedToken(t, special=False, normalized=False)
                  for t, k in zip(tokens, types) if k == GGUF_USER_DEFINED])
  return HFTokenizer(tok, meta.get("tokenizer.ggml.bos_token_id"), meta["tokenizer.ggml.eos_token_id"],
                     meta.get("tokenizer.ggml.padding_token_id"),
                     add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", True)))


def chat_template_from_gguf(path: str | Path) -> str | None:
  """The raw jinja chat template stored in a GGUF (`tokenizer.chat_template`), if any."""
  return _gguf_fields(Path(path)).get("tokenizer.chat_template")


def _json_object(path: Path) -> dict:
  """A JSON object file of a tokenizer folder; DataError naming it when damaged."""
  try:
    value = json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise DataError(f"{path}: not valid JSON ({e}); restore the checkpoint folder's file", path=path) from None
  if not isinstance(value, dict):
    raise DataError(f"{path}: expected a JSON object", path=path)
  return value


def _special_id(tok: tokenizers.Tokenizer, folder: Path, name: str) -> int | None:
  """Id of `{name}_token` from tokenizer_config.json, else `{name}_token_id` from config.json."""
  cfg_path = folder / "tokenizer_config.json"
  if cfg_path.exists():
    token = _json_object(cfg_path).get(f"{name}_token")
    token = token.get("content") if isinstance(token, dict) else token
    if token is not None:
      if tok.token_to_id(token) is None:
        raise ValueError(f"{cfg_path}: {name}_token {token!r} is not in the vocabulary")
      return tok.token_to_id(token)
  cfg_path = folder / "config.json"
  if cfg_path.exists():
    token_id = _json_object(cfg_path).get(f"{name}_token_id")
    return token_id[0] if isinstance(token_id, list) else token_id
  return None


def _hf_tokenizer_from_folder(folder: Path) -> HFTokenizer:
  """An HF checkpoint folder's `tokenizer.json`, special ids from its config files."""
  tok = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
  bos, eos, pad = (_special_id(tok, folder, name) for name in ("bos", "eos", "pad"))
  if eos is None:
    raise ValueError(f"{folder}: no eos_token in tokenizer_config.json nor eos_token_id in config.json")
  return HFTokenizer(tok, bos, eos, pad)


def load_tokenizer(path: str | Path) -> Tokenizer:
  """A tokenizer from `*.model` (sentencepiece), `*.gguf`, `tokenizer.json`, or a folder holding one."""
  path = Path(path)
  if path.is_dir():
    if (path / "tokenizer.json").exists():
      return _hf_tokenizer_from_folder(path)
    if (path / "tokenizer.model").exists():
      return SentencePieceTokenizer(path / "tokenizer.model")
  elif path.exists():
    if path.suffix == ".model":
      return SentencePieceTokenizer(path)
    if path.suffix == ".gguf":
      return tokenizer_from_gguf(path)
    if path.name == "tokenizer.json":
      return _hf_tokenizer_from_folder(path.parent)
  raise ValueError(f"{path}: not a tokenizer; expected a sentencepiece *.model, a *.gguf, a tokenizer.json, "
                   "or a folder holding tokenizer.json or tokenizer.model")
