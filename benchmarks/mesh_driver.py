"""The driver on one device vs on a (data, model) mesh of 8 host CPU devices: bytes and seconds.

For the pre-LN transformer of benchmarks/gpfq_network.py (12 blocks, d=192 by default), GPTQ at
4 bits on one device and with `qjax.mesh.shard_params` / `shard_batch` placements: weights per
device of both streams (float + quantized: the addressable shards), XLA's planned peak bytes
per device of one jitted forward pass (`qjax.mesh.compiled_bytes`: the segments' largest
program is at most that), wall time of one (cold) quantization, and how many Q entries differ
from one device. Prints a table and writes JSON. CPU "devices" share the same cores, so wall
time measures overhead, not speed-up. With --reduce-chunks C every run (one device included)
uses the driver's deterministic reduction (`reduce_chunks=C`), and no Q entry should differ.

  PYTHONPATH=. python benchmarks/mesh_driver.py [--blocks 12] [--dim 192] [--meshes 4x2,2x4]
                                                [--reduce-chunks C] [--no-time] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import jax

jax.config.update("jax_num_cpu_devices", 8)  # before any backend starts

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import qjax  # noqa: E402
from gpfq_network import Transformer  # noqa: E402
from qjax import mesh as mesh_lib  # noqa: E402

MIB = 2 ** 20


def measure(model, v, x, mesh, timed: bool, ref=None, reduce_chunks=None) -> dict:
  if mesh is not None:
    v, x = mesh_lib.shard_params(v, mesh), mesh_lib.shard_batch(x, mesh)
  else:
    x = jnp.asarray(x)
  row = {"weights_mib": 2 * mesh_lib.per_device_bytes(v) / MIB,
         "forward_peak_mib": mesh_lib.compiled_bytes(lambda p, b: model.apply(p, b), v, x) / MIB}
  if timed:
    t = time.perf_counter()
    q, _ = qjax.gptq(v, model.apply, x, bits=4, progress=False, reduce_chunks=reduce_chunks)
    jax.block_until_ready(q)
    row["gptq_seconds"] = time.perf_counter() - t
    if ref is not None:
      row["q_differ"] = int(sum((np.asarray(a) != np.asarray(b)).sum() for a, b in
                                zip(jax.tree_util.tree_leaves(q), jax.tree_util.tree_leaves(ref))))
    row["_q"] = q
  return row


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--blocks", type=int, default=12)
  ap.add_argument("--dim", type=int, default=192)
  ap.add_argument("--tokens", type=int, default=32)
  ap.add_argument("--seqs", type=int, default=8)
  ap.add_argument("--meshes", default="8x1,4x2,2x4")
  ap.add_argument("--reduce-chunks", type=int, default=None,
                  help="the driver's deterministic reduction (same Q on every mesh)")
  ap.add_argument("--no-time", action="store_true", help="memory only (no GPTQ runs)")
  ap.add_argument("--out", default="mesh_driver.json")
  args = ap.parse_args()
  model = Transformer(args.blocks, args.dim, 4)
  x = np.random.default_rng(0).normal(size=(args.seqs, args.tokens, args.dim)).astype(np.float32)
  v = model.init(jax.random.key(0), x[:1])
  rc = args.reduce_chunks
  rows = {"1 device": measure(model, v, x, None, not args.no_time, reduce_chunks=rc)}
  ref = rows["1 device"].pop("_q", None)
  for spec in args.meshes.split(","):
    shape = tuple(int(s) for s in spec.split("x"))
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(shape), ("data", "model"))
    rows[f"mesh {shape}"] = measure(model, v, x, mesh, not args.no_time, ref, rc)
    rows[f"mesh {shape}"].pop("_q", None)
  print(f"transformer {args.blocks} blocks, d={args.dim}, {args.seqs} x {args.tokens} tokens, "
        f"GPTQ 4 bits{f', reduce_chunks={rc}' if rc else ''}; per device:")
  print("| placement | weights, 2 streams (MiB) | forward peak (MiB) | GPTQ s | Q entries differ |")
  print("| --- | --- | --- | --- | --- |")
  for name, r in rows.items():
    print(f"| {name} | {r['weights_mib']:.1f} | {r['forward_peak_mib']:.1f} | "
          f"{r.get('gptq_seconds', float('nan')):.1f} | {r.get('q_differ', '-')} |")
  pathlib.Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
