"""Sharded DistrAttention on 4 fake CPU devices, each check in a separate process
(XLA_FLAGS must be set before JAX starts)."""

import os
import subprocess
import sys


def _run_check(script: str, ok_line: str):
  result = subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), script)],
                          capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  assert ok_line in result.stdout


def test_sharded_equals_unsharded_without_collectives():
  """`sharding=` over batch/heads: tests/sharding_check.py."""
  _run_check("sharding_check.py", "SHARDING OK")


def test_plain_jit_sharded_inputs_partition_without_collectives():
  """Batch/head-sharded inputs under plain jit (no `sharding=`):
  tests/sharding_plain_jit_check.py."""
  _run_check("sharding_plain_jit_check.py", "PLAIN JIT SHARDING OK")
