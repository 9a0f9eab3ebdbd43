"""The ALQ training driver (Qu et al. 2020, Appendix B.3, Alg. 5) and its configuration."""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from qjax.alq import transforms
from qjax.alq.accounting import report
from qjax.alq.kernel import reconstruct
from qjax.alq.pruning import num_alphas, prune, schedule
from qjax.alq.sketch import init

PyTree = Any
LossFn = Callable[[PyTree, jax.Array, jax.Array], jax.Array]

_TRANSFORMS = {"basis": transforms.basis, "coordinate": transforms.coordinate,
               "ste": transforms.ste}


def default_config() -> ml_collections.ConfigDict:
  """ALQ hyperparameters; defaults follow the authors' LeNet5/MNIST recipe (Appendix B.2, C.1).

  Epoch counts are the paper's; experiments scale them down (see configs/).
  """
  c = ml_collections.ConfigDict()
  # Layer-name regex -> structure (Appendix A.2), the rules of qjax.rules (re.search, first
  # match wins); unmatched kernels stay float. Anchored: exactly these four layers.
  c.structures = (("^Conv_0$", "kernel-wise"), ("^Conv_1$", "kernel-wise"),
                  ("^Dense_0$", "subchannel-wise(2)"), ("^Dense_1$", "channel-wise"))
  c.max_bits = 6  # I_max
  c.sigma = 0.0  # Alg. 1 stops adding bases at ||eps||^2 / ||w||^2 <= sigma
  c.batch_size = 128
  c.init_epochs = 0  # basis epochs right after init, to recover from the sketching error
  c.rounds = 4  # R
  # Fraction of live alphas removed per round (Eq. (30)). The paper's LeNet5 'pruning ratio 80%',
  # read this way, leaves 6 * 0.2^4 ~ 0.01 bits after 4 rounds, far below its reported 0.40.
  c.prune_ratio = 0.8
  c.top_k = 0.005  # fraction of a layer's slots it proposes per pruning iteration
  c.prune_iterations = 0  # T per round; 0 means one epoch of batches
  c.prune_lr = 1e-3  # step size of the quadratic model in the pruning metric
  c.basis_epochs = 20  # Q, in epochs
  c.basis_lr = 1e-3
  c.basis_decay = 0.8  # per epoch
  c.coordinate_epochs = 10  # P, in epochs
  c.coordinate_lr = 1e-5
  c.coordinate_decay = 0.8
  c.final = "basis"  # 'basis' (Sec. 3.3 steps), 'coordinate' or 'ste' (Appendix B.4)
  c.final_epochs = 50
  c.final_lr = 1e-4
  c.final_decay = 0.98
  return c


@dataclasses.dataclass
class History:
  """What `run` measured: one entry per round (0 = after init) and the per-step train loss."""
  rounds: list[dict[str, Any]] = dataclasses.field(default_factory=list)
  loss: list[float] = dataclasses.field(default_factory=list)
  phase: list[str] = dataclasses.field(default_factory=list)  # 'basis', 'coordinate', ... per step


def _transform(name: str, lr: float) -> optax.GradientTransformationExtraArgs:
  """The named transform with its learning rate as a hyperparameter in the state (float32), so
  one jitted step serves every epoch's decayed rate. b1, b2, eps stay Python floats (static):
  as float32 arrays, 1 - b1 would round differently from the float64 1 - b1 the transforms
  compute."""
  return optax.inject_hyperparams(_TRANSFORMS[name], static_args=("b1", "b2", "eps"),
                                  hyperparam_dtype=jnp.float32)(learning_rate=lr)


def _step_fn(tx: optax.GradientTransformationExtraArgs, loss_fn: LossFn):
  """A jitted training step of `tx`."""

  def step(q, state, x, y):
    loss, grads = jax.value_and_grad(loss_fn)(reconstruct(q), x, y)
    updates, state = tx.update(grads, state, q)
    return optax.apply_updates(q, updates), state, loss

  return jax.jit(step)


def _prune_fn(tx: optax.GradientTransformationExtraArgs, loss_fn: LossFn, top_k: float):
  """A jitted Alg. 2 iteration: alpha-domain AMSGrad moments of this batch (`tx` a
  `coordinate`), then remove M_p with the same step size in the quadratic model."""

  def step(q, state, x, y, num_remove):
    loss, grads = jax.value_and_grad(loss_fn)(reconstruct(q), x, y)
    _, state = tx.update(grads, state, q)
    q, state = prune(q, state, num_remove, top_k=top_k,
                     learning_rate=state.hyperparams["learning_rate"], alpha_domain=True)
    return q, state, loss

  return jax.jit(step)


def _batches(x: np.ndarray, y: np.ndarray, batch_size: int, key: jax.Array):
  order = np.asarray(jax.random.permutation(key, len(x)))
  for i in range(len(x) // batch_size):
    idx = order[i * batch_size:(i + 1) * batch_size]
    yield x[idx], y[idx]


def run(params: PyTree, loss_fn: LossFn, data: tuple[np.ndarray, np.ndarray],
        config: Mapping[str, Any] | ml_collections.ConfigDict, *, key: jax.Array,
        evaluate: Callable[[PyTree], float] | None = None,
        on_round: Callable[[dict[str, Any]], None] | None = None) -> tuple[PyTree, History]:
  """Adaptive Loss-aware Quantization, Alg. 5.

  init (Alg. 1) -> `init_epochs` of basis steps -> R rounds of
  [prune to M^r = M^{r-1} (1 - prune_ratio) (Alg. 2, T iterations of M_p = ceil((M^{r-1} - M^r)/T),
  continuing past T until M^r is reached) -> `basis_epochs` of Alg. 3 -> `coordinate_epochs` of
  Alg. 4] -> `final_epochs` of `final` (Alg. 3, 4 or 6). Every phase starts a fresh AMSGrad state
  and decays its learning rate by its `*_decay` per epoch (Appendix B.2, C).

  Args:
    params: float-trained parameters.
    loss_fn: loss_fn(params, x, y) -> scalar, on float-layout params (the reconstructed tree).
    data: training (x, y) arrays; batches are shuffled per epoch, the remainder dropped.
    config: see `default_config`.
    key: PRNG key for shuffling.
    evaluate: optional evaluate(quantized params) -> accuracy, called after init and each round.
    on_round: optional callback with each round's record as it is made.

  Returns:
    (quantized params, History); a record is made after init (round 0), after each round's
    retraining (1..R) and after the final epochs ('final'); it holds round, bits, alphas,
    storage_bytes, compression, accuracy (None without `evaluate`), seconds (since start), report.
  """
  c = ml_collections.ConfigDict(dict(config)) if not isinstance(
      config, ml_collections.ConfigDict) else config
  x, y = data
  if len(x) < c.batch_size:
    raise ValueError(f"batch_size {c.batch_size} exceeds the {len(x)} training examples")
  if c.final not in _TRANSFORMS:
    raise ValueError(f"final must be one of {sorted(_TRANSFORMS)}, got {c.final!r}")
  steps_per_epoch = len(x) // c.batch_size
  history = History()
  start = time.perf_counter()
  txs = {name: _transform(name, 0.0) for name in _TRANSFORMS}
  steps = {name: _step_fn(tx, loss_fn) for name, tx in txs.items()}
  prune_tx = _transform("coordinate", c.prune_lr)
  prune_step = _prune_fn(prune_tx, loss_fn, c.top_k)

  def record(r, q):
    rep = report(q)
    entry = dict(round=r, bits=rep["bits"], alphas=rep["alphas"],
                 storage_bytes=rep["storage_bytes"], compression=rep["compression"],
                 accuracy=None if evaluate is None else float(evaluate(q)),
                 seconds=time.perf_counter() - start, report=rep)
    history.rounds.append(entry)
    if on_round is not None:
      on_round(entry)

  def train(q, name, epochs, lr, decay):
    nonlocal key
    state = txs[name].init(q)
    for epoch in range(epochs):
      key, sub = jax.random.split(key)
      state.hyperparams["learning_rate"] = jnp.float32(lr * decay ** epoch)
      for xb, yb in _batches(x, y, c.batch_size, sub):
        q, state, loss = steps[name](q, state, xb, yb)
        history.loss.append(float(loss))
        history.phase.append(name)
    return q

  def prune_round(q, target):
    nonlocal key
    live = num_alphas(q)
    iterations = c.prune_iterations or steps_per_epoch
    per_iteration = max(1, -(-(live - target) // iterations))
    state = prune_tx.init(q)
    while live > target:
      key, sub = jax.random.split(key)
      for xb, yb in _batches(x, y, c.batch_size, sub):
        num_remove = jnp.int32(min(per_iteration, live - target))
        q, state, loss = prune_step(q, state, xb, yb, num_remove)
        history.loss.append(float(loss))
        history.phase.append("prune")
        live = num_alphas(q)
        if live <= target:
          break
    return q

  structures = (list(c.structures.items()) if hasattr(c.structures, "items")
                else [tuple(pair) for pair in c.structures])
  q = init(params, structures, max_bits=c.max_bits, sigma=c.sigma)
  q = train(q, "basis", c.init_epochs, c.basis_lr, c.basis_decay)
  record(0, q)
  for r, target in enumerate(schedule(num_alphas(q), c.prune_ratio, c.rounds), start=1):
    q = prune_round(q, target)
    q = train(q, "basis", c.basis_epochs, c.basis_lr, c.basis_decay)
    q = train(q, "coordinate", c.coordinate_epochs, c.coordinate_lr, c.coordinate_decay)
    record(r, q)
  if c.final_epochs:
    q = train(q, c.final, c.final_epochs, c.final_lr, c.final_decay)
    record("final", q)
  return q, history
