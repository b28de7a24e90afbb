"""Checks of a model's or guide's layer sizes, shared by models and guides (so a guide never imports from a
model's file)."""
from __future__ import annotations

import numbers
from typing import Optional, Sequence

#: Deterministic hidden sizes of the IWAE paper: 200-200 next to x, 100-100 between stochastic layers.
IWAE_HIDDEN = ((200, 200), (100, 100))


def default_hidden(num_layers: int) -> tuple[tuple[int, ...], ...]:
    """The IWAE paper's hidden sizes for ``num_layers`` stochastic layers."""
    return tuple(IWAE_HIDDEN[min(i, 1)] for i in range(num_layers))


def check_layers(z_dims: Sequence[int], hidden: Optional[Sequence[Sequence[int]]]) -> tuple:
    """``(z_dims, hidden)`` as tuples, ``hidden`` defaulting to :func:`default_hidden`; ``ValueError`` for sizes
    that are not positive integers or a ``hidden`` without one entry per stochastic layer."""
    z_dims = tuple(int(d) for d in z_dims)
    if not z_dims or any(d < 1 for d in z_dims):
        raise ValueError(f"z_dims={z_dims} must be a non-empty sequence of positive sizes, e.g. (50,) or (100, 50)")
    hidden = default_hidden(len(z_dims)) if hidden is None else tuple(tuple(h) for h in hidden)
    if len(hidden) != len(z_dims):
        raise ValueError(f"hidden has {len(hidden)} entries but z_dims has {len(z_dims)}: give one hidden-size tuple per stochastic layer")
    for sizes in hidden:
        if any(isinstance(h, bool) or not isinstance(h, numbers.Integral) or h < 1 for h in sizes):
            raise ValueError(f"hidden={[list(h) for h in hidden]}: every hidden size must be a positive integer, e.g. hidden=[(200, 200)]")
    return z_dims, hidden


def check_z_dim(z_dim) -> int:
    """``z_dim`` if it is a positive int (the number of binary latent units), else ``ValueError``."""
    if isinstance(z_dim, bool) or not isinstance(z_dim, int) or z_dim < 1:
        raise ValueError(f"z_dim={z_dim!r} must be a positive int: the number K of binary latent units")
    return z_dim
