"""DistrAttention for JAX: attention with the head dimension grouped per query block."""

from distrattention_jax.attention import distr_attention
from distrattention_jax.config import DistrConfig
from distrattention_jax.flax_layers import (DistrMultiHeadAttention,
                                            DistrMultiHeadDotProductAttention,
                                            LowrankMaps, make_attention_fn)
from distrattention_jax.grouping import HeadReduction, block_permutations
from distrattention_jax.reference import distr_attention_reference, exact_attention

__all__ = [
    "DistrConfig",
    "DistrMultiHeadAttention",
    "DistrMultiHeadDotProductAttention",
    "HeadReduction",
    "LowrankMaps",
    "make_attention_fn",
    "block_permutations",
    "distr_attention",
    "distr_attention_reference",
    "exact_attention",
]
__version__ = "0.1.0"
