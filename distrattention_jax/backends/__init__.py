"""The backends and their registry: the only list of them.

`REGISTRY` is in preference order: `implementation=None` picks the first selectable
backend that supports the call (`supports(problem) is None`) and prefers it
(`preferred_for(problem)`: False where a later backend was measured faster) on the
platform in use (GPU backends only when `jax.default_backend() == "gpu"`). `ALIASES` keeps older names.
To add a backend: write a `base.Backend` subclass in a module here and put an instance
in `REGISTRY` at its place in the preference order (docs/DESIGN.md, "How to add a
backend"); `distr_attention`, validation and the error messages pick it up from here.
"""

from __future__ import annotations

from distrattention_jax.backends import base
from distrattention_jax.backends import cudnn
from distrattention_jax.backends import mosaic
from distrattention_jax.backends import triton
from distrattention_jax.backends import xla

Backend = base.Backend
Problem = base.Problem

REGISTRY: tuple[base.Backend, ...] = (
    mosaic.MosaicBackend(),   # Hopper, our kernels (pallas_kernels/mosaic_gpu)
    cudnn.CudnnBackend(),
    triton.TritonBackend(),
    triton.TritonBackend(interpret=True),
    xla.XlaBackend(),
)

# Documented aliases: the Triton kernels were "pallas" before there were two Pallas
# backends (tokamax names them "triton" and "mosaic").
ALIASES = {"pallas": "triton", "pallas_interpret": "triton_interpret"}


def names() -> tuple[str, ...]:
  """Every accepted `implementation` name (registry order, then aliases)."""
  return tuple(b.name for b in REGISTRY) + tuple(ALIASES)


def get(name: str) -> base.Backend:
  """The backend called `name` (or an alias of it)."""
  name = ALIASES.get(name, name)
  for backend in REGISTRY:
    if backend.name == name:
      return backend
  raise ValueError(f"implementation must be None or one of {names()}, got {name!r}")


def _runs_here(backend: base.Backend, problem: base.Problem) -> bool:
  return not backend.needs_gpu or problem.platform == "gpu"


def select(implementation: str | None, problem: base.Problem) -> base.Backend:
  """The backend to run: the user's choice, checked, or the first that fits (None).

  Raises NotImplementedError (with the backend's reason) when the chosen backend does
  not support the call, and ValueError when it needs a GPU and there is none.
  """
  if implementation is None:
    for backend in REGISTRY:
      if (backend.selectable and _runs_here(backend, problem)
          and backend.supports(problem) is None and backend.preferred_for(problem)):
        return backend
    raise NotImplementedError("no backend supports this call")  # "xla" supports all
  backend = get(implementation)
  reason = backend.supports(problem)
  if reason is not None:
    others = [b.name for b in REGISTRY
              if b is not backend and b.selectable and b.supports(problem) is None]
    use = " or ".join(repr(n) for n in others)
    raise NotImplementedError(
        f"implementation={implementation!r} does not support {reason}; use "
        f"implementation={use} (or None to choose automatically)")
  if not _runs_here(backend, problem):
    raise ValueError(
        f"implementation={implementation!r} needs a GPU backend (jax.default_backend() is "
        f"{problem.platform!r}); {backend.off_gpu_hint}")
  return backend
