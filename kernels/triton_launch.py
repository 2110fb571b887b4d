"""How kernels/ decides between a Triton kernel and its torch reference, and launches it.

Triton is an optional dependency (the `gpu` extra): every kernel module must
import, and every op must work through its torch reference, without it. This
module holds that decision and the launch plumbing, nothing else: no kernels,
no maths.

Kernels are wrapped in `TritonKernel` instead of `triton.jit` so that the
choice between compiled code and Triton's CPU interpreter (`TRITON_INTERPRET=1`)
is made at launch time. `triton.jit` makes it once, when the kernel's module is
imported, and triton's own library functions when triton is imported; both
would make the tests depend on import order.
"""
from __future__ import annotations

import contextlib
import os
import sys
import types

import torch

try:  # Triton is optional: without it every op runs its torch reference.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    # Kernel signatures annotate compile-time arguments with `tl.constexpr`;
    # this stand-in lets those definitions execute (they are never launched).
    tl = types.SimpleNamespace(constexpr=object())

HAVE_TRITON = triton is not None


def interpreting() -> bool:
    """True when Triton's CPU interpreter is requested (TRITON_INTERPRET=1) right now."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def should_use_triton(use_triton: bool | None, *tensors: torch.Tensor) -> bool:
    """Resolve an op's `use_triton` argument.

    None (default): Triton when triton is installed, the tensors are on CUDA and
    the interpreter is off; the torch reference otherwise (the CPU fallback).
    True: Triton or a clear error (CPU tensors need TRITON_INTERPRET=1).
    False: always the torch reference.
    """
    on_cuda = all(t.is_cuda for t in tensors)
    if use_triton is None:
        return HAVE_TRITON and on_cuda and not interpreting()
    if not use_triton:
        return False
    if not HAVE_TRITON:
        raise RuntimeError("use_triton=True needs the 'triton' package: pip install 'parafill[gpu]'")
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"all tensors of one kernel call must be on one device, got {sorted(map(str, devices))}")
    if not on_cuda and not interpreting():
        raise RuntimeError(
            "use_triton=True with CPU tensors runs Triton's CPU interpreter, which must be "
            "switched on: set the environment variable TRITON_INTERPRET=1"
        )
    return True


class TritonKernel:
    """A Triton kernel whose compiled/interpreted form is chosen when it is launched.

    `kernel[grid](*args, **meta)` works as with `triton.jit`.
    """

    def __init__(self, fn):
        self.fn = fn
        self.__name__ = fn.__name__
        self.__doc__ = fn.__doc__
        self._compiled = None
        self._interpreted = None

    def _implementation(self):
        if not HAVE_TRITON:
            raise RuntimeError(f"{self.__name__} needs the 'triton' package: pip install 'parafill[gpu]'")
        if interpreting():
            if self._interpreted is None:
                from triton.runtime.interpreter import InterpretedFunction

                self._interpreted = InterpretedFunction(self.fn)
            return self._interpreted
        if self._compiled is None:
            self._compiled = triton.jit(self.fn)
        return self._compiled

    def __getitem__(self, grid):
        launch = self._implementation()[grid]
        if not interpreting():
            return launch

        def interpreted_launch(*args, **kwargs):
            with _language_interpretable():
                return launch(*args, **kwargs)

        return interpreted_launch


# Triton decides at import time whether its own library functions (tl.sum, tl.max,
# tl.argmax, tl.cdiv, ...) are compiled (`JITFunction`) or interpreted: when
# triton was imported before TRITON_INTERPRET=1 was set, calling them from an
# interpreted kernel fails ("Cannot call @triton.jit'd outside of the scope of
# a kernel"). For the length of one interpreted launch, swap them for
# interpreted twins, so the interpreter does not depend on import order.
_INTERPRETED_TWINS: dict[int, tuple[object, object]] = {}  # id -> (jit function kept alive, twin)


def _interpreted_twin(jit_fn):
    entry = _INTERPRETED_TWINS.get(id(jit_fn))
    if entry is None:
        from triton.runtime.interpreter import InterpretedFunction

        entry = _INTERPRETED_TWINS[id(jit_fn)] = (jit_fn, InterpretedFunction(jit_fn.fn))
    return entry[1]


@contextlib.contextmanager
def _language_interpretable():
    from triton.runtime.jit import JITFunction

    owners = [m for name, m in list(sys.modules.items()) if name.startswith("triton.language") and m is not None]
    owners.append(tl.tensor)  # tensor methods such as x.sum() are library functions too
    swapped = []
    for owner in owners:
        for name, value in list(vars(owner).items()):
            if isinstance(value, JITFunction):
                swapped.append((owner, name, value))
                setattr(owner, name, _interpreted_twin(value))
    try:
        yield
    finally:
        for owner, name, value in swapped:
            setattr(owner, name, value)


def triton_kernel(fn) -> TritonKernel:
    """Decorator used in place of `@triton.jit` for every kernel in kernels/."""
    return TritonKernel(fn)


def next_power_of_2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def multiprocessor_count(device: torch.device) -> int:
    """SMs of a CUDA device (used to size split-K grids); a nominal value elsewhere."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 8
