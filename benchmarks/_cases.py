"""The benchmark cases: one loss, three implementations, a mean reduction each.

Every case is a scalar loss of the same arguments written three ways: with
jaxent, with optax (the same-named function, or a composition of optax pieces
where optax lacks the option; ``optax_peer`` says which), and with
``jaxent.reference`` (plain autodiff of the same formula).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import optax

import jaxent
from jaxent import reference

IGNORE = -100
SMOOTHING = 0.1
Z_LOSS = 1e-4
# Share of examples that are ignored / masked out, and of classes masked out.
DROP_ROWS = 0.1
DROP_CLASSES = 0.01


@dataclass(frozen=True)
class Case:
    name: str
    title: str
    # (key, n, c, dtype) -> positional arguments of the three losses.
    make: Callable[..., tuple]
    argnums: tuple[int, ...]
    jaxent: Callable
    optax: Callable
    reference: Callable
    optax_peer: str


def _logits(key, n, c, dtype):
    return (2.0 * jax.random.normal(key, (n, c), jnp.float32)).astype(dtype)


def _int_args(key, n, c, dtype):
    kx, ky = jax.random.split(key)
    return _logits(kx, n, c, dtype), jax.random.randint(ky, (n,), 0, c)


def _ignored_args(key, n, c, dtype):
    x, y = _int_args(key, n, c, dtype)
    drop = jax.random.uniform(jax.random.fold_in(key, 1), (n,)) < DROP_ROWS
    return x, jnp.where(drop, IGNORE, y)


def _row_mask_args(key, n, c, dtype):
    x, y = _int_args(key, n, c, dtype)
    keep = jax.random.uniform(jax.random.fold_in(key, 1), (n,)) >= DROP_ROWS
    return x, y, keep


def _soft_args(key, n, c, dtype):
    kx, ky = jax.random.split(key)
    labels = jax.nn.softmax(_logits(ky, n, c, jnp.float32), axis=-1)
    return _logits(kx, n, c, dtype), labels.astype(dtype)


def _class_mask_args(key, n, c, dtype):
    x, labels = _soft_args(key, n, c, dtype)
    # A padded vocabulary: the last classes are never admissible.
    keep = (jnp.arange(c) < c - max(1, int(c * DROP_CLASSES)))[None, :]
    labels = jnp.where(keep, labels, 0.0).astype(dtype)
    return x, labels, keep


def _two_logits_args(key, n, c, dtype):
    kx, kt = jax.random.split(key)
    return _logits(kx, n, c, dtype), _logits(kt, n, c, dtype)


def _logits_args(key, n, c, dtype):
    return (_logits(key, n, c, dtype),)


def _binary_args(key, n, c, dtype):
    kx, ky = jax.random.split(key)
    y = jax.random.uniform(ky, (n, c), jnp.float32).astype(dtype)
    return _logits(kx, n, c, dtype), y


def _masked_mean(loss, keep):
    """Mean over kept examples; 0 when none is kept (jaxent's convention)."""
    return jnp.sum(jnp.where(keep, loss, 0.0)) / jnp.maximum(jnp.sum(keep), 1)


def _optax_ignored(x, y):
    keep = y != IGNORE
    loss = optax.losses.softmax_cross_entropy_with_integer_labels(
        x, jnp.where(keep, y, 0)
    )
    return _masked_mean(loss, keep)


def _optax_smoothed(x, y):
    target = optax.losses.smooth_labels(
        jax.nn.one_hot(y, x.shape[-1], dtype=x.dtype), SMOOTHING
    )
    return optax.losses.softmax_cross_entropy(x, target).mean()


def _optax_z_loss(x, y):
    loss = optax.losses.softmax_cross_entropy_with_integer_labels(x, y)
    lse = jax.nn.logsumexp(x.astype(jnp.float32), axis=-1)
    return (loss + Z_LOSS * lse**2).mean()


def _optax_row_mask(x, y, keep):
    loss = optax.losses.softmax_cross_entropy_with_integer_labels(x, y, where=keep)
    return _masked_mean(loss, keep)


def _int_kw(**kw):
    def jaxent_loss(x, y):
        return jaxent.softmax_cross_entropy_with_integer_labels(
            x, y, reduction="mean", **kw
        )

    def reference_loss(x, y):
        return reference.softmax_cross_entropy_with_integer_labels(
            x, y, reduction="mean", **kw
        )

    return jaxent_loss, reference_loss


def _int_case(name, title, make, optax_loss, optax_peer, **kw):
    jaxent_loss, reference_loss = _int_kw(**kw)
    return Case(
        name, title, make, (0,), jaxent_loss, optax_loss, reference_loss, optax_peer
    )


def _soft_case(name, title, argnums):
    def jaxent_loss(x, y):
        return jaxent.softmax_cross_entropy(x, y, reduction="mean")

    def optax_loss(x, y):
        return optax.losses.softmax_cross_entropy(x, y).mean()

    def reference_loss(x, y):
        return reference.softmax_cross_entropy(x, y, reduction="mean")

    return Case(
        name,
        title,
        _soft_args,
        argnums,
        jaxent_loss,
        optax_loss,
        reference_loss,
        "softmax_cross_entropy",
    )


def _cases() -> dict[str, Case]:
    cases = [
        _int_case(
            "int",
            "integer labels",
            _int_args,
            lambda x, y: optax.losses.softmax_cross_entropy_with_integer_labels(
                x, y
            ).mean(),
            "softmax_cross_entropy_with_integer_labels",
        ),
        _int_case(
            "int_ignore",
            f"integer labels, ignore_index ({DROP_ROWS:.0%} ignored)",
            _ignored_args,
            _optax_ignored,
            "composed: labels masked with jnp.where, mean = sum / count",
            ignore_index=IGNORE,
        ),
        _int_case(
            "int_smooth",
            f"integer labels, label_smoothing={SMOOTHING}",
            _int_args,
            _optax_smoothed,
            "composed: smooth_labels(one_hot(y)) + softmax_cross_entropy",
            label_smoothing=SMOOTHING,
        ),
        _int_case(
            "int_zloss",
            f"integer labels, z_loss={Z_LOSS}",
            _int_args,
            _optax_z_loss,
            "composed: + z * jax.nn.logsumexp(x)**2",
            z_loss=Z_LOSS,
        ),
    ]

    def jaxent_row_mask(x, y, keep):
        return jaxent.softmax_cross_entropy_with_integer_labels(
            x, y, where=keep, reduction="mean"
        )

    def reference_row_mask(x, y, keep):
        return reference.softmax_cross_entropy_with_integer_labels(
            x, y, where=keep, reduction="mean"
        )

    cases.append(
        Case(
            "int_where",
            f"integer labels, example mask `where` ({DROP_ROWS:.0%} out)",
            _row_mask_args,
            (0,),
            jaxent_row_mask,
            _optax_row_mask,
            reference_row_mask,
            "softmax_cross_entropy_with_integer_labels(where=), mean = sum / count",
        )
    )
    cases.append(_soft_case("soft", "soft labels, d/dlogits", (0,)))
    cases.append(
        _soft_case("soft_both", "soft labels, d/dlogits and d/dlabels", (0, 1))
    )

    def jaxent_class_mask(x, y, keep):
        return jaxent.softmax_cross_entropy(x, y, where=keep, reduction="mean")

    def optax_class_mask(x, y, keep):
        return optax.losses.softmax_cross_entropy(x, y, where=keep).mean()

    def reference_class_mask(x, y, keep):
        return reference.softmax_cross_entropy(x, y, where=keep, reduction="mean")

    cases.append(
        Case(
            "soft_where",
            f"soft labels, class mask `where` [1, C] ({DROP_CLASSES:.0%} out)",
            _class_mask_args,
            (0,),
            jaxent_class_mask,
            optax_class_mask,
            reference_class_mask,
            "softmax_cross_entropy(where=)",
        )
    )

    def jaxent_kl(x, t):
        return jaxent.softmax_kl_divergence(x, t, reduction="mean")

    def optax_kl(x, t):
        return optax.losses.kl_divergence_with_log_targets(
            jax.nn.log_softmax(x), jax.nn.log_softmax(t)
        ).mean()

    def reference_kl(x, t):
        return reference.softmax_kl_divergence(x, t, reduction="mean")

    cases.append(
        Case(
            "kl",
            "softmax_kl_divergence, d/dlogits and d/dtarget_logits",
            _two_logits_args,
            (0, 1),
            jaxent_kl,
            optax_kl,
            reference_kl,
            "composed: kl_divergence_with_log_targets(log_softmax(x), log_softmax(t))",
        )
    )
    cases.append(
        Case(
            "entropy",
            "softmax_entropy",
            _logits_args,
            (0,),
            lambda x: jnp.mean(jaxent.softmax_entropy(x)),
            lambda x: optax.losses.softmax_cross_entropy(x, jax.nn.softmax(x)).mean(),
            lambda x: jnp.mean(reference.softmax_entropy(x)),
            "composed: softmax_cross_entropy(x, jax.nn.softmax(x))",
        )
    )
    cases.append(
        Case(
            "log_softmax",
            "log_softmax (loss: mean of all entries)",
            _logits_args,
            (0,),
            lambda x: jnp.mean(jaxent.log_softmax(x)),
            lambda x: jnp.mean(jax.nn.log_softmax(x)),
            lambda x: jnp.mean(reference.log_softmax(x)),
            "jax.nn.log_softmax (optax has none; its losses use this one)",
        )
    )
    cases.append(
        Case(
            "bce",
            "sigmoid_binary_cross_entropy (mean over all entries)",
            _binary_args,
            (0,),
            lambda x, y: jaxent.sigmoid_binary_cross_entropy(x, y, reduction="mean"),
            lambda x, y: optax.losses.sigmoid_binary_cross_entropy(x, y).mean(),
            lambda x, y: reference.sigmoid_binary_cross_entropy(x, y, reduction="mean"),
            "sigmoid_binary_cross_entropy",
        )
    )
    return {case.name: case for case in cases}


CASES = _cases()
