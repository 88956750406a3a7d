"""One definition per loss: the public function and its plain-JAX twin.

A loss is declared once, as a *front*: a function whose first parameter is an
``impl`` and whose other parameters are the public signature. The front does
all argument handling (checks, axes, masks, dtypes) and calls its differentiable
core through ``impl(rule)``. :func:`loss` turns the front into the public
function, where ``impl(rule)`` is the rule's ``custom_vjp``, and registers its
:mod:`jaxent.reference` twin, where ``impl(rule)`` is the rule's plain formula.
The two share every check, error and reduction by construction and differ only
in how the gradient is obtained. Both run under ``jax.jit`` with their options
static, as ``jax.nn``'s functions do (see :func:`_jitted`).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import types
import warnings
from collections.abc import Callable

import jax
import numpy as np

from ._sharding import align_vma


@dataclasses.dataclass(frozen=True)
class Rule:
    """A differentiable core written twice, with one call signature.

    Attributes:
      custom: the ``jax.custom_vjp`` function (analytic backward).
      plain: the same formula in plain JAX (autodiff, forward mode).
      diff: positions of the arguments that receive cotangents. Before either
        is called, these are aligned inside ``shard_map`` to vary over every
        mesh axis any array argument varies over (see
        :func:`jaxent._sharding.align_vma`), so no loss can skip that step.
      exclude: position of a static argument naming mesh axes to leave out of
        that alignment (an axis the backward sums over itself), or None.
    """

    custom: Callable
    plain: Callable
    diff: tuple[int, ...]
    exclude: int | None = None

    def call(self, fn: Callable, args: tuple):
        arrays = [i for i, a in enumerate(args) if hasattr(a, "shape")]
        diff = [i for i in self.diff if args[i] is not None]
        others = tuple(args[i] for i in arrays if i not in diff)
        exclude = frozenset()
        if self.exclude is not None and args[self.exclude] is not None:
            name = args[self.exclude]
            exclude = frozenset(name if isinstance(name, tuple) else (name,))
        aligned = align_vma(tuple(args[i] for i in diff), others, exclude)
        args = list(args)
        for i, a in zip(diff, aligned, strict=True):
            args[i] = a
        return fn(*args)


class Impl:
    """Which half of every :class:`Rule` a front calls."""

    def __init__(self, plain: bool):
        self.plain = plain

    def __call__(self, rule: Rule) -> Callable:
        fn = rule.plain if self.plain else rule.custom
        return functools.partial(_call, rule, fn)

    def __repr__(self):
        return "PLAIN" if self.plain else "CUSTOM"


def _call(rule: Rule, fn: Callable, *args):
    return rule.call(fn, args)


CUSTOM = Impl(plain=False)
PLAIN = Impl(plain=True)


@dataclasses.dataclass(frozen=True)
class Definition:
    """A registered loss: its name, input kinds, public function and twin.

    ``inputs`` names the kind of each positional array argument, for tests and
    benchmarks that draw inputs for every loss: ``"logits"``, ``"probs"``,
    ``"log_probs"``, ``"class_ids"``, ``"binary"`` (labels in [0, 1] of the
    logits' shape), ``"hidden"``, ``"weight"``, ``"teacher_hidden"`` and
    ``"teacher_weight"`` (a distillation teacher's head: another hidden size,
    the same vocabulary). ``where`` says which masks the ``where`` argument
    takes: ``"both"`` (a class mask of the logits' shape or an example mask of
    the batch shape), ``"classes"`` or ``"rows"``.
    """

    name: str
    inputs: tuple[str, ...]
    public: Callable
    reference: Callable
    where: str = "both"

    @property
    def parameters(self) -> dict[str, inspect.Parameter]:
        return dict(inspect.signature(self.public).parameters)


REGISTRY: dict[str, Definition] = {}


# Options a front checks differently when concrete (a concrete array is
# checked at its extremes, a traced one is not): such an array argument keeps
# the un-jitted call so that its checks stay as they are.
_CHECKED_WHEN_CONCRETE = frozenset({"epsilon", "alpha", "gamma"})
_NUMERIC_KINDS = frozenset("biufc")


def _static_key(value):
    """``value`` as a hashable jit cache key that tells types apart (``1``,
    ``1.0`` and ``True`` select different programs: the checks treat them
    differently), or None when it is not hashable."""
    if type(value) is tuple:
        items = tuple(_static_key(v) for v in value)
        return None if None in items else (tuple, items)
    try:
        hash(value)
    except TypeError:
        return None
    return (type(value), value)


def _from_key(key):
    kind, value = key
    return tuple(_from_key(k) for k in value) if kind is tuple else value


def _jitted(front: Callable, impl: Impl) -> Callable:
    """``front`` with ``impl`` bound, run under ``jax.jit``, as ``jax.nn``
    does: an eager call compiles and dispatches one program, not every
    primitive on its own, and a user's ``jax.jit`` sees one nested call.

    Arrays (``jax.Array``, including tracers, and numeric NumPy arrays) given to
    an ``ArrayLike`` parameter are traced; every other argument is static, as
    given, so the front sees exactly what it saw un-jitted and raises the same
    errors at trace time. What jit can't take as it is (a list, an unhashable
    option, an array for an option that must be static) and calls that don't
    bind (the front's own TypeError) keep the un-jitted call.
    """
    params = list(inspect.signature(front).parameters.values())[1:]
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    if any(p.kind not in named for p in params):
        raise TypeError(f"{front.__name__}: a front takes named parameters only.")
    names = frozenset(p.name for p in params)
    positional = tuple(p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD)
    arrays = frozenset(p.name for p in params if "ArrayLike" in str(p.annotation))
    traced_ok = arrays - _CHECKED_WHEN_CONCRETE

    def run(static, *values):
        fixed, traced = static
        kwargs = {name: _from_key(key) for name, key in fixed}
        kwargs.update(zip(traced, values, strict=True))
        return front(impl, **kwargs)

    def run_positional(*values):
        return front(impl, *values)

    for f in (run, run_positional):
        f.__name__ = f.__qualname__ = front.__name__
    compiled = jax.jit(run, static_argnums=0)
    # The usual call, arrays by position and nothing else, skips the sorting
    # below and jit's hashing of a static argument (a third of its time).
    by_position = jax.jit(run_positional)
    fast = next(
        (i for i, name in enumerate(positional) if name not in traced_ok),
        len(positional),
    )

    def call(args: tuple, kwargs: dict):
        if not kwargs and len(args) <= fast:
            for value in args:
                if not isinstance(value, jax.Array) and not (
                    isinstance(value, np.ndarray) and value.dtype.kind in _NUMERIC_KINDS
                ):
                    break
            else:
                return by_position(*args)
        if len(args) > len(positional) or not names.issuperset(kwargs):
            return front(impl, *args, **kwargs)
        fixed, traced, values = [], [], []
        for name, value in zip(positional, args, strict=False):
            if name in kwargs:
                return front(impl, *args, **kwargs)
            if not _split(name, value, fixed, traced, values):
                return front(impl, *args, **kwargs)
        for name, value in kwargs.items():
            if not _split(name, value, fixed, traced, values):
                return front(impl, *args, **kwargs)
        return compiled((tuple(fixed), tuple(traced)), *values)

    call.jitted = (by_position, compiled)

    def _split(name, value, fixed, traced, values) -> bool:
        if isinstance(value, jax.Array):
            if name not in traced_ok and not (
                name in arrays and isinstance(value, jax.core.Tracer)
            ):
                return False
        elif isinstance(value, np.ndarray):
            if name not in traced_ok or value.dtype.kind not in _NUMERIC_KINDS:
                return False
        else:
            key = _static_key(value)
            if key is None:
                return False
            fixed.append((name, key))
            return True
        traced.append(name)
        values.append(value)
        return True

    return call


def _bind(front: Callable, impl: Impl) -> Callable:
    """``front`` with ``impl`` bound and jitted (see :func:`_jitted`), as a
    function of ``front``'s module (so doctest and Sphinx find it there) with
    the signature less ``impl``; its ``_jitted`` holds the ``jax.jit``
    objects (tests count their traces)."""
    run = _jitted(front, impl)

    def call(*args, **kwargs):
        return run(args, kwargs)

    fn = types.FunctionType(
        call.__code__, front.__globals__, front.__name__, None, call.__closure__
    )
    functools.update_wrapper(fn, front)
    del fn.__wrapped__
    sig = inspect.signature(front)
    fn.__signature__ = sig.replace(parameters=list(sig.parameters.values())[1:])
    fn._jitted = run.jitted
    return fn


def loss(*inputs: str, where: str = "both") -> Callable[[Callable], Callable]:
    """Declares a front as a loss: returns its public function and registers
    its :mod:`jaxent.reference` twin. ``inputs`` are the kinds of its positional
    array arguments and ``where`` the masks it takes (see :class:`Definition`)."""

    def register(front: Callable) -> Callable:
        public = _bind(front, CUSTOM)
        twin = _bind(front, PLAIN)
        name = front.__name__
        twin.__module__ = "jaxent.reference"
        twin.__qualname__ = name
        twin.__doc__ = (
            f"Plain-JAX twin of :func:`jaxent.{name}`: same arguments, checks, "
            "errors and values, differentiated by JAX's autodiff (forward mode "
            "included)."
        )
        REGISTRY[name] = Definition(name, tuple(inputs), public, twin, where)
        return public

    return register


def _renamed(
    fn: Callable, old: str, new: str, deprecation: str | None = None
) -> Callable:
    """``fn`` whose argument errors (``"old: `arg` ..."``) name ``new``, and
    that warns ``deprecation`` (a ``DeprecationWarning``) when given one."""

    def call(*args, **kwargs):
        if deprecation is not None:
            warnings.warn(deprecation, DeprecationWarning, stacklevel=2)
        try:
            return fn(*args, **kwargs)
        except (TypeError, ValueError) as e:
            msg = str(e)
            if type(e) not in (TypeError, ValueError) or not msg.startswith(old + ":"):
                raise
            raise type(e)(new + msg[len(old) :]) from None

    return call


def alias(
    name: str, target: Callable, note: str, deprecation: str | None = None
) -> Callable:
    """Registers ``name`` as another name of the loss ``target`` (optax keeps
    deprecated aliases); returns the public function. With ``deprecation``,
    both it and its twin warn that message as a ``DeprecationWarning``."""
    base = REGISTRY[target.__name__]
    renamed = functools.partial(
        _renamed, old=base.name, new=name, deprecation=deprecation
    )
    public = functools.wraps(base.public)(renamed(base.public))
    twin = functools.wraps(base.reference)(renamed(base.reference))
    for fn, of in ((public, base.public), (twin, base.reference)):
        fn.__name__ = fn.__qualname__ = name
        del fn.__wrapped__
        fn._jitted = of._jitted
        fn.__signature__ = inspect.signature(base.public)
    public.__doc__ = f"Another name of :func:`jaxent.{base.name}`. {note}"
    twin.__doc__ = f"Another name of :func:`jaxent.reference.{base.name}`."
    REGISTRY[name] = Definition(name, base.inputs, public, twin, base.where)
    return public
