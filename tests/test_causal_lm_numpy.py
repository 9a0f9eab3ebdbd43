"""Torch-free tests of qjax.pretrained.causal_lm and the causal_lm task: a tiny random checkpoint
written with safetensors' NumPy API in the Hugging Face layout (the torch comparisons are in
test_causal_lm.py, slow)."""
import json
import os

import numpy as np
import pytest
from safetensors.numpy import save_file

from qjax.pretrained import causal_lm, huggingface
from qjax.pretrained import gguf as gguf_loader  # not the gguf package
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
             for name, shape in huggingface._expected_shapes(cfg).items() if name not in drop}
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
  assert methods == {"float", "rtn", "gptq", "gptq act-order", "gpfq", "gpfq-act", "qronos"}
  assert all(np.isfinite(r["perplexity"]) and r["perplexity"] > 1 for r in rows)
  exported = [r for r in rows if "storage_bytes" in r]
  assert len(exported) == 1 and exported[0]["storage_bytes"] > 0
  assert os.path.exists(tmp_path / "work" / "perplexity.png")
  # Activation rows (config.acts): each method again behind 4-bit per-token activations.
  config.methods, config.acts = ("rtn", "gptq", "gpfq"), ("a4-token",)
  rows = main.run(config, str(tmp_path / "work_act"))
  weight_only = {r["method"]: r["perplexity"] for r in rows if not r.get("act")}
  with_act = {r["method"]: r["perplexity"] for r in rows if r.get("act") == "a4-token"}
  assert set(with_act) == {"rtn", "gptq", "gpfq"}
  for m, p in with_act.items():  # 4-bit activations cost something on every method
    assert np.isfinite(p) and p != weight_only[m], m
  config.methods = ("nope",)
  with pytest.raises(ValueError, match="unknown method 'nope'"):
    main.validate_config(config)


def _llama_cpp_permute(w, n_head):
  """llama.cpp convert_hf_to_gguf LlamaModel.permute (q/k rows, per head: halves interleaved)."""
  return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
      w.shape)


def write_gguf(path, arch="llama", bad_type=None):
  """The tiny checkpoint as a GGUF, written as llama.cpp's converter does (q/k permuted)."""
  import gguf
  from safetensors.numpy import load_file
  src = write_checkpoint(os.path.join(os.path.dirname(path), "hf_src"))
  t = load_file(os.path.join(src, "model.safetensors"))
  w = gguf.GGUFWriter(str(path), arch)
  w.add_block_count(HF["num_hidden_layers"])
  w.add_context_length(HF["max_position_embeddings"])
  w.add_embedding_length(HF["hidden_size"])
  w.add_feed_forward_length(HF["intermediate_size"])
  w.add_head_count(HF["num_attention_heads"])
  w.add_head_count_kv(HF["num_key_value_heads"])
  w.add_layer_norm_rms_eps(HF["rms_norm_eps"])
  w.add_rope_freq_base(HF["rope_theta"])
  with open(os.path.join(src, "tokenizer.json")) as f:
    tok = json.load(f)
  vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
  w.add_tokenizer_model("gpt2")
  w.add_tokenizer_pre("default")
  w.add_token_list([k for k, _ in vocab])
  w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]])
  w.add_token_types([1] * len(vocab))
  inv = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight":
         "output_norm.weight"}
  block = {v: k for k, v in gguf_loader._GGUF_BLOCK.items()}
  for name, x in t.items():
    if name in inv:
      g = inv[name]
    else:
      i, rest = name[len("model.layers."):].split(".", 1)
      base = rest[:-len(".weight")] if not rest.endswith("layernorm.weight") else rest
      g = f"blk.{i}.{block[base]}.weight"
      if ".q_proj." in name:
        x = _llama_cpp_permute(x, HF["num_attention_heads"])
      elif ".k_proj." in name:
        x = _llama_cpp_permute(x, HF["num_key_value_heads"])
    if bad_type is not None and g == "blk.0.ffn_up.weight":
      w.add_tensor(g, np.zeros((48, 18), np.uint8), raw_dtype=bad_type)  # 32 weights: 18 bytes
    else:
      w.add_tensor(g, x)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return src


def test_gguf_equals_hf_checkpoint(tmp_path):
  """The converter's q/k permutation is undone: GGUF params == the Hugging Face ones."""
  src = write_gguf(tmp_path / "m.gguf")
  g = causal_lm.load_causal_lm(tmp_path / "m.gguf")
  h = causal_lm.load_causal_lm(src)
  assert g.config.num_key_value_heads == 2 and g.config.tie_word_embeddings
  import jax
  for a, b in zip(jax.tree_util.tree_leaves_with_path(g.params),
                  jax.tree_util.tree_leaves_with_path(h.params)):
    assert a[0] == b[0]
    np.testing.assert_array_equal(np.asarray(a[1]), np.asarray(b[1]), err_msg=str(a[0]))
  text_ = "def f(x): return x + 1"
  assert g.encode(text_).tolist() == h.encode(text_).tolist()


def test_gguf_errors(tmp_path):
  import gguf
  write_gguf(tmp_path / "gpt2.gguf", arch="gpt2")
  with pytest.raises(ValueError, match=r"gpt2.gguf: GGUF architecture 'gpt2' is not supported"):
    causal_lm.load_causal_lm(tmp_path / "gpt2.gguf")
  write_gguf(tmp_path / "iq.gguf", bad_type=gguf.GGMLQuantizationType.IQ4_NL)
  with pytest.raises(ValueError, match=r"iq.gguf: tensor 'blk.0.ffn_up.weight' has GGUF type "
                                       r"IQ4_NL, not supported"):
    causal_lm.load_causal_lm(tmp_path / "iq.gguf")
