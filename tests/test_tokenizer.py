"""The tokenizer interface on the toy sentencepiece model, `load_tokenizer` dispatch and chat templates."""
from __future__ import annotations

import json

import pytest
import tokenizers
from tokenizers import models, pre_tokenizers

from humpback_jax.tokenizer import (CHATML, CHATML_SYSTEM, LLAMA2_INST, HFTokenizer, SentencePieceTokenizer,
                                    load_tokenizer, render_chat)
from humpback_jax.tools.train_toy_tokenizer import TOY_DIR, toy_text_lines, train_toy_tokenizer

TOY_MODEL = TOY_DIR / "tokenizer.model"


@pytest.fixture(scope="module")
def toy():
  return SentencePieceTokenizer(TOY_MODEL)


def test_toy_model_round_trips_its_training_text(toy):
  lines = toy_text_lines()
  assert len(lines) > 1000
  assert [toy.decode(toy.encode(s)) for s in lines] == lines


@pytest.mark.parametrize("text", ["two  spaces\nand\ttabs\n\n", "digits 12345 and ünïcödé ✓ 日本語", "  leading"])
def test_toy_model_is_lossless_on_unseen_text(toy, text):
  assert toy.decode(toy.encode(text)) == text


def test_toy_special_ids(toy):
  assert (toy.pad_id, toy.bos_id, toy.eos_id, toy.vocab_size) == (0, 1, 2, 2048)
  assert toy.sp.unk_id() == 3


def test_encode_adds_bos_and_eos_only_when_asked(toy):
  body = toy.encode("Bake the bread.")
  assert toy.encode("Bake the bread.", add_bos=True, add_eos=True) == [1, *body, 2]
  assert 1 not in body and 2 not in body


def test_decode_shows_special_tokens_only_when_asked(toy):
  ids = toy.encode("Hello there.", add_bos=True, add_eos=True)
  assert toy.decode(ids) == "Hello there."
  assert toy.decode(ids, skip_special=False) == "<s>Hello there.</s>"


def test_inst_markers_are_single_tokens(toy):
  pieces = [toy.sp.id_to_piece(i) for i in toy.encode(render_chat(LLAMA2_INST, "What is INST?"))]
  assert [p for p in pieces if "[" in p or "]" in p] == ["[INST]", "[/INST]"]


def test_retraining_reproduces_the_shipped_model_byte_for_byte(tmp_path):
  assert train_toy_tokenizer(tmp_path / "again.model").read_bytes() == TOY_MODEL.read_bytes()


def _write_hf_folder(folder, tokenizer_config=None, config=None):
  """A tiny word-level tokenizer.json (+ optional config files) in `folder`."""
  vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, "hello": 4, "world": 5}
  tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.add_special_tokens(["<s>", "</s>", "<pad>"])
  folder.mkdir(exist_ok=True)
  tok.save(str(folder / "tokenizer.json"))
  if tokenizer_config is not None:
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
  if config is not None:
    (folder / "config.json").write_text(json.dumps(config))
  return folder


def test_load_tokenizer_picks_sentencepiece_for_model_files_and_folders(tmp_path):
  (tmp_path / "tokenizer.model").write_bytes(TOY_MODEL.read_bytes())
  assert isinstance(load_tokenizer(TOY_MODEL), SentencePieceTokenizer)
  assert isinstance(load_tokenizer(tmp_path), SentencePieceTokenizer)


def test_load_tokenizer_reads_special_tokens_from_tokenizer_config(tmp_path):
  folder = _write_hf_folder(tmp_path, tokenizer_config={"bos_token": "<s>", "eos_token": {"content": "</s>"},
                                                        "pad_token": "<pad>"})
  tok = load_tokenizer(folder)
  assert isinstance(tok, HFTokenizer)
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 3)
  assert tok.encode("hello world", add_bos=True) == [1, 4, 5]


def test_load_tokenizer_falls_back_to_config_json_and_pads_with_eos(tmp_path):
  folder = _write_hf_folder(tmp_path, config={"bos_token_id": 1, "eos_token_id": [2, 3]})
  tok = load_tokenizer(folder / "tokenizer.json")
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 2)


def test_load_tokenizer_needs_an_eos_for_hf_folders(tmp_path):
  with pytest.raises(ValueError, match="eos_token"):
    load_tokenizer(_write_hf_folder(tmp_path))


def test_load_tokenizer_rejects_unknown_paths(tmp_path):
  (tmp_path / "vocab.txt").write_text("hello\n")
  for path in (tmp_path / "vocab.txt", tmp_path / "missing.model", tmp_path):
    with pytest.raises(ValueError, match="expected a sentencepiece") as err:
      load_tokenizer(path)
    assert str(path) in str(err.value)


def test_render_chat_llama2():
  assert render_chat(LLAMA2_INST, "Name a fruit.") == "[INST] Name a fruit. [/INST]"


def test_render_chat_chatml_includes_smollm_default_system_turn():
  assert render_chat(CHATML, "Name a fruit.") == (
      "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
      "<|im_start|>user\nName a fruit.<|im_end|>\n<|im_start|>assistant\n")


def test_render_chat_fills_system_and_leaves_braces_in_instructions_alone():
  assert render_chat(CHATML_SYSTEM, "Print {x}.", system="Be brief.") == (
      "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nPrint {x}.<|im_end|>\n<|im_start|>assistant\n")


def test_render_chat_rejects_a_system_message_the_template_cannot_hold():
  with pytest.raises(ValueError, match="system"):
    render_chat(LLAMA2_INST, "Hi", system="Be brief.")
  with pytest.raises(ValueError, match="system"):
    render_chat(CHATML_SYSTEM, "Hi")
