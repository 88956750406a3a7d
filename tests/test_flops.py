"""Matmul FLOPs of the fused heads, counted in their jaxprs
(:mod:`benchmarks._flops`), against the same losses on materialized logits
(their ``jaxent.reference`` twins: three ``N x D x V`` matmuls for the student,
one for a distillation teacher). The scalar reductions compute the gradient in
the forward pass: no more matmuls than materialized logits; ``"none"`` and
``low_memory=True`` recompute the logits in the backward (one more)."""

import jax
import jax.numpy as jnp
import pytest

import jaxent
from benchmarks._flops import matmul_flops

# Several token chunks and vocabulary blocks of the default tiles, and a
# teacher with a hidden size of its own.
N, D, DT, V = 1024, 16, 24, 8192
S = jax.ShapeDtypeStruct
ARGS = {
    "h": S((N, D), jnp.float32),
    "w": S((D, V), jnp.float32),
    "th": S((N, DT), jnp.float32),
    "tw": S((DT, V), jnp.float32),
    "b": S((V,), jnp.float32),
    "y": S((N,), jnp.int32),
    "tok": S((N,), jnp.float32),
    "ids": S((N, 32), jnp.int32),
    "lq": S((N, 32), jnp.float32),
}
EVERY_CE = dict(label_smoothing=0.1, z_loss=1e-4, softcap=30.0)
DISTILL = dict(temperature=2.0, hard_weight=0.5)


def _head(name, reduction, **kw):
    """The loss as a function of ``(h, w, b, th, tw, y, tok)``, summed when
    per token."""

    def loss(h, w, b, th, tw, y, tok):
        if name == "ce":
            out = fn(h, w, y, bias=b, token_weights=tok, reduction=reduction, **kw)
        else:
            out = fn(
                h, w, th, tw, y, bias=b, token_weights=tok, reduction=reduction, **kw
            )
        return jnp.sum(out)

    module = jaxent if not kw.pop("materialized", False) else jaxent.reference
    fn = getattr(
        module,
        "linear_softmax_cross_entropy"
        if name == "ce"
        else "linear_softmax_distillation",
    )
    return loss


def _flops(loss, argnums=(0, 1, 2)):
    a = ARGS
    args = (a["h"], a["w"], a["b"], a["th"], a["tw"], a["y"], a["tok"])
    if argnums is None:
        return matmul_flops(loss, *args)
    return matmul_flops(jax.value_and_grad(loss, argnums), *args)


CASES = [
    ("ce", "mean", EVERY_CE),
    ("ce", "sum", {}),
    *(("distill", "mean", dict(DISTILL, beta=beta)) for beta in (0.0, 0.5, 1.0)),
    ("distill", "sum", dict(beta=0.5, softcap=30.0)),
]


@pytest.mark.parametrize(("name", "reduction", "kw"), CASES)
def test_scalar_reductions_cost_what_materialized_logits_cost(name, reduction, kw):
    fused = _flops(_head(name, reduction, **kw))
    materialized = _flops(_head(name, reduction, materialized=True, **kw))
    assert fused <= 1.02 * materialized, fused / materialized


@pytest.mark.parametrize("name", ["ce", "distill"])
@pytest.mark.parametrize("how", ["none", "low_memory"])
def test_recompute_path_costs_one_more_matmul(name, how):
    kw = {} if name == "ce" else dict(DISTILL, beta=0.0)
    reduction = "none" if how == "none" else "mean"
    if how == "low_memory":
        kw["low_memory"] = True
    fused = _flops(_head(name, reduction, **kw))
    materialized = _flops(_head(name, reduction, materialized=True, **kw))
    limit = 1.34 if name == "ce" else 1.6
    assert fused <= limit * materialized, fused / materialized


def test_forward_only_and_frozen_head_skip_gradient_matmuls():
    one = 2 * N * D * V
    loss = _head("ce", "mean")
    assert _flops(loss, None) <= 1.02 * one
    assert _flops(loss, (0,)) <= 2.02 * one  # d hidden alone (a frozen head)
    assert _flops(loss, (1,)) <= 2.02 * one  # d weight alone
    teacher = 2 * N * DT * V
    distill = _head("distill", "mean", beta=0.5)
    assert _flops(distill, (0,)) <= 2.02 * one + teacher


@pytest.mark.parametrize(("low_memory", "matmuls"), [(False, 4), (True, 5)])
def test_checkpointed_head_reruns_its_forward_once(low_memory, matmuls):
    # Under jax.checkpoint the forward keeps only the logits matmul (the
    # gradient matmuls are not needed there) and the backward reruns the pass.
    def loss(h, w, b, th, tw, y, tok):
        return jaxent.linear_softmax_cross_entropy(
            h, w, y, reduction="mean", low_memory=low_memory
        )

    one = 2 * N * D * V
    assert _flops(jax.checkpoint(loss), (0, 1)) == matmuls * one


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_topk_head_costs_what_materialized_logits_cost(reduction):
    # No teacher matmul; three student matmuls for a scalar reduction.
    def loss(module):
        def f(h, w, b, ids, lq, y, tok):
            out = module.linear_topk_distillation(
                h,
                w,
                ids,
                lq,
                y,
                bias=b,
                token_weights=tok,
                hard_weight=0.5,
                temperature=2.0,
                reduction=reduction,
            )
            return jnp.sum(out)

        return f

    a = ARGS
    args = (a["h"], a["w"], a["b"], a["ids"], a["lq"], a["y"], a["tok"])
    vg = [
        matmul_flops(jax.value_and_grad(loss(m), (0, 1, 2)), *args)
        for m in (jaxent, jaxent.reference)
    ]
    assert vg[0] <= 1.02 * vg[1] == 1.02 * 3 * 2 * N * D * V, vg
