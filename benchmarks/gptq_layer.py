"""Benchmark of GPTQ for one layer (`qjax.gptq_layer`) beside GPFQ's Gram form on the same H.

For each (m, N0, N1) of the GPFQ layer benchmark (benchmarks/gpfq_layer.py: the same W, X~ and
4-bit alphabet), with H = X~^T X~:

* gpfq_gram: `qjax.gpfq_layer(W, X~, None, levels, method="gram")`: GPFQ with X = X~, whose
  Gram form accumulates exactly this H (and G = H) from the data, then runs its recursion;
* gptq: `qjax.gptq_layer(W, H, levels)` on the same alphabet, H given (damping, Cholesky of
  H^-1, the blocked column loop), and gptq+H: the same including H = X~^T X~ from the data,
  which is what GPTQ costs from the same inputs as gpfq_gram;
* gptq_g128: `qjax.gptq_layer(W, H, GridSpec(4, "group", 128))`, the common LLM grid, with
  scales fitted as the loop reaches each group.
* the act-order family on the same alphabet: gptq_act (`gptq_layer(..., act_order=True)`, H
  given), gpfq_act (`gpfq_layer(W, X, X~, levels, method="gram", act_order=True)`, from the
  data) and qronos (`qjax.qronos_layer(W, X, X~, levels)`, from the data: H and G = X~^T X, one
  more triangular solve than GPTQ), with its ratio over gptq+H.

First call (compile + one run) and steady seconds (median of the interleaved rounds after it),
compile ~ first - steady, and the ratios gptq / gpfq_gram, gptq+H / gpfq_gram. Goals: compile
< 10 s on every shape, gptq steady <= 2x gpfq_gram. Prints a table, writes JSON (--out).

The Cholesky factorization is LAPACK's (jaxlib's potrf, on scipy's OpenBLAS). On a CPU shared
with other busy processes, OpenBLAS's spinning worker threads make it up to ~70x slower (measured
here: 2.25 s against 0.03 s at N0 = 1152), so this script runs OpenBLAS single-threaded unless
OPENBLAS_NUM_THREADS is already set; XLA's own GEMMs (both methods) are not affected.

  python benchmarks/gptq_layer.py [--quick] [--out FILE]
"""
from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy / jax load OpenBLAS

import argparse  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from gpfq_layer import QUICK_SHAPES, SHAPES, layer, round_robin  # noqa: E402

import qjax  # noqa: E402
from qjax import grids  # noqa: E402

REPEATS = 3


@jax.jit
def gram(x):
  return jax.lax.dot_general(x, x, (((0,), (0,)), ((), ())),
                             precision=jax.lax.Precision.HIGHEST)


def first_call_seconds(fn) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - start


def bench(shapes, repeats: int) -> list[dict]:
  rows = []
  for m, N0, N1 in shapes:
    W, X, Xt, levels = layer(m, N0, N1)
    H = jax.block_until_ready(gram(Xt))
    g128 = grids.GridSpec(4, "group", 128)
    fns = {
        "gpfq_gram": functools.partial(qjax.gpfq_layer, W, Xt, None, levels, method="gram"),
        "gptq": functools.partial(qjax.gptq_layer, W, H, levels),
        "gptq+H": lambda: qjax.gptq_layer(W, gram(Xt), levels),
        "gptq_g128": functools.partial(qjax.gptq_layer, W, H, g128),
        "gptq_act": functools.partial(qjax.gptq_layer, W, H, levels, act_order=True),
        "gpfq_act": functools.partial(qjax.gpfq_layer, W, X, Xt, levels, method="gram",
                                      act_order=True),
        "qronos": functools.partial(qjax.qronos_layer, W, X, Xt, levels),
    }
    first = {name: first_call_seconds(fn) for name, fn in fns.items()}
    times, _ = round_robin(fns, repeats)
    steady = {name: statistics.median(t) for name, t in times.items()}
    row = dict(m=m, N0=N0, N1=N1)
    for name in fns:
      row[f"{name}_first_s"] = first[name]
      row[f"{name}_s"] = steady[name]
      row[f"{name}_compile_s"] = max(first[name] - steady[name], 0.0)
    row["gptq_over_gpfq_gram"] = steady["gptq"] / steady["gpfq_gram"]
    row["gptq_with_H_over_gpfq_gram"] = steady["gptq+H"] / steady["gpfq_gram"]
    row["gptq_g128_over_gpfq_gram"] = steady["gptq_g128"] / steady["gpfq_gram"]
    row["qronos_over_gptq_with_H"] = steady["qronos"] / steady["gptq+H"]
    rows.append(row)
    print(f"{m:>6} {N0:>5} {N1:>4} | {steady['gpfq_gram']:>8.3f} | "
          f"{first['gptq']:>7.2f} {row['gptq_compile_s']:>6.2f} {steady['gptq']:>8.3f} | "
          f"{steady['gptq+H']:>8.3f} | {row['gptq_g128_compile_s']:>6.2f} "
          f"{steady['gptq_g128']:>8.3f} | {row['gptq_over_gpfq_gram']:>6.2f} "
          f"{row['gptq_with_H_over_gpfq_gram']:>6.2f} {row['gptq_g128_over_gpfq_gram']:>6.2f} | "
          f"{first['gptq_act']:>7.2f} {steady['gptq_act']:>8.3f} | {first['gpfq_act']:>7.2f} "
          f"{steady['gpfq_act']:>8.3f} | {first['qronos']:>7.2f} {steady['qronos']:>8.3f} "
          f"{row['qronos_over_gptq_with_H']:>6.2f}", flush=True)
  return rows


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="the smaller shapes, 2 rounds")
  parser.add_argument("--out", default=str(pathlib.Path(__file__).with_suffix(".json")))
  args = parser.parse_args()
  print(f"OPENBLAS_NUM_THREADS={os.environ['OPENBLAS_NUM_THREADS']}, backend "
        f"{jax.default_backend()}", flush=True)
  print(f"{'m':>6} {'N0':>5} {'N1':>4} | {'gpfq s':>8} | {'gptq 1st':>7} {'comp':>6} "
        f"{'gptq s':>8} | {'gptq+H s':>8} | {'g128 cp':>6} {'g128 s':>8} | "
        f"{'/gpfq':>6} {'+H/gpfq':>6} {'g128/':>6} | {'act 1st':>7} {'act s':>8} | "
        f"{'fq-a 1st':>7} {'fq-a s':>8} | {'qr 1st':>7} {'qr s':>8} {'qr/+H':>6}", flush=True)
  rows = bench(QUICK_SHAPES if args.quick else SHAPES, 2 if args.quick else REPEATS)
  ok = all(r[f"{k}_compile_s"] < 10.0 for r in rows for k in ("gptq", "gptq_g128")) and all(
      r["gptq_over_gpfq_gram"] <= 2.0 for r in rows)
  print(f"goals (compile < 10 s, gptq <= 2x gpfq gram): {'met' if ok else 'NOT met'}")
  pathlib.Path(args.out).write_text(json.dumps(
      dict(quick=args.quick, backend=jax.default_backend(), rows=rows, goals_met=ok,
           openblas_num_threads=os.environ["OPENBLAS_NUM_THREADS"]), indent=2))
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
