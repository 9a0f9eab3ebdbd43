"""The default experiment: LeNet5 on the 5,000 embedded MNIST digits, every quantizer compared."""
import ml_collections

from qjax.experiments import psgd as psgd_experiment
from qjax.experiments import alq as alq_experiment
from qjax.experiments import gpfq as gpfq_experiment
from qjax.experiments import act as act_experiment


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.name = "mnist_lenet5"
  config.task = "classify"         # qjax.main.TASKS
  config.dataset = "mnist_embedded"
  config.data_dir = ""             # for tfds datasets: where they were prepared
  config.model = "lenet5"
  config.num_classes = 10
  config.seed = 0                  # one run: --config.seeds=0
  # The table is the mean over these seeds (each a float model and a calibration draw),
  # with the sample std of accuracy (acc_std): which differences are real.
  config.seeds = (0, 1, 2)
  # Float training (SGD + momentum, cosine decay, shift augmentation).
  config.epochs = 20
  config.batch_size = 128
  config.learning_rate = 0.05
  config.momentum = 0.9
  config.weight_decay = 5e-4
  config.augment_shift = 2
  config.val_fraction = 0.1        # carved from the 4,000 training digits, for tuning only
  # Round-to-nearest baseline bits.
  config.bits = (8, 6, 5, 4, 3, 2)
  # Each method adds rows to the one results table; its options live in config.<method>.
  config.methods = ("rtn", "gpfq", "psgd", "alq", "act")
  config.gpfq = gpfq_experiment.default_config()
  config.psgd = psgd_experiment.default_config()
  config.alq = alq_experiment.default_config()
  config.act = act_experiment.default_config()  # W8A8 / W4A8 rows
  return config
