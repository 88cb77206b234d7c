"""SmolLM2's byte-level BPE, rebuilt from GGUF metadata, against transformers' tokenizer for the same file."""
from __future__ import annotations

import pytest

from humpback_jax.assets_fetch import smollm2_gguf_path
from humpback_jax.tokenizer import CHATML, chat_template_from_gguf, render_chat, tokenizer_from_gguf

pytestmark = pytest.mark.smollm2

TEXTS = [
    "Hello world",
    "12345",
    "Pi is 3.14159, not 22/7.",
    "héllo wörld ✓",
    "line one\nline two\n\nline four\n",
    "def square(x):\n    return x ** 2\n",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "I'm sure they'll say we've done it.",
    "日本語のテキスト and emoji 🚀🐋",
    "   indented\ttext   ",
    "",
]


@pytest.fixture(scope="module")
def gguf_path():
  return smollm2_gguf_path()


@pytest.fixture(scope="module")
def ours(gguf_path):
  return tokenizer_from_gguf(gguf_path)


@pytest.fixture(scope="module")
def reference(gguf_path):
  transformers = pytest.importorskip("transformers")
  return transformers.AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)


@pytest.mark.parametrize("text", TEXTS)
def test_ids_match_transformers(ours, reference, text):
  assert ours.encode(text) == reference.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("text", TEXTS)
def test_decode_round_trips(ours, text):
  assert ours.decode(ours.encode(text), skip_special=False) == text


def test_decode_drops_special_tokens_like_transformers(ours, reference):
  ids = ours.encode(TEXTS[6])
  assert ours.decode(ids) == reference.decode(ids, skip_special_tokens=True) == "user\nWhat is 2+2?\nassistant\n"


def test_special_ids_match_transformers(ours, reference):
  assert (ours.bos_id, ours.eos_id, ours.pad_id) == (reference.bos_token_id, reference.eos_token_id,
                                                      reference.pad_token_id) == (1, 2, 2)
  assert ours.vocab_size == len(reference) == 49152


def test_whitespace_before_a_digit_stays_one_piece_as_in_llama_cpp(ours, reference):
  # llama.cpp's "smollm" pre-tokenizer (and SmolLM2's own tokenizer.json) split off each digit
  # first, so "\n\n" before "1" is one token; transformers' GGUF loader (5.x) splits it in two.
  assert ours.encode("Steps:\n\n1.") == reference.convert_tokens_to_ids(["Steps", ":", "ĊĊ", "1", "."])
  assert ours.encode("x  1") == reference.convert_tokens_to_ids(["x", "ĠĠ", "1"])


def test_chatml_matches_the_gguf_chat_template(gguf_path, reference):
  instruction = "Give me three tips for better sleep."
  rendered = reference.apply_chat_template([{"role": "user", "content": instruction}], tokenize=False,
                                           add_generation_prompt=True,
                                           chat_template=chat_template_from_gguf(gguf_path))
  assert render_chat(CHATML, instruction) == rendered
