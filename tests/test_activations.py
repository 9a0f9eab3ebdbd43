"""Activation quantization (qjax.activations) against hand-written NumPy fake-quant forwards."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import qjax
from qjax import activations

F32 = np.float32


def np_fake_quant(x, bits, *, symmetric=True, per_token=False, group=None, scale=None,
                  zero=None):
  """round(x / s) clipped, times s; s per tensor / per row of the last axis / per group of the
  last axis (the feature axis), NumPy float32."""
  x = np.asarray(x, F32)
  if scale is not None:
    s, z = F32(scale), F32(zero or 0)
  else:
    shape = x.shape
    m = x.reshape(-1, shape[-1])
    if group is not None:
      m = m.reshape(m.shape[0], -1, group)
    elif per_token:
      m = m[:, None, :]
    else:
      m = m.reshape(1, 1, -1)
    lo, hi = m.min(-1, keepdims=True), m.max(-1, keepdims=True)
    if symmetric:
      s = np.maximum(-lo, hi) / F32(2 ** (bits - 1) - 1)
      z = np.zeros_like(s)
    else:
      lo, hi = np.minimum(lo, 0), np.maximum(hi, 0)
      s = (hi - lo) / F32(2**bits - 1)
      z = np.round(-lo / np.where(s > 0, s, 1))
    s = np.where(s > 0, s, F32(1))
    x = m
  if symmetric:
    qmax = 2 ** (bits - 1) - 1
    y = np.clip(np.round(x / s), -qmax, qmax) * s
  else:
    y = (np.clip(np.round(x / s) + z, 0, 2**bits - 1) - z) * s
  return y.reshape(np.shape(x) if scale is not None else shape).astype(F32)


def _mlp_params(seed=0):
  k1, k2 = jax.random.split(jax.random.key(seed))
  return {"w1": jax.random.normal(k1, (8, 16)), "w2": jax.random.normal(k2, (16, 4)) * 0.3}


def _mlp(p, x):
  return jax.nn.relu(x @ p["w1"]) @ p["w2"]


def _x(shape=(32, 8), seed=1):
  return jax.random.normal(jax.random.key(seed), shape)


@pytest.mark.parametrize("kw", [dict(), dict(granularity="token"), dict(symmetric=False),
                                dict(granularity="token", symmetric=False, bits=4),
                                dict(granularity="group", group_size=4, bits=6)])
def test_plain_mlp_equals_hand_written_fake_quant(kw):
  p, x = _mlp_params(), _x()
  spec = qjax.ActSpec(**kw)
  ref_kw = dict(bits=spec.bits, symmetric=spec.symmetric,
                per_token=spec.granularity == "token", group=spec.group_size)
  h = np.maximum(np_fake_quant(x, **ref_kw) @ np.asarray(p["w1"]), 0)
  ref = np_fake_quant(h, **ref_kw) @ np.asarray(p["w2"])
  fn = qjax.with_activation_quant(_mlp, spec)
  np.testing.assert_allclose(fn(p, x), ref, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(jax.jit(fn)(p, x), ref, rtol=1e-4, atol=1e-4)
  # It is a real quantization: the output moves, and 8 bits move it less than 4.
  assert not np.allclose(fn(p, x), _mlp(p, x), atol=1e-6)


def test_inputs_lie_on_the_grid():
  p, x = _mlp_params(), _x()
  spec = qjax.ActSpec(bits=4, granularity="token")
  # The first layer's input per token: at most 15 distinct values, integer multiples of s.
  from qjax import program as program_lib
  prog = program_lib.trace(_mlp, p, x)
  op = prog.stops[0]
  xq = activations.fake_quant(x, spec, activations.feature_axes(op.eqn, op.x_index))
  s = np.abs(np.asarray(x)).max(1, keepdims=True) / 7
  codes = np.asarray(xq) / s
  np.testing.assert_allclose(codes, np.round(codes), atol=1e-4)
  assert np.abs(np.round(codes)).max() <= 7


class _LinenCnn(nn.Module):
  quant: object = None

  @nn.compact
  def __call__(self, x):
    q = self.quant or (lambda v: v)
    x = nn.relu(nn.Conv(4, (3, 3), padding="SAME")(q(x)))
    x = x.reshape(x.shape[0], -1)
    return nn.Dense(3)(q(x))


@pytest.mark.parametrize("token", [False, True])
def test_linen_cnn_equals_hand_written(token):
  model = _LinenCnn()
  x = _x((4, 6, 6, 2), seed=2)
  variables = model.init(jax.random.key(0), x)
  spec = qjax.ActSpec(bits=8, granularity="token" if token else "tensor")
  # A conv's tokens are its pixels (features: the input channels, the last axis in NHWC).
  hand = _LinenCnn(quant=lambda v: jnp.asarray(np_fake_quant(v, 8, per_token=token)))
  # The quant callable is NumPy: the hand-written forward runs eagerly.
  ref = hand.apply(variables, x)
  out = qjax.with_activation_quant(model.apply, spec)(variables, x)
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


class _NnxMlp(nnx.Module):
  def __init__(self, rngs, quant=None):
    self.l1 = nnx.Linear(8, 16, rngs=rngs)
    self.l2 = nnx.Linear(16, 4, rngs=rngs)
    self.quant = quant

  def __call__(self, x):
    q = self.quant or (lambda v: v)
    return self.l2(q(nnx.relu(self.l1(q(x)))))


def test_nnx_equals_hand_written():
  model = _NnxMlp(nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  apply_fn = lambda s, x: nnx.merge(graphdef, s)(x)  # noqa: E731
  x = _x()
  spec = qjax.ActSpec(bits=6, symmetric=False, granularity="token")
  out = qjax.with_activation_quant(apply_fn, spec)(state, x)
  hand = _NnxMlp(nnx.Rngs(0), quant=lambda v: jnp.asarray(
      np_fake_quant(v, 6, symmetric=False, per_token=True)))
  np.testing.assert_allclose(out, hand(x), rtol=1e-4, atol=1e-4)


def test_rules_by_layer_name_leave_others_float():
  p, x = _mlp_params(), _x()
  spec = qjax.ActSpec(bits=4)
  out = qjax.with_activation_quant(_mlp, {"w2": spec})(p, x)
  h = np.maximum(np.asarray(x) @ np.asarray(p["w1"]), 0)
  np.testing.assert_allclose(out, np_fake_quant(h, 4) @ np.asarray(p["w2"]), rtol=1e-4,
                             atol=1e-4)
  out_none = qjax.with_activation_quant(_mlp, {"w2": None, "default": spec})(p, x)
  ref = np.maximum(np_fake_quant(x, 4) @ np.asarray(p["w1"]), 0) @ np.asarray(p["w2"])
  np.testing.assert_allclose(out_none, ref, rtol=1e-4, atol=1e-4)


def test_scan_layers_get_their_own_static_scales():
  ws = jax.random.normal(jax.random.key(3), (3, 8, 8)) * 0.5

  def stack(p, x):
    def body(h, w):
      return jnp.tanh(h @ w), None
    return jax.lax.scan(body, x, p["ws"])[0]

  x = _x()
  spec = qjax.ActSpec(bits=8, dynamic=False)
  scales = qjax.calibrate_activations({"ws": ws}, stack, x, spec)
  assert sorted(scales) == ["ws[0]", "ws[1]", "ws[2]"]
  h, ref = np.asarray(x), np.asarray(x)
  for i in range(3):
    s = scales[f"ws[{i}]"]["scale"]
    np.testing.assert_allclose(s, np.abs(h).max() / 127, rtol=1e-6)
    ref = np.tanh(np_fake_quant(ref, 8, scale=s) @ np.asarray(ws[i]))
    h = np.tanh(h @ np.asarray(ws[i]))
  out = jax.jit(qjax.with_activation_quant(stack, spec, scales))({"ws": ws}, x)
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kw", [dict(method="max"), dict(method="max", symmetric=False),
                                dict(method="percentile", percentile=99.0),
                                dict(method="percentile", percentile=95.0, symmetric=False)])
def test_static_scales_equal_numpy_on_captured_inputs(kw):
  p = _mlp_params()
  batches = [_x(seed=s) for s in (4, 5)]
  spec = qjax.ActSpec(bits=8, dynamic=False, **kw)
  scales = qjax.calibrate_activations(p, _mlp, batches, spec)
  # The inputs the two layers see in the float network, over both batches.
  x1 = np.concatenate([np.asarray(b) for b in batches]).reshape(-1)
  x2 = np.concatenate([np.maximum(np.asarray(b) @ np.asarray(p["w1"]), 0)
                       for b in batches]).reshape(-1)
  for name, x in (("w1", x1), ("w2", x2)):
    if kw["method"] == "max":
      lo, hi = x.min(), x.max()
    elif spec.symmetric:
      hi = np.percentile(np.abs(x), spec.percentile)
      lo = -hi
    else:
      lo, hi = np.percentile(x, 100 - spec.percentile), np.percentile(x, spec.percentile)
    if spec.symmetric:
      s, z = max(-lo, hi) / 127, 0.0
    else:
      lo, hi = min(lo, 0), max(hi, 0)
      s = (hi - lo) / 255
      z = np.round(-lo / s)
    np.testing.assert_allclose(scales[name]["scale"], s, rtol=1e-5)
    np.testing.assert_allclose(scales[name]["zero"], z)
  fn = qjax.with_activation_quant(_mlp, spec, scales)
  out = fn(p, batches[0])
  h = np.maximum(np_fake_quant(batches[0], 8, symmetric=spec.symmetric,
                               scale=scales["w1"]["scale"], zero=scales["w1"]["zero"])
                 @ np.asarray(p["w1"]), 0)
  ref = np_fake_quant(h, 8, symmetric=spec.symmetric, scale=scales["w2"]["scale"],
                      zero=scales["w2"]["zero"]) @ np.asarray(p["w2"])
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


def test_mse_clips_no_worse_than_max():
  x = np.concatenate([np.random.default_rng(0).normal(size=4000), [40.0]]).astype(F32)
  mse = activations.static_scale(qjax.ActSpec(bits=4, dynamic=False, method="mse"), [x])
  mx = activations.static_scale(qjax.ActSpec(bits=4, dynamic=False), [x])
  err = lambda s: float(np.sum((np_fake_quant(x, 4, scale=s["scale"]) - x) ** 2))  # noqa: E731
  assert mse["scale"] < mx["scale"]
  assert err(mse) < err(mx)


def test_e4m3_is_float8_of_scaled_input():
  p, x = _mlp_params(), _x()
  out = qjax.with_activation_quant(_mlp, qjax.ActSpec(fmt="e4m3"))(p, x)
  s = np.abs(np.asarray(x)).max() / 448
  xq = (np.asarray(x) / s).astype(jnp.float8_e4m3fn).astype(F32) * s
  h = np.maximum(xq @ np.asarray(p["w1"]), 0)
  s2 = np.abs(h).max() / 448
  ref = ((h / s2).astype(jnp.float8_e4m3fn).astype(F32) * s2) @ np.asarray(p["w2"])
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kw, match", [
    (dict(bits=3), "bits must be in 4..8"), (dict(bits=9), "bits must be in 4..8"),
    (dict(percentile=0.0, dynamic=False, method="percentile"), r"percentile must be in \(0, 100\]"),
    (dict(percentile=101, dynamic=False, method="percentile"), "percentile"),
    (dict(granularity="row"), "granularity"),
    (dict(granularity="group"), "group_size"),
    (dict(method="percentile"), "dynamic=False"),
    (dict(granularity="token", dynamic=False), "per tensor"),
    (dict(fmt="e4m3", bits=4), "e4m3"),
])
def test_bad_specs(kw, match):
  with pytest.raises(ValueError, match=match):
    qjax.ActSpec(**kw)


def test_static_without_scales_names_the_layer():
  p, x = _mlp_params(), _x()
  fn = qjax.with_activation_quant(_mlp, {"w2": qjax.ActSpec(dynamic=False), "default": None})
  with pytest.raises(ValueError, match="layer 'w2'.*needs its scale"):
    fn(p, x)
  with pytest.raises(TypeError, match="ActSpec"):
    qjax.with_activation_quant(_mlp, {"w1": 8})
  with pytest.raises(ValueError, match="match no layer"):
    qjax.with_activation_quant(_mlp, {"w9": qjax.ActSpec()})(p, x)
  spec = qjax.ActSpec(granularity="group", group_size=5)
  with pytest.raises(ValueError, match="layer 'w1'.*group_size 5"):
    qjax.with_activation_quant(_mlp, spec)(p, x)
