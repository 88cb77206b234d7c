"""Weights that disagree with their config, or files cut short, stop the import naming the tensor and field."""
import json
import os
import re

import gguf
import numpy as np
import pytest

from helpers import layout, tiny_config
from humpback_jax import api, cli
from humpback_jax.checkpoints import gguf as gguf_ckpt
from humpback_jax.checkpoints import hf, model_dir, safetensors_io
from humpback_jax.errors import DataError
from humpback_jax.model import build


@pytest.fixture(scope="module")
def params():
  return build.init_params(tiny_config(), layout(), seed=0)


@pytest.fixture
def hf_folder(tmp_path, params):
  """A 2-layer GQA model (4 heads x 16, 2 kv heads, vocab 128) as a Hugging Face folder."""
  hf.save(tmp_path / "hf", params, tiny_config())
  return tmp_path / "hf"


def edit_config(folder, **changes):
  cfg = json.loads((folder / "config.json").read_text())
  cfg.update(changes)
  (folder / "config.json").write_text(json.dumps(cfg))


def convert(src, dst, capsys, *extra):
  code = cli.main(["convert", str(src), str(dst), *extra])
  return code, capsys.readouterr().err


def test_the_matching_config_converts(hf_folder, tmp_path, capsys):
  assert convert(hf_folder, tmp_path / "ours", capsys)[0] == 0


@pytest.mark.parametrize("change, tensor, field", [
    (dict(num_hidden_layers=1), "model.layers.1.", "num_hidden_layers = 1"),
    (dict(num_hidden_layers=3), "model.layers.2.", "num_hidden_layers = 3"),
    (dict(num_attention_heads=8), "q_proj.weight", "num_attention_heads x head_dim = 8 x 16"),
    (dict(num_key_value_heads=4), "k_proj.weight", "num_key_value_heads x head_dim = 4 x 16"),
    (dict(head_dim=8), "q_proj.weight", "num_attention_heads x head_dim = 4 x 8"),
    (dict(vocab_size=100), "model.embed_tokens.weight", "vocab_size = 100"),
    (dict(intermediate_size=96), "mlp.gate_proj.weight", "intermediate_size = 96"),
    (dict(hidden_size=32, head_dim=16), "model.embed_tokens.weight", "hidden_size = 32"),
    (dict(tie_word_embeddings=True), "lm_head.weight", "tie_word_embeddings = true"),
])
def test_a_mismatched_config_json_exits_naming_the_tensor_and_field(hf_folder, tmp_path, capsys, change, tensor, field):
  edit_config(hf_folder, **change)
  code, err = convert(hf_folder, tmp_path / "ours", capsys)
  assert code == 2
  assert len(err.strip().splitlines()) == 1, err
  assert tensor in err and field in err, err
  assert not (tmp_path / "ours").exists()


def test_a_missing_output_head_names_tie_word_embeddings(tmp_path, params):
  tied = build.init_params(tiny_config(tie_embeddings=True), layout(), seed=0)
  hf.save(tmp_path / "hf", tied, tiny_config(tie_embeddings=True))
  edit_config(tmp_path / "hf", tie_word_embeddings=False)
  with pytest.raises(DataError, match=r"'lm_head.weight' .* is missing; config.json has tie_word_embeddings = false"):
    api.load(tmp_path / "hf", layout=layout())


def test_our_folder_with_a_mismatched_model_json_names_the_tensor_and_field(tmp_path, params):
  model_dir.save(tmp_path / "ours", params, tiny_config())
  meta = json.loads((tmp_path / "ours" / "model.json").read_text())
  meta["model"]["num_layers"] = 1
  (tmp_path / "ours" / "model.json").write_text(json.dumps(meta))
  with pytest.raises(DataError, match=r"would be unused, e.g. \['layers/1/.*model.num_layers = 1"):
    api.load(tmp_path / "ours", layout=layout())


def test_a_tokenizer_path_outside_the_checkpoint_is_refused(tmp_path, params):
  model_dir.save(tmp_path / "ours", params, tiny_config())
  meta = json.loads((tmp_path / "ours" / "model.json").read_text())
  meta["tokenizer"] = "../../etc/passwd"
  (tmp_path / "ours" / "model.json").write_text(json.dumps(meta))
  with pytest.raises(DataError, match=r"model.json: field 'tokenizer' .* points outside the checkpoint"):
    api.load(tmp_path / "ours", layout=layout())


def test_a_weight_map_path_outside_the_folder_is_refused(hf_folder):
  index = dict(weight_map={"model.embed_tokens.weight": "/etc/passwd"})
  (hf_folder / "model.safetensors.index.json").write_text(json.dumps(index))
  with pytest.raises(DataError, match=r"index.json: path '/etc/passwd' points outside"):
    hf.open_hf_tensors(hf_folder)


def test_a_truncated_safetensors_names_the_file_and_tensor(hf_folder):
  path = hf_folder / "model.safetensors"
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) - 100)
  with pytest.raises(DataError, match=r"model.safetensors: tensor '[\w.]+' needs bytes \d+\.\.\d+ but the file ends"):
    hf.open_hf_tensors(hf_folder)


def test_a_safetensors_header_past_the_end_names_the_offset(hf_folder):
  path = hf_folder / "model.safetensors"
  with open(path, "r+b") as f:
    f.truncate(200)
  with pytest.raises(DataError, match=r"model.safetensors: the header claims \d+ bytes at offset 8, past the end"):
    safetensors_io.read_header(path)


def write_gguf(path, params, cfg, *, block_count=None, drop=(), extra=None, **metadata):
  """Our params as a GGUF file with LLaMA metadata (F32 tensors); `metadata` replaces a key
  (head_count=8 writes llama.attention.head_count = 8); `extra` adds tensors."""
  writer = gguf.GGUFWriter(str(path), "llama")
  keys = {**dict(block_count=block_count or cfg.num_layers, embedding_length=cfg.dim, feed_forward_length=cfg.mlp_dim,
                head_count=cfg.num_heads, head_count_kv=cfg.num_kv_heads, context_length=cfg.max_seq_len), **metadata}
  for key, value in keys.items():
    getattr(writer, f"add_{key}")(value)
  tensors = {gguf_ckpt.gguf_name(p): hf.to_hf(p, np.asarray(leaf)) for p, leaf in hf.flatten(params).items()}
  for name, w in {**tensors, **(extra or {})}.items():
    if name not in drop:
      writer.add_tensor(name, np.ascontiguousarray(w))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return path


def test_a_gguf_whose_block_count_is_short_names_the_unused_layer(tmp_path, params):
  path = write_gguf(tmp_path / "m.gguf", params, tiny_config(), block_count=1)
  code = cli.main(["convert", str(path), str(tmp_path / "ours")])
  assert code == 2
  with pytest.raises(DataError, match=r"m.gguf: .*would be unused, e.g. \['blk.1.*llama.block_count = 1"):
    api.load(path, layout=layout())


def test_a_gguf_missing_a_tensor_names_it(tmp_path, params):
  path = write_gguf(tmp_path / "m.gguf", params, tiny_config(), drop=("blk.1.ffn_up.weight",))
  with pytest.raises(DataError, match=r"m.gguf: tensor 'blk.1.ffn_up.weight' \(for layers/1/mlp/up\) is missing"):
    api.load(path, layout=layout())


@pytest.mark.parametrize("keep_bytes, message", [
    (10, r"10 bytes, shorter than a GGUF header"),
    (100, r"metadata 'llama\.[\w.]+' at byte offset \d+ runs past the end of the file \(100 bytes\)"),
    (1000, r"tensor entry #\d+ at byte offset \d+ runs past the end of the file \(1000 bytes\)"),
    (-10, r"tensor 'output.weight' needs bytes \d+\.\.\d+ but the file ends at \d+; the file is truncated"),
])
def test_a_truncated_gguf_names_the_file_and_the_offset_or_tensor(tmp_path, params, capsys, keep_bytes, message):
  path = write_gguf(tmp_path / "m.gguf", params, tiny_config())
  with open(path, "r+b") as f:
    f.truncate(keep_bytes if keep_bytes > 0 else os.path.getsize(path) + keep_bytes)
  code, err = convert(path, tmp_path / "ours", capsys)
  assert code == 2 and len(err.strip().splitlines()) == 1 and re.search(r"m\.gguf: " + message, err), err


@pytest.mark.parametrize("offset, message", [
    (0, r"not a GGUF file \(no 'GGUF' magic at byte offset 0\)"),
    (4, r"the version at byte offset 4 is 4294967295; only GGUF versions 2 and 3 can be read"),
    (16, r"metadata key #\d+ at byte offset \d+ runs past the end of the file"),  # a damaged entry count
    (32, r"metadata key #0 at byte offset 24 is not UTF-8 text"),
])
def test_a_damaged_gguf_names_the_byte_offset(tmp_path, params, offset, message):
  path = write_gguf(tmp_path / "m.gguf", params, tiny_config())
  with open(path, "r+b") as f:
    f.seek(offset)
    f.write(b"\xff" * 8)
  with pytest.raises(DataError, match=r"m\.gguf: " + message):
    api.load(path, layout=layout())


@pytest.mark.parametrize("header, message", [
    (b"{not json", r"safetensors header is not valid JSON"),
    (b'{"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}',
     r"tensor 'w': data_offsets \[0, 8\] do not hold shape \[4\] of F32"),
    (b'{"w": {"dtype": "F32", "shape": [4]}}', r"tensor 'w' has a malformed header entry"),
])
def test_a_malformed_safetensors_header_names_the_file_and_tensor(tmp_path, header, message):
  path = tmp_path / "model.safetensors"
  path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(16))
  with pytest.raises(DataError, match=r"model\.safetensors: " + message):
    safetensors_io.open_tensors(path)


@pytest.mark.parametrize("text, message", [
    ("{not json", r"config.json: not valid JSON"),
    (json.dumps(dict(vocab_size=128, hidden_size=64)), r"config.json: field 'num_attention_heads' is missing"),
])
def test_a_broken_config_json_is_named(hf_folder, tmp_path, capsys, text, message):
  (hf_folder / "config.json").write_text(text)
  code, err = convert(hf_folder, tmp_path / "ours", capsys)
  assert code == 2 and re.search(message, err), err


def test_a_model_json_without_its_config_is_named(tmp_path, params):
  model_dir.save(tmp_path / "ours", params, tiny_config())
  (tmp_path / "ours" / "model.json").write_text(json.dumps(dict(tokenizer=None)))
  with pytest.raises(DataError, match=r"model.json: field 'model' \(the model config\) is missing"):
    api.load(tmp_path / "ours", layout=layout())


def rewrite_safetensors(folder, drop=(), extra=None):
  path = folder / "model.safetensors"
  tensors = {n: np.array(t) for n, t in safetensors_io.open_tensors(path).items() if n not in drop}
  safetensors_io.write(path, {**tensors, **(extra or {})})


@pytest.mark.parametrize("edit, message", [
    (dict(extra={"model.layers.0.self_attn.q_proj.bias": np.zeros(64, np.float32)}),
     r"1 tensor\(s\) would be unused, e.g. \['model.layers.0.self_attn.q_proj.bias'\]"),
    (dict(drop=("model.layers.1.mlp.up_proj.weight",)),
     r"tensor 'model.layers.1.mlp.up_proj.weight' \(for layers/1/mlp/up\) is missing; config.json has "
     r"num_hidden_layers = 2"),
])
def test_convert_of_an_hf_folder_with_an_unused_or_missing_tensor_names_it(hf_folder, tmp_path, capsys, edit, message):
  rewrite_safetensors(hf_folder, **edit)
  code, err = convert(hf_folder, tmp_path / "ours", capsys)
  assert code == 2 and len(err.strip().splitlines()) == 1 and re.search(message, err), err
  assert not (tmp_path / "ours").exists()


def test_rotary_buffers_of_older_hf_exports_are_not_weights(hf_folder, tmp_path, capsys):
  inv_freq = {f"model.layers.{i}.self_attn.rotary_emb.inv_freq": np.ones(8, np.float32) for i in range(2)}
  rewrite_safetensors(hf_folder, extra=inv_freq)
  assert convert(hf_folder, tmp_path / "ours", capsys)[0] == 0


def test_a_head_count_change_without_head_dim_names_the_fields_that_set_the_width(hf_folder, tmp_path, capsys):
  cfg = json.loads((hf_folder / "config.json").read_text())
  del cfg["head_dim"]
  cfg["num_attention_heads"] = 8  # 8 x 8 = 64 rows of q_proj, as 4 x 16: only k_proj (2 kv heads) tells
  (hf_folder / "config.json").write_text(json.dumps(cfg))
  code, err = convert(hf_folder, tmp_path / "ours", capsys)
  assert code == 2
  assert "k_proj.weight" in err and "num_key_value_heads x (hidden_size / num_attention_heads) = 2 x 8" in err, err


@pytest.mark.parametrize("change, tensor, field", [
    (dict(block_count=1), "'blk.1.", "llama.block_count = 1"),
    (dict(block_count=3), "'blk.2.", "llama.block_count = 3"),
    (dict(head_count=8, key_length=16), "'blk.0.attn_q.weight'",
     "llama.attention.head_count x llama.attention.key_length = 8 x 16"),
    (dict(head_count=8), "'blk.0.attn_k.weight'",
     "llama.attention.head_count_kv x (llama.embedding_length / llama.attention.head_count) = 2 x 8"),
    (dict(head_count_kv=4), "'blk.0.attn_k.weight'", "llama.attention.head_count_kv x (llama.embedding_length / "
                                                   "llama.attention.head_count) = 4 x 16"),
    (dict(key_length=8), "'blk.0.attn_q.weight'", "llama.attention.head_count x llama.attention.key_length = 4 x 8"),
    (dict(feed_forward_length=96), "'blk.0.ffn_gate.weight'", "llama.feed_forward_length = 96"),
    (dict(embedding_length=32, key_length=16), "'token_embd.weight'", "llama.embedding_length = 32"),
    (dict(extra={"blk.0.attn_q.bias": np.zeros(64, np.float32)}), "['blk.0.attn_q.bias']", "would be unused"),
    (dict(drop=("output.weight",)), "'token_embd.weight'", ""),  # GGUF ties by leaving out output.weight: loads
])
def test_convert_of_a_gguf_whose_metadata_disagrees_names_the_tensor_and_key(tmp_path, params, capsys, change, tensor,
                                                                            field):
  path = write_gguf(tmp_path / "m.gguf", params, tiny_config(), **change)
  code, err = convert(path, tmp_path / "ours", capsys)
  if not field:  # tied: the weights agree; only the tokenizer (this file has none) is missing
    assert "token_embd" not in err and "tokenizer" in err, err
    return
  assert code == 2 and len(err.strip().splitlines()) == 1, err
  assert tensor in err and field in err, err
  assert not (tmp_path / "ours").exists()


def save_ours(folder, stacked=False, **model_changes):
  cfg = tiny_config(scan_layers=stacked)
  model_dir.save(folder, build.init_params(cfg, layout(), seed=0), cfg)
  meta = json.loads((folder / "model.json").read_text())
  meta["model"].update(model_changes)
  (folder / "model.json").write_text(json.dumps(meta))
  return folder


@pytest.mark.parametrize("stacked, change, tensor, field", [
    (False, dict(num_layers=1), "['layers/1/", "model.num_layers = 1"),
    (False, dict(num_layers=3), "'layers/2/", "model.num_layers = 3"),
    (False, dict(num_heads=8), "'layers/0/attn/", "model.num_heads = 8"),
    (False, dict(num_kv_heads=4), "'layers/0/attn/k'", "model.num_kv_heads = 4"),
    (False, dict(head_dim=8), "'layers/0/attn/", "model.head_dim = 8"),
    (False, dict(vocab_size=100), "'embed'", "model.vocab_size = 100"),
    (False, dict(mlp_dim=96), "'layers/0/mlp/", "model.mlp_dim = 96"),
    (False, dict(tie_embeddings=True), "['lm_head']", "model.tie_embeddings = true"),
    (False, dict(scan_layers=True), "saved as a list", "model.scan_layers = true"),
    (True, dict(num_layers=3), "'layers/", "dim 0: model.num_layers = 3"),
    (True, dict(num_kv_heads=4), "'layers/attn/k'", "model.num_kv_heads = 4"),
    (True, dict(scan_layers=False), "saved stacked", "model.scan_layers = false"),
])
def test_convert_of_our_folder_whose_model_json_disagrees_names_the_tensor_and_field(tmp_path, capsys, stacked,
                                                                                    change, tensor, field):
  src = save_ours(tmp_path / "src", stacked, **change)
  code, err = convert(src, tmp_path / "dst", capsys)
  assert code == 2 and len(err.strip().splitlines()) == 1, err
  assert tensor in err and field in err, err
  assert not (tmp_path / "dst").exists()


@pytest.mark.parametrize("change, message", [
    (dict(no_such_field=1), r"model.json: model.no_such_field: unknown model field"),
    (dict(num_layers="two"), r"model.json: .*num_layers"),
])
def test_a_damaged_model_json_is_named(tmp_path, capsys, change, message):
  src = save_ours(tmp_path / "src", **change)
  code, err = convert(src, tmp_path / "dst", capsys)
  assert code == 2 and re.search(message, err), err
