"""SmolLM2-135M with activations quantized: RTN, GPTQ, GPFQ and Qronos on the per-channel grid at
W8 / W4, each weight-only, with 8-bit per-token dynamic and with 8-bit per-tensor static
activations (the inputs of every projection), beside each other; perplexity.

  python -m qjax --config configs/smollm2_act.py
"""
import os

import ml_collections

from qjax import main


def get_config() -> ml_collections.ConfigDict:
  config = main.load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                         "smollm2_ptq.py"))
  config.name = "smollm2_act"
  config.methods = ("rtn", "gptq", "gpfq", "qronos")
  config.bits = (8, 4)
  config.grids = ("channel",)
  config.acts = ("a8-token", "a8-tensor")
  # Qronos' damp fixed at 0.3, the held-out search's pick at 3 bits per channel (smollm2_ptq):
  # no search here (six fits per method; each search would add three).
  config.qronos_damp_grid = (0.3,)
  config.export = False
  return config
