"""The round-to-nearest baseline: values on the grid, biases untouched, 8 bits harmless."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qjax
from qjax import rounding


def _params(seed=0):
  rng = np.random.default_rng(seed)
  return {"Dense_0": {"kernel": rng.normal(size=(20, 7)).astype(np.float32),
                      "bias": rng.normal(size=(7,)).astype(np.float32)},
          "Conv_0": {"kernel": rng.normal(size=(3, 3, 2, 4)).astype(np.float32)}}


@pytest.mark.parametrize("bits", [2, 3, 4, 8, 16])
def test_every_value_on_its_grid(bits):
  params = _params()
  q = qjax.quantize_uniform(params, bits)
  np.testing.assert_array_equal(q["Dense_0"]["bias"], params["Dense_0"]["bias"])
  for w, wq in ((params["Dense_0"]["kernel"], q["Dense_0"]["kernel"]),
                (params["Conv_0"]["kernel"], q["Conv_0"]["kernel"])):
    half = 2 ** (bits - 1) - 1
    delta = np.abs(w).max() / half
    k = np.asarray(wq) / delta
    np.testing.assert_allclose(k, np.round(k), atol=1e-3)
    assert np.abs(np.round(k)).max() <= half
    assert len(np.unique(np.round(k))) <= 2 * half + 1
    # Nearest level: error at most half a step.
    assert np.abs(np.asarray(wq) - w).max() <= delta / 2 + 1e-6
    assert wq.dtype == w.dtype


def test_per_layer_bits_and_mask():
  params = _params()
  q = qjax.quantize_uniform(params, lambda path: 8 if path.startswith("Conv") else 2)
  assert len(np.unique(q["Dense_0"]["kernel"])) <= 3
  assert len(np.unique(q["Conv_0"]["kernel"])) > 3
  mask = jax.tree.map(lambda _: False, params)
  q = qjax.quantize_uniform(params, 2, mask=mask)
  jax.tree.map(np.testing.assert_array_equal, q, params)


@pytest.mark.parametrize("bits,err", [(0, ValueError), (1, ValueError), (17, ValueError),
                                      (2.5, TypeError), (True, TypeError)])
def test_bits_out_of_range(bits, err):
  with pytest.raises(err, match="bits"):
    qjax.quantize_uniform(_params(), bits)


def test_one_bit_is_an_error_not_the_two_bit_grid():
  """b bits give 2^b - 1 levels; the per-tensor symmetric grid has no 1-bit form (2 bits is
  already ternary), so bits=1 is refused everywhere rather than silently rounding to ternary."""
  with pytest.raises(ValueError, match="2..16"):
    qjax.quantize_uniform(_params(), 1)
  with pytest.raises(ValueError, match=r"bits\['Conv'\] must be in 2..16"):
    qjax.quantize_uniform(_params(), {"Conv": 1, "default": 4})
  with pytest.raises(ValueError, match="'Dense_0'.*2..16"):
    qjax.quantize_uniform(_params(), lambda name: 1 if name == "Dense_0" else 4)
  with pytest.raises(ValueError, match="2..16"):
    rounding.round_to_uniform_grid(np.ones(3, np.float32), 1)
  q = qjax.quantize_uniform(_params(), 2)
  for layer in ("Dense_0", "Conv_0"):
    assert len(np.unique(q[layer]["kernel"])) == 3  # 2^2 - 1 levels


def test_bits_rules():
  """bits as qjax.rules: re.search on layer names, first match wins, 'default', unused = error."""
  params = _params()
  params["Dense_10"] = {"kernel": _params(1)["Dense_0"]["kernel"]}
  q = qjax.quantize_uniform(params, {"^Dense_1": 2, "default": 8})
  assert len(np.unique(q["Dense_10"]["kernel"])) <= 3
  assert len(np.unique(q["Dense_0"]["kernel"])) > 3
  q = qjax.quantize_uniform(params, {"^Dense_0$": 2, "default": 8})
  assert len(np.unique(q["Dense_0"]["kernel"])) <= 3
  assert len(np.unique(q["Dense_10"]["kernel"])) > 3
  with pytest.raises(ValueError, match="Dense_7"):
    qjax.quantize_uniform(params, {"Dense_7": 2, "default": 8})
  with pytest.raises(ValueError, match="'Conv_0' matches no pattern"):
    qjax.quantize_uniform(params, {"Dense": 4})


def test_sparsity_counts_exact_zeros():
  params = {"a": {"kernel": np.array([[0.0, 1.0], [0.0, 2.0]], np.float32),
                  "bias": np.zeros(2, np.float32)},
            "b": {"kernel": np.array([0.0, 0.0, 0.0, 5.0, 1.0, 1.0], np.float32)}}
  s = qjax.sparsity(params)
  assert s == {"a": 0.5, "b": 0.5, "overall": 0.5}  # layer names, as qjax.rules.path_name
  mask = jax.tree.map(lambda _: True, params)
  assert qjax.sparsity(params, mask=mask) == {"a": 0.5, "a/bias": 1.0, "b": 0.5,
                                              "overall": 7 / 12}


@pytest.mark.parametrize("array", [np.zeros(3), np.array([0.0, 1.0, 0.0, 2.0], np.float32),
                                   jax.numpy.ones((2, 2))])
def test_sparsity_of_a_bare_array_is_that_tensors(array):
  assert qjax.sparsity(array) == {"overall": float(np.mean(np.asarray(array) == 0))}


def test_zero_tensor_stays_zero():
  q = rounding.round_to_uniform_grid(np.zeros((3, 3), np.float32), 4)
  np.testing.assert_array_equal(q, 0)


def test_kernel_names_in_creation_order_and_pruning():
  params = {"Conv_0": {"kernel": jnp.arange(1.0, 11.0), "bias": jnp.ones(3)},
            "block10": {"Dense_0": {"kernel": -jnp.arange(1.0, 5.0)}},
            "block2": {"Dense_1": {"kernel": jnp.ones(4)}}}
  assert rounding.kernel_names(params) == ["Conv_0", "block10/Dense_0", "block2/Dense_1"]
  pruned = rounding.prune_smallest(params, 0.5)
  np.testing.assert_array_equal(pruned["Conv_0"]["kernel"], [0] * 5 + list(range(6, 11)))
  np.testing.assert_array_equal(pruned["Conv_0"]["bias"], jnp.ones(3))
  np.testing.assert_array_equal(pruned["block10"]["Dense_0"]["kernel"], [0, 0, -3, -4])
  # One threshold for all kernels: the 9th smallest of the 18 kernel weights, |w| = 3.
  pruned = rounding.prune_smallest(params, 0.5, scope="global")
  np.testing.assert_array_equal(pruned["Conv_0"]["kernel"], [0] * 3 + list(range(4, 11)))
  np.testing.assert_array_equal(pruned["block10"]["Dense_0"]["kernel"], [0, 0, 0, -4])
  np.testing.assert_array_equal(pruned["block2"]["Dense_1"]["kernel"], jnp.zeros(4))
  with pytest.raises(ValueError, match="scope"):
    rounding.prune_smallest(params, 0.5, scope="neuron")
  with pytest.raises(ValueError, match="fraction"):
    rounding.prune_smallest(params, 1.5)
