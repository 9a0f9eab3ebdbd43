"""Memory and time to GPFQ-quantize a 7B and a 70B decoder with the driver on TPU v5e / v5p slices.

An estimate from counts, not a measurement. Per chip and per (data, model) mesh split: both
streams' weights, both streams' activations at the widest stop and the float32 Grams come from
`qjax.mesh.memory_plan`; the GPFQ kernels' time, working arrays and all-reduces follow the layout
of `qjax.gpfq_layer(..., mesh=...)` (`kernel`, which mirrors its kernels op by op, with the auto
choice of `qjax.gpfq_flops`); the driver's two forward passes are FLOPs over an assumed peak.
Hardware numbers are assumptions (`SLICES`, the constants below), printed with the tables.
Prints markdown, writes it to benchmarks/scaling_estimate.md (--md) and JSON to --out.

  python benchmarks/scaling_estimate.py [--out FILE] [--md FILE]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib

from qjax import gpfq_flops
from qjax import mesh as mesh_lib

GIB, MIB = 2**30, 2**20
F32, BF16 = 4, 2  # bytes
BLOCK = 128  # gpfq_layer's default block_size
SEQUENCES, SEQ = 128, 2048
ROWS = SEQUENCES * SEQ  # calibration tokens, all at every stop
F32_PASSES = 6  # precision=HIGHEST on TPU = 6 bf16 passes (jax.lax.Precision docstring)
KERNEL_MXU = 0.6  # assumed fraction of the f32 peak reached by GPFQ's large GEMMs
FORWARD_MXU = 0.5  # assumed fraction of the bf16 peak reached by the calibration forwards
COLLECTIVE_S = 10e-6  # assumed fixed latency per collective
STEP_S = 10e-6  # assumed cost of one sequential step of the recursion (a tiny loop iteration)
FIT = 0.9  # a chip fits below this fraction of its HBM


@dataclasses.dataclass(frozen=True)
class Slice:
  """A TPU slice: per-chip peak, HBM and interconnect."""
  name: str
  chips: int
  hbm_gib: float
  bf16_flops: float  # peak per chip
  hbm_bytes_per_s: float
  ici_bytes_per_s: float  # per chip; a ring all-reduce moves 2 (n-1)/n x size


SLICES = (
    Slice("v5e-8", 8, 16, 197e12, 819e9, 200e9),
    Slice("v5e-64", 64, 16, 197e12, 819e9, 200e9),
    Slice("v5p-8", 4, 95, 459e12, 2765e9, 600e9),  # 4 chips; peak, HBM and ICI rates assumed
)


@dataclasses.dataclass(frozen=True)
class Decoder:
  """Llama-2 shapes: the linears of one decoder layer as (name, N0, N1, count)."""
  name: str
  layers: int
  hidden: int
  mlp: int
  kv: int  # width of k and v (grouped-query attention: fewer than hidden)

  @property
  def linears(self) -> tuple[tuple[str, int, int, int], ...]:
    d = self.hidden
    return (("q, o", d, d, 2), ("k, v", d, self.kv, 2), ("gate, up", d, self.mlp, 2),
            ("down", self.mlp, d, 1))

  @property
  def weights(self) -> int:
    return self.layers * sum(N0 * N1 * n for _, N0, N1, n in self.linears)

  @property
  def forward_flops(self) -> float:
    """One forward of the calibration tokens: linears plus attention scores and values."""
    attention = self.layers * 2 * 2 * SEQ * self.hidden  # QK^T and AV per token (unmasked)
    return ROWS * (2 * self.weights + attention)


MODELS = (Decoder("7B", 32, 4096, 11008, 4096), Decoder("70B", 80, 8192, 28672, 1024))


@dataclasses.dataclass
class Cost:
  """One device's share of one layer's GPFQ kernels."""
  form: str  # "gram" or "scan" (the data form)
  flops: float
  hbm_bytes: float  # HBM traffic
  steps: int  # sequential quantization steps
  memory_bytes: float  # peak float32 working arrays (inputs included)
  reduces: int  # all-reduces
  reduce_bytes: float  # size of each
  reduce_chips: int  # chips each one spans

  def seconds(self, hw: Slice) -> float:
    compute = self.flops / (hw.bf16_flops / F32_PASSES * KERNEL_MXU)
    comm = 0.0
    if self.reduce_chips > 1:
      n = self.reduce_chips
      comm = self.reduces * (2 * (n - 1) / n * self.reduce_bytes / hw.ici_bytes_per_s
                             + COLLECTIVE_S)
    return max(compute, self.hbm_bytes / hw.hbm_bytes_per_s) + comm + self.steps * STEP_S


def kernel(m: int, N0: int, N1: int, D: int, M: int, form: str = "auto") -> Cost:
  """One device's share under gpfq_layer(..., mesh=mesh, method=form) on a (D, M) mesh."""
  n_pad = math.ceil(N0 / BLOCK) * BLOCK
  nb, c, k = n_pad // BLOCK, N1 // M, 2  # blocks, local columns, [H, G] (X_tilde != X)
  if form == "auto":
    form = gpfq_flops(m, N0, N1, block_size=BLOCK).method
  if form == "gram":
    rows = math.ceil(m / (D * M))  # rows split over both axes
    acc = 2 * k * rows * N0 * N0  # the local rows' Grams
    rec = (4 * n_pad * n_pad * c  # GW = tril(G) @ W, one (B, n) @ (n, c) GEMM per block
           + 2 * n_pad * BLOCK * c)  # B steps of (B,) @ (B, c) per block
    hbm = F32 * (k * rows * N0  # read the local X (and X_tilde) once
                 + nb * (BLOCK * n_pad + n_pad * c)  # per block: H rows and all of Q
                 + 3 * n_pad * n_pad)  # padded H, tril(G)
    memory = F32 * (k * rows * N0 + 2 * k * N0 * N0  # inputs, partial and summed H (G)
                    + 2 * n_pad * n_pad + 2 * n_pad * c + 2 * N0 * c)  # Hp, tril G; GW, Q; W, Q
    return Cost("gram", acc + rec, hbm, n_pad, memory, 1, F32 * k * N0 * N0, D * M)
  rows = math.ceil(m / D)  # data form: rows over data; U is (rows, c)
  per_block = (2 * k * rows * BLOCK * BLOCK  # Hb (and Gb)
               + 2 * BLOCK * rows * c  # projections Xt_b^T U
               + 4 * BLOCK * BLOCK * c  # tril(Gb) @ w and the B quantize steps
               + 2 * k * BLOCK * rows * c)  # U += [X_b, Xt_b] [w; -q]
  hbm = F32 * nb * ((3 + 2 * k) * rows * c  # U: projections, k update GEMM outputs, U + ...
                    + 3 * k * BLOCK * rows)  # block columns of X (X_tilde)
  memory = F32 * (k * rows * N0 + (2 + k) * rows * c + 2 * N0 * c)  # X (X_t), U + temps, W, Q
  reduce_bytes = F32 * (k * BLOCK * BLOCK + BLOCK * c)  # the block Grams and projections
  return Cost("scan", nb * per_block, hbm, n_pad, memory, nb, reduce_bytes, D)


def estimate(model: Decoder, hw: Slice, data: int) -> dict:
  """Bytes per chip, all-reduces and minutes of one GPFQ run on the (data, chips / data) mesh."""
  M = hw.chips // data
  shapes = {f"{name}{i}": (N0, N1 * n) for i in range(model.layers)
            for name, N0, N1, n in model.linears}
  plan = mesh_lib.memory_plan(shapes, rows=ROWS, data=data, model=M, weight_bytes=BF16,
                              act_bytes=BF16, grams=2)
  costs = {name: (kernel(ROWS, N0, N1, data, M), n) for name, N0, N1, n in model.linears}
  widest = max(model.linears, key=lambda l: l[1])[0]
  wide = costs[widest][0]
  sent = lambda c: 2 * (c.reduce_chips - 1) / c.reduce_chips * c.reduces * c.reduce_bytes
  peak = max(c.memory_bytes for c, _ in costs.values())
  gram_peak = max(kernel(ROWS, N0, N1, data, M, "gram").memory_bytes
                  for _, N0, N1, _ in model.linears)
  kernel_min = model.layers * sum(n * c.seconds(hw) for c, n in costs.values()) / 60
  forward_min = 2 * model.forward_flops / (hw.chips * hw.bf16_flops * FORWARD_MXU) / 60
  # With a kernel's working arrays counted, they replace the Grams (the Gram form holds its own).
  fits = lambda grams: bool(plan.total - plan.hessian + grams < FIT * hw.hbm_gib * GIB)
  return dict(
      data=data, model=M, weights_bytes=plan.weights, activations_bytes=plan.activations,
      grams_bytes=plan.hessian, total_bytes=plan.total, fits=fits(plan.hessian),
      widest_stop=widest, reduces_per_widest_stop=wide.reduces if wide.reduce_chips > 1 else 0,
      reduce_bytes_widest_stop=wide.reduce_bytes,
      reduce_bytes_sent_per_run=model.layers * sum(n * sent(c) for c, n in costs.values()),
      kernel_peak_bytes=peak, fits_with_kernel=fits(peak),
      kernel_peak_gram_bytes=gram_peak, fits_with_gram_kernel=fits(gram_peak),
      forms={name: c.form for name, (c, _) in costs.items()},
      kernel_minutes=kernel_min, forward_minutes=forward_min, minutes=kernel_min + forward_min)


def candidates(hw: Slice) -> list[int]:
  """Data-axis sizes: powers of two dividing the chips and the 128 calibration sequences."""
  return [d for d in (2**i for i in range(8)) if hw.chips % d == 0 and SEQUENCES % d == 0]


def results() -> dict:
  """{model: {'slices': {slice: {its `Slice` fields, 'best' (the data size of least bytes),
  'meshes': [`estimate` per candidate]}}}}."""
  out = {}
  for model in MODELS:
    out[model.name] = dict(weights=model.weights, forward_flops=model.forward_flops, slices={})
    for hw in SLICES:
      meshes = [estimate(model, hw, d) for d in candidates(hw)]
      best = min(meshes, key=lambda e: (e["total_bytes"], e["data"]))["data"]
      out[model.name]["slices"][hw.name] = dict(dataclasses.asdict(hw), best=best, meshes=meshes)
  return out


def assumptions() -> list[str]:
  hw = "; ".join(f"{s.name}: {s.chips} chips of {s.hbm_gib:g} GiB HBM at "
                 f"{s.hbm_bytes_per_s / 1e9:,.0f} GB/s, {s.bf16_flops / 1e12:.0f} TFLOP/s bf16, "
                 f"ICI {s.ici_bytes_per_s / 1e9:.0f} GB/s per chip" for s in SLICES)
  return [
      "## Assumptions",
      "",
      "* Models (Llama-2 shapes, Flax layout N0 x N1): 7B, 32 layers, d 4,096, MLP 11,008; 70B, "
      "80 layers, d 8,192, MLP 28,672, grouped k / v of 1,024. Embeddings and the LM head are "
      "not counted.",
      f"* Hardware: {hw}. The v5p figures are assumed (v5p-8 has 4 chips).",
      f"* Calibration: {SEQUENCES} x {SEQ:,} = {ROWS:,} tokens, all at every stop (the driver "
      "advances every batch together), X != X_tilde, block_size 128.",
      "* Bytes per chip (`qjax.mesh.memory_plan`): weights of both streams in bf16, split over "
      "the model axis; activations of both streams at the widest stop (the `down` input) in "
      "bf16, split over the data axis; GPFQ's two float32 Grams H, G of the widest layer, "
      f"replicated. A slice fits when their total is below {FIT:.0%} of HBM.",
      "* Not in the total: the GPFQ kernels' float32 working arrays (the 'kernel f32 peak' "
      "column, the largest layer's: its inputs as f32 copies, the data form's U, the padded "
      "Grams; an upper bound if XLA fuses the casts) and XLA's temporaries.",
      "* All-reduces per stop: the Gram form sums [H, G] once over every chip (rows split over "
      "data and model), the data form sums (2B x B + B x N1/M) floats per block of B = 128 inputs "
      "over the data axis. The model-axis collectives of the sharded forward are not counted.",
      f"* Kernel minutes: float32 at precision=HIGHEST, {F32_PASSES} bf16 MXU passes at an "
      f"assumed {KERNEL_MXU:.0%} of the peak; max(flops, HBM bytes) + ring all-reduces "
      f"(2 (n-1)/n x bytes / ICI + {COLLECTIVE_S * 1e6:.0f} us) + {STEP_S * 1e6:.0f} us per "
      "sequential step; the form per layer is `qjax.gpfq_flops`'s auto choice.",
      f"* Forward minutes: the driver's two forward passes (float and quantized stream, one each "
      f"over the calibration set), 2 x weights x tokens + attention flops at an assumed "
      f"{FORWARD_MXU:.0%} of the bf16 peak over every chip.",
  ]


def table(name: str, slices: dict) -> list[str]:
  gib = lambda b: f"{b / GIB:.1f}"
  out = [f"## {name}", "", "| slice | mesh (data, model) | weights | activations | Grams | "
         "total GiB/chip | fits | all-reduces per stop, widest (count x MiB) | "
         "kernel f32 peak GiB (not in total) | kernel min | forward min | minutes |",
         "|" + "---|" * 12]
  for sl, s in slices.items():
    by_data = {e["data"]: e for e in s["meshes"]}
    for d in sorted({s["best"], 1}, reverse=True):  # the best split, then all-model
      e = by_data[d]
      n = e["reduces_per_widest_stop"]
      reduces = f"{n} x {e['reduce_bytes_widest_stop'] / MIB:,.1f}" if n else "none"
      out.append(
          f"| {sl} | ({d}, {e['model']}) | {gib(e['weights_bytes'])} | "
          f"{gib(e['activations_bytes'])} | {gib(e['grams_bytes'])} | {gib(e['total_bytes'])} | "
          f"{'yes' if e['fits'] else 'no'} | {reduces} | {gib(e['kernel_peak_bytes'])} | "
          f"{e['kernel_minutes']:.1f} | {e['forward_minutes']:.1f} | {e['minutes']:.1f} |")
  return out


def verdicts(res: dict) -> list[str]:
  """Per model and slice, the mesh splits that fit: driver bytes alone, then with the kernels'."""
  out = ["## Which fit", "",
         "Mesh splits (data, model) whose total fits; then those that still fit with the largest "
         "layer's kernel f32 working arrays in place of the Grams (auto forms; every layer in "
         "the Gram form, `method=\"gram\"`).", ""]
  for name, r in res.items():
    for sl, s in r["slices"].items():
      ok = lambda key: ", ".join(f"({e['data']}, {e['model']})" for e in s["meshes"]
                                 if e[key]) or "none"
      out.append(f"* {name} on {sl}: {ok('fits')}; with the kernels: {ok('fits_with_kernel')} "
                 f"(auto), {ok('fits_with_gram_kernel')} (Gram form)")
  return out


def report(res: dict) -> str:
  out = ["# Scaling estimate: GPFQ with the one-pass driver on a 7B and a 70B decoder, TPU v5e "
         "and v5p", "",
         "Generated by `python benchmarks/scaling_estimate.py` from byte and flop counts "
         "(`qjax.mesh.memory_plan`, `qjax.gpfq_flops` and the kernel layout of "
         "`qjax.gpfq_layer(..., mesh=...)`). An estimate, not a measurement.", ""]
  out += assumptions() + [""]
  for model in MODELS:
    r = res[model.name]
    forms = r["slices"]["v5e-8"]["meshes"][0]["forms"]
    stops = model.layers * sum(n for *_, n in model.linears)
    hw = SLICES[0]
    # The driver qjax.gpfq replaced re-ran both streams up to every stop: half the depth on average.
    old = stops * model.forward_flops / (hw.chips * hw.bf16_flops * FORWARD_MXU) / 60
    out += table(f"{model.name}: {r['weights']:.2e} weights, one forward "
                 f"{r['forward_flops']:.2e} flops", r["slices"])
    out += ["", "Rows: the split with the fewest bytes per chip, then all chips on the model "
            "axis (data 1). Kernel forms: " + "; ".join(f"{k}: {v}" for k, v in forms.items())
            + f" (scan = the data form). The driver it replaced re-ran both streams up to each of "
            f"the {stops} stops: {old:.0f} minutes of forwards on {hw.name}.", ""]
  out += verdicts(res)
  return "\n".join(out) + "\n"


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", help="write the estimates as JSON here (default: no file)")
  parser.add_argument("--md", default=str(pathlib.Path(__file__).with_suffix(".md")),
                      help="where to write the markdown")
  args = parser.parse_args(argv)
  res = results()
  text = report(res)
  print(text)
  pathlib.Path(args.md).write_text(text)
  if args.out:
    pathlib.Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
  return res


if __name__ == "__main__":
  main()
