"""ALQ: Adaptive Loss-aware Quantization (Qu et al., CVPR 2020) as optax transformations.

Every quantized kernel is a `QuantizedKernel`: groups w_g = B_g alpha_g with binary bases B_g and
a mask of live coordinates. `init` sketches float weights (Alg. 1); `coordinate`, `basis` and
`ste` are optax transformations (Alg. 4, 3, 6) whose updates, applied with
`optax.apply_updates`, give the new quantized tree; `prune` removes alphas (Alg. 2); `run` is the
whole pipeline (Alg. 5); `report` gives bitwidth, storage and compression (Eq. 28).

Typical step (gradients are taken w.r.t. the reconstructed kernels):

  q = qjax.alq.init(params, {"Conv_.*": "kernel-wise", "Dense_.*": "channel-wise"},
                    max_bits=6, sigma=0.0)
  tx = qjax.alq.basis(1e-3)
  state = tx.init(q)
  grads = jax.grad(loss)(qjax.alq.reconstruct(q))
  updates, state = tx.update(grads, state, q)
  q = optax.apply_updates(q, updates)
"""
from qjax.alq.accounting import format_report, report
from qjax.alq.kernel import QuantizedKernel, is_quantized, reconstruct
from qjax.alq.pipeline import History, default_config, run
from qjax.alq.pruning import metric, num_alphas, prune, schedule
from qjax.alq.sketch import init
from qjax.alq.structures import (Structure, as_structure, channel_wise, from_groups, group_shape,
                                 kernel_wise, pixel_wise, subchannel_wise, to_groups)
from qjax.alq.transforms import (BasisState, CoordinateState, SteState, basis, coordinate,
                                 nearest_bases, quadratic_model, ste)

__all__ = [
    "BasisState", "CoordinateState", "History", "QuantizedKernel", "SteState", "Structure",
    "as_structure", "basis", "channel_wise", "coordinate", "default_config", "format_report",
    "from_groups", "group_shape", "init", "is_quantized", "kernel_wise", "metric",
    "nearest_bases", "num_alphas", "pixel_wise", "prune", "quadratic_model", "reconstruct",
    "report", "run", "schedule", "ste", "subchannel_wise", "to_groups",
]
