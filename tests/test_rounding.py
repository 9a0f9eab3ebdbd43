"""The round-to-nearest baseline: values on the grid, biases untouched, 8 bits harmless."""
import jax
import numpy as np
import pytest

import qjax
from qjax import rounding


def _params(seed=0):
  rng = np.random.default_rng(seed)
  return {"Dense_0": {"kernel": rng.normal(size=(20, 7)).astype(np.float32),
                      "bias": rng.normal(size=(7,)).astype(np.float32)},
          "Conv_0": {"kernel": rng.normal(size=(3, 3, 2, 4)).astype(np.float32)}}


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8, 16])
def test_every_value_on_its_grid(bits):
  params = _params()
  q = qjax.quantize_uniform(params, bits)
  np.testing.assert_array_equal(q["Dense_0"]["bias"], params["Dense_0"]["bias"])
  for w, wq in ((params["Dense_0"]["kernel"], q["Dense_0"]["kernel"]),
                (params["Conv_0"]["kernel"], q["Conv_0"]["kernel"])):
    half = max(2 ** (bits - 1) - 1, 1)
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


@pytest.mark.parametrize("bits,err", [(0, ValueError), (17, ValueError), (2.5, TypeError),
                                      (True, TypeError)])
def test_bits_out_of_range(bits, err):
  with pytest.raises(err, match="bits"):
    qjax.quantize_uniform(_params(), bits)


def test_sparsity_counts_exact_zeros():
  params = {"a": {"kernel": np.array([[0.0, 1.0], [0.0, 2.0]], np.float32),
                  "bias": np.zeros(2, np.float32)},
            "b": {"kernel": np.array([0.0, 0.0, 0.0, 5.0, 1.0, 1.0], np.float32)}}
  s = qjax.sparsity(params)
  assert s == {"a/kernel": 0.5, "b/kernel": 0.5, "overall": 0.5}


def test_zero_tensor_stays_zero():
  q = rounding.round_to_uniform_grid(np.zeros((3, 3), np.float32), 4)
  np.testing.assert_array_equal(q, 0)
