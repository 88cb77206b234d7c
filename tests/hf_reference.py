"""Tiny random-weight Hugging Face LLaMA checkpoints, built on the fly as references."""
from __future__ import annotations

import torch
import transformers

TINY = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
            rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)

VARIANTS = {
    "mha": {},
    "gqa": dict(num_key_value_heads=2),
    "mqa": dict(num_key_value_heads=1),
    "tied": dict(num_key_value_heads=2, tie_word_embeddings=True),
    "llama3_rope": dict(num_key_value_heads=2, rope_theta=500000.0,
                        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                          high_freq_factor=4.0, original_max_position_embeddings=32)),
}


def make_hf_model(variant: str = "gqa", seed: int = 0, **overrides) -> transformers.LlamaForCausalLM:
  """A random LlamaForCausalLM (fp32, eval mode) of the named variant."""
  torch.manual_seed(seed)
  config = transformers.LlamaConfig(**{**TINY, **VARIANTS[variant], **overrides})
  model = transformers.LlamaForCausalLM(config).eval()
  with torch.no_grad():  # norms start at exactly 1; perturb so the test sees them
    for name, p in model.named_parameters():
      if "norm" in name:
        p.add_(0.1 * torch.randn_like(p))
  return model


def save_hf_model(model, folder) -> None:
  """save_pretrained as safetensors."""
  model.save_pretrained(folder, safe_serialization=True)


def hf_logits(model, tokens) -> "np.ndarray":
  """Reference float32 logits for int tokens [batch, len]."""
  with torch.no_grad():
    return model(torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()
