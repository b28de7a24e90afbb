"""Graph capture of training steps and evaluation chunks (:mod:`graphs`) and the FX passes applied to them
(:mod:`fx_passes`)."""

from pyrovae.capture.graphs import (  # noqa: F401
    GraphCache,
    MODES,
    _SHARED,
    grad_norm,
    identity,
    log,
    owner,
    shared_cache,
    weak_programs,
)
