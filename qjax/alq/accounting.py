"""Bitwidth, storage and compression of ALQ-quantized parameters (Qu et al. 2020, Appendix A.2,
Eq. (28))."""
from __future__ import annotations

from typing import Any

import jax
import numpy as np

from qjax.alq.kernel import is_quantized, quantized_leaves

PyTree = Any


def _compression(weights: int, storage_bits: float) -> float:
  return 32.0 * weights / storage_bits if storage_bits else float("inf")


def report(params: PyTree) -> dict[str, Any]:
  """Average bitwidth, storage and compression per quantized layer and for the network.

  A layer of N weights in G groups of n has average bitwidth I = (live alphas) / G and stores
  I N bits of bases plus I (N / n) 32-bit coordinates, so its compression rate against float32 is
  r_s = 32 N / (I N + 32 I N / n) (Eq. (28)). The network's bitwidth is the layers' weighted by
  weight count; its storage and compression sum over quantized layers. `float_bytes` counts the
  parameters left in float32 (biases, unquantized layers), not included in `storage_bytes`.

  Returns:
    {'layers': {name: {structure, groups, group_size, weights, alphas, bits, storage_bytes,
    compression}}, 'alphas', 'weights', 'bits', 'storage_bytes', 'compression', 'float_bytes'}.
  """
  layers = {}
  alphas = weights = 0
  storage_bits = 0.0
  for name, q in quantized_leaves(params):
    g, n, _ = q.B.shape
    live = int(np.sum(np.asarray(q.mask)))
    bits = live * n + 32 * live
    layers[name] = dict(structure=str(q.structure), groups=g, group_size=n, weights=g * n,
                        alphas=live, bits=live / g, storage_bytes=bits / 8,
                        compression=_compression(g * n, bits))
    alphas += live
    weights += g * n
    storage_bits += bits
  float_size = sum(int(np.size(x)) for x in jax.tree.leaves(params, is_leaf=is_quantized)
                   if not is_quantized(x))
  return dict(layers=layers, alphas=alphas, weights=weights,
              bits=sum(l["bits"] * l["weights"] for l in layers.values()) / max(weights, 1),
              storage_bytes=storage_bits / 8, compression=_compression(weights, storage_bits),
              float_bytes=4 * float_size)


def format_report(rep: dict[str, Any]) -> str:
  """A small text table of `report`'s output."""
  lines = [f"{'layer':<16}{'structure':<22}{'G':>6}{'n':>6}{'alphas':>8}{'bits':>7}"
           f"{'bytes':>10}{'ratio':>8}"]
  for name, l in rep["layers"].items():
    lines.append(f"{name:<16}{l['structure']:<22}{l['groups']:>6}{l['group_size']:>6}"
                 f"{l['alphas']:>8}{l['bits']:>7.3f}{l['storage_bytes']:>10.0f}"
                 f"{l['compression']:>8.1f}")
  lines.append(f"{'network':<16}{'':<22}{'':>6}{'':>6}{rep['alphas']:>8}{rep['bits']:>7.3f}"
               f"{rep['storage_bytes']:>10.0f}{rep['compression']:>8.1f}")
  return "\n".join(lines)
