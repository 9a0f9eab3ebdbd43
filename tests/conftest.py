"""Strict JAX settings for every test: silent broadcasting is a bug.

Dtype promotion stays 'standard': optax's own schedules mix int counts with float rates and fail
under 'strict'; our code makes its dtypes explicit instead, and tests check output dtypes.

Eight host CPU devices, so the sharding tests (tests/test_sharding.py) build 2 x 4 meshes in
this process. JAX fixes the device count when its backend starts, so this must run before any
test touches a device; pytest imports conftest.py before the test modules. Code that is not given
a mesh still runs on device 0 alone.
"""
import jax

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_numpy_rank_promotion", "raise")
