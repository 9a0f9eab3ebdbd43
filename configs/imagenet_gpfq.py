"""The GPFQ paper's ImageNet experiment (Zhang, Zhou and Saab, Sec. 3, Tables 1-3).

  python -m qjax --config configs/imagenet_gpfq.py --config.data_dir=DIR --config.weights_dir=W
  python -m qjax --config configs/imagenet_gpfq.py --config.smoke=True     # mock data, CI

Per model (`config.settings.<model>`): the paper's C and m (Table 1), p = 0.25 and b = 3, 4, 5
(Tables 2-3; GoogLeNet and EfficientNet-B1 only at b = 5, Table 1). Methods: GPFQ on every layer,
MSQ on the same alphabet, and the paper's dagger variant (last layer float + bias correction,
Table 3). Mixed precision of another kind (Dense layers at other bits than convs):
`--config.settings.alexnet.dense_bits=8`.
"""
import ml_collections

from qjax.experiments import imagenet


def get_config() -> ml_collections.ConfigDict:
  config = imagenet.default_config()
  config.name = "imagenet_gpfq"
  return config
