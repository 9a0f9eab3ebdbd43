"""qjax.driver through qjax.gpfq on many model kinds: Q equals `gpfq_layer` on X and X~ taken from
the model's own intermediates (or a hand-written forward), computed without qjax's program code."""
import dataclasses
import re

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import qjax
from qjax import alphabets
from qjax import driver
from qjax._gpfq import network
from qjax._gpfq.layer import gpfq_layer


def _reference_q(W, X, Xt, bits, groups=1, C=1.0):
  """GPFQ of each group on (X, X~); X~ = None when it equals X (the driver's 'same' form)."""
  W, X, Xt = (np.asarray(a, np.float32) for a in (W, X, Xt))
  levels = network.pad_levels(alphabets.levels_for(jnp.asarray(W), bits, C))
  same = np.array_equal(X, Xt)
  n0, n1 = W.shape[0], W.shape[1] // groups
  blocks = [gpfq_layer(W[:, g * n1:(g + 1) * n1], X[:, g * n0:(g + 1) * n0],
                       None if same else Xt[:, g * n0:(g + 1) * n0], levels)
            for g in range(groups)]
  return np.concatenate([np.asarray(b) for b in blocks], axis=1)


def _check(Q, W, X, Xt, bits=4, groups=1):
  chex.assert_trees_all_equal(np.asarray(Q, np.float32), _reference_q(W, X, Xt, bits, groups))


def _inputs(model, variables, *args, method_name="__call__"):
  """{module path: first input of its first call} from the model's own calls."""
  seen = {}

  def record(next_fun, call_args, kw, context):
    if context.method_name == method_name and context.module.has_variable("params", "kernel"):
      seen.setdefault("/".join(context.module.path), call_args[0])
    if context.method_name == "attend" and method_name == "attend":
      seen.setdefault("/".join(context.module.path), call_args[0])
    return next_fun(*call_args, **kw)

  with nn.intercept_methods(record):
    model.apply(variables, *args)
  return seen


def _rows(x, n0):
  return np.asarray(x).reshape(-1, n0)


def _gpfq(params, apply_fn, batch, **kw):
  kw.setdefault("bits", 4)
  return qjax.gpfq(params, apply_fn, batch, progress=False, **kw)


# --------------------------------------------------------------------------------------------
# Transformer pieces (linen).


class _EncoderBlock(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8)(nn.LayerNorm()(x))
    x = x + h
    h = nn.Dense(8)(nn.gelu(nn.Dense(16)(nn.LayerNorm()(x))))
    return x + h


def test_transformer_encoder_block():
  model = _EncoderBlock()
  x = jax.random.normal(jax.random.key(0), (3, 5, 8))
  variables = model.init(jax.random.key(1), x)
  q_vars, report = _gpfq(variables, model.apply, x)
  attn = "MultiHeadDotProductAttention_0"  # linen numbers the outer Dense(8) first
  names = [f"{attn}/query", f"{attn}/key", f"{attn}/value", f"{attn}/out", "Dense_1", "Dense_0"]
  assert [(r.path, r.status) for r in report.layers] == [(n, "quantized") for n in names]
  assert report.forward_passes == 2
  f_in, q_in = _inputs(model, variables, x), _inputs(model, q_vars, x)
  for name in names:
    keys = name.split("/")
    W = np.asarray(variables["params"][keys[0]][keys[-1]]["kernel"] if len(keys) > 1
                   else variables["params"][name]["kernel"])
    Q = q_vars["params"][keys[0]][keys[-1]]["kernel"] if len(keys) > 1 else \
        q_vars["params"][name]["kernel"]
    n0 = W.shape[0] * (W.shape[1] if name.endswith("/out") else 1)  # out: heads x head dim
    _check(np.asarray(Q).reshape(n0, -1), W.reshape(n0, -1), _rows(f_in[name], n0),
           _rows(q_in[name], n0))
  # Non-matmul parameters (LayerNorm scales, biases) stay as they were.
  chex.assert_trees_all_equal(q_vars["params"]["LayerNorm_0"], variables["params"]["LayerNorm_0"])


def test_einsum_layer():
  class M(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.relu(nn.Einsum((3, 2, 4), "btd,dhk->bthk")(x))
      return nn.Einsum((2, 4, 5), "bthk,hkf->btf")(x)

  model = M()
  x = jax.random.normal(jax.random.key(0), (4, 3, 3))
  variables = model.init(jax.random.key(1), x)
  q_vars, report = _gpfq(variables, model.apply, x, bits=3)
  assert [r.path for r in report.layers] == ["Einsum_0", "Einsum_1"]
  f_in, q_in = _inputs(model, variables, x), _inputs(model, q_vars, x)
  for name, n0 in (("Einsum_0", 3), ("Einsum_1", 8)):
    W = variables["params"][name]["kernel"]
    _check(np.asarray(q_vars["params"][name]["kernel"]).reshape(n0, -1),
           np.asarray(W).reshape(n0, -1), _rows(f_in[name], n0), _rows(q_in[name], n0), bits=3)


class _TiedDecoder(nn.Module):
  @nn.compact
  def __call__(self, tokens):
    emb = nn.Embed(20, 8)
    h = nn.relu(nn.Dense(8)(emb(tokens)))
    return emb.attend(h)


def test_tied_embedding_decoder():
  model = _TiedDecoder()
  tokens = jax.random.randint(jax.random.key(0), (4, 6), 0, 20)
  variables = model.init(jax.random.key(1), tokens)
  q_vars, report = _gpfq(variables, model.apply, tokens)
  assert [(r.path, r.status) for r in report.layers] == [("Dense_0", "quantized"),
                                                         ("Embed_0/embedding", "quantized")]
  assert "gather" in report.layers[1].reason
  assert [n for n, _ in report.other_params] == ["Embed_0/embedding"]
  E = np.asarray(variables["params"]["Embed_0"]["embedding"])
  # The calibration streams looked the tokens up in the float table; the head is quantized on
  # the inputs of `attend` in the network whose Dense_0 is quantized.
  mixed = {"params": {**q_vars["params"], "Embed_0": variables["params"]["Embed_0"]}}
  f_in = _inputs(model, variables, tokens, method_name="attend")["Embed_0"]
  q_in = _inputs(model, mixed, tokens, method_name="attend")["Embed_0"]
  _check(np.asarray(q_vars["params"]["Embed_0"]["embedding"]).T, E.T, _rows(f_in, 8),
         _rows(q_in, 8))


def test_shared_module_called_twice():
  class M(nn.Module):
    @nn.compact
    def __call__(self, x):
      d = nn.Dense(4)
      return nn.Dense(2)(d(jnp.tanh(d(x))))

  model = M()
  x = jax.random.normal(jax.random.key(0), (6, 4))
  variables = model.init(jax.random.key(1), x)
  q_vars, report = _gpfq(variables, model.apply, x, bits=3)
  assert [(r.path, r.status) for r in report.layers] == [
      ("Dense_0", "quantized"), ("Dense_0", "shared"), ("Dense_1", "quantized")]
  assert "Dense_0" in report.layers[1].reason
  _check(q_vars["params"]["Dense_0"]["kernel"], variables["params"]["Dense_0"]["kernel"], x, x,
         bits=3)


# --------------------------------------------------------------------------------------------
# Lifted transforms: scan, remat; boxed params.


class _Blk(nn.Module):
  @nn.compact
  def __call__(self, c, _):
    return nn.relu(nn.Dense(6)(c)), None


class _Scanned(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Dense(6)(x)
    x, _ = nn.scan(_Blk, variable_axes={"params": 0}, split_rngs={"params": True},
                   length=4)()(x, None)
    return nn.Dense(3)(x)


def _dense(p, x):
  return x @ p["kernel"] + p["bias"][None, :]


def test_nn_scan_quantizes_one_slice_per_iteration():
  model = _Scanned()
  x = jax.random.normal(jax.random.key(0), (7, 4))
  variables = model.init(jax.random.key(1), x)
  q_vars, report = _gpfq(variables, model.apply, x, bits=3)
  names = ["Dense_0"] + [f"Scan_Blk_0/Dense_0[{i}]" for i in range(4)] + ["Dense_1"]
  assert [(r.path, r.status) for r in report.layers] == [(n, "quantized") for n in names]
  p, q = variables["params"], q_vars["params"]
  stack_p, stack_q = p["Scan_Blk_0"]["Dense_0"], q["Scan_Blk_0"]["Dense_0"]
  chex.assert_trees_all_equal(stack_q["bias"], stack_p["bias"])
  hf, hq = _dense(p["Dense_0"], x), _dense(q["Dense_0"], x)
  for i in range(4):  # hand-written forward of both streams
    sl_p = {k: v[i] for k, v in stack_p.items()}
    sl_q = {k: v[i] for k, v in stack_q.items()}
    _check(sl_q["kernel"], sl_p["kernel"], hf, hq, bits=3)
    hf, hq = jax.nn.relu(_dense(sl_p, hf)), jax.nn.relu(_dense(sl_q, hq))
  _check(q["Dense_1"]["kernel"], p["Dense_1"]["kernel"], hf, hq, bits=3)


def test_nn_remat_blocks():
  class M(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.Dense(6)(x)
      for _ in range(2):
        x, _ = nn.remat(_Blk)()(x, None)
      return nn.Dense(3)(x)

  model = M()
  x = jax.random.normal(jax.random.key(0), (7, 4))
  variables = model.init(jax.random.key(1), x)
  q_vars, report = _gpfq(variables, model.apply, x, bits=3)
  names = ["Dense_0", "Checkpoint_Blk_0/Dense_0", "Checkpoint_Blk_1/Dense_0", "Dense_1"]
  assert [(r.path, r.status) for r in report.layers] == [(n, "quantized") for n in names]
  p, q = variables["params"], q_vars["params"]
  hf, hq = x, x
  for name in names:
    keys = name.split("/")
    lp, lq = p, q
    for k in keys:
      lp, lq = lp[k], lq[k]
    _check(lq["kernel"], lp["kernel"], hf, hq, bits=3)
    act = jax.nn.relu if "Blk" in name else (lambda h: h)  # Dense_0 has no activation
    hf, hq = act(_dense(lp, hf)), act(_dense(lq, hq))


def test_with_partitioning_boxed_params_kept():
  init = nn.with_partitioning(nn.initializers.lecun_normal(), (None, "model"))

  class M(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(3, kernel_init=init)(nn.relu(nn.Dense(6, kernel_init=init)(x)))

  model = M()
  x = jax.random.normal(jax.random.key(0), (9, 4))
  variables = model.init(jax.random.key(1), x)
  q_vars, report = _gpfq(variables, model.apply, x, bits=3)
  # linen numbers the outer Dense(3) first: Dense_1 (4 -> 6) runs first.
  assert [r.path for r in report.layers] == ["Dense_1", "Dense_0"]
  box = q_vars["params"]["Dense_0"]["kernel"]
  assert isinstance(box, nn.Partitioned) and box.names == (None, "model")
  p, q = nn.unbox(variables)["params"], nn.unbox(q_vars)["params"]
  _check(q["Dense_1"]["kernel"], p["Dense_1"]["kernel"], x, x, bits=3)
  hf, hq = (jax.nn.relu(_dense(d["Dense_1"], x)) for d in (p, q))
  _check(q["Dense_0"]["kernel"], p["Dense_0"]["kernel"], hf, hq, bits=3)


# --------------------------------------------------------------------------------------------
# Convolutions: patches written out by hand (numpy), all positions (patch_p=1, layer strides).


def _np_patches(x, k, stride, pads, dilate_input=1):
  """(N * positions, C * prod(k)) patches of a channels-last x, features channel-major."""
  x = np.asarray(x, np.float32)
  n_sp = x.ndim - 2
  if dilate_input > 1:
    shape = (x.shape[0],) + tuple((s - 1) * dilate_input + 1 for s in x.shape[1:-1]) + (
        x.shape[-1],)
    d = np.zeros(shape, np.float32)
    d[(slice(None),) + (slice(None, None, dilate_input),) * n_sp] = x
    x = d
  x = np.pad(x, ((0, 0),) + tuple(pads) + ((0, 0),))
  out = [(x.shape[1 + i] - k[i]) // stride[i] + 1 for i in range(n_sp)]
  rows = []
  for n in range(x.shape[0]):
    for pos in np.ndindex(*out):
      sl = tuple(slice(p * s, p * s + kk) for p, s, kk in zip(pos, stride, k))
      patch = x[(n,) + sl]  # (k..., C)
      rows.append(np.moveaxis(patch, -1, 0).reshape(-1))
  return np.stack(rows)


def _conv_matrix(kernel):
  kernel = np.asarray(kernel)
  return np.moveaxis(kernel, -2, 0).reshape(-1, kernel.shape[-1])


@pytest.mark.parametrize("case", ["depthwise", "1d"])
def test_depthwise_and_1d_conv(case):
  if case == "depthwise":
    conv = dict(features=4, kernel_size=(3, 3), padding=((1, 1), (1, 1)), feature_group_count=4)
    x = jax.random.normal(jax.random.key(0), (2, 5, 5, 4))
    k, stride, pads, groups = (3, 3), (1, 1), ((1, 1), (1, 1)), 4
  else:
    conv = dict(features=5, kernel_size=(3,), strides=2, padding=((1, 1),))
    x = jax.random.normal(jax.random.key(0), (3, 9, 2))
    k, stride, pads, groups = (3,), (2,), ((1, 1),), 1

  class M(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(2)(nn.relu(nn.Conv(**conv)(x)))

  model = M()
  variables = model.init(jax.random.key(1), x)
  q_vars, report = _gpfq(variables, model.apply, x, bits=3, patch_p=1.0, patch_stride="layer")
  assert [(r.path, r.op) for r in report.layers] == [("Conv_0", "conv"),
                                                     ("Dense_0", "dot_general")]
  X = _np_patches(x, k, stride, pads)
  _check(_conv_matrix(q_vars["params"]["Conv_0"]["kernel"]),
         _conv_matrix(variables["params"]["Conv_0"]["kernel"]), X, X, bits=3, groups=groups)
  f_in, q_in = _inputs(model, variables, x), _inputs(model, q_vars, x)
  _check(q_vars["params"]["Dense_0"]["kernel"], variables["params"]["Dense_0"]["kernel"],
         _rows(f_in["Dense_0"], conv["features"]), _rows(q_in["Dense_0"], conv["features"]),
         bits=3)


def test_conv_transpose():
  model = nn.ConvTranspose(3, (3, 3), strides=(2, 2), padding="VALID", use_bias=False)
  x = jax.random.normal(jax.random.key(0), (2, 4, 4, 2))
  variables = model.init(jax.random.key(1), x)
  # A transposed conv is a conv over the input dilated by the strides, padded by k - 1.
  X = _np_patches(x, (3, 3), (1, 1), ((2, 2), (2, 2)), dilate_input=2)
  W = _conv_matrix(variables["params"]["kernel"])
  y = np.asarray(model.apply(variables, x)).reshape(-1, 3)
  np.testing.assert_allclose(X @ W, y, atol=1e-5)  # the hand-written patches are the layer's
  q_vars, report = _gpfq(variables, model.apply, x, bits=2, patch_p=1.0, patch_stride="layer")
  assert report.layers[0].rows == X.shape[0]
  _check(_conv_matrix(q_vars["params"]["kernel"]), W, X, X, bits=2)


# --------------------------------------------------------------------------------------------
# Other frameworks: NNX, plain functions, jitted functions, pytree modules.


class _NnxCnn(nnx.Module):
  def __init__(self, rngs):
    self.conv = nnx.Conv(2, 4, (3, 3), padding="VALID", rngs=rngs)
    self.bn = nnx.BatchNorm(4, use_running_average=True, rngs=rngs)
    self.head = nnx.Linear(4, 3, rngs=rngs)

  def __call__(self, x):
    h = nnx.relu(self.bn(self.conv(x)))
    return self.head(h.mean(axis=(1, 2)))


def test_nnx_cnn_through_split_and_merge():
  model = _NnxCnn(nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  apply_fn = lambda s, x: nnx.merge(graphdef, s)(x)  # noqa: E731
  x = jax.random.normal(jax.random.key(0), (3, 6, 6, 2))
  q_state, report = _gpfq(state, apply_fn, x, bits=3, patch_p=1.0, patch_stride="layer")
  assert [r.path for r in report.layers] == ["conv", "head"]
  assert type(q_state) is type(state)
  W = _conv_matrix(state["conv"]["kernel"].value)
  X = _np_patches(x, (3, 3), (1, 1), ((0, 0), (0, 0)))
  _check(_conv_matrix(q_state["conv"]["kernel"].value), W, X, X, bits=3)

  def head_input(s):
    m = nnx.merge(graphdef, s)
    return nnx.relu(m.bn(m.conv(x))).mean(axis=(1, 2))

  _check(q_state["head"]["kernel"].value, state["head"]["kernel"].value, head_input(state),
         head_input(q_state), bits=3)
  out = nnx.merge(graphdef, q_state)(x)  # the quantized state runs as an NNX module
  chex.assert_shape(out, (3, 3))


def _mlp(p, x):
  return jax.nn.relu(x @ p["w1"] + p["b1"][None, :]) @ p["w2"] + p["b2"][None, :]


@pytest.fixture(scope="module")
def plain():
  k = jax.random.split(jax.random.key(0), 3)
  params = {"w1": jax.random.normal(k[0], (5, 8)) / 2, "b1": jnp.zeros(8),
            "w2": jax.random.normal(k[1], (8, 3)) / 3, "b2": jnp.ones(3)}
  return params, jax.random.normal(k[2], (16, 5))


@pytest.mark.parametrize("jit", [False, True])
def test_plain_jax_mlp_function_and_jitted(plain, jit):
  params, x = plain
  q, report = _gpfq(params, jax.jit(_mlp) if jit else _mlp, x, bits=3)
  assert [r.path for r in report.layers] == ["w1", "w2"]
  assert set(q) == set(params) and report.other_params == ()
  _check(q["w1"], params["w1"], x, x, bits=3)
  h = lambda p: jax.nn.relu(x @ p["w1"] + p["b1"][None, :])  # noqa: E731
  _check(q["w2"], params["w2"], h(params), h(q), bits=3)


def test_pytree_module_with_transposed_weights():
  @jax.tree_util.register_dataclass
  @dataclasses.dataclass
  class Linear:  # equinox-style: weight (out, in), y = x @ W.T
    weight: jax.Array
    bias: jax.Array

    def __call__(self, x):
      return x @ self.weight.T + self.bias[None, :]

  k = jax.random.split(jax.random.key(1), 3)
  layers = [Linear(jax.random.normal(k[0], (6, 4)), jnp.zeros(6)),
            Linear(jax.random.normal(k[1], (2, 6)), jnp.zeros(2))]
  x = jax.random.normal(k[2], (10, 4))
  apply_fn = lambda ls, x: ls[1](jnp.tanh(ls[0](x)))  # noqa: E731
  q, report = _gpfq(layers, apply_fn, x, bits=3)
  assert [r.path for r in report.layers] == ["0/weight", "1/weight"]
  assert isinstance(q, list) and isinstance(q[0], Linear)
  _check(q[0].weight.T, layers[0].weight.T, x, x, bits=3)
  _check(q[1].weight.T, layers[1].weight.T, jnp.tanh(layers[0](x)), jnp.tanh(q[0](x)), bits=3)


# --------------------------------------------------------------------------------------------
# Calibration as several batches; the generic quantizer hook.


def test_iterable_of_batches_sums_grams(plain):
  params, x = plain
  batches = [x[:8], x[8:]]
  q, report = _gpfq(params, _mlp, iter(batches), bits=3)
  assert report.forward_passes == 4 and report.layers[0].rows == 16
  levels = network.pad_levels(alphabets.levels_for(params["w1"], 3, 1.0))
  chex.assert_trees_all_equal(q["w1"], gpfq_layer(params["w1"], [(b, b) for b in batches],
                                                  None, levels))
  h = lambda p, b: jax.nn.relu(b @ p["w1"] + p["b1"][None, :])  # noqa: E731
  levels = network.pad_levels(alphabets.levels_for(params["w2"], 3, 1.0))
  chunks = [(h(params, b), h(q, b)) for b in batches]
  chex.assert_trees_all_close(q["w2"], gpfq_layer(params["w2"], chunks, None, levels),
                              atol=1e-6)


def test_quantize_layer_hook_sees_matrices_and_writes_back_layouts():
  class M(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.DenseGeneral((2, 3))(x)                       # kernel (4, 2, 3) -> W (4, 6)
      return nn.DenseGeneral(5, axis=(-2, -1))(h)          # kernel (2, 3, 5) -> W (6, 5)

  model = M()
  x = jax.random.normal(jax.random.key(0), (3, 7, 4))
  variables = model.init(jax.random.key(1), x)
  seen = []

  def round_to_tenths(name, W, chunks, info):
    (X, X_tilde), = list(chunks)
    seen.append((name, W.shape, X.shape, info.groups, info.bits, X_tilde is X, info.index))
    return jnp.round(W * 10) / 10, {"delta": 0.1}

  q_vars, report = driver.run(variables, model.apply, x, round_to_tenths, bits={"_0": 8,
                                                                               "default": 2})
  assert seen == [("DenseGeneral_0", (4, 6), (21, 4), 1, 8, True, 0),
                  ("DenseGeneral_1", (6, 5), (21, 6), 1, 2, False, 1)]
  for name in ("DenseGeneral_0", "DenseGeneral_1"):
    k = variables["params"][name]["kernel"]
    chex.assert_trees_all_equal(q_vars["params"][name]["kernel"], jnp.round(k * 10) / 10)
  assert [r.delta for r in report.layers] == [0.1, 0.1]
  # error = ||X W - X~ Q|| / ||X W|| on the driver's matrices; layer 1's X~ follows Q of layer 0.
  f64 = lambda t: np.asarray(t, np.float64)  # noqa: E731
  p, q = variables["params"], q_vars["params"]
  X = f64(x).reshape(21, 4)
  W0, Q0 = (f64(t["DenseGeneral_0"]["kernel"]).reshape(4, 6) for t in (p, q))
  W1, Q1 = (f64(t["DenseGeneral_1"]["kernel"]).reshape(6, 5) for t in (p, q))
  b0 = f64(p["DenseGeneral_0"]["bias"]).reshape(6)
  H, H_tilde = X @ W0 + b0, X @ Q0 + b0
  rel = lambda a, b: np.linalg.norm(a - b) / np.linalg.norm(a)  # noqa: E731
  np.testing.assert_allclose([r.error for r in report.layers],
                             [rel(X @ W0, X @ Q0), rel(H @ W1, H_tilde @ Q1)], rtol=1e-5)


def test_report_error_is_the_relative_output_error_over_all_batches(plain):
  params, x = plain
  batches = [x[:8], x[8:]]
  q, report = _gpfq(params, _mlp, batches, bits=3)
  h = lambda p, b: jax.nn.relu(b @ p["w1"] + p["b1"][None, :])  # noqa: E731
  data = {"w1": [(b, b) for b in batches],
          "w2": [(h(params, b), h(q, b)) for b in batches]}
  for rec in report.layers:
    W, Q = (np.asarray(t[rec.path], np.float64) for t in (params, q))
    err = sum(np.sum((np.asarray(a, np.float64) @ W - np.asarray(b, np.float64) @ Q) ** 2)
              for a, b in data[rec.path])
    ref = sum(np.sum((np.asarray(a, np.float64) @ W) ** 2) for a, _ in data[rec.path])
    np.testing.assert_allclose(rec.error, np.sqrt(err / ref), rtol=1e-5)
  # The quantizers' and the error diagnostics' wall times are disjoint parts of the total.
  assert report.quantizer_seconds > 0
  assert report.quantizer_seconds + report.error_seconds <= report.seconds


def test_identical_blocks_share_one_compiled_segment_each():
  class Stack(nn.Module):
    @nn.compact
    def __call__(self, x):
      for i in range(4):
        x = jnp.tanh(nn.Dense(6, name=f"d{i}")(x))
      return x

  model = Stack()
  x = jax.random.normal(jax.random.key(0), (5, 6))
  variables = model.init(jax.random.key(1), x)
  prep = driver.prepare(variables, model.apply, x)
  q, report = driver.execute(prep, lambda name, W, chunks, info: jnp.round(W * 4) / 4)
  fns = [v[2] for k, v in prep.program.segments.items()
         if isinstance(k, tuple) and len(k) == 4]
  # Per block one segment: the Dense dot (its error fused in), bias, tanh; all four share it.
  assert len(fns) == 4 and len({id(f) for f in fns}) == 1
  ref = x
  for i in range(4):  # the quantized stream is still the model's own forward with Q
    ref = jnp.tanh(ref @ q["params"][f"d{i}"]["kernel"] + q["params"][f"d{i}"]["bias"][None, :])
  chex.assert_trees_all_close(model.apply(q, x), ref, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Bad input (issue 14): each is a clear error naming the cause.


def test_empty_batch(plain):
  params, x = plain
  with pytest.raises(ValueError, match=r"calibration batch is empty \(0 examples\)"):
    _gpfq(params, _mlp, x[:0])
  with pytest.raises(ValueError, match="empty iterable"):
    _gpfq(params, _mlp, [])


def test_inputs_labels_pair_as_batch():
  from qjax import models
  model = models.MLP(features=(8,), num_classes=3)
  x = jax.random.normal(jax.random.key(0), (6, 4, 4, 1))
  variables = model.init(jax.random.key(1), x)
  y = jnp.zeros((6,), jnp.int32)
  with pytest.raises(ValueError, match=re.escape("if it is (inputs, labels), pass the inputs "
                                                 "only")):
    _gpfq(variables, model.apply, (x, y))


def test_nan_params_in_any_pytree(plain):
  params, x = plain
  bad = {**params, "w2": params["w2"].at[1, 1].set(jnp.nan)}
  with pytest.raises(ValueError, match="'w2'.*1 NaN"):
    _gpfq(bad, _mlp, x)


def test_batches_of_different_shapes(plain):
  params, x = plain
  with pytest.raises(ValueError, match="share one shape"):
    _gpfq(params, _mlp, [x[:8], x[8:12]])


def test_numpy_params_are_accepted():
  """NumPy leaves (e.g. a checkpoint read with safetensors' numpy API) quantize like jax arrays;
  a transposed (out, in) weight exercises the write-back through layout ops."""
  rng = np.random.default_rng(3)
  params = {"w1": rng.normal(size=(16, 8)).astype(np.float32),
            "w2": rng.normal(size=(4, 16)).astype(np.float32)}
  x = rng.normal(size=(32, 8)).astype(np.float32)
  f = lambda p, b: jnp.tanh(b @ p["w1"].T) @ p["w2"].T  # noqa: E731
  q_np, _ = qjax.gpfq(params, f, x, bits=3, progress=False)
  q_jax, _ = qjax.gpfq(jax.tree.map(jnp.asarray, params), f, x, bits=3, progress=False)
  for name in params:
    np.testing.assert_array_equal(np.asarray(q_np[name]), np.asarray(q_jax[name]))
