"""qjax.program: weight ops found in the traced program; qjax.layouts: their matrices;
qjax.patches: conv patches that reproduce the conv exactly; qjax.provenance: write-back."""
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qjax import layouts
from qjax import patches as patches_lib
from qjax import program
from qjax import provenance


def _stops(fn, params, x):
  return program.trace(fn, params, x).stops


def _conv_rows(conv: nn.Conv, x: jax.Array, key: jax.Array, p: float, patch_stride: str):
  """(conv output, the traced stop, sampled patch rows, W matrix) of one nn.Conv."""
  variables = conv.init(jax.random.key(0), x)
  (op,) = _stops(conv.apply, variables, x)
  x_in = x  # the conv op's own input: flax pads CIRCULAR itself, then convolves VALID
  if getattr(conv, "padding", None) == "CIRCULAR":
    x_in = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="wrap")
  rows = patches_lib.conv_rows(x_in, key, patches_lib.ConvSpec.of(op.eqn), p, patch_stride)
  W = layouts.weight_to_matrix(variables["params"]["kernel"], op.layout)
  return conv.apply(variables, x), op, rows, W


def _rows_times_w(rows, W, groups):
  return jnp.concatenate([
      jnp.matmul(rows[:, r], W[:, c], precision=jax.lax.Precision.HIGHEST)
      for r, c in layouts.group_slices(W.shape[0], W.shape[1], groups)], axis=1)


CONV_CASES = [
    dict(features=6, kernel_size=(3, 3), padding="SAME"),
    dict(features=6, kernel_size=(3, 3), padding="VALID", strides=2),
    dict(features=6, kernel_size=(3, 2), padding="SAME", strides=(2, 1)),
    dict(features=8, kernel_size=(3, 3), padding="SAME", feature_group_count=2),
    dict(features=4, kernel_size=(3, 3), padding="VALID", feature_group_count=4),  # depthwise
    pytest.param(dict(features=6, kernel_size=(3, 3), padding=((1, 0), (2, 1)),
                      kernel_dilation=2), marks=pytest.mark.slow),
    pytest.param(dict(features=6, kernel_size=(3, 3), padding="CIRCULAR"),
                 marks=pytest.mark.slow),
]


@pytest.mark.parametrize("kwargs", CONV_CASES)
def test_patches_match_conv_at_sampled_positions_layer_stride(kwargs):
  x = jax.random.normal(jax.random.key(1), (3, 9, 10, 4))
  key = jax.random.key(7)
  y, op, rows, W = _conv_rows(nn.Conv(use_bias=False, **kwargs), x, key, 0.5, "layer")
  assert op.op == "conv" and op.layout.groups == kwargs.get("feature_group_count", 1)
  out = y.reshape(y.shape[0], -1, y.shape[-1])
  idx = patches_lib.sample_patch_indices(key, out.shape[0], out.shape[1], 0.5)
  expected = jnp.take_along_axis(out, idx[:, :, None], axis=1).reshape(-1, y.shape[-1])
  chex.assert_trees_all_close(_rows_times_w(rows, W, op.layout.groups), expected, atol=1e-5,
                              rtol=1e-5)


@pytest.mark.parametrize("padding", ["SAME", "VALID"])
@pytest.mark.parametrize("groups", [1, 2])
def test_disjoint_patches_match_conv_on_the_kernel_grid(padding, groups):
  # Stride = kernel size (Sec. 2.3): patch (i, j) is the stride-1 output at (3i, 3j).
  x = jax.random.normal(jax.random.key(2), (2, 11, 9, 4))
  conv = nn.Conv(6, (3, 3), padding=padding, feature_group_count=groups, use_bias=False)
  y, op, rows, W = _conv_rows(conv, x, jax.random.key(0), 1.0, "kernel")
  expected = y[:, ::3, ::3, :].reshape(-1, 6)
  chex.assert_trees_all_close(_rows_times_w(rows, W, groups), expected, atol=1e-5, rtol=1e-5)


def test_disjoint_patches_sampled_fraction():
  x = jax.random.normal(jax.random.key(3), (5, 12, 12, 2))
  key = jax.random.key(4)
  y, op, rows, W = _conv_rows(nn.Conv(3, (3, 3), padding="VALID", use_bias=False), x, key,
                              0.25, "kernel")
  grid = y[:, ::3, ::3, :].reshape(5, -1, 3)  # 4 x 4 = 16 disjoint positions per image
  idx = patches_lib.sample_patch_indices(key, 5, 16, 0.25)
  chex.assert_shape(idx, (5, 4))
  expected = jnp.take_along_axis(grid, idx[:, :, None], axis=1).reshape(-1, 3)
  chex.assert_trees_all_close(_rows_times_w(rows, W, 1), expected, atol=1e-5)


def test_channels_first_conv_and_conv_transpose_patches():
  # Any dimension numbers: NCHW / OIHW straight from lax; and a transposed conv (lhs dilation).
  x = jax.random.normal(jax.random.key(0), (2, 3, 7, 6))
  w = jax.random.normal(jax.random.key(1), (5, 3, 3, 2))
  fn = lambda p, x: jax.lax.conv_general_dilated(  # noqa: E731
      x, p["w"], (2, 1), ((1, 1), (0, 1)), dimension_numbers=("NCHW", "OIHW", "NCHW"))
  (op,) = _stops(fn, {"w": w}, x)
  rows = patches_lib.conv_rows(x, None, patches_lib.ConvSpec.of(op.eqn), 1.0, "layer")
  y = jnp.moveaxis(fn({"w": w}, x), 1, -1).reshape(-1, 5)
  chex.assert_trees_all_close(rows @ layouts.weight_to_matrix(w, op.layout), y, atol=1e-5)
  conv_t = nn.ConvTranspose(4, (3, 3), strides=(2, 2), padding="SAME", use_bias=False)
  xt = jax.random.normal(jax.random.key(2), (2, 4, 5, 3))
  y, op, rows, W = _conv_rows(conv_t, xt, jax.random.key(0), 1.0, "layer")
  chex.assert_trees_all_close(rows @ W, y.reshape(-1, 4), atol=1e-5)


def test_patch_features_are_channel_major():
  # One image, one 2x2 patch, 2 channels: features come as (c, kh, kw).
  x = jnp.arange(8.0).reshape(1, 2, 2, 2)
  patches = patches_lib.conv_patches(x, (2, 2), (1, 1), ((0, 0), (0, 0)), lhs_dilation=(1, 1),
                                     rhs_dilation=(1, 1))
  chex.assert_trees_all_equal(patches[0, 0], jnp.array([0., 2., 4., 6., 1., 3., 5., 7.]))


def test_sample_patch_indices_deterministic_and_distinct():
  a = patches_lib.sample_patch_indices(jax.random.key(0), 4, 20, 0.3)
  b = patches_lib.sample_patch_indices(jax.random.key(0), 4, 20, 0.3)
  chex.assert_trees_all_equal(a, b)
  chex.assert_shape(a, (4, 6))
  for row in np.asarray(a):
    assert len(set(row.tolist())) == 6
  full = patches_lib.sample_patch_indices(jax.random.key(0), 2, 5, 1.0)
  chex.assert_trees_all_equal(full, jnp.tile(jnp.arange(5, dtype=jnp.int32), (2, 1)))
  with pytest.raises(ValueError, match="p must be in"):
    patches_lib.sample_patch_indices(jax.random.key(0), 2, 5, 0.0)


# --------------------------------------------------------------------------------------------
# Weight matrices of dot_general: contracting x free, batch dims as groups; round trips.


@pytest.mark.parametrize("spec,x_shape,w_shape,N0,N1,groups", [
    ("btd,dhk->bthk", (2, 3, 4), (4, 2, 5), 4, 10, 1),      # DenseGeneral / attention q,k,v
    ("bthk,hkd->btd", (2, 3, 2, 5), (2, 5, 4), 10, 4, 1),   # attention output projection
    ("bd,fd->bf", (6, 4), (3, 4), 4, 3, 1),                  # torch-style (out, in) weight
    ("ebd,edf->ebf", (3, 6, 4), (3, 4, 2), 4, 6, 3),         # per-expert weights: 3 problems
])
def test_dot_general_matrix_and_rows_reproduce_the_op(spec, x_shape, w_shape, N0, N1, groups):
  x = jax.random.normal(jax.random.key(0), x_shape)
  w = jax.random.normal(jax.random.key(1), w_shape)
  fn = lambda p, x: jnp.einsum(spec, x, p)  # noqa: E731
  (op,) = _stops(fn, w, x)
  layout = op.layout
  assert (layout.N0, layout.N1, layout.groups) == (N0, N1, groups)
  W = layouts.weight_to_matrix(w, layout)
  chex.assert_shape(W, (N0, N1))
  chex.assert_trees_all_equal(layouts.matrix_to_weight(W, layout), w)
  X = layouts.dot_rows(x, layout)
  Y = _rows_times_w(X, W, groups)  # (m, G*N1g): problem g's outputs side by side
  y = fn(w, x)
  if groups == 1:
    expected = y.reshape(-1, N1) if spec != "bd,fd->bf" else y
  else:
    expected = jnp.moveaxis(y, 0, 1).reshape(y.shape[1], -1)
  chex.assert_trees_all_close(Y, expected, atol=1e-5)


def test_write_back_through_transpose_cast_and_scan_slice():
  leaf = jnp.arange(18.0, dtype=jnp.bfloat16).reshape(2, 3, 3)

  def fn(p, x):
    def body(c, w):  # slice i of the stack, transposed and cast
      return c @ w.astype(jnp.float32).T, None
    return jax.lax.scan(body, x, p)[0]

  stops = _stops(fn, leaf, jnp.ones((4, 3)))
  assert [s.name for s in stops] == ["<params>[0]", "<params>[1]"]
  op = stops[1]
  assert op.prov.slice_key == (1,)
  operand = -jnp.arange(9.0).reshape(3, 3)  # the new value of slice 1, transposed and cast
  out = provenance.write_back(leaf, op.prov, operand)
  assert out.dtype == jnp.bfloat16
  chex.assert_trees_all_equal(out[0], leaf[0])
  chex.assert_trees_all_equal(out[1], operand.T.astype(jnp.bfloat16))


# --------------------------------------------------------------------------------------------
# Discovery: names, nesting, uses, biases.


class _Mixed(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Conv(4, (3, 3), strides=2, padding="SAME")(x)
    x = x.reshape(x.shape[0], -1, 4) * self.param("scale", nn.initializers.ones, (1, 1, 4))
    x = jax.jit(nn.relu)(nn.Dense(5)(x))
    x = nn.DenseGeneral((2, 3), use_bias=False)(x)
    return nn.Dense(2)(x.reshape(x.shape[0], -1))


def test_discovery_names_ops_biases_and_other_uses():
  model = _Mixed()
  x = jax.random.normal(jax.random.key(0), (2, 6, 6, 3))
  variables = model.init(jax.random.key(1), x)
  prog = program.trace(model.apply, variables, x)
  assert [(s.name, s.op, s.status) for s in prog.stops] == [
      ("Conv_0", "conv", "ok"), ("Dense_0", "dot_general", "ok"),
      ("DenseGeneral_0", "dot_general", "ok"), ("Dense_1", "dot_general", "ok")]
  bias_names = [None if s.bias is None else prog.leaf_names[s.bias[0].leaf] for s in prog.stops]
  assert bias_names == ["Conv_0/bias", "Dense_0/bias", None, "Dense_1/bias"]
  assert {prog.leaf_names[i]: u for i, u in prog.other_uses.items()} == {"scale": ["mul"]}


def test_nested_programs_and_loops():
  w = {"a": jnp.ones((3, 3)), "b": jnp.ones((3, 3)), "c": jnp.ones((3, 3)),
       "loop": jnp.ones((3, 3)), "both": jnp.ones((3, 3))}

  @jax.custom_vjp
  def twice(x, w):
    return 2.0 * (x @ w)
  twice.defvjp(lambda x, w: (twice(x, w), None), lambda r, g: (g, g))

  def fn(p, x):
    x = jax.jit(lambda x, w: jnp.tanh(x @ w))(x, p["a"])
    x = jax.checkpoint(lambda x: x @ p["b"].T)(x)
    x = twice(x, p["c"])
    x = jax.lax.cond(x.sum() > 0, lambda x: x @ p["loop"], lambda x: x, x)
    return x @ (p["both"] @ p["both"])

  stops = _stops(fn, w, jnp.ones((2, 3)))
  assert [(s.name, s.status) for s in stops] == [
      ("a", "ok"), ("b", "ok"), ("c", "ok"), ("loop", "unsupported"), ("both", "unsupported")]
  assert "cond" in stops[3].reason and "both operands" in stops[4].reason
