"""The generic jitted training and evaluation loop; the optimizer is a parameter.

Any `optax.GradientTransformation` (or `...ExtraArgs`, e.g. PSGD, which reads `params`) plugs in.
BatchNorm statistics are carried in `TrainState.batch_stats` when the model has them.
"""
from __future__ import annotations

import functools
import os
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state
from tqdm.auto import tqdm

from qjax import data as data_lib
from qjax import files

PyTree = Any


class TrainState(train_state.TrainState):
  batch_stats: PyTree = None


def create_train_state(model: nn.Module, key: jax.Array, sample_x: np.ndarray,
                       tx: optax.GradientTransformation,
                       variables: PyTree | None = None) -> TrainState:
  """Initialise (or wrap given `variables`) into a TrainState with optimizer `tx`."""
  if variables is None:
    variables = model.init(key, jnp.asarray(sample_x[:1]), train=False)
  return TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx,
                           batch_stats=variables.get("batch_stats"))


def state_variables(state: TrainState) -> dict:
  """The flax variables dict ({'params'} and, if present, {'batch_stats'}) of a state."""
  out = {"params": state.params}
  if state.batch_stats is not None:
    out["batch_stats"] = state.batch_stats
  return out


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


@jax.jit
def train_step(state: TrainState, x: jax.Array, y: jax.Array) -> tuple[TrainState, jax.Array]:
  """One SGD step of the mean cross-entropy; updates BatchNorm statistics when present."""
  has_bn = state.batch_stats is not None

  def loss_fn(params):
    variables = {"params": params}
    if has_bn:
      variables["batch_stats"] = state.batch_stats
      logits, updates = state.apply_fn(variables, x, train=True, mutable=["batch_stats"])
      return cross_entropy(logits, y), updates["batch_stats"]
    return cross_entropy(state.apply_fn(variables, x, train=True), y), None

  (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  state = state.apply_gradients(grads=grads)
  if has_bn:
    state = state.replace(batch_stats=batch_stats)
  return state, loss


def fit(state: TrainState, x: np.ndarray, y: np.ndarray, *, epochs: int, batch_size: int = 128,
        seed: int = 0, augment_shift: int = 0, progress: bool = True, desc: str = "train"
        ) -> tuple[TrainState, list[float]]:
  """Train for `epochs` epochs of shuffled minibatches; returns the state and per-epoch mean loss.

  `augment_shift` > 0 translates every training image by up to that many pixels each epoch.
  """
  if epochs < 0:
    raise ValueError(f"epochs must be >= 0, got {epochs}")
  history = []
  bar = tqdm(range(epochs), desc=desc, disable=not progress, leave=False)
  for epoch in bar:
    losses = []
    rng = np.random.default_rng(seed * 100_003 + epoch)
    xe = data_lib.random_shift(x, rng, augment_shift) if augment_shift else x
    for xb, yb in data_lib.batches(xe, y, batch_size, seed=seed * 100_003 + epoch,
                                   drop_remainder=True):
      state, loss = train_step(state, jnp.asarray(xb), jnp.asarray(yb))
      losses.append(loss)
    history.append(float(jnp.mean(jnp.stack(losses))))
    bar.set_postfix(loss=f"{history[-1]:.4f}")
  return state, history


@functools.partial(jax.jit, static_argnums=0)
def _logits(apply_fn, variables: PyTree, x: jax.Array) -> jax.Array:
  return apply_fn(variables, x, train=False)


def predict(apply_fn, variables: PyTree, x: np.ndarray, *, batch_size: int = 1000) -> np.ndarray:
  """Logits for x in batches (inference mode: train=False); compiled once per apply_fn."""
  return np.concatenate([np.asarray(_logits(apply_fn, variables, jnp.asarray(x[i:i + batch_size])))
                         for i in range(0, x.shape[0], batch_size)])


def evaluate(apply_fn, variables: PyTree, x: np.ndarray, y: np.ndarray, *,
             batch_size: int = 1000) -> float:
  """Top-1 accuracy in percent."""
  logits = predict(apply_fn, variables, x, batch_size=batch_size)
  return float(100.0 * np.mean(np.argmax(logits, -1) == y))


def save_variables(path: str, variables: PyTree) -> None:
  """Write variables as msgpack (flax.serialization), atomically; creates the directory."""
  files.atomic_write(path, flax.serialization.to_bytes(jax.device_get(variables)))


def restore_variables(path: str, target: PyTree) -> PyTree:
  """Read variables written by `save_variables` into the structure of `target`.

  Raises:
    ValueError naming the file if it does not hold variables of `target`'s structure.
  """
  with open(path, "rb") as f:
    data = f.read()
  try:
    return flax.serialization.from_bytes(target, data)
  except Exception as e:  # msgpack and flax raise several types for damaged or foreign files
    raise ValueError(f"{path}: not a variables file of this model ({type(e).__name__}: {e})"
                     ) from None


def restore_cached(path: str, target: PyTree) -> PyTree | None:
  """`restore_variables`, or None (the damaged cache set aside, with a warning) if it fails."""
  if not os.path.exists(path):
    return None
  try:
    return restore_variables(path, target)
  except ValueError as e:
    files.set_aside(path, f"does not load ({e}); retraining")
    return None
