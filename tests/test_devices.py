"""devices.is_hopper: our Mosaic GPU kernels (wgmma) only on compute capability 9.x."""

import types
from unittest import mock

import jax
import pytest

from distrattention_jax import devices


@pytest.mark.parametrize("capability,hopper", [("9.0", True), ("9.0a", True),
                                               ("8.6", False), ("10.0", False),
                                               ("12.0", False)])
def test_hopper_is_capability_nine_only(capability, hopper):
  devices.is_hopper.cache_clear()
  try:
    with mock.patch.object(jax, "default_backend", return_value="gpu"), \
        mock.patch.object(jax, "devices", return_value=[
            types.SimpleNamespace(compute_capability=capability)]):
      assert devices.is_hopper() is hopper
  finally:
    devices.is_hopper.cache_clear()


def test_not_hopper_off_the_gpu_or_without_a_capability():
  devices.is_hopper.cache_clear()
  try:
    with mock.patch.object(jax, "default_backend", return_value="cpu"):
      assert not devices.is_hopper()
    devices.is_hopper.cache_clear()
    with mock.patch.object(jax, "default_backend", return_value="gpu"), \
        mock.patch.object(jax, "devices", return_value=[types.SimpleNamespace()]):
      assert not devices.is_hopper()
  finally:
    devices.is_hopper.cache_clear()
