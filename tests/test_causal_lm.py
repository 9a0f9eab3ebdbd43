"""qjax.models.llama and qjax.pretrained.causal_lm: logits equal transformers' on tiny random
Llama (GQA, tied) and Qwen2 (q/k/v biases, untied) checkpoints written with save_pretrained;
loader errors."""
import json
import os
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from qjax.pretrained import causal_lm
from qjax.pretrained import gguf as gguf_loader  # not the gguf package
from qjax.models import llama

# transformers (torch CPU) is the reference: the `torch` extra, installed for CI's slow step.
pytestmark = pytest.mark.slow
torch = pytest.importorskip("torch")


def _import_transformers():
  """transformers with its model classes imported. The torchvision wheel here does not load with
  the CPU torch ("operator torchvision::nms does not exist") and transformers' Llama imports it
  when it is installed, so it is hidden during the import (and only then: test_torchvision
  imports it its own way)."""
  hidden = "torchvision" not in sys.modules
  if hidden:
    sys.modules["torchvision"] = None  # an ImportError for transformers' optional import
  try:
    import transformers  # pylint: disable=g-import-not-at-top
    for name in ("LlamaForCausalLM", "Qwen2ForCausalLM", "PreTrainedTokenizerFast",
                 "AutoModelForCausalLM", "AutoTokenizer"):
      getattr(transformers, name)
  finally:
    if hidden:
      del sys.modules["torchvision"]
  return transformers


transformers = _import_transformers()

TEXTS = ["def f(x):\n    return x ** 2  # 12345", "Grüße aus München, 3.14159!",
         "東京は日本の首都です。", "emoji 🙂🚀 and tabs\tend"]


def _tokenizer_json(path, vocab_size):
  """A small byte-level BPE tokenizer.json (trained on TEXTS) next to the weights."""
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers, trainers
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(TEXTS * 4, trainers.BpeTrainer(
      vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  tok.save(os.path.join(path, "tokenizer.json"))


def _save(tmp_path, kind, **kw):
  torch.manual_seed(0)
  common = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
  common.update(kw)
  if kind == "llama":
    cfg = transformers.LlamaConfig(tie_word_embeddings=True, rope_theta=100000.0,
                                   rms_norm_eps=1e-5, **common)
    model = transformers.LlamaForCausalLM(cfg)
  else:
    cfg = transformers.Qwen2Config(tie_word_embeddings=False, rope_theta=1e6,
                                   rms_norm_eps=1e-6, **common)
    model = transformers.Qwen2ForCausalLM(cfg)
  with torch.no_grad():  # non-trivial norms and biases, so a wrong mapping shows
    for name, p in model.named_parameters():
      if "norm" in name or name.endswith("bias"):
        p.copy_(1.0 + 0.3 * torch.randn_like(p) if "norm" in name else 0.3 * torch.randn_like(p))
  path = tmp_path / kind
  model.save_pretrained(path)
  _tokenizer_json(path, 300)
  return model.eval(), str(path)


def _rel(a, b):
  return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_logits_equal_transformers(tmp_path, kind):
  model, path = _save(tmp_path, kind)
  lm = causal_lm.load_causal_lm(path)
  assert lm.config.tie_word_embeddings == (kind == "llama")
  assert lm.config.attention_bias == (kind == "qwen2")
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 300, size=(2, 17)).astype(np.int32)
  ours = np.asarray(lm.apply_fn(lm.params, jnp.asarray(tokens)))
  with torch.no_grad():
    ref = model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
  assert ours.shape == ref.shape == (2, 17, 300)
  assert _rel(ours, ref) < 1e-4


def test_padding_mask_matches_transformers(tmp_path):
  model, path = _save(tmp_path, "llama")
  lm = causal_lm.load_causal_lm(path)
  tokens = np.random.default_rng(1).integers(0, 300, size=(2, 9)).astype(np.int32)
  mask = np.ones_like(tokens)
  mask[1, :3] = 0  # left padding
  ours = np.asarray(lm.apply_fn(lm.params, jnp.asarray(tokens), jnp.asarray(mask)))
  with torch.no_grad():
    ref = model(torch.tensor(tokens, dtype=torch.long),
                attention_mask=torch.tensor(mask)).logits.numpy()
  keep = mask.astype(bool)
  assert _rel(ours[keep], ref[keep]) < 1e-4
  # Padding never changes a real token's logits.
  alone = np.asarray(lm.apply_fn(lm.params, jnp.asarray(tokens[1:, 3:])))
  assert _rel(ours[1, 3:], alone[0]) < 1e-5


def test_llama3_rope_scaling_matches_transformers(tmp_path):
  scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
             "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
  model, path = _save(tmp_path, "llama", rope_scaling=scaling, head_dim=32)
  lm = causal_lm.load_causal_lm(path)
  tokens = np.random.default_rng(2).integers(0, 300, size=(1, 40)).astype(np.int32)
  ours = np.asarray(lm.apply_fn(lm.params, jnp.asarray(tokens)))
  with torch.no_grad():
    ref = model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
  assert _rel(ours, ref) < 1e-4


def test_sharded_checkpoint(tmp_path):
  model, _ = _save(tmp_path, "qwen2")
  path = tmp_path / "sharded"
  model.save_pretrained(path, max_shard_size="100KB")
  assert (path / "model.safetensors.index.json").exists()
  _tokenizer_json(path, 300)
  lm = causal_lm.load_causal_lm(str(path))
  tokens = np.arange(12, dtype=np.int32)[None]
  with torch.no_grad():
    ref = model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
  assert _rel(np.asarray(lm.apply_fn(lm.params, jnp.asarray(tokens))), ref) < 1e-4


def test_tokenizer_matches_transformers(tmp_path):
  _, path = _save(tmp_path, "llama")
  lm = causal_lm.load_causal_lm(path)
  ref = transformers.PreTrainedTokenizerFast(tokenizer_file=os.path.join(path, "tokenizer.json"))
  for t in TEXTS:
    ids = lm.encode(t)
    assert ids.dtype == np.int32
    assert ids.tolist() == ref.encode(t, add_special_tokens=False)
    assert lm.decode(ids) == t


def test_unpermute_inverts_llama_cpp_permute():
  # llama.cpp's convert_hf_to_gguf.LlamaModel.permute, written out.
  def permute(w, n_head):
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
        w.shape)
  w = np.random.default_rng(0).normal(size=(3 * 8, 5))
  np.testing.assert_array_equal(gguf_loader.unpermute_qk(permute(w, 3), 3), w)
  # Rows of one head: interleaved pairs (0, 4), (1, 5), ... back to halves.
  idx = np.arange(8.0)[:, None]
  assert gguf_loader.unpermute_qk(permute(idx, 1), 1).ravel().tolist() == list(range(8))
  assert permute(idx, 1).ravel().tolist() == [0, 4, 1, 5, 2, 6, 3, 7]


def test_bad_inputs(tmp_path):
  _, path = _save(tmp_path, "llama")
  cfg_file = os.path.join(path, "config.json")
  with open(cfg_file) as f:
    hf = json.load(f)
  # config.json whose shapes do not fit the tensors: names the file and the tensor.
  with open(cfg_file, "w") as f:
    json.dump({**hf, "intermediate_size": 128}, f)
  with pytest.raises(ValueError, match=r"model.safetensors.*mlp.(gate|up|down)_proj.weight"):
    causal_lm.load_causal_lm(path)
  with open(cfg_file, "w") as f:
    json.dump({**hf, "model_type": "gpt2"}, f)
  with pytest.raises(ValueError, match=r"config.json: model_type 'gpt2'"):
    causal_lm.load_causal_lm(path)
  with open(cfg_file, "w") as f:
    json.dump(hf, f)
  os.remove(os.path.join(path, "tokenizer.json"))
  with pytest.raises(ValueError, match="missing tokenizer.json"):
    causal_lm.load_causal_lm(path)
  with pytest.raises(ValueError, match="no such file"):
    causal_lm.load_causal_lm(tmp_path / "nothing")
  with pytest.raises(ValueError, match="num_key_value_heads"):
    llama.LlamaConfig(10, 8, 8, 1, 3, 2, 4)
