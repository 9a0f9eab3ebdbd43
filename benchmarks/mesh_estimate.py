"""Bytes per device for GPTQ on a 7B and a 70B decoder: `qjax.mesh.memory_plan`, no devices.

Assumptions: Llama-2 shapes (7B: 32 layers, d 4,096, MLP 11,008; 70B: 80 layers, d 8,192, MLP
28,672, grouped k/v of 1,024), bfloat16 weights and activations, both streams resident, one
float32 Hessian of the widest layer, 128 x 2,048 calibration tokens at every stop (all
batches advance together), embeddings not counted, 16 GiB HBM per v5e chip, 95 GiB per v5p.

  PYTHONPATH=. python benchmarks/mesh_estimate.py
"""
from qjax import mesh as mesh_lib

GIB = 2 ** 30
MODELS = {
    "7B": (32, {"q,k,v,o": (4096, 4 * 4096), "gate,up": (4096, 2 * 11008), "down": (11008, 4096)}),
    "70B": (80, {"q,o": (8192, 2 * 8192), "k,v": (8192, 2 * 1024), "gate,up": (8192, 2 * 28672),
                 "down": (28672, 8192)}),
}
SLICES = {"v5e-8": (8, 16), "v5e-64": (64, 16), "v5p-8 (4 chips)": (4, 95)}


def main() -> None:
  print("| model | slice | mesh (data, model) | weights | hessian | activations | total GiB/chip | fits |")
  print("| --- | --- | --- | --- | --- | --- | --- | --- |")
  for name, (layers, shapes) in MODELS.items():
    per_layer = {f"{k}{i}": s for i in range(layers) for k, s in shapes.items()}
    for sl, (chips, hbm) in SLICES.items():
      plans = {d: mesh_lib.memory_plan(per_layer, rows=128 * 2048, data=d, model=chips // d,
                                       weight_bytes=2, act_bytes=2)
               for d in (1, 2, 4, 8, 16, 32) if d <= chips and chips % d == 0}
      best = min(plans, key=lambda d: plans[d].total)  # all-model, and the best split
      for data in sorted({1, best}):
        model, p = chips // data, plans[data]
        g = lambda b: f"{b / GIB:.1f}"
        print(f"| {name} | {sl} | ({data}, {model}) | {g(p.weights)} | {g(p.hessian)} | "
              f"{g(p.activations)} | {g(p.total)} | {'yes' if p.total < 0.9 * hbm * GIB else 'no'} |")


if __name__ == "__main__":
  main()
