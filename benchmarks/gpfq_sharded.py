"""Benchmark of sharded GPFQ (`qjax.gpfq_layer(..., mesh=)`) against one device, 8 host CPU devices.

For each layer shape (m, N0, N1) and method ("scan", "gram"): seconds per layer on one device
(`gpfq_layer`) and on meshes (data, model) = (8, 1), (2, 4), (1, 8) (`gpfq_layer(...,
mesh=mesh)`, inputs already placed on their shards), median of 3 after a compile call, and how
many entries (in how many neurons) of Q differ from the one-device Q of the same form. For scale,
the one-device row counts where scan and gram differ: both are floating-point order on rounding
ties (a flipped tie changes the rest of that neuron's column). Prints a table, writes
benchmarks/gpfq_sharded.json.

The 8 "devices" are XLA host-platform devices sharing this machine's CPU cores (2 here), so the
sharded runs cannot be faster: they do the same flops on the same cores plus the collectives.
What this measures is the overhead of the partitioned program, not a speedup.

  python benchmarks/gpfq_sharded.py [--quick]
"""
from __future__ import annotations

import os

# The host device count is fixed when JAX starts.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

from gpfq_layer import layer, median_seconds  # noqa: E402  (the one-device benchmark's)
from qjax import gpfq_layer  # noqa: E402

SHAPES = ((8192, 512, 512), (2048, 1024, 1024))
QUICK_SHAPES = ((2048, 256, 256),)
MESHES = ((8, 1), (2, 4), (1, 8))
REPEATS = 3


def differ(Q: jax.Array, ref: jax.Array, vs: str) -> dict:
  """Differing entries of Q and ref (the `vs` result), and the neurons (columns) they are in."""
  diff = np.asarray(Q) != np.asarray(ref)
  return dict(vs=vs, entries=int(diff.sum()), neurons=int(diff.any(axis=0).sum()), of=diff.size)


def run(shapes) -> list[dict]:
  rows = []
  for m, N0, N1 in shapes:
    W, X, Xt, levels = layer(m, N0, N1)
    refs = {method: gpfq_layer(W, X, Xt, levels, method=method) for method in ("scan", "gram")}
    for method, other in (("scan", "gram"), ("gram", "scan")):
      single, ref = median_seconds(lambda: gpfq_layer(W, X, Xt, levels, method=method),
                                   REPEATS)
      rows.append(dict(m=m, N0=N0, N1=N1, method=method, mesh="1 device", seconds=single,
                       vs_single=1.0, differ=differ(ref, refs[other], f"{other}, 1 device")))
      for D, M in MESHES:
        mesh = Mesh(np.array(jax.devices()[:D * M]).reshape(D, M), ("data", "model"))
        row_spec = P("data", None) if method == "scan" else P(("data", "model"), None)
        x, xt = (jax.device_put(a, NamedSharding(mesh, row_spec)) for a in (X, Xt))
        w = jax.device_put(W, NamedSharding(mesh, P(None, "model")))
        seconds, Q = median_seconds(
            lambda: gpfq_layer(w, x, xt, levels, mesh=mesh, method=method), REPEATS)
        rows.append(dict(m=m, N0=N0, N1=N1, method=method, mesh=f"{D}x{M}", seconds=seconds,
                         vs_single=seconds / single, differ=differ(Q, ref, f"{method}, 1 device")))
      for r in rows[-1 - len(MESHES):]:
        print(f"{r['m']:>6} {r['N0']:>5} {r['N1']:>5} {r['method']:>5} {r['mesh']:>9} "
              f"{r['seconds']:9.3f} {r['vs_single']:6.2f}x {r['differ']['entries']:>9} "
              f"{r['differ']['neurons']:>7}", flush=True)
  return rows


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="one small shape")
  parser.add_argument("--out", default=str(pathlib.Path(__file__).with_suffix(".json")))
  args = parser.parse_args()
  print(f"{len(jax.devices())} {jax.devices()[0].platform} devices, {os.cpu_count()} CPU cores")
  print(f"{'m':>6} {'N0':>5} {'N1':>5} {'form':>5} {'mesh D x M':>9} {'seconds':>9} "
        f"{'vs 1':>7} {'Q differs':>9} {'neurons':>7}")
  rows = run(QUICK_SHAPES if args.quick else SHAPES)
  out = dict(note="host-platform devices share the CPU cores: no speedup is possible here",
             devices=len(jax.devices()), platform=jax.devices()[0].platform,
             cpu_cores=os.cpu_count(), repeats=REPEATS, jax=jax.__version__, rows=rows)
  pathlib.Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
