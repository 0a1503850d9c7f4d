"""Triton kernels of tao-fast, installed as `tao_fast.kernels`.

One file per op holds its `_kernel`s, the host wrapper that checks shapes and strides, and the
`autograd.Function`. `reference.py` is the torch spec of each op and the CPU fallback. Import
the ops through `tao_fast.ops`, which picks the backend.
"""
