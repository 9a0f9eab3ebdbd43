"""Weights fitted to fake-quantized inputs: act= in qjax.driver, qjax.gptq and qjax.gpfq."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qjax
from qjax import _gptq
from qjax import driver

from test_activations import np_fake_quant

F32 = np.float32


def _params():
  k1, k2 = jax.random.split(jax.random.key(0))
  return {"w1": jax.random.normal(k1, (8, 8)), "w2": jax.random.normal(k2, (8, 4)) * 0.3}


def _x(seed=1):
  return jax.random.normal(jax.random.key(seed), (64, 8))


def _residual(p, x):
  return (x @ p["w1"] + x) @ p["w2"]  # x is read by the weight op and by the add


def test_quantized_stream_feeds_fake_quantized_inputs_only_to_the_op():
  p, x = _params(), _x()
  seen = {}

  def identity(name, W, chunks, info):
    seen[name] = [(np.asarray(a), np.asarray(b)) for a, b in chunks]
    return W

  spec = qjax.ActSpec(bits=4, granularity="token")
  _, report = driver.run(p, _residual, x, identity, act=spec)
  X1, Xt1 = seen["w1"][0]
  np.testing.assert_allclose(X1, x)
  np.testing.assert_allclose(Xt1, np_fake_quant(x, 4, per_token=True), atol=1e-6)
  # w2's input in the quantized stream: the op saw fq(x), the residual add the float x.
  h = np_fake_quant(x, 4, per_token=True) @ np.asarray(p["w1"]) + np.asarray(x)
  X2, Xt2 = seen["w2"][0]
  np.testing.assert_allclose(X2, np.asarray(x @ p["w1"] + x), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(Xt2, np_fake_quant(h, 4, per_token=True), rtol=1e-4, atol=1e-4)
  assert report.act_scales is None  # dynamic: nothing calibrated
  # The report's error is the deployed one: ||X W - X^~ Q|| with Q = W.
  ref = np.linalg.norm(X2 @ np.asarray(p["w2"]) - Xt2 @ np.asarray(p["w2"])) / np.linalg.norm(
      X2 @ np.asarray(p["w2"]))
  np.testing.assert_allclose(report.layers[1].error, ref, rtol=1e-4)


@pytest.mark.parametrize("dynamic", [True, False])
def test_gptq_H_is_gram_of_fake_quantized_inputs(monkeypatch, dynamic):
  p, x = _params(), _x()
  Hs = []
  layer = _gptq.gptq_layer

  def spy(W, H, grid, **kw):
    Hs.append(np.asarray(H))
    return layer(W, H, grid, **kw)

  monkeypatch.setattr(_gptq, "gptq_layer", spy)
  mlp = lambda p, x: jax.nn.relu(x @ p["w1"]) @ p["w2"]  # noqa: E731
  spec = qjax.ActSpec(bits=8, dynamic=dynamic)
  q, report = qjax.gptq(p, mlp, x, bits=4, act=spec, progress=False)
  if dynamic:
    fq = lambda v, name: np_fake_quant(v, 8)  # noqa: E731
  else:
    # Static scales were calibrated on the quantized stream: max |x~| / 127 of each layer.
    fq = lambda v, name: np_fake_quant(  # noqa: E731
        v, 8, scale=report.act_scales[name]["scale"])
    np.testing.assert_allclose(report.act_scales["w1"]["scale"], np.abs(x).max() / 127,
                               rtol=1e-6)
  X1 = fq(np.asarray(x), "w1")
  h = np.maximum(X1 @ np.asarray(q["w1"]), 0)
  if not dynamic:
    np.testing.assert_allclose(report.act_scales["w2"]["scale"], np.abs(h).max() / 127,
                               rtol=1e-5)
  X2 = fq(h, "w2")
  np.testing.assert_allclose(Hs[0], X1.T @ X1, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(Hs[1], X2.T @ X2, rtol=1e-4, atol=1e-3)
  # Not the Gram of the unquantized inputs.
  assert not np.allclose(Hs[0], np.asarray(x).T @ np.asarray(x), rtol=1e-5, atol=1e-4)
  # The deployed network is the quantized weights behind the same activation quantizers.
  out = qjax.with_activation_quant(mlp, spec, report.act_scales)(q, x)
  np.testing.assert_allclose(out, X2 @ np.asarray(q["w2"]), rtol=1e-4, atol=1e-4)


def test_gpfq_and_given_scales():
  p, x = _params(), _x()
  mlp = lambda p, x: jax.nn.relu(x @ p["w1"]) @ p["w2"]  # noqa: E731
  spec = qjax.ActSpec(bits=8, dynamic=False, method="percentile", percentile=99.0)
  scales = qjax.calibrate_activations(p, mlp, x, spec)
  q, report = qjax.gpfq(p, mlp, x, bits=4, act=spec, act_scales=scales, progress=False)
  assert report.act_scales.keys() == scales.keys()
  for k in scales:  # given scales are used as they are
    np.testing.assert_array_equal(report.act_scales[k]["scale"], scales[k]["scale"])
  q_float, _ = qjax.gpfq(p, mlp, x, bits=4, progress=False)
  assert not np.allclose(q["w2"], q_float["w2"])  # w2 was fitted to other inputs
  grid = qjax.grids.GridSpec(4, "channel")
  q_grid, r_grid = qjax.gpfq(p, mlp, x, grid=grid, act=qjax.ActSpec(bits=8, dynamic=False),
                             progress=False)
  assert sorted(r_grid.act_scales) == ["w1", "w2"]


def test_bad_act_arguments():
  p, x = _params(), _x()
  mlp = lambda p, x: jax.nn.relu(x @ p["w1"]) @ p["w2"]  # noqa: E731
  with pytest.raises(TypeError, match="ActSpec"):
    qjax.gptq(p, mlp, x, act=8, progress=False)
  with pytest.raises(ValueError, match="match no layer"):
    qjax.gpfq(p, mlp, x, act={"w7": qjax.ActSpec()}, progress=False)


def test_export_stores_activation_grids(tmp_path):
  from qjax import export
  p, x = _params(), _x()
  mlp = lambda p, x: jax.nn.relu(x @ p["w1"]) @ p["w2"]  # noqa: E731
  act = {"w1": qjax.ActSpec(bits=8, dynamic=False, symmetric=False),
         "w2": qjax.ActSpec(bits=4, granularity="token")}
  q, report, grids = qjax.gptq(p, mlp, x, bits=4, act=act, progress=False, return_grids=True)
  packed = export.pack(q, grids, act=act, act_scales=report.act_scales)
  rep = export.report(packed)["layers"]
  assert rep["w1"]["act"]["bits"] == 8 and not rep["w1"]["act"]["dynamic"]
  np.testing.assert_allclose(rep["w1"]["act"]["scale"], report.act_scales["w1"]["scale"])
  assert rep["w2"]["act"] == dict(fmt="int", bits=4, granularity="token", symmetric=True,
                                  dynamic=True, scale=None, zero=None)
  restored = export.restore(tmp_path / "ckpt") if export.save(tmp_path / "ckpt", packed) else None
  specs, scales = export.act_rules(restored)
  out = qjax.with_activation_quant(mlp, specs, scales)(export.unpack(restored), x)
  ref = qjax.with_activation_quant(mlp, act, report.act_scales)(q, x)
  np.testing.assert_array_equal(out, ref)
  with pytest.raises(ValueError, match="layer 'w1'.*needs its scale"):
    export.pack(q, grids, act=act)


def test_conv_rows_come_from_the_fake_quantized_image_and_bias_correction_sees_them():
  import flax.linen as nn
  from qjax import patches
  from qjax import program as program_lib

  class Cnn(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.relu(nn.Conv(4, (3, 3), padding="VALID")(x))
      return nn.Dense(3)(x.reshape(x.shape[0], -1))

  model = Cnn()
  x = jax.random.normal(jax.random.key(2), (6, 7, 7, 2))
  variables = model.init(jax.random.key(0), x)
  seen = {}

  def identity(name, W, chunks, info):
    seen[name] = list(chunks)[0]
    return W

  spec = qjax.ActSpec(bits=4, granularity="token")
  driver.run(variables, model.apply, x, identity, act=spec, patch_stride="layer")
  X, Xt = seen["Conv_0"]
  prog = program_lib.trace(model.apply, variables, x)
  conv = prog.stops[0]
  xq = np_fake_quant(x, 4, per_token=True)  # a conv's tokens are pixels, channels last
  rows = patches.conv_rows(jnp.asarray(xq), None, patches.ConvSpec.of(conv.eqn), 1.0, "layer")
  np.testing.assert_allclose(Xt, rows, atol=1e-6)
  np.testing.assert_allclose(X, patches.conv_rows(x, None, patches.ConvSpec.of(conv.eqn), 1.0,
                                                  "layer"), atol=1e-6)
  # Bias correction of the last layer uses the fake-quantized input: with Q = W the shift is the
  # mean of fq(x~) W - x W over the calibration rows.
  q, report = driver.run(variables, model.apply, x, identity, act=spec, bias_correction=True)
  conv_out = lambda v: np.maximum(np.asarray(jax.lax.conv_general_dilated(  # noqa: E731
      jnp.asarray(v), variables["params"]["Conv_0"]["kernel"], (1, 1), "VALID",
      dimension_numbers=("NHWC", "HWIO", "NHWC"))) + np.asarray(
          variables["params"]["Conv_0"]["bias"]), 0).reshape(6, -1)
  hidden, hidden_f = conv_out(xq), conv_out(x)
  W = np.asarray(variables["params"]["Dense_0"]["kernel"])
  shift = (np_fake_quant(hidden, 4, per_token=True) @ W - hidden_f @ W).mean(0)
  np.testing.assert_allclose(q["params"]["Dense_0"]["bias"],
                             variables["params"]["Dense_0"]["bias"] - shift, rtol=1e-4,
                             atol=1e-4)
  assert report.bias_shift > 0


def test_scan_stack_with_static_act():
  ws = jax.random.normal(jax.random.key(3), (3, 8, 8)) * 0.5

  def stack(p, x):
    return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, p["ws"])[0]

  x = _x()
  spec = qjax.ActSpec(bits=6, dynamic=False)
  q, report = qjax.gptq({"ws": ws}, stack, x, bits=4, act=spec, progress=False)
  assert sorted(report.act_scales) == ["ws[0]", "ws[1]", "ws[2]"]
  # Each slice's scale is max |input| / 31 of the quantized network's input of that slice.
  h = np.asarray(x)
  for i in range(3):
    s = report.act_scales[f"ws[{i}]"]["scale"]
    np.testing.assert_allclose(s, np.abs(h).max() / 31, rtol=1e-5)
    h = np.tanh(np_fake_quant(h, 6, scale=s) @ np.asarray(q["ws"][i]))
  out = jax.jit(qjax.with_activation_quant(stack, spec, report.act_scales))(q, x)
  np.testing.assert_allclose(out, h, rtol=1e-4, atol=1e-4)
