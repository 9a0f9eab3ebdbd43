"""GPFQ with act-order (qjax.gpfq_layer(act_order=True)): the plain Eq. (7)-(8) loop on the
permuted inputs, each row on the grid of its original position, Q back in the original order."""
import jax
import numpy as np
import pytest
from absl.testing import parameterized
from jax.sharding import Mesh

import qjax
from qjax import grids

from test_gpfq_layer import chunked, layer_data, reference_gpfq, rounder_for


def reference_act_order(W, X, Xt, levels_of):
  """perm by decreasing diag(Xt^T Xt) (stable), the float64 loop on the permuted problem with
  row t rounding onto the alphabet of original row perm[t], un-permuted."""
  d = np.sum(np.asarray(Xt, np.float32) ** 2, axis=0)
  perm = np.argsort(-d, kind="stable")
  Qp, margin = reference_gpfq(W[perm], X[:, perm], Xt[:, perm],
                              lambda t, j: levels_of(perm[t], j))
  Q = np.zeros_like(Qp)
  Q[perm] = Qp
  return Q, margin, perm


class ActOrderTest(parameterized.TestCase):

  @parameterized.product(kind=("alphabet", "group", "grid"), method=("scan", "gram"),
                         stream=(False, True))
  def test_matches_reference_loop(self, kind, method, stream):
    W, X, Xt, levels = layer_data(3, m=40, N0=45, N1=7, dead=(3, 20))
    if kind == "alphabet":
      target, levels_of = levels, lambda t, j: levels
    elif kind == "group":
      target, levels_of = rounder_for("group", W, seed=7)
    else:  # a fitted group grid: each row keeps the group of its original position
      target = grids.fit(W, grids.GridSpec(3, "group", 8, symmetric=True))
      scale = np.asarray(target.scale)
      levels_of = lambda t, j: scale[t // 8, j] * np.arange(-4, 4, dtype=np.float32)  # noqa
    Q_ref, margin, perm = reference_act_order(W, X, Xt, levels_of)
    assert margin > 2e-5 and not np.array_equal(perm, np.arange(45))
    data = (chunked(X, Xt, 16), None) if stream else (X, Xt)
    Q = qjax.gpfq_layer(W, *data, target, method=method, block_size=16, act_order=True)
    np.testing.assert_array_equal(Q, Q_ref)
    if kind == "grid":
      np.testing.assert_array_equal(target.round(Q), Q)

  def test_same_input_and_mesh(self):
    W, X, _, levels = layer_data(4, m=32, N0=40, N1=8, same=True)
    Q_ref, _, _ = reference_act_order(W, X, X, lambda t, j: levels)
    np.testing.assert_array_equal(qjax.gpfq_layer(W, X, None, levels, act_order=True), Q_ref)
    if len(jax.devices()) >= 8:
      mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))
      Q = qjax.gpfq_layer(W, X, None, levels, act_order=True, mesh=mesh)
      np.testing.assert_array_equal(np.asarray(Q), Q_ref)

  def test_bad_input_is_checked_first(self):
    W, X, Xt, levels = layer_data(5, m=20, N0=10, N1=3)
    with pytest.raises(ValueError, match="X and X_tilde must have the same shape"):
      qjax.gpfq_layer(W, X, Xt[:-1], levels, act_order=True)


def test_gpfq_network_act_order_matches_layer_calls():
  k = jax.random.split(jax.random.key(7), 4)
  params = {"w1": jax.random.normal(k[0], (12, 20)) / 3, "b1": 0.1 * jax.random.normal(k[1], (20,)),
            "w2": jax.random.normal(k[2], (20, 5)) / 4}
  x = jax.random.normal(k[3], (64, 12)) * np.linspace(0.3, 2.0, 12, dtype=np.float32)[None, :]
  mlp = lambda p, x: jax.nn.relu(x @ p["w1"] + p["b1"][None, :]) @ p["w2"]  # noqa: E731
  spec = grids.GridSpec(3, "group", 4, symmetric=True)
  q, report = qjax.gpfq(params, mlp, x, grid=spec, act_order=True, progress=False)
  Q1 = qjax.gpfq_layer(params["w1"], x, None, grids.fit(params["w1"], spec), act_order=True)
  np.testing.assert_array_equal(q["w1"], Q1)
  h, ht = (jax.nn.relu(x @ w + params["b1"][None, :]) for w in (params["w1"], Q1))
  Q2 = qjax.gpfq_layer(params["w2"], h, ht, grids.fit(params["w2"], spec), act_order=True)
  np.testing.assert_allclose(q["w2"], Q2, rtol=0, atol=1e-6)
  q0, _ = qjax.gpfq(params, mlp, x, grid=spec, progress=False)
  assert not np.array_equal(q0["w1"], q["w1"])  # the order changes Q
