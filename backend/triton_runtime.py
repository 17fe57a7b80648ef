"""What the Triton kernels share: whether they run in Triton's interpreter, and loop bounds
that work both compiled and interpreted."""

from __future__ import annotations

import triton
import triton.language as tl

# Kernels decorated under TRITON_INTERPRET=1 run in Triton's interpreter (the CPU tests).
INTERPRETED = tl.constexpr(triton.knobs.runtime.interpret)


@triton.jit
def loop_bound(x):
    """A runtime loop bound: itself when compiled; a Python int in the interpreter, whose
    range() cannot index its one-element scalars under numpy >= 2.4 (Triton issue 9171). Call it
    inside range(): the interpreter turns every assigned value back into a tensor."""
    if INTERPRETED:
        return x.handle.data.item()
    else:
        return x
