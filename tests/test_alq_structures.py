"""Group structures (Appendix A.2) in Flax layout, and the QuantizedKernel reconstruction."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qjax import alq

CONV = (3, 3, 4, 6)  # kh, kw, Cin, Cout
DENSE = (8, 6)  # N0, N1


@pytest.mark.parametrize("shape,structure,expected", [
    (CONV, alq.channel_wise(), (6, 36)),
    (CONV, alq.subchannel_wise(2), (12, 18)),
    (CONV, alq.pixel_wise(), (54, 4)),
    (CONV, alq.kernel_wise(), (24, 9)),
    (DENSE, alq.channel_wise(), (6, 8)),
    (DENSE, alq.subchannel_wise(4), (24, 2)),
    (DENSE, alq.pixel_wise(), (6, 8)),
])
def test_round_trip_and_shapes(shape, structure, expected):
  w = jax.random.normal(jax.random.key(0), shape)
  groups = alq.to_groups(w, structure)
  assert groups.shape == expected == alq.group_shape(structure, shape)
  chex.assert_trees_all_equal(alq.from_groups(groups, structure, shape), w)


def test_groups_are_the_documented_slices():
  w = np.asarray(jax.random.normal(jax.random.key(1), CONV))
  kh, kw, cin, cout = CONV
  kernel = np.asarray(alq.to_groups(jnp.asarray(w), alq.kernel_wise()))
  pixel = np.asarray(alq.to_groups(jnp.asarray(w), alq.pixel_wise()))
  channel = np.asarray(alq.to_groups(jnp.asarray(w), alq.channel_wise()))
  sub = np.asarray(alq.to_groups(jnp.asarray(w), alq.subchannel_wise(2)))
  for c in range(cout):
    np.testing.assert_array_equal(np.sort(channel[c]), np.sort(w[..., c].ravel()))
    for d in range(cin):
      np.testing.assert_array_equal(kernel[c * cin + d], w[:, :, d, c].ravel())
    for h in range(kh):
      for v in range(kw):
        np.testing.assert_array_equal(pixel[(c * kh + h) * kw + v], w[h, v, :, c])
    for s in range(2):
      np.testing.assert_array_equal(np.sort(sub[c * 2 + s]),
                                    np.sort(w[:, :, s * cin // 2:(s + 1) * cin // 2, c].ravel()))
  d = np.asarray(jax.random.normal(jax.random.key(2), (800, 10)))
  dsub = np.asarray(alq.to_groups(jnp.asarray(d), alq.subchannel_wise(2)))
  np.testing.assert_array_equal(dsub[3 * 2 + 1], d[400:, 3])


@pytest.mark.parametrize("spec,expected", [
    ("kernel-wise", alq.kernel_wise()), ("pixel", alq.pixel_wise()),
    ("channel-wise", alq.channel_wise()), ("subchannel-wise(2)", alq.subchannel_wise(2)),
    (" subchannel ( 16 ) ", alq.subchannel_wise(16)),
])
def test_parse(spec, expected):
  assert alq.as_structure(spec) == expected


@pytest.mark.parametrize("spec", ["rows", "kernel-wise(2)", "subchannel-wise", "channel(0)"])
def test_parse_errors(spec):
  with pytest.raises(ValueError):
    alq.as_structure(spec)


def test_structure_that_does_not_divide_names_layer():
  with pytest.raises(ValueError, match="Dense_0.*|.*Dense_0"):
    alq.group_shape(alq.subchannel_wise(3), (800, 500), "Dense_0")
  with pytest.raises(ValueError, match="Dense_1"):
    alq.group_shape(alq.kernel_wise(), (500, 10), "Dense_1")


def test_reconstruct_is_b_alpha_in_flax_shape():
  g, n, i = 6, 36, 3
  k = jax.random.split(jax.random.key(3), 2)
  alpha = jnp.abs(jax.random.normal(k[0], (g, i)))
  B = jnp.where(jax.random.bernoulli(k[1], 0.5, (g, n, i)), 1, -1).astype(jnp.int8)
  mask = jnp.array([[True, True, False]] * g)
  q = alq.QuantizedKernel(alpha=alpha * mask, B=B, mask=mask, structure=alq.channel_wise(),
                          shape=CONV)
  params = {"Conv_0": {"kernel": q, "bias": jnp.zeros((6,))}}
  kernel = alq.reconstruct(params)["Conv_0"]["kernel"]
  assert kernel.shape == CONV and kernel.dtype == jnp.float32
  expected = np.einsum("gni,gi->gn", np.asarray(B, np.float32), np.asarray(alpha * mask))
  np.testing.assert_allclose(np.asarray(alq.to_groups(kernel, alq.channel_wise())), expected,
                             rtol=1e-6, atol=1e-6)
