"""Reconstruction fixed points of a beta-VAE and their phase transitions (Rezende & Viola 2018, Figure 2 and
Appendix A).

The latent space is compact, ``[0, 1]^2`` cut into a ``grid x grid`` lattice of K basis tiles z_k with a uniform
prior p(z_k) = 1/K; encoder and decoder are non-parametric: a table q(z_k | x_n) and one decoder point g(z_k) per
tile, with a Gaussian likelihood N(x; g(z), sigma^2 I). For fixed g the beta-VAE objective
E_q[log p(x | z)] - beta KL(q(z | x) || p(z)) is maximised by a Boltzmann distribution, and for fixed q the best
decoder is a weighted mean; the fixed points satisfy

    q(z_k | x_n) = softmax_k( -|x_n - g(z_k)|^2 / (2 sigma^2 beta) )
    g(z_k)       = sum_n q(z_k | x_n) x_n / sum_n q(z_k | x_n)

(deterministic annealing, Rose 1998, with temperature T = 2 sigma^2 beta). Iteration uses exponential smoothing
(damping) ``g <- (1 - rate) g + rate * g_new`` and stops after ``max_iter`` steps or when the largest move of a
decoder point is below ``tol``. Beta is swept from large to small, each solve warm-started from the previous fixed
point with a small seeded jitter (so that symmetric solutions can split once they become unstable).

Above the first critical beta every tile decodes to the data mean; the collapsed solution loses stability when
the largest eigenvalue lambda_max of the data covariance exceeds sigma^2 beta, i.e. at

    beta_c = lambda_max / sigma^2      (for two points +-a: beta_c = a^2 / sigma^2)

where the expected reconstruction error E(beta) bends (a kink: a spike of its second derivative). Each further
split of a cluster gives another critical beta, found the same way on the computed curve.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch


@dataclass
class FixedPoint:
    """One solve: decoder points ``g`` ``[K, D]``, encoder table ``q`` ``[N, K]``, the iterations used, whether the
    last step was below ``tol``, and the expected reconstruction error E_n E_q |x_n - g(z)|^2."""

    beta: float
    g: torch.Tensor
    q: torch.Tensor
    iterations: int
    converged: bool
    recon_error: float


def tiles(grid: int = 32, dtype=torch.float64) -> torch.Tensor:
    """Centres of the ``grid x grid`` tiles of [0, 1]^2, ``[grid^2, 2]`` (for plotting the decoder as a mesh)."""
    c = (torch.arange(grid, dtype=dtype) + 0.5) / grid
    return torch.cartesian_prod(c, c)


def _check(beta: float, sigma: float, rate: float, max_iter: int, tol: float) -> None:
    for name, v in (("beta", beta), ("sigma", sigma), ("tol", tol)):
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise ValueError(f"{name}={v!r} must be a positive number")
    if not 0 < rate <= 1:
        raise ValueError(f"rate={rate!r} must be in (0, 1] (1: no smoothing)")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter={max_iter!r} must be an int >= 1")


def solve(
    data: torch.Tensor,
    beta: float,
    sigma: float = 1.0,
    grid: int = 32,
    init: Optional[torch.Tensor] = None,
    rate: float = 0.5,
    max_iter: int = 400,
    tol: float = 1e-3,
    jitter: float = 1e-2,
    generator: Optional[torch.Generator] = None,
) -> FixedPoint:
    """Iterate the fixed-point equations at one ``beta``.

    Args:
        data: ``[N, D]`` points.
        beta: the KL weight (> 0).
        sigma: the decoder's standard deviation.
        grid: tiles per side (K = grid^2).
        init: starting decoder points ``[K, D]`` (default: the data mean for every tile).
        rate: smoothing rate of the decoder update (1 = plain iteration).
        max_iter, tol: stop after ``max_iter`` updates or when max_k |g_new - g| < ``tol``.
        jitter: standard deviation of the seeded noise added to the start, relative to the data's spread.
        generator: CPU generator of the jitter.
    """
    _check(beta, sigma, rate, max_iter, tol)
    if data.ndim != 2 or data.shape[0] < 1:
        raise ValueError(f"data has shape {tuple(data.shape)}; expected [N, D] points")
    k = grid * grid
    g = data.mean(0).expand(k, -1).clone() if init is None else init.clone()
    spread = float(data.std(0).max()) if data.shape[0] > 1 else 0.0  # one point: nothing to split
    if jitter > 0:
        g = g + jitter * spread * torch.randn(g.shape, generator=generator, dtype=g.dtype).to(g.device)
    temperature = 2 * sigma**2 * beta
    converged, it = False, 0
    for it in range(1, max_iter + 1):
        q = torch.softmax(-torch.cdist(data, g).pow(2) / temperature, dim=1)  # [N, K]
        mass = q.sum(0)  # an empty tile keeps its point: no data pulls it anywhere
        g_new = torch.where(mass[:, None] > 1e-12, (q.T @ data) / mass.clamp_min(1e-300)[:, None], g)
        step = (g_new - g).abs().max()
        g = (1 - rate) * g + rate * g_new
        if float(step) < tol:
            converged = True
            break
    q = torch.softmax(-torch.cdist(data, g).pow(2) / temperature, dim=1)
    err = float((q * torch.cdist(data, g).pow(2)).sum(1).mean())
    return FixedPoint(float(beta), g, q, it, converged, err)


@dataclass
class Sweep:
    """Fixed points over a range of beta (increasing order): ``betas``, ``errors`` (expected reconstruction error),
    ``curvature`` (d^2 E / d(log beta)^2 by finite differences), ``critical`` (detected critical betas), and each
    beta's :class:`FixedPoint` in ``points``."""

    betas: list
    errors: list
    curvature: list
    critical: list
    points: list


def sweep(
    data: torch.Tensor,
    betas: Sequence[float],
    sigma: float = 1.0,
    grid: int = 32,
    rate: float = 0.5,
    max_iter: int = 400,
    tol: float = 1e-3,
    jitter: float = 1e-2,
    seed: int = 0,
    threshold: float = 0.2,
) -> Sweep:
    """Solve at each beta, from the largest to the smallest (warm starts), and detect critical betas.

    Args:
        data, sigma, grid, rate, max_iter, tol, jitter: as in :func:`solve`.
        betas: at least 3 positive values (sorted here; a log-spaced range resolves the transitions evenly).
        seed: seed of the jitter.
        threshold: a critical beta is a local maximum of -d^2E/d(log beta)^2 above ``threshold`` times the
            largest one (the error's kink where a cluster splits: E falls faster as beta decreases).
    """
    betas = sorted(float(b) for b in betas)
    if len(betas) < 3:
        raise ValueError(f"betas has {len(betas)} values; give at least 3 to take a second derivative")
    gen = torch.Generator().manual_seed(seed)
    data = data.to(torch.float64)
    points, g = [], None
    for b in reversed(betas):
        fp = solve(data, b, sigma, grid, g, rate, max_iter, tol, jitter, gen)
        points.append(fp)
        g = fp.g
    points.reverse()
    errors = [p.recon_error for p in points]
    curvature = second_derivative(betas, errors)
    return Sweep(betas, errors, curvature, critical_points(betas, curvature, threshold), points)


def second_derivative(betas: Sequence[float], values: Sequence[float]) -> list:
    """d^2 f / d(log beta)^2 at the interior points by the three-point formula on a non-uniform grid (NaN at the ends)."""
    t = [math.log(b) for b in betas]
    out = [float("nan")] * len(t)
    for i in range(1, len(t) - 1):
        h1, h2 = t[i] - t[i - 1], t[i + 1] - t[i]
        out[i] = 2 * (h1 * values[i + 1] - (h1 + h2) * values[i] + h2 * values[i - 1]) / (h1 * h2 * (h1 + h2))
    return out


def critical_points(betas: Sequence[float], curvature: Sequence[float], threshold: float = 0.2) -> list:
    """Betas where E(beta) bends down (as beta falls) by a local minimum of the curvature below
    ``-threshold * max |curvature|``: the kink of the error at a split, E being flat above it."""
    c = [x if math.isfinite(x) else 0.0 for x in curvature]
    scale = max((abs(x) for x in c), default=0.0)
    if scale < 1e-9:
        return []
    return [betas[i] for i in range(1, len(c) - 1) if c[i] < -threshold * scale and c[i] <= c[i - 1] and c[i] <= c[i + 1]]


def mixture_data(n: int = 300, centers: Sequence[Sequence[float]] = ((-2.0, 0.0), (2.0, 0.0), (0.0, 3.0)), std: float = 0.5, seed: int = 0) -> torch.Tensor:
    """``n`` points of an equal-weight 2-D Gaussian mixture (Figure 2's kind of data), ``[n, 2]`` float64."""
    g = torch.Generator().manual_seed(seed)
    c = torch.as_tensor(centers, dtype=torch.float64)
    which = torch.arange(n) % len(c)
    return c[which] + std * torch.randn(n, c.shape[1], generator=g, dtype=torch.float64)
