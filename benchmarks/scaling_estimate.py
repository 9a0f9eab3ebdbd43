"""Time and memory to GPFQ-quantize every linear layer of a 7B decoder on a TPU v5e-8 slice.

An estimate from counts, not a measurement. The totals and the auto choice per layer come from
`qjax.gpfq_flops` (exactly what `gpfq_layer(method="auto")` compares); the split over the mesh
follows the layout of `qjax.gpfq_layer(..., mesh=...)` (see `per_device`, which mirrors its
kernels op by op). Hardware numbers are assumptions, listed in `HW` and printed with
the tables. Prints markdown and writes benchmarks/scaling_7b.md.

  python benchmarks/scaling_estimate.py
"""
from __future__ import annotations

import dataclasses
import math
import pathlib

from qjax import gpfq_flops

GIB = 2**30
HW = dict(
    chips=8,
    bf16_peak_flops=197e12,  # v5e MXU, per chip
    f32_passes=6,  # precision=HIGHEST on TPU = 6 bf16 passes (jax.lax.Precision docstring)
    mxu_efficiency=0.6,  # assumed fraction of that peak reached by the large f32 GEMMs
    hbm_bytes=16 * GIB,
    hbm_bytes_per_s=819e9,
    ici_bytes_per_s=200e9,  # 1,600 Gbps per chip; ring all-reduce moves 2 (n-1)/n x size
    collective_seconds=10e-6,  # fixed latency per collective
    step_seconds=10e-6,  # per sequential step of the recursion (one tiny while-loop iteration)
)
F32 = 4  # bytes
BLOCK = 128  # gpfq_layer's default block_size
M_ROWS = 128 * 2048  # calibration tokens
DECODER_LAYERS = 32
LINEARS = (  # name, N0 (inputs), N1 (neurons), how many per decoder layer
    ("q, k, v, o", 4096, 4096, 4),
    ("gate, up", 4096, 11008, 2),
    ("down", 11008, 4096, 1),
)
FUSED = (  # q|k|v and gate|up share their input: one call on the concatenated kernel
    ("q|k|v", 4096, 3 * 4096, 1),
    ("o", 4096, 4096, 1),
    ("gate|up", 4096, 2 * 11008, 1),
    ("down", 11008, 4096, 1),
)
MESHES = ((8, 1), (4, 2), (2, 4), (1, 8))
SEQ, HIDDEN = 2048, 4096
FORWARD_MXU_EFFICIENCY = 0.5  # assumed, for the calibration forwards at default precision
SCAN_WEIGHT = gpfq_flops(1, 1, 1).scan_weight  # the auto choice's weight on data form flops


def weights() -> int:
  return DECODER_LAYERS * sum(N0 * N1 * count for _, N0, N1, count in LINEARS)


def forward_flops() -> float:
  """One forward pass of the m calibration tokens: linears plus attention scores and values."""
  attention = DECODER_LAYERS * 2 * 2 * SEQ * HIDDEN  # QK^T and AV per token (full, unmasked)
  return M_ROWS * (2 * weights() + attention)


def f32_flops_per_s() -> float:
  return HW["bf16_peak_flops"] / HW["f32_passes"] * HW["mxu_efficiency"]


def all_reduce_seconds(nbytes: float, n: int) -> float:
  if n == 1:
    return 0.0
  return 2 * (n - 1) / n * nbytes / HW["ici_bytes_per_s"] + HW["collective_seconds"]


@dataclasses.dataclass
class Cost:
  """Per-device cost of one layer."""
  flops: float
  hbm_bytes: float  # HBM traffic
  comm_seconds: float
  steps: int  # sequential quantization steps
  memory_bytes: float  # peak resident arrays (inputs included)

  @property
  def compute_seconds(self) -> float:
    return self.flops / f32_flops_per_s()

  @property
  def hbm_seconds(self) -> float:
    return self.hbm_bytes / HW["hbm_bytes_per_s"]

  @property
  def step_seconds(self) -> float:
    return self.steps * HW["step_seconds"]

  @property
  def seconds(self) -> float:
    return max(self.compute_seconds, self.hbm_seconds) + self.comm_seconds + self.step_seconds


def per_device(form: str, m: int, N0: int, N1: int, D: int, M: int, same: bool = False,
               B: int = BLOCK) -> Cost:
  """One device's share under gpfq_layer(..., mesh=mesh) on a (data D, model M) mesh."""
  n_pad = math.ceil(N0 / B) * B
  nb, c = n_pad // B, N1 // M  # blocks, local columns
  if form == "gram":
    k = 1 if same else 2  # [H] or [H, G]
    rows = math.ceil(m / (D * M))  # rows split over both axes
    acc = 2 * k * rows * N0 * N0  # _gram_chunk(_same) on the local rows
    rec = (2 * n_pad * n_pad * c  # GW = tril(G) @ W
           + 2 * n_pad * n_pad * c  # one (B, n) @ (n, c) GEMM per block
           + 2 * n_pad * B * c)  # _quantize_block: B steps of (B,) @ (B, c) per block
    hbm = F32 * (k * rows * N0  # read the local X (and X_tilde) once
                 + nb * (B * n_pad + n_pad * c)  # per block: H rows and all of Q
                 + 3 * n_pad * n_pad)  # padded H, tril(G)
    memory = F32 * (k * rows * N0 + 2 * k * N0 * N0  # inputs, partial and summed H (G)
                    + 2 * n_pad * n_pad + 2 * n_pad * c + 2 * N0 * c)  # Hp, tril G; GW, Q; W, Q
    comm = all_reduce_seconds(F32 * k * N0 * N0, D * M)
    return Cost(acc + rec, hbm, comm, n_pad, memory)
  rows = math.ceil(m / D)  # rows over data; U is (rows, c)
  k = 1 if same else 2
  per_block = (2 * k * rows * B * B  # Hb (and Gb)
               + 2 * B * rows * c  # projections Xt_b^T U
               + 4 * B * B * c  # tril(Gb) @ w and the B quantize steps
               + 2 * k * B * rows * c)  # U += [X_b, Xt_b] [w; -q]
  hbm = F32 * nb * ((3 + 2 * k) * rows * c  # U: projections, k update GEMM outputs, U + ...
                    + 3 * k * B * rows)  # block columns of X (X_tilde): Grams, projection, update
  memory = F32 * (k * rows * N0 + (2 + k) * rows * c + 2 * N0 * c)  # X (X_t), U + temps, W, Q
  comm = nb * all_reduce_seconds(F32 * (k * B * B + B * c), D)
  return Cost(nb * per_block, hbm, comm, n_pad, memory)


def auto_form(m: int, N0: int, N1: int, same: bool = False) -> str:
  """gpfq_layer's choice: data form flops weighted by `scan_weight` against Gram form flops."""
  return gpfq_flops(m, N0, N1, block_size=BLOCK, same=same).method


def form_flops(m: int, N0: int, N1: int) -> tuple[float, float]:
  """(data form, Gram form) flops of one layer, X_tilde != X."""
  cost = gpfq_flops(m, N0, N1, block_size=BLOCK)
  return cost.scan, cost.gram


def layer_table(linears, mesh: tuple[int, int]) -> list[str]:
  D, M = mesh
  lines = ["| layer | N0 x N1 | data form flops | Gram form flops | auto | per chip GFLOP | "
           "compute s | HBM s | collectives s | step latency s | s per layer | per chip GiB | "
           f"x {DECODER_LAYERS} layers (s) |", "|" + "---|" * 13]
  for name, N0, N1, count in linears:
    data, gram = form_flops(M_ROWS, N0, N1)
    form = auto_form(M_ROWS, N0, N1)
    c = per_device(form, M_ROWS, N0, N1, D, M)
    lines.append(f"| {name} | {N0} x {N1} | {data:.2e} | {gram:.2e} | {form} | "
                 f"{c.flops / 1e9:,.0f} | {c.compute_seconds:.3f} | {c.hbm_seconds:.3f} | "
                 f"{c.comm_seconds:.3f} | {c.step_seconds:.3f} | {c.seconds:.3f} | "
                 f"{c.memory_bytes / GIB:.2f} | {count * DECODER_LAYERS * c.seconds:.0f} |")
  return lines


def total(linears, mesh: tuple[int, int], forced: str | None = None) -> tuple[float, float, float]:
  """(minutes, peak memory GiB per chip, total flops) over all linears of the model."""
  seconds = peak = flops = 0.0
  for _, N0, N1, count in linears:
    form = forced or auto_form(M_ROWS, N0, N1)
    cost = per_device(form, M_ROWS, N0, N1, *mesh)
    seconds += count * DECODER_LAYERS * cost.seconds
    peak = max(peak, cost.memory_bytes)
    flops += count * DECODER_LAYERS * form_flops(M_ROWS, N0, N1)[form == "gram"]
  return seconds / 60, peak / GIB, flops


def weights_bytes_per_chip() -> float:
  """Float and partly quantized copies of the weights, float32, sharded over the slice."""
  return 2 * F32 * weights() / HW["chips"]


def fits(gib: float) -> str:
  """GPFQ's peak per chip; does it fit next to the weights?"""
  ok = gib * GIB + weights_bytes_per_chip() <= HW["hbm_bytes"]
  return f"{gib:.1f}" if ok else f"{gib:.1f} (does not fit)"


def report() -> str:
  rate = f32_flops_per_s()
  out = [
      "# Scaling estimate: GPFQ on every linear layer of a 7B decoder, TPU v5e-8",
      "",
      "Generated by `python benchmarks/scaling_estimate.py` from the flop and byte counts of "
      "the GPFQ kernels of `qjax.gpfq_layer` on one device and on a mesh (the totals and the "
      "auto choice are `qjax.gpfq_flops`). An estimate, not a measurement.",
      "",
      "## Assumptions",
      "",
      f"* Model: {DECODER_LAYERS} decoder layers, each q, k, v, o 4096 x 4096, gate, up "
      "4096 x 11008, down 11008 x 4096 (Flax layout N0 x N1); 224 linears, 6.5e9 weights.",
      f"* Calibration: m = 128 x 2048 = {M_ROWS:,} token rows per layer, X != X_tilde "
      "(after the first layer the two networks differ), block_size 128.",
      f"* Compute: float32 with precision=HIGHEST everywhere. On TPU that is {HW['f32_passes']} "
      f"bf16 MXU passes, so the f32 peak is {HW['bf16_peak_flops'] / 1e12:.0f} / "
      f"{HW['f32_passes']} = {HW['bf16_peak_flops'] / HW['f32_passes'] / 1e12:.1f} TFLOP/s per "
      f"chip; assuming {HW['mxu_efficiency']:.0%} of it on these large GEMMs gives an effective "
      f"**{rate / 1e12:.1f} TFLOP/s per chip** ({HW['chips'] * rate / 1e12:.0f} for the slice).",
      f"* Memory: {HW['hbm_bytes'] / GIB:.0f} GiB HBM per chip at "
      f"{HW['hbm_bytes_per_s'] / 1e9:.0f} GB/s; a kernel's time is max(flops / rate, HBM bytes / "
      "bandwidth); the data form's U traffic runs at 6 B / 28 = "
      f"{6 * BLOCK / 28:.0f} flop/byte against a ridge of "
      f"{rate / HW['hbm_bytes_per_s']:.0f} flop/byte, so it is close to memory-bound.",
      f"* ICI: {HW['ici_bytes_per_s'] / 1e9:.0f} GB/s per chip (1,600 Gbps), ring all-reduce "
      f"2 (n-1)/n x bytes / bandwidth + {HW['collective_seconds'] * 1e6:.0f} us per collective.",
      f"* The recursion has N0 sequential steps per layer (tiny (B,) x (B, N1/M) products); "
      f"each costs an assumed {HW['step_seconds'] * 1e6:.0f} us of loop overhead.",
      "* Not in the GPFQ tables: the calibration forward passes (see the last section), the "
      "model weights themselves (float and partly quantized copies: 2 x 4 bytes x 6.5e9 / 8 = "
      "6.5 GB per chip in float32 if sharded over the slice) and host input pipelines.",
      "",
      "## Per layer, mesh (data 8, model 1)",
      "",
      "`auto` is gpfq_layer's rule, on one device and on a mesh alike, so both run the same "
      f"form: data form flops x {SCAN_WEIGHT} (its thinner GEMMs, a weight measured on XLA:CPU) "
      "against Gram form flops, both from `qjax.gpfq_flops`. With m >> N0 that is roughly Gram "
      "when N0 < 2.25 N1 (9 m N0 N1 > 4 m N0^2): every N0 = 4096 layer takes the Gram form, "
      "`down` (N0 = 11008) the data form.",
      "",
  ]
  out += layer_table(LINEARS, (8, 1))
  out += [
      "",
      "## Whole model, by mesh shape",
      "",
      f"Peak GiB per chip is GPFQ's own; \"does not fit\" counts the "
      f"{weights_bytes_per_chip() / GIB:.1f} GiB of weights per chip as well.",
      "",
      "| mesh (data x model) | minutes, auto | peak GiB per chip, auto | minutes, auto, fused "
      "q\\|k\\|v and gate\\|up | minutes, all Gram | minutes, all data form | peak GiB per "
      "chip, all data form |",
      "|---|---|---|---|---|---|---|",
  ]
  for mesh in MESHES:
    auto, peak, _ = total(LINEARS, mesh)
    fused, _, _ = total(FUSED, mesh)
    gram, _, _ = total(LINEARS, mesh, "gram")
    data, data_peak, _ = total(LINEARS, mesh, "scan")
    out.append(f"| {mesh[0]} x {mesh[1]} | {auto:.1f} | {fits(peak)} | {fused:.1f} | {gram:.1f} "
               f"| {data:.1f} | {fits(data_peak)} |")
  _, _, flops = total(LINEARS, (8, 1))
  _, _, fused_flops = total(FUSED, (8, 1))
  out += [
      "",
      "## Reading the numbers",
      "",
      f"* Total work (auto): {flops:.2e} flops; {fused_flops:.2e} with q|k|v and gate|up fused. "
      f"At {HW['chips'] * rate / 1e12:.0f} TFLOP/s for the slice that is the floor of the "
      "times above; the rest is HBM-bound data-form blocks, collectives and step latency, each "
      "small.",
      "* The mesh shape hardly changes the time: the dominant terms are split over all 8 chips "
      "either way (Gram form: rows over both axes; data form: U over both), a model axis "
      "splits the Gram recursion further but makes every model shard repeat the data form's "
      "B x B block Grams of its rows (4 m N0 B / D flops). Memory decides: the data form "
      "replicates its rows of X over the model axis. Use (8, 1) or (4, 2).",
      "* Fusing q|k|v (and gate|up) is exact: they see the same X and X_tilde (quantizing q does "
      "not change k's input), and neurons are independent, so one call on the concatenated "
      "kernel gives the same Q while computing H and G once instead of three (two) times.",
      "* Memory: on (8, 1) the largest arrays are the data form's local X and X_tilde for "
      "`down` (m/8 x 11008 each) and U; with 6.5 GB of float32 weights per chip that fits "
      "16 GiB. A model axis replicates X over it: from (2, 4) on, `down` no longer fits at "
      "this m (force the Gram form with X streamed in chunks, or use fewer rows).",
      "* bf16 instead of HIGHEST float32 would be ~6x faster on the MXU but changes Q "
      "(H and G lose precision); qjax keeps float32.",
  ]
  fwd = forward_flops()
  fwd_rate = HW["chips"] * HW["bf16_peak_flops"] * FORWARD_MXU_EFFICIENCY
  layers = DECODER_LAYERS * sum(count for *_, count in LINEARS)
  driver = layers * 2 * 0.5 * fwd  # per layer: both networks, on average up to half depth
  out += [
      "",
      "## What dominates end to end: the calibration forwards",
      "",
      f"One forward of the {M_ROWS:,} tokens costs {fwd:.2e} flops ({weights():.2e} weights x 2 "
      "per token plus attention). `qjax.gpfq` runs the float and the quantized network in "
      "lockstep, one weight op at a time (`qjax.driver`), so the calibration data goes through "
      f"2 forward passes in all: {2 * fwd:.2e} flops, about {2 * fwd / fwd_rate:.0f} s at default "
      f"precision ({FORWARD_MXU_EFFICIENCY:.0%} of the bf16 peak on 8 chips), against about a "
      "minute for all the GPFQ kernels above. The driver it replaced re-ran both networks up to "
      f"every layer: {layers} layers x 2 networks x half the depth on average = {driver:.2e} "
      f"flops, **{driver / fwd_rate / 60:.0f} minutes** (benchmarks/gpfq_network.py measures "
      "both drivers on a 12-block transformer and ResNet-18).",
  ]
  return "\n".join(out) + "\n"


def main() -> None:
  text = report()
  print(text)
  path = pathlib.Path(__file__).with_name("scaling_7b.md")
  path.write_text(text)
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
