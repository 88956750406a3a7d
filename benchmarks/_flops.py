"""Matmul FLOPs of a function, counted in its jaxpr.

What a program's matmuls cost predicts its accelerator time better than a CPU
timing does: each ``dot_general`` counts ``2 * prod(output) * prod(contracted
dims)``, a ``scan`` body counts times its length, a ``cond`` (a platform switch
included) counts its costliest branch, and nested calls (``jit``, custom rules)
count once.
"""

from __future__ import annotations

import math

import jax
from jax.extend import core


def _dot_flops(eqn) -> int:
    (contract, _), _ = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval.shape
    out = eqn.outvars[0].aval.shape
    return 2 * math.prod(out) * math.prod(lhs[i] for i in contract)


def _jaxprs(value):
    if isinstance(value, core.ClosedJaxpr):
        yield value.jaxpr
    elif isinstance(value, core.Jaxpr):
        yield value
    elif isinstance(value, tuple | list):
        for v in value:
            yield from _jaxprs(v)


def jaxpr_flops(jaxpr) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            total += _dot_flops(eqn)
        elif name == "cond":
            total += max(jaxpr_flops(b.jaxpr) for b in eqn.params["branches"])
        elif name == "scan":
            total += eqn.params["length"] * jaxpr_flops(eqn.params["jaxpr"].jaxpr)
        elif name == "while":
            raise ValueError("a while loop has no static trip count")
        else:
            for value in eqn.params.values():
                for sub in _jaxprs(value):
                    total += jaxpr_flops(sub)
    return total


def matmul_flops(fn, *args) -> int:
    """Matmul FLOPs of ``fn(*args)`` (arrays or ``jax.ShapeDtypeStruct``)."""
    return jaxpr_flops(jax.make_jaxpr(fn)(*args).jaxpr)
