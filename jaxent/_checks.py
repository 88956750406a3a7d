"""Transitional re-exports: the helpers live in ``_args``, ``_numerics``,
``_sharding``, ``_reduction`` and ``_backend`` now."""

from ._args import (  # noqa: F401
    as_bool,
    as_float,
    as_int,
    check_fraction,
    check_index,
    check_nonnegative,
    check_reduction,
    describe,
)
from ._numerics import compute_dtype  # noqa: F401
from ._reduction import reduce_loss  # noqa: F401
from ._sharding import is_sharded, replicated, reshard, spec, vma  # noqa: F401
