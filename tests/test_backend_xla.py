"""The shared backend cases on implementation="xla" (any platform; supports every option)."""

from backend_cases import BackendTestBase


class TestXla(BackendTestBase):
  implementation = "xla"
  supports_mask = True
  supports_small_block_q = True
