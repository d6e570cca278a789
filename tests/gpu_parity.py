"""Kept for modules that import `tests.gpu_parity` (tests/test_mosaic_gpu.py): the shared
helpers live in tests/conftest.py."""

from conftest import random_inputs, rel_error, requires_gpu  # noqa: F401
