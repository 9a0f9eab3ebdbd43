"""Static activation scales from a calibration pass of the float network (`qjax.ActSpec`).

Its own module because it needs both the driver's batch checks and `qjax.activations`, which
the driver imports.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import jax

from qjax import activations
from qjax import driver
from qjax import rules

PyTree = Any


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
