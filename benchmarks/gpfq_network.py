"""Benchmark of the network driver: the one-pass lockstep driver against the old per-layer one.

Two models: a 12-block pre-LN transformer encoder (attention and MLP projections all nn.Dense,
so the old driver, which saw only nn.Dense / nn.Conv, quantizes the same 72 layers), on 4 x 32
and on 16 x 128 tokens, and ResNet-18 at 224x224 on 4 images, all seeded. For each driver: wall time of a
first (cold: compiles included) and a second (warm) quantization, the forward passes it ran, the
seconds inside the per-layer quantizer (the alphabet + `qjax.gpfq_layer`, compiles included; the
new driver's `Report.quantizer_seconds`) and the rest, the rest in
units of one jitted forward pass of the model on the same batch (the whole `apply_fn` jitted,
warm, median of 5), and (new driver) the part of the rest spent on the per-layer error
diagnostics ||XW - X~Q|| / ||XW|| of the report. Warm figures are the median of `--repeats`
warm runs (the rest column: the median of the rests). The drivers
run new first, then old: the old cold run finds the GPFQ kernels compiled (its kernel column is
small for that reason; the rest columns compare fairly).

The old driver is commit edb48e8's `qjax/_gpfq/network.py` + `qjax/capture.py`, loaded from git
into a temporary module (its column is skipped with a note when git or the commit is missing).
The new one is `qjax.driver` with a GPFQ `quantize_layer` built from public names
(`qjax.alphabets.levels_for`, `qjax.gpfq_layer`); its warm run reuses the traced program, so its
segments are compiled once. Prints a table and writes JSON.

  python benchmarks/gpfq_network.py [--quick] [--large] [--models A,B] [--out FILE] [--no-old]
                                    [--repeats N]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import qjax
from qjax import alphabets, driver, models

ROOT = pathlib.Path(__file__).resolve().parents[1]
OLD_COMMIT = "edb48e8"
BITS = 4


# ---------------------------------------------------------------------------------------------
# Models.


class _Block(nn.Module):
  """Pre-LN encoder block with Dense-only multi-head self-attention and a GELU MLP."""
  dim: int
  heads: int

  @nn.compact
  def __call__(self, x):
    b, t, d = x.shape
    h = nn.LayerNorm()(x)
    q, k, v = (nn.Dense(d, name=n)(h).reshape(b, t, self.heads, d // self.heads)
               for n in ("query", "key", "value"))
    att = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d // self.heads), -1)
    o = jnp.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, t, d)
    x = x + nn.Dense(d, name="out")(o)
    h = nn.Dense(4 * d, name="mlp_in")(nn.LayerNorm()(x))
    return x + nn.Dense(d, name="mlp_out")(nn.gelu(h))


class Transformer(nn.Module):
  blocks: int = 12
  dim: int = 192
  heads: int = 4

  @nn.compact
  def __call__(self, x):
    for i in range(self.blocks):
      x = _Block(self.dim, self.heads, name=f"block{i}")(x)
    return nn.LayerNorm()(x)


def workloads(quick: bool, large: bool = False) -> dict[str, tuple[Any, Any, np.ndarray, dict]]:
  """name -> (apply_fn, variables, calibration batch, apply kwargs); `large` adds a d=384,
  64-token transformer (the d=192 one's forward is ~20 ms, so fixed per-layer costs weigh more
  there than in a real model)."""
  rng = np.random.default_rng(0)
  dim, seq, n_seq = (64, 16, 2) if quick else (192, 32, 4)
  tf = Transformer(12, dim, 4)
  x_tf = rng.normal(size=(n_seq, seq, dim)).astype(np.float32)
  rn = models.get_model("resnet18", num_classes=1000)
  x_rn = rng.normal(size=(1 if quick else 4, 224, 224, 3)).astype(np.float32)
  out = {"transformer-12": (tf.apply, tf.init(jax.random.key(0), x_tf[:1]), x_tf, {})}
  if not quick:  # a calibration set of 2,048 tokens (GPTQ's is 128 x 2,048)
    x_2k = rng.normal(size=(16, 128, dim)).astype(np.float32)
    out["transformer-12-2k"] = (tf.apply, out["transformer-12"][1], x_2k, {})
  if large:
    big = Transformer(12, 384, 6)
    x_big = rng.normal(size=(4, 64, 384)).astype(np.float32)
    out["transformer-12-d384"] = (big.apply, big.init(jax.random.key(0), x_big[:1]), x_big, {})
  out["resnet18-224"] = (rn.apply, rn.init(jax.random.key(0), x_rn[:1], train=False), x_rn,
                         {"train": False})
  return out


# ---------------------------------------------------------------------------------------------
# The two drivers.


def load_old_driver():
  """edb48e8's network.py + capture.py as temporary modules (None if git cannot give them)."""
  tmp = pathlib.Path(tempfile.mkdtemp(prefix="qjax_old_driver_"))
  try:
    for path, name in (("qjax/capture.py", "capture"), ("qjax/_gpfq/network.py", "network")):
      src = subprocess.run(["git", "show", f"{OLD_COMMIT}:{path}"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout
      src = src.replace("from qjax import capture as capture_lib",
                        "import qjax_old_capture as capture_lib")
      (tmp / f"qjax_old_{name}.py").write_text(src)
  except (OSError, subprocess.CalledProcessError) as e:
    print(f"note: old driver not available ({e}); its column is skipped")
    return None
  sys.path.insert(0, str(tmp))
  mods = {}
  for name in ("capture", "network"):
    spec = importlib.util.spec_from_file_location(f"qjax_old_{name}", tmp / f"qjax_old_{name}.py")
    mods[name] = importlib.util.module_from_spec(spec)
    sys.modules[f"qjax_old_{name}"] = mods[name]
    spec.loader.exec_module(mods[name])
  return mods["network"]


class KernelTimer:
  """Wraps a gpfq_layer-like function and sums the seconds spent in it (results awaited)."""

  def __init__(self, fn):
    self.fn, self.seconds, self.calls = fn, 0.0, 0

  def __call__(self, *args, **kwargs):
    start = time.perf_counter()
    out = jax.block_until_ready(self.fn(*args, **kwargs))
    self.seconds += time.perf_counter() - start
    self.calls += 1
    return out


def new_quantizer():
  """GPFQ per layer from public names: the paper's alphabet (Eq. 17-19), `qjax.gpfq_layer`."""
  def quantize_layer(name, W, chunks, info):
    del name
    (X, X_tilde), = list(chunks)
    levels = alphabets.levels_for(W, info.bits, 1.0)
    blocks = [qjax.gpfq_layer(W[:, c], X[:, r], None if info.same else X_tilde[:, r], levels)
              for r, c in info.group_slices()]
    return jnp.concatenate(blocks, axis=1) if len(blocks) > 1 else blocks[0]
  return quantize_layer


def forward_seconds(apply_fn, variables, x, kwargs, repeats: int = 5) -> float:
  fwd = jax.jit(lambda v, b: apply_fn(v, b, **kwargs))
  jax.block_until_ready(fwd(variables, x))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fwd(variables, x))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _median_run(runs: list[dict]) -> dict:
  """The run whose rest (seconds - kernel seconds) is the median one."""
  runs = sorted(runs, key=lambda e: e["seconds"] - e["kernel_seconds"])
  return dict(runs[len(runs) // 2], runs=len(runs))


def run_new(apply_fn, variables, x, kwargs, repeats: int = 3) -> dict:
  out = {}
  start = time.perf_counter()
  prep = driver.prepare(variables, apply_fn, x, kwargs)
  out["trace_seconds"] = time.perf_counter() - start
  warm = []
  for phase in ["cold"] + ["warm"] * repeats:
    start = time.perf_counter()
    q, report = driver.execute(prep, new_quantizer(), bits=BITS, patch_p=0.25,
                               key=jax.random.key(1), method="gpfq")
    jax.block_until_ready(q)
    total = time.perf_counter() - start + (out["trace_seconds"] if phase == "cold" else 0.0)
    e = dict(seconds=total, kernel_seconds=report.quantizer_seconds,
             error_seconds=report.error_seconds, forward_passes=report.forward_passes,
             layers=sum(r.status == "quantized" for r in report.layers))
    if phase == "cold":
      out["cold"] = e
    else:
      warm.append(e)
  out["warm"] = _median_run(warm)
  return out


def run_old(old, apply_fn, variables, x, kwargs) -> dict:
  timers = {name: KernelTimer(getattr(old, name)) for name in ("gpfq_layer", "alphabet")}
  for name, timer in timers.items():
    setattr(old, name, timer)
  out = {}
  for phase in ("cold", "warm"):
    for timer in timers.values():
      timer.seconds = 0.0
    start = time.perf_counter()
    q, report = old.gpfq(variables, apply_fn, x, bits=BITS, patch_p=0.25,
                         key=jax.random.key(1), apply_kwargs=kwargs, progress=False)
    jax.block_until_ready(q)
    n = sum(r.status == "quantized" for r in report.layers)
    # Every layer re-ran the float and the partly quantized network up to that layer.
    out[phase] = dict(seconds=time.perf_counter() - start,
                      kernel_seconds=sum(t.seconds for t in timers.values()),
                      forward_passes=f"2 x {n} prefixes", layers=n)
  for name, timer in timers.items():
    setattr(old, name, timer.fn)
  return out


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="smaller transformer, 1 image")
  parser.add_argument("--no-old", action="store_true", help="skip the old driver's column")
  parser.add_argument("--large", action="store_true", help="add a d=384, 64-token transformer")
  parser.add_argument("--models", default="", help="comma-separated subset of the model names")
  parser.add_argument("--repeats", type=int, default=3, help="warm runs of the new driver "
                      "(the median is reported)")
  parser.add_argument("--out", default=str(pathlib.Path(__file__).with_suffix(".json")))
  args = parser.parse_args(argv)
  old = None if args.no_old else load_old_driver()
  results = {"quick": args.quick, "device": str(jax.devices()[0]), "models": {}}
  for name, (apply_fn, variables, x, kwargs) in workloads(args.quick, args.large).items():
    if args.models and name not in args.models.split(","):
      continue
    fwd = forward_seconds(apply_fn, variables, x, kwargs)
    entry = {"forward_seconds": fwd, "batch": list(x.shape)}
    entry["new"] = run_new(apply_fn, variables, x, kwargs, max(1, args.repeats))
    if old is not None:
      entry["old"] = run_old(old, apply_fn, variables, x, kwargs)
    for who in ("new", "old"):
      for phase in ("cold", "warm"):
        if who in entry:
          e = entry[who][phase]
          e["rest_seconds"] = e["seconds"] - e["kernel_seconds"]
          e["rest_in_forward_passes"] = e["rest_seconds"] / fwd
    results["models"][name] = entry
    print_table({name: entry})
  pathlib.Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
  return results


def print_table(models_: dict) -> None:
  head = (f"{'model':<16} {'driver':<9} {'layers':>6} {'seconds':>9} {'quantizer':>9} "
          f"{'rest':>9} {'rest/fwd':>9} {'err diag':>9} {'fwd passes':>17}")
  print(head)
  print("-" * len(head))
  for name, entry in models_.items():
    for who in ("old", "new"):
      for phase in ("cold", "warm"):
        if who not in entry:
          continue
        e = entry[who][phase]
        print(f"{name:<16} {who + ' ' + phase:<9} {e['layers']:>6} {e['seconds']:>9.2f} "
              f"{e['kernel_seconds']:>9.2f} {e['rest_seconds']:>9.2f} "
              f"{e['rest_in_forward_passes']:>9.1f} {e.get('error_seconds', 0.0):>9.2f} "
              f"{str(e['forward_passes']):>17}")
    print(f"{name:<16} one jitted forward pass: {entry['forward_seconds']:.3f} s "
          f"(batch {tuple(entry['batch'])})")


if __name__ == "__main__":
  main()
