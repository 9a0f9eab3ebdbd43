"""qjax.capture: layer calls of linen models, and conv patches that reproduce nn.Conv exactly."""
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qjax import capture as cap


def _conv_out_and_rows(conv: nn.Conv, x: jax.Array, key: jax.Array, p: float,
                       patch_stride: str):
  """(nn.Conv output, captured layer, sampled patch rows, kernel) for one conv."""
  variables = conv.init(jax.random.key(0), x)
  y, calls = cap.capture(conv.apply, variables, x)
  (layer,) = calls
  rows = cap.layer_rows(layer, x, key=key, patch_p=p, patch_stride=patch_stride)
  return y, layer, rows, variables["params"]["kernel"]


def _rows_times_kernel(rows: jax.Array, kernel: jax.Array, groups: int) -> jax.Array:
  W = cap.kernel_to_matrix(kernel)
  outs = [jnp.matmul(rows[:, r], W[:, c], precision=jax.lax.Precision.HIGHEST)
          for r, c in cap.group_slices(W.shape[0], W.shape[1], groups)]
  return jnp.concatenate(outs, axis=1)


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
  conv = nn.Conv(use_bias=False, **kwargs)
  key = jax.random.key(7)
  y, layer, rows, kernel = _conv_out_and_rows(conv, x, key, 0.5, "layer")
  out = y.reshape(y.shape[0], -1, y.shape[-1])
  idx = cap.sample_patch_indices(key, out.shape[0], out.shape[1], 0.5)
  expected = jnp.take_along_axis(out, idx[:, :, None], axis=1).reshape(-1, y.shape[-1])
  chex.assert_trees_all_close(
      _rows_times_kernel(rows, kernel, layer.conv.feature_group_count), expected,
      atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("padding", ["SAME", "VALID"])
@pytest.mark.parametrize("groups", [1, 2])
def test_disjoint_patches_match_conv_on_the_kernel_grid(padding, groups):
  # Stride = kernel size (Sec. 2.3): patch (i, j) is the stride-1 output at (3i, 3j).
  x = jax.random.normal(jax.random.key(2), (2, 11, 9, 4))
  conv = nn.Conv(6, (3, 3), padding=padding, feature_group_count=groups, use_bias=False)
  y, layer, rows, kernel = _conv_out_and_rows(conv, x, jax.random.key(0), 1.0, "kernel")
  expected = y[:, ::3, ::3, :].reshape(-1, 6)
  chex.assert_trees_all_close(_rows_times_kernel(rows, kernel, groups), expected,
                              atol=1e-5, rtol=1e-5)


def test_disjoint_patches_sampled_fraction():
  x = jax.random.normal(jax.random.key(3), (5, 12, 12, 2))
  conv = nn.Conv(3, (3, 3), padding="VALID", use_bias=False)
  key = jax.random.key(4)
  y, layer, rows, kernel = _conv_out_and_rows(conv, x, key, 0.25, "kernel")
  grid = y[:, ::3, ::3, :].reshape(5, -1, 3)  # 4 x 4 = 16 disjoint positions per image
  idx = cap.sample_patch_indices(key, 5, 16, 0.25)
  chex.assert_shape(idx, (5, 4))
  expected = jnp.take_along_axis(grid, idx[:, :, None], axis=1).reshape(-1, 3)
  chex.assert_trees_all_close(_rows_times_kernel(rows, kernel, 1), expected, atol=1e-5)


def test_patch_features_are_channel_major():
  # One image, one 2x2 patch, 2 channels: features come as (c, kh, kw).
  x = jnp.arange(8.0).reshape(1, 2, 2, 2)
  patches = cap.conv_patches(x, (2, 2), 1, "VALID")
  chex.assert_trees_all_equal(patches[0, 0], jnp.array([0., 2., 4., 6., 1., 3., 5., 7.]))


def test_kernel_matrix_round_trip():
  kernel = jax.random.normal(jax.random.key(0), (3, 2, 5, 7))
  W = cap.kernel_to_matrix(kernel)
  chex.assert_shape(W, (5 * 3 * 2, 7))
  chex.assert_trees_all_equal(W[1], kernel[0, 1, 0])  # row (c=0, kh=0, kw=1)
  chex.assert_trees_all_equal(cap.matrix_to_kernel(W, kernel.shape), kernel)
  dense = jnp.ones((4, 3))
  chex.assert_trees_all_equal(cap.kernel_to_matrix(dense), dense)


def test_sample_patch_indices_deterministic_and_distinct():
  a = cap.sample_patch_indices(jax.random.key(0), 4, 20, 0.3)
  b = cap.sample_patch_indices(jax.random.key(0), 4, 20, 0.3)
  chex.assert_trees_all_equal(a, b)
  chex.assert_shape(a, (4, 6))
  for row in np.asarray(a):
    assert len(set(row.tolist())) == 6
  full = cap.sample_patch_indices(jax.random.key(0), 2, 5, 1.0)
  chex.assert_trees_all_equal(full, jnp.tile(jnp.arange(5, dtype=jnp.int32), (2, 1)))
  with pytest.raises(ValueError, match="p must be in"):
    cap.sample_patch_indices(jax.random.key(0), 2, 5, 0.0)


class _Block(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.relu(nn.Dense(5)(x))


class _Mixed(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(4, (3, 3), strides=2, padding="SAME")(x)
    x = nn.BatchNorm(use_running_average=not train)(x)
    x = x.reshape(x.shape[0], -1, 4)            # (B, T, 4): Dense over leading axes
    x = _Block(name="block1")(x)
    x = nn.DenseGeneral((2, 3), axis=-1)(x)     # unsupported: not a plain matrix layer
    return nn.Dense(2)(x.reshape(x.shape[0], -1))


def test_capture_paths_kinds_and_attributes():
  model = _Mixed()
  x = jax.random.normal(jax.random.key(0), (2, 6, 6, 3))
  variables = model.init(jax.random.key(1), x)
  out, calls = cap.capture(model.apply, variables, x)
  assert [c.path for c in calls] == ["Conv_0", "block1/Dense_0", "DenseGeneral_0", "Dense_0"]
  assert [c.kind for c in calls] == ["conv", "dense", "unsupported", "dense"]
  assert "DenseGeneral" in calls[2].reason
  for c in calls:  # the path addresses the kernel in the params tree
    node = variables["params"]
    for k in c.path.split("/"):
      node = node[k]
    assert node["kernel"].shape == c.kernel_shape
  conv = calls[0].conv
  assert conv == cap.ConvSpec((3, 3), (2, 2), "SAME", (1, 1), (1, 1), 1)
  chex.assert_trees_all_equal(calls[0].inputs, x)
  chex.assert_trees_all_equal(out, model.apply(variables, x))


def test_dense_with_leading_axes_rows():
  model = _Mixed()
  x = jax.random.normal(jax.random.key(0), (2, 6, 6, 3))
  variables = model.init(jax.random.key(1), x)
  _, calls = cap.capture(model.apply, variables, x)
  dense = calls[1]
  chex.assert_shape(dense.inputs, (2, 9, 4))
  rows = cap.layer_rows(dense, dense.inputs)
  chex.assert_shape(rows, (18, 4))
  params = variables["params"]["block1"]["Dense_0"]
  expected = nn.Dense(5).apply({"params": params}, dense.inputs).reshape(18, 5)
  chex.assert_trees_all_close(rows @ params["kernel"] + params["bias"][None, :], expected,
                              atol=1e-6)
  with pytest.raises(ValueError, match="DenseGeneral_0"):
    cap.layer_rows(calls[2], calls[2].inputs)


def test_capture_under_jit_returns_inputs():
  model = _Mixed()
  x = jax.random.normal(jax.random.key(0), (2, 6, 6, 3))
  variables = model.init(jax.random.key(1), x)

  @jax.jit
  def inputs(v, xb):
    _, calls = cap.capture(model.apply, v, xb)
    return [c.inputs for c in calls]

  _, eager = cap.capture(model.apply, variables, x)
  chex.assert_trees_all_close(inputs(variables, x), [c.inputs for c in eager], atol=1e-6)


def test_nested_call_recorded_once():
  class MyDense(nn.Dense):
    def __call__(self, x):
      return super().__call__(x) * 2.0

  model = MyDense(3)
  x = jnp.ones((2, 4))
  variables = model.init(jax.random.key(0), x)
  _, calls = cap.capture(model.apply, variables, x)
  assert [(c.path, c.kind) for c in calls] == [("", "dense")]
