"""qjax: neural-network quantization research in JAX/Flax (GPFQ, ALQ, PSGD)."""
from qjax.rounding import quantize_uniform, sparsity

__version__ = "0.1.0"
