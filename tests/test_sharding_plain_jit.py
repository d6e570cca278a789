"""Batch/head-sharded inputs under plain jit (no `sharding=`), 4 fake CPU devices, in a
separate process (XLA_FLAGS must be set before JAX starts)."""

import os
import subprocess
import sys


def test_plain_jit_sharded_inputs_partition_without_collectives():
  script = os.path.join(os.path.dirname(__file__), "sharding_plain_jit_check.py")
  result = subprocess.run([sys.executable, script], capture_output=True, text=True,
                          timeout=900)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  assert "PLAIN JIT SHARDING OK" in result.stdout
