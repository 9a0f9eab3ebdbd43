"""Torch-free tests of qjax.causal_lm and the causal_lm task: a tiny random checkpoint written
with safetensors' NumPy API in the Hugging Face layout (the torch comparisons are in
test_causal_lm.py, slow)."""
import json
import os

import numpy as np
import pytest
from safetensors.numpy import save_file

from qjax import causal_lm
from qjax import main
from qjax.models import llama

HF = dict(model_type="llama", vocab_size=300, hidden_size=32, intermediate_size=48,
          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
          rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True,
          max_position_embeddings=256, hidden_act="silu")


def write_checkpoint(path, hf=HF, drop=(), reshape=None):
  """config.json, model.safetensors (random, Hugging Face names and (out, in) shapes), tokenizer."""
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers, trainers
  os.makedirs(path, exist_ok=True)
  cfg = llama.LlamaConfig.from_hf(hf)
  rng = np.random.default_rng(0)
  tensors = {name: (0.2 * rng.normal(size=shape)).astype(np.float32)
             for name, shape in causal_lm._expected_shapes(cfg).items() if name not in drop}
  if reshape:
    tensors[reshape[0]] = np.zeros(reshape[1], np.float32)
  save_file(tensors, os.path.join(path, "model.safetensors"))
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(hf, f)
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(["def f(x): return x + 1", "The quick brown fox."] * 8,
                          trainers.BpeTrainer(vocab_size=300,
                                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  tok.save(os.path.join(path, "tokenizer.json"))
  return str(path)


def test_loads_and_maps_every_tensor(tmp_path):
  path = write_checkpoint(tmp_path / "m")
  lm = causal_lm.load_causal_lm(path)
  from safetensors.numpy import load_file
  t = load_file(os.path.join(path, "model.safetensors"))
  q = np.asarray(lm.params["layers_1"]["self_attn"]["q_proj"]["kernel"])
  np.testing.assert_array_equal(q, t["model.layers.1.self_attn.q_proj.weight"].T)
  logits = lm.apply_fn(lm.params, np.zeros((2, 5), np.int32))
  assert logits.shape == (2, 5, 300) and logits.dtype == np.float32
  assert lm.decode(lm.encode("def f(x)")) == "def f(x)"


def test_errors_name_file_and_tensor(tmp_path):
  with pytest.raises(ValueError, match=r"model.safetensors.*'model.layers.0.mlp.up_proj.weight'"
                                       r".*shape \(48, 31\)"):
    causal_lm.load_causal_lm(write_checkpoint(
        tmp_path / "a", reshape=("model.layers.0.mlp.up_proj.weight", (48, 31))))
  with pytest.raises(ValueError, match=r"missing tensors \['model.norm.weight'\]"):
    causal_lm.load_causal_lm(write_checkpoint(tmp_path / "b", drop=("model.norm.weight",)))
  with pytest.raises(ValueError, match=r"unexpected tensors \['model.layers.2"):
    causal_lm.load_causal_lm(write_checkpoint(
        tmp_path / "c", reshape=("model.layers.2.mlp.up_proj.weight", (48, 32))))
  with pytest.raises(ValueError, match="sliding-window"):
    llama.LlamaConfig.from_hf({**HF, "model_type": "mistral", "sliding_window": 4096})
  with pytest.raises(ValueError, match="rope_type 'yarn'"):
    llama.LlamaConfig.from_hf({**HF, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}})
  bad = tmp_path / "bad.gguf"
  bad.write_bytes(b"NOPE" + b"\0" * 64)
  with pytest.raises(ValueError, match="bad.gguf: not a GGUF file"):
    causal_lm.load_causal_lm(bad)


@pytest.mark.slow  # ~1 min: tokenizes the whole corpus, compiles 4 methods
def test_causal_lm_task_smoke(tmp_path):
  path = write_checkpoint(tmp_path / "m")
  config = main.load_config("configs/smollm2_ptq.py")
  config.weights = path
  config.smoke = True
  rows = main.run(config, str(tmp_path / "work"))
  methods = {r["method"] for r in rows}
  assert methods == {"float", "rtn", "gptq", "gptq act-order", "gpfq"}
  assert all(np.isfinite(r["perplexity"]) and r["perplexity"] > 1 for r in rows)
  exported = [r for r in rows if "storage_bytes" in r]
  assert len(exported) == 1 and exported[0]["storage_bytes"] > 0
  assert os.path.exists(tmp_path / "work" / "perplexity.png")
  config.methods = ("nope",)
  with pytest.raises(ValueError, match="unknown method 'nope'"):
    main.validate_config(config)
