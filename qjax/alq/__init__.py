"""ALQ: Adaptive Loss-aware Quantization (Qu et al., CVPR 2020) as optax transformations.

Every quantized kernel is a `QuantizedKernel`: groups w_g = B_g alpha_g with binary bases B_g and
a mask of live coordinates. `init` sketches float weights (Alg. 1); `coordinate`, `basis` and
`ste` are optax transformations (Alg. 4, 3, 6) -- each `scale_by_loss_aware_amsgrad` (the
AMSGrad quadratic model they share) chained with its own step -- whose updates, applied with
`optax.apply_updates`, give the new quantized tree; `prune` removes alphas (Alg. 2) using the
moments of any state holding a `ScaleByLossAwareAmsgradState`; `run` is the whole pipeline
(Alg. 5); `report` gives bitwidth, storage and compression (Eq. (28)).

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
from qjax.alq.pruning import loss_aware_moments, metric, num_alphas, prune, schedule
from qjax.alq.sketch import init
from qjax.alq.structures import (Structure, as_structure, channel_wise, from_groups, group_shape,
                                 kernel_wise, pixel_wise, subchannel_wise, to_groups)
from qjax.alq.transforms import (QuadraticModel, ScaleByLossAwareAmsgradState, SteState,
                                 alpha_step, basis, basis_step, coordinate, nearest_bases,
                                 quadratic_model, scale_by_loss_aware_amsgrad, ste, ste_step)

__all__ = [
    "History", "QuadraticModel", "QuantizedKernel", "ScaleByLossAwareAmsgradState", "SteState",
    "Structure", "alpha_step", "as_structure", "basis", "basis_step", "channel_wise",
    "coordinate", "default_config", "format_report", "from_groups", "group_shape", "init",
    "is_quantized", "kernel_wise", "loss_aware_moments", "metric", "nearest_bases", "num_alphas",
    "pixel_wise", "prune", "quadratic_model", "reconstruct", "report", "run", "schedule",
    "scale_by_loss_aware_amsgrad", "ste", "ste_step", "subchannel_wise", "to_groups",
]
