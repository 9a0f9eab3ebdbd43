"""Static activation scales from a calibration pass of the float network (`qjax.ActSpec`), and
the held-out tail of a calibration batch that GPFQ's C search and Qronos' damp search score on.

Its own module because it needs both the driver's batch checks and `qjax.activations`, which
the driver imports.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from qjax import activations
from qjax import driver
from qjax import rules

PyTree = Any


def holdout_size(n: int, fraction: float) -> int:
  """Examples held out at the end of an n-example batch for the C / damp search (at least 1)."""
  return max(1, round(fraction * n))


def output_error(q_out: PyTree, float_out: PyTree) -> jax.Array:
  """Default held-out loss of the C / damp search: ||f_q - f||^2 / ||f||^2 of the final outputs."""
  leaves_q, leaves_f = jax.tree_util.tree_leaves(q_out), jax.tree_util.tree_leaves(float_out)
  err = sum(jnp.sum((a - b) ** 2) for a, b in zip(leaves_q, leaves_f))
  return err / sum(jnp.sum(b ** 2) for b in leaves_f)


def calibrate_activations(params: PyTree, apply_fn: Callable, batch: Any, act: Any, *,
                          apply_kwargs: Mapping[str, Any] | None = None
                          ) -> dict[str, dict[str, jax.Array]]:
  """Static activation scales: {layer name: {'scale': f32[], 'zero': f32[]}} for every weight op
  whose spec is static, from its input in the float network over all calibration batches
  (min-max, percentile or MSE per the spec). A pytree: save it, pass it to
  `with_activation_quant(..., scales=)` or to `qjax.export.pack(..., act=)`.

  Args:
    params, apply_fn, batch: as `qjax.gptq` (batch: one batch or a list of batches).
    act: an ActSpec or {regex: ActSpec or None} rules.
    apply_kwargs: keyword arguments of apply_fn.
  """
  rules.check(act, "act", activations.check_act)
  prep = driver.prepare(params, apply_fn, batch, apply_kwargs)
  program = prep.program
  specs = {i: s for i, s in activations.resolve(act, program).items() if not s.dynamic}
  keys = activations.op_keys(program)

  @jax.jit
  def capture(params, batch):
    seen = {}

    def hook(op, x):
      if op.index in specs:
        seen[op.index] = x
      return x

    activations.run_with_hook(program, params, batch, hook)
    return seen

  captured: dict[int, list] = {i: [] for i in specs}
  for b in prep.batches:
    for i, x in capture(prep.params, b).items():
      captured[i].append(x)
  return {keys[i]: activations.static_scale(specs[i], captured[i]) for i in specs}
