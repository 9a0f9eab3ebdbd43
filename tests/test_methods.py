"""The one experiment method registry (qjax.experiments.methods): every task's names resolve in
it, and each entry is the qjax call it stands for (same params out, bit for bit)."""
import jax
import numpy as np
import pytest

import qjax
from qjax.experiments import act, causal_lm, imagenet, methods, ptq


def _mlp():
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  params = {"l1": {"kernel": jax.random.normal(k1, (8, 16))},
            "l2": {"kernel": jax.random.normal(k2, (16, 4)), "bias": jax.numpy.zeros((1, 4))}}
  apply_fn = lambda p, x: (jax.nn.relu(x @ p["l1"]["kernel"]) @ p["l2"]["kernel"]  # noqa: E731
                           + p["l2"]["bias"])
  return params, apply_fn, jax.random.normal(k3, (64, 8))


def _equal(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_every_task_names_registry_methods():
  for supported in (ptq.SUPPORTED, imagenet.SUPPORTED):
    assert set(supported) <= set(methods.METHODS)
  for supported in (causal_lm.SUPPORTED, act.SUPPORTED):  # grid-only tasks: the grid forms
    assert all(methods.METHODS[methods.on_grid(n)].levels == "grid" for n in supported)
  assert methods.on_grid("rtn") == "rtn-grid" and methods.on_grid("gpfq") == "gpfq-grid"
  assert methods.on_grid("qronos") == "qronos"
  # Row labels the tables keep: one method on other levels shares the label.
  assert [causal_lm.label(n) for n in ("rtn", "gpfq", "gptq-act", "qronos")] == [
      "rtn", "gpfq", "gptq act-order", "qronos"]
  assert methods.METHODS["gpfq-grid"].label == methods.METHODS["gpfq"].label == "gpfq"
  with pytest.raises(ValueError, match=r"config.methods: unknown method 'msq'; choose from"):
    causal_lm.label("msq")
  with pytest.raises(ValueError, match="unknown method 'nope'"):
    methods.get("nope")


def test_run_rejects_unknown_options():
  params, apply_fn, x = _mlp()
  with pytest.raises(TypeError, match=r"unknown method options \['damp'\]"):
    methods.run("qronos", params, apply_fn, x, qjax.grids.GridSpec(4), damp=0.1)


def test_entries_are_the_qjax_calls():
  params, apply_fn, x = _mlp()
  spec = qjax.grids.GridSpec(3, "group", 4, symmetric=True)
  driver = dict(progress=False)
  res = methods.run("rtn", params, None, None, 3)
  assert res.report is None
  _equal(res.params, qjax.quantize_uniform(params, 3))
  _equal(methods.run("rtn-grid", params, apply_fn, x, spec).params,
         qjax.quantize_rtn(params, spec)[0])
  # GPTQ with static groups (the levels RTN uses); options it does not read are ignored.
  res = methods.run("gptq-act", params, apply_fn, x, spec, driver=driver, C=2.0,
                    return_grids=True)
  q, _, grids = qjax.gptq(params, apply_fn, x, bits=3, granularity="group", group_size=4,
                          symmetric=True, act_order=True, static_groups=True, progress=False,
                          return_grids=True)
  _equal(res.params, q)
  assert set(res.targets) == set(grids) and res.columns == {}
  res = methods.run("gpfq", params, apply_fn, x, 3, driver=driver, C=1.5)
  _equal(res.params, qjax.gpfq(params, apply_fn, x, bits=3, C=1.5, progress=False)[0])
  assert res.columns == {"C": 1.5}
  res = methods.run("msq", params, apply_fn, x, 3, driver=driver, C=1.5)
  _equal(res.params, qjax.quantize_msq(params, apply_fn, x, bits=3, C=1.5, progress=False)[0])
  _equal(methods.run("gpfq-act", params, apply_fn, x, spec, driver=driver).params,
         qjax.gpfq(params, apply_fn, x, grid=spec, act_order=True, progress=False)[0])
  # Qronos: one damp is used as given; a grid is searched on the held-out tail.
  res = methods.run("qronos", params, apply_fn, x, spec, driver=driver, damp_grid=(0.1,))
  kw = dict(bits=3, granularity="group", group_size=4, symmetric=True, act_order=True,
            progress=False)
  _equal(res.params, qjax.qronos(params, apply_fn, x, damp=0.1, **kw)[0])
  assert res.columns == {"damp": 0.1}
  res = methods.run("qronos", params, apply_fn, x, spec, driver=driver, damp_grid=(0.01, 1.0))
  search = qjax.qronos(params, apply_fn, x, damp_grid=(0.01, 1.0), **kw)[1]
  assert res.columns == {"damp": search.damp}


def test_dagger_variant_keeps_the_last_layer_float():
  params, apply_fn, x = _mlp()
  q = methods.run("gpfq_lastfloat_bc", params, apply_fn, x, 3, driver=dict(progress=False)).params
  np.testing.assert_array_equal(q["l2"]["kernel"], params["l2"]["kernel"])  # float
  assert not np.array_equal(q["l2"]["bias"], params["l2"]["bias"])  # bias-corrected
  assert not np.array_equal(q["l1"]["kernel"], params["l1"]["kernel"])
