"""GGUF import: SmolLM2-135M-Instruct (Q4_1) through our importer matches transformers' own
GGUF loader logit for logit; llama.cpp's q/k permutation is undone exactly."""
import functools
from pathlib import Path

import gguf
import jax
import ml_collections
import numpy as np
import pytest
import torch
import transformers
from transformers.initialization import no_init_weights
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

from humpback_jax import sharding
from humpback_jax.assets_fetch import smollm2_gguf_path
from humpback_jax.checkpoints import gguf as gguf_ckpt
from humpback_jax.errors import DataError
from humpback_jax.model import build

pytestmark = pytest.mark.smollm2

CHAT = [{"role": "user", "content": "Give three tips for staying healthy."}]


@pytest.fixture(scope="module")
def gguf_path():
  return Path(smollm2_gguf_path()).resolve()


@pytest.fixture(scope="module")
def reader(gguf_path):
  """One parsed GGUFReader for every loader here: otherwise transformers parses the 49k-token
  vocabulary three times more and rebuilds gguf's tensor-name map once per submodule (~15 s)."""
  parsed, open_gguf = gguf_ckpt.open_reader(gguf_path), gguf.GGUFReader
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(gguf, "GGUFReader", lambda path, *args, **kw: (
        parsed if Path(path).resolve() == gguf_path else open_gguf(path, *args, **kw)))
    patch.setattr(gguf, "get_tensor_name_map", functools.cache(gguf.get_tensor_name_map))
    yield parsed


@pytest.fixture(scope="module")
def ours(gguf_path, reader):
  """(config, params) from our importer, unsharded on one device."""
  cfg = gguf_ckpt.read_config(gguf_path, reader)
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(axes=sharding.MESH_AXES, shape=(1, 1, 1))),
                            jax.devices()[:1])
  return cfg, gguf_ckpt.load_params(gguf_path, cfg, sharding.Layout(mesh), reader=reader)


@pytest.fixture(scope="module")
def reference(gguf_path, reader):
  """transformers' LlamaForCausalLM with weights dequantised by transformers itself (fp32)."""
  folder, name = str(gguf_path.parent), gguf_path.name
  config = transformers.AutoConfig.from_pretrained(folder, gguf_file=name)
  with no_init_weights():
    model = transformers.LlamaForCausalLM(config).eval()
  # from_pretrained(gguf_file=...) needs `accelerate`; this is the same loader without it.
  tensors = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=model)["tensors"]
  model.load_state_dict(tensors, strict=False)
  model.tie_weights()
  tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
  return model, tokenizer


@pytest.fixture(scope="module")
def logits(ours, reference):
  """(our logits, reference logits) [3, t, vocab] for two random rows and one chat prompt."""
  cfg, params = ours
  model, tokenizer = reference
  chat = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, return_dict=False)
  randoms = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, len(chat)))
  tokens = np.concatenate([randoms, np.asarray([chat])]).astype(np.int32)
  forward = jax.jit(lambda p, t: build.forward(cfg, p, t)[0])
  tokens_on_device = jax.device_put(tokens, jax.devices()[0])
  with jax.transfer_guard("disallow"):
    got = forward(params, tokens_on_device)
  with torch.no_grad():
    want = model(torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()
  return np.asarray(got), want


def test_config_is_smollm2_135m(ours):
  cfg, _ = ours
  assert (cfg.num_layers, cfg.dim, cfg.mlp_dim, cfg.num_heads, cfg.num_kv_heads) == (30, 576, 1536, 9, 3)
  assert (cfg.rope_theta, cfg.tie_embeddings, cfg.vocab_size) == (1e5, True, 49152)
  assert cfg.rope_scaling.factor == 0.0


def test_logits_match_transformers_on_random_tokens(logits):
  got, want = logits
  np.testing.assert_array_less(np.abs(got[:2] - want[:2]).max(), 1e-3)


def test_logits_match_transformers_on_chat_prompt(logits):
  got, want = logits
  np.testing.assert_array_less(np.abs(got[2] - want[2]).max(), 1e-3)
  assert got[2, -1].argmax() == want[2, -1].argmax()


def test_scanned_import_gives_the_same_logits(gguf_path, reader, ours):
  """Imported straight into the stacked form (`scan_layers`), one dequantised layer at a time."""
  cfg, params = ours
  scanned_cfg = cfg.copy_and_resolve_references()
  scanned_cfg.scan_layers = True
  layout = sharding.Layout(sharding.make_mesh(ml_collections.ConfigDict(dict(axes=sharding.MESH_AXES,
                                                                             shape=(1, 1, 1))), jax.devices()[:1]))
  stacked = gguf_ckpt.load_params(gguf_path, scanned_cfg, layout, reader=reader)
  np.testing.assert_array_equal(stacked["layers"]["attn"]["q"][29], params["layers"][29]["attn"]["q"])
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 16)).astype(np.int32)
  forward = lambda c: jax.jit(lambda p, t: build.forward(c, p, t)[0])
  np.testing.assert_allclose(forward(scanned_cfg)(stacked, tokens), forward(cfg)(params, tokens), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n_head", [1, 3, 9])
def test_unpermute_inverts_llama_cpp_permutation(n_head):
  w = np.arange(n_head * 8 * 5, dtype=np.float32).reshape(n_head * 8, 5)
  permuted = gguf_ckpt.permute_rows(w, n_head)
  assert not np.array_equal(permuted, w)
  np.testing.assert_array_equal(gguf_ckpt.unpermute_rows(permuted, n_head), w)
  # within a head, GGUF interleaves the two rotary halves: rows x0, y0, x1, y1, ...
  np.testing.assert_array_equal(permuted[:4], w[[0, 4, 1, 5]])


def _tiny_gguf(path, arch="llama", dim=8, theta=10000.0, tensors=(), extra=None):
  """A small GGUF with LLaMA metadata and zero-filled [4, dim] tensors of the given names."""
  writer = gguf.GGUFWriter(str(path), arch)
  for key, value in dict(block_count=1, embedding_length=dim, feed_forward_length=16,
                         head_count=2, head_count_kv=1, rope_freq_base=theta).items():
    getattr(writer, f"add_{key}")(value)
  for name, value in {**{n: np.zeros((4, dim), np.float32) for n in tensors}, **(extra or {})}.items():
    writer.add_tensor(name, value)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return path


def test_missing_tensor_names_file_and_tensor(tmp_path):
  path = _tiny_gguf(tmp_path / "tiny.gguf", tensors=["token_embd.weight"])
  cfg = gguf_ckpt.read_config(path)
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(axes=sharding.MESH_AXES, shape=(1, 1, 1))),
                            jax.devices()[:1])
  with pytest.raises(DataError, match=r"tiny\.gguf: tensor '[\w.]+' \(for [\w/]+\) is missing"):
    gguf_ckpt.load_params(path, cfg, sharding.Layout(mesh))


def test_other_architecture_is_refused(tmp_path):
  path = _tiny_gguf(tmp_path / "gpt2.gguf", arch="gpt2")
  with pytest.raises(DataError, match=r"gpt2\.gguf: general\.architecture is 'gpt2'"):
    gguf_ckpt.read_config(path)


def test_llama3_rope_scaling_is_read_from_rope_freqs(tmp_path):
  # llama.cpp's convert_hf_to_gguf.py stores LLaMA-3.1 scaling as per-frequency divisors
  base, dim, factor, old_len = 500000.0, 256, 8.0, 8192  # two heads of 128
  wavelen = 2 * np.pi * base ** (np.arange(0, 128, 2) / 128)
  smooth = (old_len / wavelen - 1.0) / (4.0 - 1.0)
  divisors = np.where(wavelen < old_len / 4, 1.0,
                      np.where(wavelen > old_len, factor, 1 / ((1 - smooth) / factor + smooth)))
  path = _tiny_gguf(tmp_path / "llama31.gguf", dim=dim, theta=base, tensors=["token_embd.weight"],
                    extra={"rope_freqs.weight": divisors.astype(np.float32)})
  scaling = gguf_ckpt.read_config(path).rope_scaling
  assert (scaling.factor, scaling.low_freq_factor, scaling.high_freq_factor) == (8.0, 1.0, 4.0)
  assert scaling.original_max_position_embeddings == 8192


def test_load_then_greedy_chat_matches_transformers_generate(gguf_path, reader, reference):
  """`humpback_jax.load(gguf)` + greedy decoding of a chat prompt gives transformers' tokens."""
  import torch
  import humpback_jax
  hf_model, hf_tokenizer = reference
  model = humpback_jax.load(gguf_path)
  question = "What is the capital of France? Answer in one sentence."
  ours = model.generate([question], max_new_tokens=16, temperature=0.0)[0]
  chat = hf_tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                          return_dict=False)
  with torch.no_grad():
    out = hf_model.generate(torch.tensor([chat]), max_new_tokens=16, do_sample=False)
  theirs = hf_tokenizer.decode(out[0, len(chat):], skip_special_tokens=True)
  assert ours.strip() == theirs.strip()
  assert "Paris" in ours
