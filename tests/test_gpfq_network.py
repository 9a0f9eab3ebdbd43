"""qjax.gpfq / quantize_msq on the one-pass driver (Alg. 1): LeNet5 and small inline models."""
import re

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qjax import alphabets
from qjax import data as data_lib
from qjax import models
from qjax import patches as patches_lib
from qjax._gpfq import network

# --------------------------------------------------------------------------------------------
# A tiny numpy reference of the GPFQ recursion (Eq. 7-8), for checking the wiring only.


def _np_msq(z, levels):
  mid = 0.5 * (levels[1:] + levels[:-1])
  return levels[np.searchsorted(mid, z, side="left")]


def _np_gpfq(W, X, Xt, levels):
  W, X, Xt = (np.asarray(a, np.float64) for a in (W, X, Xt))
  levels = np.sort(np.asarray(levels, np.float64))
  Q = np.zeros_like(W)
  U = np.zeros((X.shape[0], W.shape[1]))
  for t in range(W.shape[0]):
    nrm = Xt[:, t] @ Xt[:, t]
    arg = (Xt[:, t] @ (U + np.outer(X[:, t], W[t]))) / nrm if nrm > 0 else np.zeros(W.shape[1])
    Q[t] = _np_msq(arg, levels)
    U += np.outer(X[:, t], W[t]) - np.outer(Xt[:, t], Q[t])
  return Q


def _in_levels(values, levels) -> bool:
  values, levels = np.asarray(values).ravel(), np.asarray(levels)
  return bool(np.all(np.min(np.abs(values[:, None] - levels[None, :]), axis=1)
                     <= 1e-6 * max(1.0, float(np.max(np.abs(levels))))))


def _matrix(kernel):
  """A Flax kernel as the GPFQ matrix: Dense as is, conv HWIO -> (Cin*kh*kw, Cout)."""
  kernel = np.asarray(kernel)
  if kernel.ndim == 2:
    return kernel
  return np.moveaxis(kernel, -2, 0).reshape(-1, kernel.shape[-1])


def _layer_inputs(model, variables, x, **kwargs):
  """{module path: input of its __call__} from the model's own calls (independent of qjax)."""
  seen = {}

  def record(next_fun, args, kw, context):
    if context.method_name == "__call__" and context.module.has_variable("params", "kernel"):
      seen.setdefault("/".join(context.module.path), args[0])
    return next_fun(*args, **kw)

  with nn.intercept_methods(record):
    model.apply(variables, x, **kwargs)
  return seen


def _kernel(tree, path):
  for k in path.split("/"):
    tree = tree[k]
  return tree["kernel"]


# --------------------------------------------------------------------------------------------
# LeNet5 on embedded MNIST (fresh init: the driver's contracts do not need a trained model).


@pytest.fixture(scope="module")
def lenet():
  x, _ = data_lib.load_mnist_embedded()["train"]
  batch = x[np.random.default_rng(0).permutation(x.shape[0])[:48]]
  model = models.LeNet5()
  variables = model.init(jax.random.key(0), jnp.asarray(batch[:1]))
  return model, variables, batch


@pytest.fixture(scope="module")
def lenet_q4(lenet):
  model, variables, batch = lenet
  return network.gpfq(variables, model.apply, batch, bits=4, key=jax.random.key(1),
                      progress=False)


def test_lenet_kernels_in_alphabet_and_structure_kept(lenet, lenet_q4):
  model, variables, batch = lenet
  q_vars, report = lenet_q4
  chex.assert_trees_all_equal_structs(q_vars, variables)
  chex.assert_trees_all_equal_shapes_and_dtypes(q_vars, variables)
  assert [r.path for r in report.layers] == ["Conv_0", "Conv_1", "Dense_0", "Dense_1"]
  for r in report.layers:
    W = _kernel(variables["params"], r.path)
    levels = alphabets.levels_for(_matrix(W), 4, network.DEFAULT_C["paper"])
    assert r.status == "quantized" and r.bits == 4
    assert _in_levels(_kernel(q_vars["params"], r.path), levels), r.path
    assert 0 <= r.error < r.msq_error, r  # greedy path following beats rounding on X~
    chex.assert_trees_all_equal(q_vars["params"][r.path]["bias"],
                                variables["params"][r.path]["bias"])
  out = model.apply(q_vars, batch)  # the unchanged apply_fn runs
  chex.assert_shape(out, (batch.shape[0], 10))
  chex.assert_tree_all_finite(out)
  text = network.format_report(report)
  assert "Conv_1" in text and "C=1" in text and str(report) == text


def test_lenet_deterministic_under_fixed_key(lenet, lenet_q4):
  model, variables, batch = lenet
  again, _ = network.gpfq(variables, model.apply, batch, bits=4, key=jax.random.key(1),
                          progress=False)
  chex.assert_trees_all_equal(again, lenet_q4[0])


def test_lenet_ternary_reference_rule_bits_dict_skip(lenet):
  model, variables, batch = lenet
  bits = {"Conv_.*": 1, "default": 4}
  q_vars, report = network.gpfq(variables["params"], model.apply, batch, bits=bits,
                                rule="reference", C=0.9, skip="^Dense_1$", progress=False)
  assert set(q_vars) == set(variables["params"])  # bare params in, bare params out
  status = {r.path: (r.status, r.bits) for r in report.layers}
  assert status == {"Conv_0": ("quantized", 1), "Conv_1": ("quantized", 1),
                    "Dense_0": ("quantized", 4), "Dense_1": ("float", None)}
  for path in ("Conv_0", "Conv_1", "Dense_0"):
    W = _matrix(_kernel(variables["params"], path))
    levels = alphabets.levels_for(W, status[path][1], 0.9, "reference")
    assert _in_levels(_kernel(q_vars, path), levels), path
  for path in ("Conv_0", "Conv_1"):  # ternary
    assert np.unique(np.asarray(_kernel(q_vars, path))).size <= 3
  chex.assert_trees_all_equal(q_vars["Dense_1"], variables["params"]["Dense_1"])


def test_lenet_msq_baseline_is_rounding(lenet):
  model, variables, batch = lenet
  q_vars, report = network.quantize_msq(variables, model.apply, batch, bits=4, progress=False)
  for r in report.layers:
    W = _kernel(variables["params"], r.path)
    levels = alphabets.levels_for(_matrix(W), 4, network.DEFAULT_C["paper"])
    chex.assert_trees_all_equal(_kernel(q_vars["params"], r.path), alphabets.msq(W, levels))
    assert r.error == pytest.approx(r.msq_error)


# --------------------------------------------------------------------------------------------
# Small inline models: exactness against the numpy reference, options, BatchNorm.


class _ConvNet(nn.Module):
  groups: int = 1

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(4, (3, 3), padding="SAME", feature_group_count=self.groups)(x)
    x = nn.BatchNorm(use_running_average=not train)(x)
    x = nn.relu(x)
    x = x.reshape(x.shape[0], -1, 4)  # Dense over a leading token axis
    x = nn.relu(nn.Dense(6)(x))
    return nn.Dense(3)(x.reshape(x.shape[0], -1))


@pytest.fixture(scope="module")
def convnet():
  model = _ConvNet(groups=2)
  x = jax.random.normal(jax.random.key(0), (12, 6, 6, 2))
  variables = model.init(jax.random.key(1), x)
  # Non-trivial BatchNorm statistics, to see that they are used and kept.
  stats = variables["batch_stats"]["BatchNorm_0"]
  variables = {"params": variables["params"], "batch_stats": {"BatchNorm_0": {
      "mean": stats["mean"] + 0.1, "var": stats["var"] * 2.0}}}
  return model, variables, x


def test_first_layers_match_numpy_reference(convnet):
  model, variables, x = convnet
  key = jax.random.key(3)
  q_vars, report = network.gpfq(variables, model.apply, x, bits=2, key=key,
                                apply_kwargs={"train": False}, progress=False)
  assert report.forward_passes == 2  # one float and one quantized pass, whatever the depth
  # Conv_0 (grouped): X = X~ = disjoint 3x3 patches of x ('SAME': one zero row/column of
  # border), a sampled quarter of the 4 positions per image, one problem per group.
  xp = np.pad(np.asarray(x), ((0, 0), (1, 1), (1, 1), (0, 0)))
  patches = np.stack([xp[:, 3 * i:3 * i + 3, 3 * j:3 * j + 3, :].transpose(0, 3, 1, 2)
                      .reshape(x.shape[0], -1) for i in range(2) for j in range(2)], axis=1)
  idx = np.asarray(patches_lib.sample_patch_indices(jax.random.fold_in(key, 0), x.shape[0], 4,
                                                    0.25))
  X = np.take_along_axis(patches, idx[:, :, None], axis=1).reshape(-1, patches.shape[-1])
  W = _matrix(variables["params"]["Conv_0"]["kernel"])  # (1*3*3, 4): 2 groups of 1 channel
  levels = alphabets.levels_for(W, 2, network.DEFAULT_C["paper"])
  expected = np.concatenate([_np_gpfq(W[:, 2 * g:2 * g + 2], X[:, 9 * g:9 * g + 9],
                                      X[:, 9 * g:9 * g + 9], levels) for g in range(2)], axis=1)
  chex.assert_trees_all_close(_matrix(q_vars["params"]["Conv_0"]["kernel"]),
                              expected.astype(np.float32), atol=1e-6)
  # Dense_0 (leading axes): X from the float net, X~ from the net with Conv_0 quantized.
  Xf = _layer_inputs(model, variables, x, train=False)["Dense_0"].reshape(-1, 4)
  Xq = _layer_inputs(model, q_vars, x, train=False)["Dense_0"].reshape(-1, 4)
  W = variables["params"]["Dense_0"]["kernel"]
  expected = _np_gpfq(W, Xf, Xq, alphabets.levels_for(W, 2, network.DEFAULT_C["paper"]))
  chex.assert_trees_all_close(q_vars["params"]["Dense_0"]["kernel"],
                              expected.astype(np.float32), atol=1e-6)


def test_batchnorm_kept_last_layer_float_and_bias_correction(convnet):
  model, variables, x = convnet
  q_vars, report = network.gpfq(variables, model.apply, x, bits=2, last_layer_float=True,
                                bias_correction=True, apply_kwargs={"train": False},
                                progress=False)
  chex.assert_trees_all_equal(q_vars["batch_stats"], variables["batch_stats"])
  chex.assert_trees_all_equal(q_vars["params"]["Dense_1"]["kernel"],
                              variables["params"]["Dense_1"]["kernel"])
  assert report.layers[-1].status == "float" and report.bias_shift > 0
  # Bias correction (Sec. 3.2.3): on the calibration batch the mean output error vanishes.
  err = model.apply(q_vars, x) - model.apply(variables, x)
  assert float(jnp.max(jnp.abs(jnp.mean(err, axis=0)))) < 1e-4 * float(jnp.max(jnp.abs(err)) + 1)


def test_top_level_conv_with_bias_correction():
  # The module is the model itself (its kernel is named "kernel"), and the last layer is a conv.
  model = nn.Conv(3, (2, 2), strides=2, padding="VALID")
  x = jax.random.normal(jax.random.key(0), (10, 4, 4, 2))
  variables = model.init(jax.random.key(1), x)
  q_vars, report = network.gpfq(variables, model.apply, x, bits=2, bias_correction=True,
                                patch_p=1.0, progress=False)
  assert [(r.path, r.status) for r in report.layers] == [("kernel", "quantized")]  # rules.path_name
  err = model.apply(q_vars, x) - model.apply(variables, x)
  chex.assert_trees_all_close(jnp.mean(err, axis=(0, 1, 2)), jnp.zeros(3), atol=1e-5)


def test_c_grid_search_picks_from_grid(convnet):
  model, variables, x = convnet
  q_vars, report = network.gpfq(variables, model.apply, x, bits=2, C_grid=(0.5, 1.0),
                                holdout_fraction=0.25, apply_kwargs={"train": False},
                                progress=False)
  assert report.C in (0.5, 1.0)
  assert [c for c, _ in report.C_search] == [0.5, 1.0]
  assert report.C_search[[c for c, _ in report.C_search].index(report.C)][1] == min(
      loss for _, loss in report.C_search)
  assert report.layers[0].rows == 9  # 9 calibration images x ceil(4 disjoint patches x 0.25)
  assert "C search" in str(report)


# --------------------------------------------------------------------------------------------
# Eager validation.


@pytest.fixture(scope="module")
def mlp():
  model = models.MLP(features=(8,), num_classes=3)
  x = jax.random.normal(jax.random.key(0), (6, 4, 4, 1))
  return model, model.init(jax.random.key(1), x), x


def test_nan_in_weights_names_the_layer(mlp):
  model, variables, x = mlp
  bad = jax.tree_util.tree_map(lambda a: a, variables)
  bad["params"]["Dense_1"]["kernel"] = bad["params"]["Dense_1"]["kernel"].at[0, 0].set(jnp.nan)
  with pytest.raises(ValueError, match="Dense_1.*NaN"):
    network.gpfq(bad, model.apply, x, progress=False)


def test_nan_in_batch(mlp):
  model, variables, x = mlp
  with pytest.raises(ValueError, match="batch contains 1 NaN"):
    network.gpfq(variables, model.apply, x.at[0, 0, 0, 0].set(jnp.inf), progress=False)


@pytest.mark.parametrize("bits", [0, -2, {"Dense_0": 0, "default": 4}])
def test_bits_below_one(mlp, bits):
  model, variables, x = mlp
  with pytest.raises(ValueError, match="bits"):
    network.gpfq(variables, model.apply, x, bits=bits, progress=False)


def test_batch_shape_mismatch_explained(mlp):
  model, variables, x = mlp
  with pytest.raises(ValueError, match=re.escape("batch (shape (6, 5, 5, 1)) does not fit")):
    network.gpfq(variables, model.apply, jnp.ones((6, 5, 5, 1)), progress=False)


def test_jitted_apply_fn_gives_the_same_q(mlp):
  model, variables, x = mlp
  ref, ref_report = network.gpfq(variables, model.apply, x, bits=3, progress=False)
  got, report = network.gpfq(variables, jax.jit(model.apply), x, bits=3, progress=False)
  chex.assert_trees_all_equal(got, ref)
  assert [r.path for r in report.layers] == [r.path for r in ref_report.layers]


def test_no_parameter_used_or_no_weight_op():
  x = jnp.ones((5, 4))
  with pytest.raises(ValueError, match="does not depend on any parameter"):
    network.gpfq({"params": {"w": jnp.ones((4, 3))}}, lambda v, b: jnp.tanh(b), x,
                 progress=False)
  with pytest.raises(ValueError, match=r"no weight op.*scale \(mul\)"):
    network.gpfq({"scale": jnp.ones((4,))}, lambda p, b: b * p["scale"][None, :], x, progress=False)


def test_einsum_only_model_is_quantized():
  class OnlyEinsum(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Einsum((4, 3), "bi,ij->bj")(x)

  model = OnlyEinsum()
  x = jax.random.normal(jax.random.key(0), (5, 4))
  variables = model.init(jax.random.key(0), x)
  q_vars, report = network.gpfq(variables, model.apply, x, bits=2, progress=False)
  assert [(r.path, r.status) for r in report.layers] == [("Einsum_0", "quantized")]
  W = variables["params"]["Einsum_0"]["kernel"]
  expected = _np_gpfq(W, x, x, alphabets.levels_for(W, 2, network.DEFAULT_C["paper"]))
  chex.assert_trees_all_close(q_vars["params"]["Einsum_0"]["kernel"],
                              expected.astype(np.float32), atol=1e-6)


class _WithLoop(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(5)(x))
    w = self.param("loop_w", nn.initializers.normal(0.3), (5, 5))
    _, h = jax.lax.while_loop(lambda c: c[0] < 2, lambda c: (c[0] + 1, jnp.tanh(c[1] @ w)),
                              (0, x))
    return h


def test_unsupported_layer_warns_and_stays_float():
  model = _WithLoop()
  x = jax.random.normal(jax.random.key(0), (8, 5))
  variables = model.init(jax.random.key(1), x)
  with pytest.warns(network.UnsupportedLayerWarning, match="loop_w.*while"):
    q_vars, report = network.gpfq(variables, model.apply, x, bits=3, progress=False)
  assert [(r.path, r.status) for r in report.layers] == [("Dense_0", "quantized"),
                                                         ("loop_w", "unsupported")]
  assert "while" in report.layers[1].reason and "while" in str(report)
  chex.assert_trees_all_equal(q_vars["params"]["loop_w"], variables["params"]["loop_w"])
  # Skipping it explicitly silences the warning (warnings are errors in this test suite).
  network.gpfq(variables, model.apply, x, bits=3, skip="loop_w", progress=False)
