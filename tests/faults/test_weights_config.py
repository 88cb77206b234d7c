"""Weights that disagree with their config, or files cut short, stop the import naming the tensor and field."""
import json
import os

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


def write_gguf(path, params, cfg, *, block_count=None, drop=()):
  """Our params as a GGUF file with LLaMA metadata (F32 tensors)."""
  writer = gguf.GGUFWriter(str(path), "llama")
  writer.add_block_count(block_count or cfg.num_layers)
  writer.add_embedding_length(cfg.dim)
  writer.add_feed_forward_length(cfg.mlp_dim)
  writer.add_head_count(cfg.num_heads)
  writer.add_head_count_kv(cfg.num_kv_heads)
  writer.add_context_length(cfg.max_seq_len)
  for our_path, leaf in hf.flatten(params).items():
    name = gguf_ckpt.gguf_name(our_path)
    if name not in drop:
      writer.add_tensor(name, np.ascontiguousarray(hf.to_hf(our_path, np.asarray(leaf))))
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


@pytest.mark.parametrize("keep_fraction", [0.3, 0.9])
def test_a_truncated_gguf_names_the_file(tmp_path, params, keep_fraction):
  path = write_gguf(tmp_path / "m.gguf", params, tiny_config())
  with open(path, "r+b") as f:
    f.truncate(int(os.path.getsize(path) * keep_fraction))
  with pytest.raises(DataError, match=r"m.gguf: (truncated or malformed GGUF|tensor '[\w.]+' needs bytes)"):
    api.load(path, layout=layout())


@pytest.mark.parametrize("text, message", [
    ("{not json", r"config.json: not valid JSON"),
    (json.dumps(dict(vocab_size=128, hidden_size=64)), r"config.json: field 'num_attention_heads' is missing"),
])
def test_a_broken_config_json_is_named(hf_folder, tmp_path, capsys, text, message):
  (hf_folder / "config.json").write_text(text)
  code, err = convert(hf_folder, tmp_path / "ours", capsys)
  assert code == 2 and __import__("re").search(message, err), err


def test_a_model_json_without_its_config_is_named(tmp_path, params):
  model_dir.save(tmp_path / "ours", params, tiny_config())
  (tmp_path / "ours" / "model.json").write_text(json.dumps(dict(tokenizer=None)))
  with pytest.raises(DataError, match=r"model.json: field 'model' \(the model config\) is missing"):
    api.load(tmp_path / "ours", layout=layout())
