"""Pallas (Triton backend) kernels for DistrAttention. Arrays and tile sizes in, arrays out."""
