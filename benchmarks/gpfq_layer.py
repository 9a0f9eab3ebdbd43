"""Benchmark of the GPFQ layer kernels (`qjax.gpfq_layer`): speed against a GEMM floor, and memory.

For each (m, N0, N1): seconds per layer for method="scan", "gram" and "auto" (median of 5 after a
compile call, block_until_ready), this machine's float32 GEMM rate measured in the same rounds
(the four calls interleaved), and the median over rounds of auto's time over the floor
min(6 m N0 N1, 4 m N0^2 + 2 N0^2 N1) / (GEMM flop rate), split into two factors: the flops auto's
method runs over the floor's ("flop x") and the rate it reaches over the GEMM rate ("eff"), so
auto/floor = flop x / eff. Then the peak resident memory of a fresh process quantizing an
N0 = N1 = 1024 layer from m = 262,144 rows streamed in chunks generated on the fly. Prints a
table, writes benchmarks/gpfq_layer.json.

  python benchmarks/gpfq_layer.py [--quick]
"""
from __future__ import annotations

import argparse
import functools
import json
import pathlib
import resource
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp

from qjax import alphabets, gpfq_flops, gpfq_layer

SHAPES = ((2048, 784, 500), (8192, 800, 500), (2048, 4608, 512), (32768, 1152, 128))
QUICK_SHAPES = ((512, 784, 500), (2048, 800, 500), (512, 1152, 512), (8192, 576, 128))
STREAM = dict(rows=262_144, chunk=8192, N0=1024, N1=1024)
QUICK_STREAM = dict(rows=32_768, chunk=8192, N0=1024, N1=1024)
REPEATS = 5


def layer(m: int, N0: int, N1: int, seed: int = 0):
  """A kernel, float inputs X and perturbed quantized-network inputs X_tilde, 4-bit levels."""
  kw, kx, kn = jax.random.split(jax.random.key(seed), 3)
  W = jax.random.normal(kw, (N0, N1), jnp.float32) / N0**0.5
  X = jax.nn.relu(jax.random.normal(kx, (m, N0), jnp.float32))
  Xt = X + 0.05 * jax.random.normal(kn, (m, N0), jnp.float32)
  return W, X, Xt, alphabets.levels_for(W, 4, 1.0)


def round_robin(fns: dict[str, Callable[[], Any]],
                repeats: int = REPEATS) -> tuple[dict[str, list[float]], dict[str, Any]]:
  """Seconds of `repeats` rounds that call every fn once, after a compile call each, and the
  compile calls' outputs.

  Interleaving puts each round's calls under the same machine load, so ratios between them (auto
  over the GEMM floor) are taken round by round instead of across minutes of drifting load.
  """
  outs = {name: jax.block_until_ready(fn()) for name, fn in fns.items()}
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn())
      times[name].append(time.perf_counter() - start)
  return times, outs


def median_seconds(fn: Callable[[], Any], repeats: int = REPEATS) -> tuple[float, Any]:
  """Median seconds of `repeats` calls after a compile call, and the compile call's output."""
  times, outs = round_robin({"fn": fn}, repeats)
  return statistics.median(times["fn"]), outs["fn"]


def speed(shapes) -> list[dict]:
  rows = []
  # The GEMM rate is measured on an (N0 x m) @ (m x N0) product, the Gram form's GEMM.
  gemm = jax.jit(lambda a, b: jnp.matmul(a.T, b, precision=jax.lax.Precision.HIGHEST))
  for m, N0, N1 in shapes:
    W, X, Xt, levels = layer(m, N0, N1)
    fns = {method: functools.partial(gpfq_layer, W, X, Xt, levels, method=method)
           for method in ("scan", "gram", "auto")}
    times, _ = round_robin(dict(fns, gemm=functools.partial(gemm, Xt, X)))
    seconds = {name: statistics.median(t) for name, t in times.items()}
    gflops = 2.0 * m * N0 * N0 / seconds["gemm"] / 1e9
    floor_flops = min(6.0 * m * N0 * N1, 4.0 * m * N0 * N0 + 2.0 * N0 * N0 * N1)
    floor_seconds = floor_flops / (gflops * 1e9)
    # Round by round, auto/floor = auto seconds x GEMM rate / floor flops.
    ratio = statistics.median(a * 2.0 * m * N0 * N0 / g / floor_flops
                              for a, g in zip(times["auto"], times["gemm"]))
    # auto/floor = (flops auto runs / floor flops) / (rate auto reaches / GEMM rate), with the
    # block size and method gpfq_layer itself picks (X_tilde is not X here).
    cost = gpfq_flops(m, N0, N1)
    auto_flops = cost.gram if cost.method == "gram" else cost.scan
    rows.append(dict(m=m, N0=N0, N1=N1, scan_s=seconds["scan"], gram_s=seconds["gram"],
                     auto_s=seconds["auto"], gemm_gflops=gflops, floor_s=floor_seconds,
                     auto_over_floor=ratio, auto_flops_over_floor=auto_flops / floor_flops,
                     auto_gemm_efficiency=auto_flops / floor_flops / ratio))
    r = rows[-1]
    print(f"{m:>7} {N0:>5} {N1:>5} {seconds['scan']:>8.3f} {seconds['gram']:>8.3f} "
          f"{seconds['auto']:>8.3f} {gflops:>8.1f} {floor_seconds:>8.3f} "
          f"{r['auto_over_floor']:>7.2f} {r['auto_flops_over_floor']:>7.2f} "
          f"{r['auto_gemm_efficiency']:>7.2f}", flush=True)
  return rows


def stream_child(rows: int, chunk: int, N0: int, N1: int) -> None:
  """Run in a fresh process: quantize from streamed chunks, print seconds and peak RSS as JSON."""
  key = jax.random.key(1)
  W = jax.random.normal(key, (N0, N1), jnp.float32) / N0**0.5
  levels = alphabets.levels_for(W, 4, 1.0)
  draw = jax.jit(lambda k: jax.nn.relu(jax.random.normal(k, (chunk, N0), jnp.float32)))

  def chunks():  # each chunk is generated when consumed, never all at once
    for i in range(rows // chunk):
      x = draw(jax.random.fold_in(key, i))
      yield x, x + 0.05

  start = time.perf_counter()
  Q = jax.block_until_ready(gpfq_layer(W, chunks(), None, levels))
  seconds = time.perf_counter() - start
  print(json.dumps(dict(rows=rows, chunk=chunk, N0=N0, N1=N1, seconds=seconds,
                        peak_rss_bytes=peak_rss_bytes(), q_shape=list(Q.shape))))


def peak_rss_bytes() -> int:
  """Peak resident memory of this process.

  Linux keeps ru_maxrss across execve, so a child forked from a big parent would report the
  parent's size; VmHWM in /proc/self/status is the peak of this process's own address space.
  """
  status = pathlib.Path("/proc/self/status")
  if status.exists():
    for line in status.read_text().splitlines():
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) * 1024  # kB
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux units: KiB


def memory(config: dict) -> dict:
  out = subprocess.run([sys.executable, __file__, "--stream-child", json.dumps(config)],
                       check=True, capture_output=True, text=True)
  result = json.loads(out.stdout.strip().splitlines()[-1])
  print(f"streamed m={result['rows']} ({result['rows'] // result['chunk']} chunks), "
        f"N0=N1={result['N0']}: {result['seconds']:.1f} s, peak RSS "
        f"{result['peak_rss_bytes'] / 2**30:.3f} GiB (goal < 1 GiB)", flush=True)
  return result


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="smaller shapes and stream")
  parser.add_argument("--stream-child", help=argparse.SUPPRESS)
  parser.add_argument("--out", default=str(pathlib.Path(__file__).with_suffix(".json")))
  args = parser.parse_args()
  if args.stream_child:
    stream_child(**json.loads(args.stream_child))
    return
  print(f"{'m':>7} {'N0':>5} {'N1':>5} {'scan s':>8} {'gram s':>8} {'auto s':>8} "
        f"{'GFLOP/s':>8} {'floor s':>8} {'auto/fl':>7} {'flop x':>7} {'eff':>7}", flush=True)
  rows = speed(QUICK_SHAPES if args.quick else SHAPES)
  stream = memory(QUICK_STREAM if args.quick else STREAM)
  pathlib.Path(args.out).write_text(json.dumps(
      dict(quick=args.quick, backend=jax.default_backend(), speed=rows, stream=stream), indent=2))
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
