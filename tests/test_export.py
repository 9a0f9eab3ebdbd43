"""Integer export (qjax.export): packing, exact round trips, orbax save/restore, byte counts."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

import qjax
from qjax import alphabets
from qjax import export
from qjax import grids
from qjax import views


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
  q, fitted = qjax.quantize_rtn(params, spec)
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
  arrays = len(jax.tree.leaves(export.checkpoint._to_state(packed)))
  payload = rep["total_bytes"] + 8 * arrays  # + the int64 meta rows
  overhead = on_disk - payload
  assert 0 <= overhead <= 8192 + 600 * arrays, (on_disk, payload)
  assert export.save(tmp_path / "zstd", packed, compress=True) < on_disk
  jax.tree.map(np.testing.assert_array_equal, export.unpack(export.restore(tmp_path / "zstd")), q)


# --------------------------------------------------------------------------------------------
# Grids of the driver's matrices (qjax.gptq / qjax.gpfq return_grids): packed exactly.


class _Cell(nn.Module):
  @nn.compact
  def __call__(self, h, _):
    return nn.tanh(nn.DenseGeneral((2, 3), name="qkv")(h).reshape(h.shape)), None


class _Stacked(nn.Module):
  """Conv (rows channel-major), a scan-stacked DenseGeneral (3, 6, 2, 3): slices 'stack/qkv[i]'
  with matrices (6, 6), an Einsum kernel used transposed, a tied embedding (E^T)."""

  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Conv(6, (3, 3), name="conv")(x))  # matrix (27, 6): groups of 4, last short
    h = jnp.mean(h, axis=(1, 2))
    h, _ = nn.scan(_Cell, variable_axes={"params": 0}, split_rngs={"params": True},
                   length=3)(name="stack")(h, None)
    e = nn.Einsum((5, 6), "bd,fd->bf", name="ein")(h)
    return nn.Embed(9, 5, name="embed").attend(nn.tanh(e))


def _stacked(seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((16, 5, 5, 3)), jnp.float32)
  draw = lambda s: jnp.asarray(0.5 * rng.standard_normal(s.shape), s.dtype)  # noqa: E731
  return _Stacked(), jax.tree.map(draw, jax.eval_shape(_Stacked().init, jax.random.key(0), x)), x


def _assert_round_trip(q, targets, tmp_path=None):
  packed = export.pack(q, targets)
  jax.tree.map(np.testing.assert_array_equal, export.unpack(packed), q)
  if tmp_path is not None:
    export.save(tmp_path, packed)
    restored = export.restore(tmp_path)
    jax.tree.map(np.testing.assert_array_equal, export.unpack(restored), q)
  return packed


def test_gptq_and_gpfq_grids_of_every_layout_round_trip(tmp_path):
  """Group grids on the conv's channel-major rows, on a stacked DenseGeneral's slices (packed as
  one kernel), on a transposed Einsum kernel and a tied embedding: unpack(pack) == Q exactly."""
  model, params, x = _stacked()
  spec = grids.GridSpec(3, "group", 4, symmetric=False)
  q, _, t = qjax.gptq(params, model.apply, x, bits=3, granularity="group", group_size=4,
                      progress=False, return_grids=True)  # dynamic groups (the reference's)
  assert sorted(t) == ["conv", "ein", "embed/embedding", "stack/qkv[0]", "stack/qkv[1]",
                       "stack/qkv[2]"]
  packed = _assert_round_trip(q, t, tmp_path / "gptq")
  conv = packed["params"]["conv"]["kernel"]
  assert conv.view == t.views["conv"] and conv.view.shape == (27, 6)  # rows (Cin, kh, kw)
  stack = packed["params"]["stack"]["qkv"]["kernel"]
  assert stack.view.shape == (6, 18) and stack.scale.shape == (2, 18)  # 3 slices side by side
  rep = export.report(packed)
  assert rep["weights"] == 3 * 3 * 3 * 6 + 3 * 6 * 2 * 3 + 5 * 6 + 9 * 5  # every kernel once
  # Without the views the conv's group grid is read on the wrong rows.
  with pytest.raises(ValueError, match="conv: value .* is not on its grid"):
    export.pack(q, dict(t))
  export.pack(q, dict(t), views=t.views)  # explicit views do the same as Targets'


def test_gpfq_msq_and_rtn_on_driver_views_round_trip():
  """GPFQ on a grid / a per-tensor grid / the paper's alphabets (stacked slices: the union of
  their levels), MSQ on a grid, RTN on the driver's views: unpack(pack) == Q exactly."""
  model, params, x = _stacked()
  spec = grids.GridSpec(3, "group", 4, symmetric=False)
  for kw in (dict(grid=spec), dict(grid=grids.GridSpec(2, "tensor")), dict(bits=2)):
    q, _, t = qjax.gpfq(params, model.apply, x, progress=False, return_grids=True, **kw)
    _assert_round_trip(q, t)
  q, _, t = qjax.quantize_msq(params, model.apply, x, grid=spec, progress=False,
                              return_grids=True)
  _assert_round_trip(q, t)
  q_rtn, t_rtn = qjax.quantize_rtn(params, spec, views=views.kernel_views(params, model.apply, x))
  _assert_round_trip(q_rtn, t_rtn)


def test_stacked_slices_that_cannot_form_one_kernel():
  model, params, x = _stacked()
  q, _, t = qjax.gptq(params, model.apply, x, bits=3, skip=r"qkv\[1\]", progress=False,
                      return_grids=True)
  with pytest.raises(ValueError, match=r"stack/qkv: the view covers 72 of the kernel's 108 "
                     "entries.*a target for every slice"):
    export.pack(q, t)
  q, _, t = qjax.gptq(params, model.apply, x, bits={r"qkv\[1\]": 4, "default": 3},
                      progress=False, return_grids=True)
  with pytest.raises(ValueError, match=r"stack/qkv: slice 'stack/qkv\[1\]' has a 4-bit grid"):
    export.pack(q, t)
  with pytest.raises(ValueError, match="targets name the whole kernel and its slices"):
    export.pack(q, dict(t, **{"stack/qkv": t["stack/qkv[0]"]}))
  with pytest.raises(ValueError, match=r"views name no parameter: \['nope'\]"):
    export.pack(q, t, views={"nope": t.views["conv"]})


def test_gpfq_c_search_returns_the_alphabets_of_the_chosen_c():
  """With C_grid, return_grids holds the alphabets of the C that won (not of the last tried)."""
  rng = np.random.default_rng(5)
  params = {"w1": jnp.asarray(rng.standard_normal((6, 8)) / 3, jnp.float32),
            "w2": jnp.asarray(rng.standard_normal((8, 3)) / 3, jnp.float32)}
  x = jnp.asarray(rng.standard_normal((40, 6)), jnp.float32)
  apply = lambda p, b: jnp.tanh(b @ p["w1"]) @ p["w2"]  # noqa: E731
  q, report, t = qjax.gpfq(params, apply, x, bits=2, C_grid=(1.0, 40.0), progress=False,
                           return_grids=True)
  assert report.C == 1.0  # C = 40 spreads 5 levels over 40x the weights' range
  np.testing.assert_array_equal(t["w1"], alphabets.levels_for(params["w1"], 2, 1.0, "paper"))
  _assert_round_trip(q, t)


class _Grouped(nn.Module):
  """Independent problems side by side in one matrix: a grouped conv, per-expert weights."""

  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Conv(6, (3, 3), feature_group_count=2, name="gconv")(x))  # (3,3,2,6)
    h = jnp.mean(h, axis=(1, 2)).reshape(x.shape[0], 2, 3)
    w = self.param("experts", nn.initializers.normal(1.0), (2, 3, 5))  # batch dim e: 2 problems
    return jnp.einsum("bei,eio->beo", h, w)


def test_grouped_problems_round_trip():
  x = jax.random.normal(jax.random.key(0), (16, 5, 5, 4))
  model = _Grouped()
  params = model.init(jax.random.key(1), x)
  v = views.kernel_views(params, model.apply, x)
  assert v["gconv"].shape == (18, 6) and v["experts"].shape == (3, 10)
  spec = grids.GridSpec(3, "group", 4)
  q, _, t = qjax.gptq(params, model.apply, x, bits=3, granularity="group", group_size=4,
                      progress=False, return_grids=True)
  _assert_round_trip(q, t)
  q, _, t = qjax.gpfq(params, model.apply, x, grid=spec, progress=False, return_grids=True)
  _assert_round_trip(q, t)
  q, t = qjax.quantize_rtn(params, spec, views=v, mask=jax.tree.map(lambda w: w.ndim >= 2, params))
  _assert_round_trip(q, t)
