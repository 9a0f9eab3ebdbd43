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
# # PSGD: position-based scaled gradient for quantization and pruning of LeNet5
#
# Kim, Yoo and Kwak (NeurIPS 2020, arXiv:2005.11035) keep the forward pass in full precision and
# only rescale the gradient, elementwise, by how far each weight is from its nearest target
# $\bar w$ (the nearest level of the quantization grid, or 0 for pruning):
#
# $$w \leftarrow w - \eta\, s(w) \odot \nabla_w L, \qquad
#   s(w) = \frac{|w - \bar w| + \epsilon}{\max |w - \bar w| + \epsilon}$$
#
# with the max over the tensor, so $0 < s \leq 1$ (the normalized form of the paper's Appendix B;
# the authors' code uses $s(w) = \lambda_s |w - \bar w|$, which
# `qjax.psgd.psgd(..., normalized=False)` also offers). Weights near a target take tiny steps and
# stay near it, so after training plain per-layer rounding (`qjax.quantize_uniform`) or magnitude
# pruning should cost little accuracy, with no data and no fine-tuning. This notebook
#
# 1. trains a float LeNet5 with SGD on the embedded MNIST digits;
# 2. trains PSGD models towards the 4-bit and 2-bit grids and towards 0 (pruning) with the
#    recipes of `qjax.experiments.psgd.default_config()`;
# 3. plots the weight histograms against the grid and compares SGD and PSGD after rounding,
#    pruning and (optionally) GPFQ.
#
# On Colab, pick a TPU runtime and install qjax first:
# `!pip install "qjax @ git+<this repository>"`. With `QJAX_SMALL=1` (CI on CPU) every size
# shrinks so the notebook runs in under two minutes; accuracies are then far from the paper's.

# %%
import os
import time

import jax
import matplotlib.pyplot as plt
import numpy as np
import optax

import qjax
from qjax import data, models, train
from qjax.experiments import psgd as psgd_experiment
from qjax.rounding import uniform_grid_step

SMALL = os.environ.get("QJAX_SMALL") == "1"
key = jax.random.key(0)
start = time.time()
print("backend:", jax.default_backend(), "devices:", jax.device_count(), "small:", SMALL)

# %% [markdown]
# ## 1. A float LeNet5 trained with SGD
#
# The main job's recipe (`configs/mnist_lenet5.py`): SGD with momentum 0.9, cosine decay from
# 0.05, weight decay 5e-4, random shifts of up to 2 pixels.

# %%
splits = data.load_mnist_embedded()
x, y = splits["train"]
x_test, y_test = splits["test"]
if SMALL:  # the splits are sorted by label: subsample at random
  train_idx, test_idx = (np.random.default_rng(0).permutation(n)[:m]
                         for n, m in ((len(x), 1024), (len(x_test), 500)))
  x, y, x_test, y_test = x[train_idx], y[train_idx], x_test[test_idx], y_test[test_idx]
batch_size = 32 if SMALL else 128
lr_scale = batch_size / 128  # the recipes are for batch 128: scale learning rates linearly
model = models.LeNet5()


def fit(variables, tx, epochs, seed=0):
  """Train `variables` (None: a fresh init) with optimizer `tx` on (x, y)."""
  state = train.create_train_state(model, key, x, tx, variables=variables)
  state, _ = train.fit(state, x, y, epochs=epochs, batch_size=batch_size, seed=seed,
                       augment_shift=2, progress=False)
  return train.state_variables(state)


def accuracy(variables):
  return train.evaluate(model.apply, variables, x_test, y_test)


def steps(epochs):
  return max(1, epochs * (len(x) // batch_size))


epochs = 3 if SMALL else 20
sgd_tx = optax.chain(optax.add_decayed_weights(5e-4),
                     optax.sgd(optax.cosine_decay_schedule(0.05 * lr_scale, steps(epochs)),
                               momentum=0.9))
sgd_vars = fit(None, sgd_tx, epochs)
print(f"SGD float accuracy {accuracy(sgd_vars):.2f}%")

# %% [markdown]
# ## 2. PSGD towards the 4-bit grid, the 2-bit grid and 0
#
# `qjax.psgd.psgd` is an optax transformation: scale the kernels' gradients by $s(w)$, add weight
# decay, then SGD with momentum. The recipes were tuned on a validation split
# (`configs/psgd_tuning.md`): 4 bits fine-tunes the SGD model for a few epochs (the authors'
# recipe); 2 bits needs a fresh init (started from the SGD weights, almost all of them sit in the
# 0 bin of the grid $\{-\max|w|, 0, \max|w|\}$ and stay there); pruning fine-tunes with the
# unnormalized $s(w) = \lambda_s |w|$ and strong weight decay. Below 4 bits the first and last
# layer get 8 bits, as in the authors' code (`psgd_experiment.layer_bits`).

# %%
config = psgd_experiment.default_config()
if SMALL:  # a few epochs only: a smoke test, far from converged
  for name, n in (("bits4", 2), ("bits2", 6), ("prune", 3)):
    config.recipes[name].epochs = n


def train_psgd(target):
  """PSGD run for `target` in (4, 2, 'prune'), as `psgd_experiment.train_psgd` does."""
  recipe = config.recipes["prune" if target == "prune" else f"bits{target}"]
  if target == "prune":
    targets = qjax.psgd.zero_targets()
  else:
    bits = psgd_experiment.layer_bits(sgd_vars["params"], target, config.edge_bits)
    targets = qjax.psgd.uniform_targets(bits)
  schedule = optax.cosine_decay_schedule(recipe.learning_rate * lr_scale, steps(recipe.epochs))
  tx = qjax.psgd.psgd(schedule, targets=targets, momentum=config.momentum,
                      weight_decay=recipe.weight_decay, normalized=recipe.normalized,
                      eps=config.eps, lambda_s=recipe.lambda_s)
  init = sgd_vars
  if recipe.from_scratch:  # a fresh init, not the SGD model's
    init = model.init(jax.random.fold_in(key, 0 if target == "prune" else target), x[:1])
  return fit(init, tx, recipe.epochs, seed=1)


psgd_vars = {}
for target in (4, 2, "prune"):
  t = time.time()
  psgd_vars[target] = train_psgd(target)
  print(f"PSGD {target}: float accuracy {accuracy(psgd_vars[target]):.2f}% "
        f"({time.time() - t:.0f} s)")

# %% [markdown]
# ## 3. Weights against the grid
#
# Histograms of the `Dense_0` kernel (800 x 500, the middle layer), in units of the grid step
# $\Delta = \max|w| / (2^{b-1} - 1)$ of each tensor, so the levels $\Delta k$ sit at the integers
# (dashed lines) for both models; the legend gives the share of weights within $\Delta/10$ of a
# level (20% for weights spread evenly). The right panel is the pruning model around 0 (log
# scale).
#
# What to look for (full run, not `QJAX_SMALL`): the pruning model's weights pile up at 0. At 2
# bits SGD keeps almost every weight in the 0 bin ($|w| < \Delta/2$, rounded to 0), while the
# PSGD weights spread over the whole range $[-\Delta, \Delta]$. The spikes on every level shown
# in the paper do not appear with these short MNIST recipes, yet rounding keeps the PSGD model's
# accuracy (section 4). The 4-bit recipe only fine-tunes gently, so the two 4-bit histograms
# nearly coincide: the SGD model already rounds well at 4 bits.

# %%
def kernel(variables, layer="Dense_0"):
  return np.asarray(variables["params"][layer]["kernel"]).ravel()


fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
for ax, bits in zip(axes, (4, 2)):
  half = 2 ** (bits - 1) - 1
  for label, variables, colour in (("SGD", sgd_vars, "tab:blue"),
                                   (f"PSGD {bits} bit", psgd_vars[bits], "tab:red")):
    w = kernel(variables)
    w = w / float(uniform_grid_step(w, bits))
    near = np.mean(np.abs(w - np.round(w)) < 0.1)
    ax.hist(w, bins=np.linspace(-half - 0.5, half + 0.5, 241), histtype="step", density=True,
            color=colour, label=f"{label} ({near:.0%} near a level)")
  for k in range(-half, half + 1):
    ax.axvline(k, color="k", ls="--", lw=0.6)
  ax.set(xlabel=r"$w / \Delta$ (Dense_0 kernel)", ylabel="density",
         title=f"{bits}-bit grid $\\Delta k$, $|k| \\leq {half}$")
  ax.legend(fontsize=8, loc="upper right")
ax = axes[2]
w_sgd, w_prune = kernel(sgd_vars), kernel(psgd_vars["prune"])
lim = float(np.quantile(np.abs(w_sgd), 0.99))
for label, w, colour in (("SGD", w_sgd, "tab:blue"), ("PSGD, target 0", w_prune, "tab:red")):
  ax.hist(w, bins=np.linspace(-lim, lim, 201), histtype="step", density=True, color=colour,
          label=label)
ax.axvline(0, color="k", ls="--", lw=0.6)
ax.set(yscale="log", xlabel="w (Dense_0 kernel)", ylabel="density", title="pruning: target 0")
ax.legend(fontsize=8)
fig.tight_layout()
plt.show()

# %% [markdown]
# ## 4. Rounding, pruning and GPFQ: SGD vs PSGD
#
# Each PSGD entry uses the PSGD model trained for that row's target. Rounding is per-tensor
# round-to-nearest (`qjax.quantize_uniform`) onto the same grids PSGD trained for (first and last
# layer at 8 bits below 4 bits), no data, no fine-tuning. Pruning zeroes the smallest 70% / 90% of
# every kernel (`qjax.prune_smallest`, layer-wise; `scope="global"` is kinder to both
# models); `qjax.sparsity` counts the zeros. The last row is optional (`RUN_GPFQ`): GPFQ
# (`qjax.gpfq`, see `colabs/gpfq.ipynb`) uses calibration data to choose each layer's 2-bit
# weights so that its outputs track the float network's, applied to both models with the same
# per-layer bits.

# %%
RUN_GPFQ = True


def rounded(variables, bits):
  """Data-free rounding of every kernel; edge layers at 8 bits below 4 bits."""
  params = variables["params"]
  bits_of = psgd_experiment.layer_bits(params, bits, config.edge_bits)
  return {**variables, "params": qjax.quantize_uniform(params, bits_of)}


rows = [("float (no rounding)", accuracy(sgd_vars), None, "")]
for bits in (4, 2):
  rows.append((f"{bits} bit, round to nearest",
               accuracy(rounded(sgd_vars, bits)),
               accuracy(rounded(psgd_vars[bits], bits)),
               f"{bits}-bit PSGD, float {accuracy(psgd_vars[bits]):.2f}"))
for fraction in (0.7, 0.9):
  pruned, zeros = [], []
  for variables in (sgd_vars, psgd_vars["prune"]):
    params = qjax.prune_smallest(variables["params"], fraction)
    pruned.append(accuracy({**variables, "params": params}))
    zeros.append(qjax.sparsity(params)["overall"])
  rows.append((f"prune {fraction:.0%} (layer-wise)", *pruned,
               f"target-0 PSGD, float {accuracy(psgd_vars['prune']):.2f}; "
               f"sparsity {zeros[0]:.1%} / {zeros[1]:.1%}"))
if RUN_GPFQ:
  calib = x[np.random.default_rng(1).permutation(len(x))[:512 if SMALL else 1500]]
  gpfq_bits = {"Conv_0|Dense_1": config.edge_bits, "default": 2}  # edges at 8 bits, as above
  gpfq_acc = []
  for variables in (sgd_vars, psgd_vars[2]):
    q_vars, report = qjax.gpfq(variables, model.apply, calib, bits=gpfq_bits, progress=False)
    gpfq_acc.append(accuracy(q_vars))
  rows.append(("2 bit, GPFQ (calibration data)", *gpfq_acc,
               f"2-bit PSGD, float {accuracy(psgd_vars[2]):.2f}"))

print(f"{'test accuracy (%)':32}{'SGD':>7}{'PSGD':>7}   PSGD model")
for name, acc_sgd, acc_psgd, note in rows:
  psgd_text = "-" if acc_psgd is None else f"{acc_psgd:.2f}"
  print(f"{name:32}{acc_sgd:7.2f}{psgd_text:>7}   {note}")
print(f"\ntest digits: {len(x_test)}, total time {time.time() - start:.0f} s")
