"""What the kernel files share: how Triton runs here, the device checks, the debug poison, the
GPU's shared-memory limit, and the backend="auto" fallback to the torch reference.

Importable without triton (an optional dependency): `tao_fast.ops` asks `interpreting()` before
it knows whether any kernel will run.
"""
from __future__ import annotations

import os
import warnings

import torch

try:  # triton is optional; without it no kernel runs, so there is no kernel error to catch
    from triton.compiler.errors import CompilationError
    from triton.errors import TritonError
except ImportError:  # pragma: no cover - the test environment has triton
    CompilationError = TritonError = None

# Shared memory one block may use on H100 / H200 (sm_90, opt-in maximum: 227 KiB). Every GPU
# config in kernels/*.py is chosen to fit under it (tests/kernels/test_sm90_compile.py checks).
SMEM_LIMIT = 232_448
SM90_MULTIPROCESSORS = 132  # H100 SXM / H200; meta tensors (offline compile) assume it

# Errors that mean "this kernel cannot compile or launch here": OutOfResources (shared memory,
# threads), CompilationError (the Triton frontend), PTXASError, and the interpreter's errors.
# MLIR pass failures surface as plain RuntimeError and are not caught (they raise).
KERNEL_ERRORS: tuple[type[BaseException], ...] = (TritonError,) if TritonError else ()

DEBUG_POISON = False  # tests set True: kernel outputs and scratch start as NaN, so unwritten shows


def interpreting() -> bool:
    """True when kernels run in the Triton interpreter (TRITON_INTERPRET=1) on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_device(op: str, *tensors: torch.Tensor) -> None:
    """Raise unless the tensors are where `op`'s kernels can run: CUDA, CPU under the interpreter,
    or meta (Triton's launch path without data: the offline compile test drives it so)."""
    for t in tensors:
        kind = t.device.type
        if kind not in ("cuda", "meta") and not (kind == "cpu" and interpreting()):
            raise ValueError(f"Triton {op} needs CUDA tensors (or TRITON_INTERPRET=1), got device "
                             f"{t.device}")


def multiprocessor_count(device: torch.device) -> int:
    """SMs of a CUDA device (meta: an H100's 132, as the offline compile assumes)."""
    if device.type == "meta":
        return SM90_MULTIPROCESSORS
    return torch.cuda.get_device_properties(device).multi_processor_count


def empty(*shape: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.empty of a floating dtype, or all-NaN while DEBUG_POISON is set."""
    if DEBUG_POISON:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def empty_like(x: torch.Tensor) -> torch.Tensor:
    """`empty` with x's shape, dtype and device (contiguous)."""
    return empty(*x.shape, dtype=x.dtype, device=x.device)


_FAILED: dict[tuple, str] = {}  # (op, variant key) -> why its kernels cannot run here
_WARNED: set[tuple[str, str]] = set()


def warn_fallback(op: str, reason: str) -> None:
    """One RuntimeWarning per (op, reason) for the process: the torch reference runs instead."""
    if (op, reason) in _WARNED:
        return
    _WARNED.add((op, reason))
    warnings.warn(f"tao_fast {op}: the Triton kernel cannot run ({reason}); backend='auto' uses "
                  f"the torch reference instead", RuntimeWarning, stacklevel=4)


def _describe(err: BaseException, key: tuple) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()] or [""]
    # a CompilationError starts with the kernel source and ends with what went wrong
    line = lines[-1] if CompilationError and isinstance(err, CompilationError) else lines[0]
    return f"{type(err).__name__} for {', '.join(map(str, key))}: {line[:300]}"


def run_or_fallback(op: str, key: tuple, fallback: bool, kernel, reference, unsupported=None):
    """`kernel()`; with `fallback` (backend="auto"), `reference()` where the kernel cannot run.

    `unsupported` (a reason string) says up front that the kernels do not cover these inputs:
    a ValueError without fallback. A kernel error (KERNEL_ERRORS) re-raises without fallback;
    with it, the reason is kept for (op, key), so later calls go to the reference at once
    instead of recompiling a kernel that failed. key: what the kernel variant depends on
    (e.g. dtype and head dim)."""
    if unsupported is not None:
        if not fallback:
            raise ValueError(unsupported)
        warn_fallback(op, unsupported)
        return reference()
    if not fallback:
        return kernel()
    reason = _FAILED.get((op, key))
    if reason is None:
        try:
            return kernel()
        except KERNEL_ERRORS as err:
            reason = _FAILED[(op, key)] = _describe(err, key)
    warn_fallback(op, reason)
    return reference()


def reference_grads(fn, inputs, needs, grad_outputs):
    """Gradients of `fn(*inputs)` (a tuple of outputs, None allowed) w.r.t. the inputs whose
    `needs` flag is set, None for the others: torch autograd through the reference op, for a
    backward whose kernel cannot run."""
    with torch.enable_grad():
        xs = [x.detach().requires_grad_(bool(n)) for x, n in zip(inputs, needs)]
        outs = fn(*xs)
        pairs = [(o, g) for o, g in zip(outs, grad_outputs) if o is not None and g is not None]
        wrt = [x for x, n in zip(xs, needs) if n]
        grads = iter(torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs],
                                         allow_unused=True))
    return tuple(next(grads) if n else None for n in needs)
