"""Alg. 1 (structured sketching): residual, independence, stopping rule, input validation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qjax import alq
from qjax.alq import sketch


def _params():
  k = jax.random.split(jax.random.key(0), 3)
  return {"Conv_0": {"kernel": jax.random.normal(k[0], (3, 3, 4, 6)), "bias": jnp.zeros((6,))},
          "Dense_0": {"kernel": jax.random.normal(k[1], (40, 8)), "bias": jnp.zeros((8,))},
          "Dense_1": {"kernel": jax.random.normal(k[2], (8, 3)), "bias": jnp.zeros((3,))}}


def _residual(w, alpha, B):
  return np.sum((w - np.einsum("gni,gi->gn", B.astype(np.float64), alpha)) ** 2, axis=1)


def test_residual_never_increases_with_each_basis():
  w = jax.random.normal(jax.random.key(1), (32, 25))
  previous = np.sum(np.asarray(w, np.float64) ** 2, axis=1)
  for bits in range(1, 7):
    alpha, B, mask = sketch.sketch_groups(w, max_bits=bits, sigma=0.0)
    assert np.all(np.asarray(mask).sum(1) == bits)
    residual = _residual(np.asarray(w, np.float64), np.asarray(alpha, np.float64), np.asarray(B))
    assert np.all(residual <= previous * (1 + 1e-5) + 1e-6)
    assert np.all(residual < previous)  # strictly: each sign(eps) basis reduces the residual
    previous = residual


def test_bases_linearly_independent_binary_and_alphas_positive():
  w = jax.random.normal(jax.random.key(2), (64, 25))
  alpha, B, mask = sketch.sketch_groups(w, max_bits=6, sigma=0.0)
  assert B.dtype == jnp.int8 and alpha.dtype == jnp.float32 and mask.dtype == jnp.bool_
  assert set(np.unique(np.asarray(B))) <= {-1, 1}
  assert np.all(np.asarray(alpha)[np.asarray(mask)] > 0)
  for g in range(64):
    live = np.asarray(B[g])[:, np.asarray(mask[g])].astype(np.float64)
    gram = live.T @ live
    assert np.linalg.matrix_rank(live) == live.shape[1]
    assert np.isfinite(np.linalg.cond(gram)) and np.linalg.cond(gram) < 1e6


def test_more_bases_than_weights_stops_at_an_exact_fit():
  w = jax.random.normal(jax.random.key(4), (16, 2))
  alpha, B, mask = sketch.sketch_groups(w, max_bits=5, sigma=0.0)
  assert np.all(np.asarray(mask).sum(1) <= 2)
  np.testing.assert_allclose(np.einsum("gni,gi->gn", np.asarray(B, np.float32), alpha), w,
                             atol=1e-5)


@pytest.mark.parametrize("sigma", [0.3, 0.05, 0.01])
def test_stops_below_sigma_or_at_max_bits(sigma):
  w = jax.random.normal(jax.random.key(3), (128, 16))
  alpha, B, mask = sketch.sketch_groups(w, max_bits=4, sigma=sigma)
  wn = np.asarray(w, np.float64)
  rel = _residual(wn, np.asarray(alpha, np.float64), np.asarray(B)) / np.sum(wn ** 2, axis=1)
  bits = np.asarray(mask).sum(1)
  assert np.all((rel <= sigma * (1 + 1e-4)) | (bits == 4))
  # live slots form a prefix, and a group stops as soon as it is below sigma
  assert np.all(np.asarray(mask) == (np.arange(4)[None, :] < bits[:, None]))
  for b in range(1, 4):
    a1, b1, _ = sketch.sketch_groups(w, max_bits=b, sigma=0.0)
    rel_b = _residual(wn, np.asarray(a1, np.float64), np.asarray(b1)) / np.sum(wn ** 2, axis=1)
    assert np.all((bits <= b) | (rel_b > sigma * (1 - 1e-4)))


def test_init_replaces_matched_kernels_only():
  params = _params()
  q = alq.init(params, {"Conv_.*": "kernel-wise", "Dense_0": alq.subchannel_wise(2)},
               max_bits=3, sigma=0.0)
  assert alq.is_quantized(q["Conv_0"]["kernel"]) and alq.is_quantized(q["Dense_0"]["kernel"])
  assert q["Conv_0"]["kernel"].alpha.shape == (24, 3)
  assert q["Dense_0"]["kernel"].B.shape == (16, 20, 3)
  assert q["Dense_1"]["kernel"] is params["Dense_1"]["kernel"]
  rec = alq.reconstruct(q)
  assert jax.tree.map(jnp.shape, rec) == jax.tree.map(jnp.shape, params)
  rel = jnp.sum((rec["Dense_0"]["kernel"] - params["Dense_0"]["kernel"]) ** 2) / jnp.sum(
      params["Dense_0"]["kernel"] ** 2)
  assert float(rel) < 0.2


@pytest.mark.parametrize("max_bits", [0, -1, 13])
def test_bad_max_bits(max_bits):
  with pytest.raises(ValueError, match="max_bits"):
    alq.init(_params(), {"Conv_0": "kernel-wise"}, max_bits=max_bits, sigma=0.0)


def test_pattern_matching_nothing_is_named():
  with pytest.raises(ValueError, match="Dense_7"):
    alq.init(_params(), {"Conv_0": "kernel-wise", "Dense_7": "channel-wise"}, max_bits=2,
             sigma=0.0)


def test_structure_not_dividing_layer_is_named():
  with pytest.raises(ValueError, match="Dense_0"):
    alq.init(_params(), {"Dense_0": "subchannel-wise(3)"}, max_bits=2, sigma=0.0)
  with pytest.raises(ValueError, match="Dense_1"):
    alq.init(_params(), {"Dense_1": "kernel-wise"}, max_bits=2, sigma=0.0)


def test_bad_sigma():
  with pytest.raises(ValueError, match="sigma"):
    alq.init(_params(), {"Conv_0": "kernel-wise"}, max_bits=2, sigma=-1.0)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_weight_is_an_error_naming_the_layer(bad):
  params = _params()
  params["Dense_0"]["kernel"] = params["Dense_0"]["kernel"].at[3, 2].set(bad)
  with pytest.raises(ValueError, match=r"'Dense_0'.*non-finite.*\(3, 2\)"):
    alq.init(params, {"Dense_.*": "channel-wise"}, max_bits=2, sigma=0.0)
  # a float layer may hold anything: only the kernels being sketched are checked
  q = alq.init(params, {"Conv_0": "kernel-wise"}, max_bits=2, sigma=0.0)
  assert not alq.is_quantized(q["Dense_0"]["kernel"])


def test_structures_follow_qjax_rules():
  """re.search on the layer name, first match wins, 'default', one value for all layers."""
  params = {f"Dense_{i}": {"kernel": jnp.ones((4, 2))} for i in (1, 10)}
  params["Block_0"] = {"Dense_1": {"kernel": jnp.ones((4, 2))}}
  assigned = sketch.assign_structures(params, {"Dense_1": "channel-wise"})
  assert set(assigned) == {"Dense_1", "Dense_10", "Block_0/Dense_1"}  # re.search
  assigned = sketch.assign_structures(params, {"^Dense_1$": "channel-wise",
                                               "default": "subchannel-wise(2)"})
  assert assigned == {"Dense_1": alq.channel_wise(), "Dense_10": alq.subchannel_wise(2),
                      "Block_0/Dense_1": alq.subchannel_wise(2)}
  assert set(sketch.assign_structures(params, "channel-wise")) == set(assigned)
  with pytest.raises(ValueError, match=r"\['Dense_1\$'\] match no layer"):
    sketch.assign_structures(params, [("Dense_1", "channel-wise"), ("Dense_1$", "kernel-wise")])
  with pytest.raises(ValueError, match="structures\\['Dense'\\].*cannot parse"):
    sketch.assign_structures(params, {"Dense": "rows"})


def test_default_structures_select_the_same_layers_as_before():
  """The pipeline's default rules pick exactly Conv_0, Conv_1, Dense_0, Dense_1 (as the former
  re.fullmatch did), not e.g. Dense_10 or a nested Block_0/Conv_0."""
  shapes = {"Conv_0": (5, 5, 1, 6), "Conv_1": (5, 5, 6, 16), "Dense_0": (16, 120),
            "Dense_1": (120, 84), "Dense_10": (84, 10)}
  params = {name: {"kernel": jnp.ones(shape)} for name, shape in shapes.items()}
  params["Block_0"] = {"Conv_0": {"kernel": jnp.ones((5, 5, 1, 6))}}
  structures = alq.default_config().structures
  assigned = sketch.assign_structures(params, structures)
  assert set(assigned) == {"Conv_0", "Conv_1", "Dense_0", "Dense_1"}
