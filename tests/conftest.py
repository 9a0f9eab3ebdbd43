"""Strict JAX settings for every test: silent broadcasting is a bug.

Dtype promotion stays 'standard': optax's own schedules mix int counts with float rates and fail
under 'strict'; our code makes its dtypes explicit instead, and tests check output dtypes.
"""
import jax

jax.config.update("jax_numpy_rank_promotion", "raise")
