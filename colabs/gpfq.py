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
# # GPFQ: post-training quantization with provable guarantees
#
# Zhang, Zhou and Saab (2022) quantize a trained network one layer at a time. Each neuron walks
# its inputs t = 1..N0 and picks the level that keeps the running error u_t of the layer output
# small (Eq. 7-8). This notebook
#
# 1. checks the theorem on synthetic Gaussian data: at fixed m the relative error falls like
#    1/N0 (up to a log), and GPFQ beats plain rounding (MSQ) on the same alphabet;
# 2. quantizes a trained LeNet5 with `qjax.gpfq` and plots accuracy against bits.
#
# On Colab, pick a TPU runtime and `pip install` qjax first. Set `DATASET = "mnist"` (prepared
# once with `tfds.builder("mnist", file_format="array_record").download_and_prepare()`) to use
# the full tensorflow-datasets MNIST; the default is the 5,000 digits embedded in qjax.
# With `QJAX_SMALL=1` (CI on CPU) every size shrinks.

# %%
import os

import jax
import matplotlib.pyplot as plt
import numpy as np
import optax

import qjax
from qjax import alphabets, data, models, train

SMALL = os.environ.get("QJAX_SMALL") == "1"
DATASET = os.environ.get("QJAX_DATASET", "mnist_embedded")
print("backend:", jax.default_backend(), "devices:", jax.device_count(), "small:", SMALL)

# %% [markdown]
# ## 1. The theorem on synthetic data
#
# Single layer, X = X~ with i.i.d. N(0, 1) entries, ||w||_inf <= 1 and a 3-bit alphabet. The
# error bound (Thm 2.2) makes ||Xw - Xq||^2 independent of N0 while ||Xw||^2 grows like N0, so
# the relative error should fall with slope about -1 on a log-log plot.

# %%
m, n1 = (64, 16) if SMALL else (256, 64)
n0s = [64, 128, 256, 512] if SMALL else [64, 128, 256, 512, 1024, 2048, 4096]
rng = np.random.default_rng(0)
levels = alphabets.midtread(4, 0.25)  # {-1, -0.75, ..., 1}
gpfq_err, msq_err = [], []
for n0 in n0s:
  X = rng.normal(size=(m, n0)).astype(np.float32)
  W = rng.uniform(-1, 1, size=(n0, n1)).astype(np.float32)
  Q = qjax.gpfq_layer(W, X, None, levels)
  ref = X @ W
  rel = lambda q: float(np.mean(np.sum((ref - X @ np.asarray(q)) ** 2, 0) / np.sum(ref ** 2, 0)))
  gpfq_err.append(rel(Q))
  msq_err.append(rel(alphabets.msq(W, levels)))
slope = np.polyfit(np.log(n0s), np.log(gpfq_err), 1)[0]
print(f"log-log slope of GPFQ's relative error over N0: {slope:.2f} (theory: about -1)")

fig, ax = plt.subplots(figsize=(5, 3.5))
ax.loglog(n0s, gpfq_err, "o-", label=f"GPFQ (slope {slope:.2f})")
ax.loglog(n0s, msq_err, "s--", label="MSQ, same alphabet")
ax.set(xlabel="N0 (inputs per neuron)", ylabel="||Xw - Xq||² / ||Xw||²",
       title=f"Gaussian X, m = {m}")
ax.legend()
plt.show()

# %% [markdown]
# ## 2. A trained LeNet5

# %%
if DATASET == "mnist_embedded":
  splits = data.load_mnist_embedded()
else:
  splits = data.load(DATASET, data_dir=os.environ.get("TFDS_DATA_DIR"))
x, y = splits["train"]
x_test, y_test = splits["test"]
if SMALL:  # splits are sorted by label: subsample at random
  rng = np.random.default_rng(0)
  tr, te = rng.permutation(len(x))[:1024], rng.permutation(len(x_test))[:500]
  x, y, x_test, y_test = x[tr], y[tr], x_test[te], y_test[te]

model = models.LeNet5()
epochs = 2 if SMALL else 15
steps = epochs * (len(x) // 128)
tx = optax.sgd(optax.cosine_decay_schedule(0.05, steps), momentum=0.9)
state = train.create_train_state(model, jax.random.key(0), x, tx)
state, _ = train.fit(state, x, y, epochs=epochs, batch_size=128, augment_shift=2)
variables = train.state_variables(state)
float_accuracy = train.evaluate(model.apply, variables, x_test, y_test)
print(f"float accuracy {float_accuracy:.2f}%")

# %% [markdown]
# ## 3. GPFQ vs plain rounding on the same alphabet
#
# `qjax.gpfq` finds every Dense/Conv call, feeds the calibration batch through the float and the
# partly quantized network, and quantizes layer by layer. Convolutions use disjoint patches,
# a quarter of them per image (Sec. 2.3, p = 0.25). bits = 1 is the ternary alphabet.

# %%
calib = x[np.random.default_rng(1).permutation(len(x))[:512 if SMALL else 1500]]
bits_list = [4, 2] if SMALL else [5, 4, 3, 2, 1]
results = []
for bits in bits_list:
  q_vars, report = qjax.gpfq(variables, model.apply, calib, bits=bits, progress=False)
  m_vars, _ = qjax.quantize_msq(variables, model.apply, calib, bits=bits, C=report.C,
                                progress=False)
  results.append((bits, train.evaluate(model.apply, q_vars, x_test, y_test),
                  train.evaluate(model.apply, m_vars, x_test, y_test)))
  print(report)

print(f"{'bits':>4}  {'GPFQ':>6}  {'MSQ':>6}  (float {float_accuracy:.2f})")
for bits, acc_gpfq, acc_msq in results:
  print(f"{bits:>4}  {acc_gpfq:6.2f}  {acc_msq:6.2f}")

# %%
fig, ax = plt.subplots(figsize=(5, 3.5))
b, g, q = zip(*results)
ax.plot(b, g, "o-", label="GPFQ")
ax.plot(b, q, "s--", label="MSQ, same alphabet")
ax.axhline(float_accuracy, color="k", lw=1, ls=":", label="float")
ax.set(xlabel="bits per weight", ylabel="test accuracy (%)", title="LeNet5")
ax.legend()
plt.show()
