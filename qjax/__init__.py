"""qjax: neural-network quantization research in JAX/Flax (GPFQ, ALQ, PSGD)."""
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
from qjax.grids import quantize_rtn
from qjax.driver import plan_segments
from qjax._gptq import gptq, gptq_layer
from qjax.activations import ActSpec, with_activation_quant
from qjax.calibration import calibrate_activations
from qjax._qronos import qronos, qronos_layer

__version__ = "0.1.0"

__all__ = [
    "alphabets", "alq", "psgd", "gpfq", "gpfq_flops", "gpfq_layer", "quantize_msq",
    "quantize_uniform", "sparsity",
    "export", "grids", "gptq", "gptq_layer", "quantize_rtn", "views",
    "ActSpec", "calibrate_activations", "with_activation_quant",
    "qronos", "qronos_layer", "plan_segments",
]
