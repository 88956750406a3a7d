"""Per-backend formulations, chosen when the program is lowered.

A few formulations are chosen per platform, from measurements with
``benchmarks/run.py``: XLA:CPU fuses a row reduction only over a select-free
expression with a single consumer, while GPU fusion recomputes shared
elementwise work by itself and fuses comparisons for free. The choice is made
by :func:`jax.lax.platform_dependent` at lowering, never from
``jax.default_backend()`` while tracing, so a program traced on a CPU host and
exported or compiled for GPUs carries the GPU formulation (and the other way
round). With one lowering platform, the other branch is pruned then.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
from jax import lax

from ._sharding import vary, vma


def per_platform(cpu: Callable, other: Callable, *args):
    """``cpu(*args)`` when lowered for XLA:CPU, ``other(*args)`` elsewhere."""
    return lax.platform_dependent(*args, cpu=cpu, default=other)


def _identity(v):
    return v


def fusion_barrier(v):
    """``lax.optimization_barrier`` on XLA:CPU, the identity elsewhere.

    On CPU it keeps an N x C expression used by two passes (``x - m`` of the
    forward and of the backward) from being computed once and written to
    memory. On GPU it only blocks fusion: softmax KL divergence forward and
    backward at 8192 x 128256 bfloat16 on an H100 took 8.6 ms with it and
    7.3 ms without.

    Inside ``shard_map`` the barrier gives all its outputs the mesh axes any of
    them varies over; the values are cast so first, so that both branches
    have one type.
    """
    leaves, tree = jax.tree.flatten(v)
    axes = frozenset().union(*(vma(a) for a in leaves))
    v = tree.unflatten([vary(a, axes) for a in leaves])
    return per_platform(lax.optimization_barrier, _identity, v)
