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
# # ALQ: Adaptive Loss-aware Quantization of LeNet5 below one bit
#
# Qu et al. (CVPR 2020) write every group of weights as a sum of a few binary bases,
# $w_g = B_g \alpha_g$, and train $B$ and $\alpha$ with AMSGrad read as a quadratic model of the
# loss. Pruning $\alpha$'s whose removal the model predicts to cost least (Eq. 13) drives the
# average bitwidth below one bit. This notebook runs the whole pipeline (Alg. 5) on the embedded
# MNIST digits: sketching init, rounds of prune / basis epochs / coordinate epochs, final epochs.
#
# With `QJAX_SMALL=1` (CI) every size shrinks so the notebook runs in well under two minutes.

# %%
import os

import jax
import matplotlib.pyplot as plt
import numpy as np
import optax

from qjax import alq, data, models, train

SMALL = os.environ.get("QJAX_SMALL") == "1"
key = jax.random.key(0)

# %% [markdown]
# ## A float LeNet5

# %%
splits = data.load_mnist_embedded()
x, y = splits["train"]
x_test, y_test = splits["test"]
if SMALL:  # the splits are sorted by label: subsample at random
  train_idx, test_idx = (np.random.default_rng(0).permutation(n)[:m]
                         for n, m in ((len(x), 1024), (len(x_test), 500)))
  x, y, x_test, y_test = x[train_idx], y[train_idx], x_test[test_idx], y_test[test_idx]
model = models.LeNet5()
state = train.create_train_state(model, key, x, optax.adam(1e-3))
state, _ = train.fit(state, x, y, epochs=3 if SMALL else 10, batch_size=32 if SMALL else 128,
                     progress=False)
variables = train.state_variables(state)
float_accuracy = train.evaluate(model.apply, variables, x_test, y_test)
print(f"float accuracy {float_accuracy:.2f}%")

# %% [markdown]
# ## ALQ
#
# The authors' structures: kernel-wise for both convolutions, subchannel-wise(2) for the 800 x 500
# Dense layer, channel-wise for the classifier; at most 6 bases per group. Each round removes a
# `prune_ratio` fraction of the live $\alpha$'s.

# %%
config = alq.default_config()
config.update(init_epochs=1, rounds=4, prune_ratio=0.5, top_k=0.02, basis_epochs=2,
              coordinate_epochs=1, final="basis", final_epochs=4)
if SMALL:
  config.update(batch_size=64, init_epochs=0, rounds=2, prune_ratio=0.6, top_k=0.05,
                basis_epochs=1, coordinate_epochs=1, final_epochs=1)


def loss_fn(params, xb, yb):
  logits = model.apply({"params": params}, xb)
  return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()


def evaluate(q):
  return train.evaluate(model.apply, {"params": alq.reconstruct(q)}, x_test, y_test)


q, history = alq.run(variables["params"], loss_fn, (x, y), config, key=key, evaluate=evaluate)
for r in history.rounds:
  print(f"round {r['round']}: {r['bits']:.3f} bits, {r['storage_bytes'] / 1024:.1f} KiB, "
        f"x{r['compression']:.1f}, accuracy {r['accuracy']:.2f}%")
print(alq.format_report(alq.report(q)))

# %% [markdown]
# ## Train loss by phase (colours as in the paper's Fig. 4)

# %%
colours = {"prune": "red", "basis": "green", "coordinate": "blue", "ste": "orange"}
loss, phase = np.asarray(history.loss), np.asarray(history.phase)
fig, ax = plt.subplots(figsize=(8, 3))
starts = np.flatnonzero(np.r_[True, phase[1:] != phase[:-1], True])
for a, b in zip(starts[:-1], starts[1:]):
  ax.plot(np.arange(a, min(b + 1, len(loss))), loss[a:b + 1], color=colours[phase[a]], lw=1)
for name, colour in colours.items():
  if name in phase:
    ax.plot([], [], color=colour, label=name)
ax.set(yscale="log", xlabel="step", ylabel="train loss (cross-entropy)")
ax.legend(fontsize=8)
fig.tight_layout()

# %% [markdown]
# ## Accuracy vs average bitwidth

# %%
bits = [r["bits"] for r in history.rounds]
acc = [r["accuracy"] for r in history.rounds]
fig, ax = plt.subplots(figsize=(5, 3.5))
ax.plot(bits, acc, marker="o", label="ALQ")
for r in history.rounds:
  ax.annotate(str(r["round"]), (r["bits"], r["accuracy"]), fontsize=8,
              textcoords="offset points", xytext=(3, 3))
ax.axhline(float_accuracy, color="k", ls="--", lw=1, label="float")
ax.set(xscale="log", xlabel="average bits per weight", ylabel="test accuracy (%)")
ax.legend(fontsize=8)
fig.tight_layout()
