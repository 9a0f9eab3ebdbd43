"""Integer export (qjax.export): packing, exact round trips, orbax save/restore, byte counts."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from qjax import alphabets
from qjax import export
from qjax import grids


def _kernel(seed, shape):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _params(seed=0):
  """A LeNet5-shaped params dict: two convs (one with odd sizes), three dense layers, biases."""
  shapes = {"Conv_0": (5, 5, 1, 6), "Conv_1": (5, 5, 6, 16), "Dense_0": (400, 120),
            "Dense_1": (120, 84), "Dense_2": (84, 10)}
  return {name: {"kernel": _kernel(seed + i, s), "bias": 0.1 * _kernel(100 + i, s[-1:])}
          for i, (name, s) in enumerate(shapes.items())}


class PackTest(parameterized.TestCase):

  @parameterized.parameters(1, 2, 3, 4, 5, 7, 8)
  def test_pack_codes_round_trip(self, bits):
    rng = np.random.default_rng(bits)
    for size in (1, 7, 1001):
      codes = rng.integers(0, 2**bits, size)
      data = export.pack_codes(codes, bits)
      assert data.dtype == np.uint8
      assert data.size == math.ceil(size * export.container_bits(bits) / 8)
      np.testing.assert_array_equal(export.unpack_codes(data, bits, size), codes)

  @parameterized.parameters(*[dict(gran=gran, symmetric=sym, bits=bits)
                              for gran in (("tensor", None), ("channel", None), ("group", 7))
                              for sym in (True, False) for bits in (1, 2, 3, 4, 8)])
  def test_every_grid_round_trips_exactly(self, gran, symmetric, bits):
    W = _kernel(bits, (3, 3, 5, 4))  # conv kernel: matrix (45, 4), 7 groups of 7 (last has 3)
    grid = grids.fit(W, grids.GridSpec(bits, gran[0], gran[1], symmetric=symmetric))
    Q = grid.round(W)
    packed = export.pack_kernel(Q, grid)
    assert packed.kind == "grid" and packed.bits == bits
    assert packed.scale.shape == ((1, 1) if gran[0] == "tensor" else grid.scale.shape)
    np.testing.assert_array_equal(packed.unpack(), Q)
    np.testing.assert_array_equal(packed.codes(), grid.codes(Q))

  @parameterized.product(bits=(1, 2, 3, 4, 5), rule=("paper", "reference", "uniform"))
  def test_paper_alphabets_round_trip_exactly(self, bits, rule):
    W = _kernel(10 + bits, (37, 11))
    levels = alphabets.levels_for(W, bits, 1.0, rule)
    Q = alphabets.msq(W, levels)
    packed = export.pack_kernel(Q, levels)
    assert packed.kind == "table"
    assert packed.bits == max(1, math.ceil(math.log2(levels.shape[0])))  # 2^b + 1 -> b + 1
    np.testing.assert_array_equal(packed.unpack(), Q)

  def test_errors(self):
    W = _kernel(0, (16, 4))
    grid = grids.fit(W, bits=4)
    with pytest.raises(ValueError, match="W: value .* is not on its grid"):
      export.pack_kernel(W, grid)
    with pytest.raises(ValueError, match="not a level of its alphabet"):
      export.pack_kernel(W, jnp.linspace(-1, 1, 5))
    with pytest.raises(ValueError, match="at most 256"):
      export.pack_kernel(W, jnp.linspace(-1, 1, 300))
    with pytest.raises(ValueError, match="does not fit"):
      export.pack_kernel(grid.round(W)[:, :3], grid)
    with pytest.raises(ValueError, match="name no parameter"):
      export.pack({"a": {"kernel": W}}, {"b": grid})
    with pytest.raises(ValueError, match="codes must lie"):
      export.pack_codes(np.array([0, 16]), 4)


def test_rtn_pack_unpack_save_restore(tmp_path):
  params = _params()
  spec = {"Conv_0": grids.GridSpec(8), "Dense_2": None,
          "default": grids.GridSpec(3, "group", 32, symmetric=False)}
  q, fitted = grids.quantize_rtn(params, spec)
  assert sorted(fitted) == ["Conv_0", "Conv_1", "Dense_0", "Dense_1"]
  np.testing.assert_array_equal(q["Dense_2"]["kernel"], params["Dense_2"]["kernel"])
  levels = alphabets.levels_for(params["Dense_2"]["kernel"], 2, 1.0)
  q["Dense_2"]["kernel"] = alphabets.msq(params["Dense_2"]["kernel"], levels)
  packed = export.pack(q, dict(fitted, Dense_2=levels))
  jax.tree.map(np.testing.assert_array_equal, export.unpack(packed), q)

  path = tmp_path / "ckpt"
  on_disk = export.save(path, packed)
  restored = export.restore(path)
  assert jax.tree.structure(restored, is_leaf=export.is_packed) == jax.tree.structure(
      packed, is_leaf=export.is_packed)
  jax.tree.map(np.testing.assert_array_equal, export.unpack(restored), q)
  for name in fitted:
    assert restored[name]["kernel"].shape == packed[name]["kernel"].shape
    np.testing.assert_array_equal(restored[name]["kernel"].data, packed[name]["kernel"].data)

  rep = export.report(packed)
  n = sum(p["kernel"].size for p in params.values())
  assert rep["weights"] == n
  assert rep["float_bytes"] == 4 * sum(p["bias"].size for p in params.values())
  assert rep["float32_bytes"] == 4 * sum(x.size for x in jax.tree.leaves(params))
  # Codes: 3-bit in nibbles (2 per byte), 8-bit one per byte, the 2-bit alphabet's 5 levels in
  # 3 bits -> nibbles.
  layers = rep["layers"]
  assert layers["Dense_0"]["code_bytes"] == 400 * 120 // 2
  assert layers["Conv_0"]["code_bytes"] == 150
  assert layers["Dense_2"]["bits"] == 3 and layers["Dense_2"]["code_bytes"] == 84 * 10 // 2
  assert layers["Dense_0"]["side_bytes"] == 2 * 4 * math.ceil(400 / 32) * 120
  assert layers["Conv_0"]["ideal_bytes"] == layers["Conv_0"]["storage_bytes"]  # 8 bits
  assert layers["Dense_0"]["ideal_bytes"] < layers["Dense_0"]["storage_bytes"]  # 3 in 4
  # The file holds the payload plus orbax's metadata (a few KiB, ~0.5 KiB per array).
  arrays = len(jax.tree.leaves(export._to_state(packed)))
  payload = rep["total_bytes"] + 8 * arrays  # + the int64 meta rows
  overhead = on_disk - payload
  assert 0 <= overhead <= 8192 + 600 * arrays, (on_disk, payload)
  assert export.save(tmp_path / "zstd", packed, compress=True) < on_disk
  jax.tree.map(np.testing.assert_array_equal, export.unpack(export.restore(tmp_path / "zstd")), q)
