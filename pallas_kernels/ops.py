"""Entry point from `distrattention_jax` into the Pallas kernels (placeholder until they land)."""


def supports(masks, dtype):
  """Returns None if the kernels support these options, else a description of what not."""
  del masks, dtype
  return "anything yet: the Pallas kernels have not landed"


def distr_attention_pallas(*args, **kwargs):
  raise NotImplementedError("the Pallas kernels have not landed; use implementation='xla'")
