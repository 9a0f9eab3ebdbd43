"""`report`: the bytes of packed params, per layer and in all, against float32.

Storage is counted as in the ALQ report (`qjax.alq.accounting.report`, Eq. 28): a quantized
layer stores its codes plus its float32 side parameters (scales, zero points, level tables) at
32 bits each, and `float_bytes` counts the leaves left in float32 (biases, unquantized layers)
separately (a view, like the shape, is metadata and not counted); the compression ratio is
32 N / (storage bits). `storage_bytes` counts the bytes the
packed arrays really hold (container padding included); `ideal_bytes` counts b bits per weight
as ALQ's bits do (its I N bits of bases, no padding), so they agree whenever b is 1, 2, 4 or 8.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from qjax.export.codes import _named_leaves, container_bits, is_packed

PyTree = Any


def report(packed: PyTree) -> dict[str, Any]:
  """Bytes per packed layer against float32, counted as the ALQ report counts (module docstring).

  Returns:
    {'layers': {name: {kind, bits, container_bits, weights, code_bytes, side_bytes,
    storage_bytes, ideal_bytes, float32_bytes, compression, and 'act' (fmt, bits,
    granularity, symmetric, dynamic, scale, zero) when the layer's input is quantized}},
    'weights', 'storage_bytes', 'ideal_bytes', 'float_bytes' (unpacked leaves, in their own
    dtypes), 'float32_bytes' (every parameter in float32), 'total_bytes' (storage + float),
    'compression' (quantized layers).
  """
  layers = {}
  float_bytes = 0
  for name, leaf in _named_leaves(packed):
    if not is_packed(leaf):
      float_bytes += int(np.asarray(leaf).nbytes)  # as stored: bfloat16 is 2 bytes
      continue
    side = sum(a.nbytes for a in leaf.side_arrays())
    code = int(np.asarray(leaf.data).nbytes)
    layers[name] = dict(kind=leaf.kind, bits=leaf.bits, container_bits=container_bits(leaf.bits),
                        weights=leaf.weights, code_bytes=code, side_bytes=side,
                        storage_bytes=code + side,
                        ideal_bytes=leaf.bits * leaf.weights / 8 + side,
                        float32_bytes=4 * leaf.weights,
                        compression=32 * leaf.weights / (8 * (code + side)))
    if leaf.act is not None:  # the input's quantizer (metadata, not counted in the bytes)
      a = leaf.act
      layers[name]["act"] = dict(fmt=a.fmt, bits=a.bits, granularity=a.granularity,
                                 symmetric=a.symmetric, dynamic=a.dynamic,
                                 scale=None if a.dynamic else float(a.scale),
                                 zero=None if a.dynamic else float(a.zero))
  weights = sum(l["weights"] for l in layers.values())
  storage = sum(l["storage_bytes"] for l in layers.values())
  return dict(layers=layers, weights=weights, storage_bytes=storage,
              ideal_bytes=sum(l["ideal_bytes"] for l in layers.values()),
              float_bytes=float_bytes, float32_bytes=4 * weights + float_bytes,
              total_bytes=storage + float_bytes,
              compression=32 * weights / (8 * storage) if storage else float("inf"))
