"""Layering: `pallas_kernels/` holds kernels only and imports nothing from the library."""

import ast
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _imports(path):
  tree = ast.parse(open(path).read(), path)
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      yield from (alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      yield node.module


def test_pallas_kernels_import_nothing_from_distrattention_jax():
  offenders = []
  for folder, _, files in os.walk(os.path.join(ROOT, "pallas_kernels")):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(folder, name)
        offenders += [f"{os.path.relpath(path, ROOT)}: {m}" for m in _imports(path)
                      if m.split(".")[0] == "distrattention_jax"]
  assert not offenders, offenders


def test_importing_every_kernel_module_loads_no_library_module():
  modules = sorted(
      os.path.relpath(os.path.join(folder, name), ROOT)[:-3].replace(os.sep, ".")
      .removesuffix(".__init__")
      for folder, _, files in os.walk(os.path.join(ROOT, "pallas_kernels"))
      for name in files if name.endswith(".py"))
  code = ("import importlib, sys\n"
          f"for m in {modules!r}: importlib.import_module(m)\n"
          "bad = [m for m in sys.modules if m.split('.')[0] == 'distrattention_jax']\n"
          "assert not bad, bad\n")
  result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, PYTHONPATH=ROOT))
  assert result.returncode == 0, result.stderr[-3000:]
