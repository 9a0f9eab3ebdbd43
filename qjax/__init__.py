"""qjax: neural-network quantization research in JAX/Flax.

Post-training methods (trained params in, quantized params out; the data-driven ones run on the
one-pass driver, `qjax.driver`, and return (params, report)):

  gpfq                   GPFQ (Zhang, Zhou & Saab): greedy path-following, the float network's
                         inputs against the quantized one's; `quantizer=` for SPFQ's stochastic
                         rounding and L0 / L1 thresholding, `grid=` for the grids of `grids`
  quantize_msq           MSQ: plain rounding onto GPFQ's alphabets (the paper's baseline)
  gptq                   GPTQ / OPTQ (Frantar et al.): rounding with the OBS update of the rows
                         still to come
  qronos                 Qronos (Zhang, Zhang, Colbert & Saab): GPFQ's mismatched objective with
                         GPTQ's re-fit of the rows still to come
  quantize_rtn           RTN: round to nearest on a `grids.GridSpec` grid, no data
  quantize_uniform       round to nearest on a per-tensor uniform grid, no data
  prune_smallest         one-shot magnitude pruning, no data
  gpfq_layer, gptq_layer, qronos_layer   the per-layer kernels; gpfq_flops counts GPFQ's work

Activation quantization: `ActSpec` (the grid of a weight op's input), `with_activation_quant`
(an apply_fn with its inputs fake-quantized), `calibrate_activations` (static scales).

Training transformations (optax): `psgd` (position-based scaled gradient, Kim et al.:
`qjax.psgd.psgd`) and `alq` (adaptive loss-aware quantization, Qu et al.: `qjax.alq.coordinate`,
`basis`, `ste`, `prune` and the pipeline `qjax.alq.run`).

Modules: `alphabets` (GPFQ's alphabets and scalar quantizers), `grids` (per tensor / channel /
group grids), `rtn` (`quantize_rtn`, and `rtn_quantizer`: the same rounding as a driver
quantizer), `views` (matrix views of the kernels), `export` (integer codes, orbax I/O), `mesh`
(params and data on a device mesh; `plan_segments` compiles the driver's segments without
quantizing and gives each one's peak bytes per device); `sparsity` reports the fraction of zero
weights.
"""
from qjax import alphabets
from qjax import alq
from qjax import psgd
from qjax._gpfq.layer import gpfq_flops, gpfq_layer
from qjax._gpfq.network import gpfq, quantize_msq
from qjax.rounding import prune_smallest, quantize_uniform, sparsity
from qjax import export
from qjax import grids
from qjax import views
from qjax import mesh
from qjax import rtn
from qjax.rtn import quantize_rtn
from qjax.driver import plan_segments
from qjax._gptq import gptq, gptq_layer
from qjax.activations import ActSpec, with_activation_quant
from qjax.calibration import calibrate_activations
from qjax._qronos import qronos, qronos_layer

__version__ = "0.1.0"

__all__ = [
    # post-training methods and their layer kernels
    "gpfq", "quantize_msq", "gptq", "qronos", "quantize_rtn", "quantize_uniform",
    "prune_smallest", "gpfq_layer", "gptq_layer", "qronos_layer", "gpfq_flops", "sparsity",
    # activation quantization
    "ActSpec", "calibrate_activations", "with_activation_quant",
    # a dry run: each driver segment's compiled peak bytes per device
    "plan_segments",
    # modules: training transformations, grids and alphabets, RTN, export, device meshes
    "psgd", "alq", "alphabets", "grids", "rtn", "views", "export", "mesh",
]
