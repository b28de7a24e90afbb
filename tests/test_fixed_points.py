"""Reconstruction fixed points of a beta-VAE (Rezende & Viola 2018, Appendix A) on cases with exact answers."""
import math

import pytest
import torch

import pyrovae.evaluate.fixed_points as F


def log_range(center, n=41, decades=1.0):
    return [center * math.exp(v) for v in torch.linspace(-decades * math.log(10), decades * math.log(10), n).tolist()]


@pytest.mark.parametrize("a,sigma", [(1.0, 1.0), (2.0, 0.5), (0.5, 1.0)])
def test_two_points_merge_at_analytic_beta(a, sigma):
    x = torch.tensor([[-a, 0.0], [a, 0.0]], dtype=torch.float64)
    beta_c = a**2 / sigma**2  # lambda_max / sigma^2
    betas = log_range(beta_c)
    s = F.sweep(x, betas, sigma=sigma, grid=8)
    step = math.log(betas[1] / betas[0])
    assert len(s.critical) == 1 and abs(math.log(s.critical[0] / beta_c)) <= step + 1e-9
    # above beta_c one merged fixed point (every tile at the mean, error = a^2); well below, two separate ones
    high = s.points[-1]
    assert torch.allclose(high.g, torch.zeros_like(high.g), atol=1e-2) and high.recon_error == pytest.approx(a**2, rel=1e-3)
    low = s.points[0]
    assert set(torch.sign(low.g[low.q.sum(0) > 1e-3, 0]).tolist()) == {-1.0, 1.0} and low.recon_error < 1e-3 * a**2


def test_one_point_has_no_transition():
    x = torch.tensor([[0.3, -1.2]], dtype=torch.float64)
    s = F.sweep(x, log_range(1.0, 11), grid=4)
    assert s.critical == [] and max(s.errors) < 1e-8


def test_large_beta_limit_is_the_data_variance():
    x = F.mixture_data(60, std=0.3)
    fp = F.solve(x, beta=1e3, grid=4)
    total_var = float((x - x.mean(0)).pow(2).sum(1).mean())
    assert fp.recon_error == pytest.approx(total_var, rel=1e-3)


def test_second_derivative_exact_on_quadratic():
    betas = [0.5, 0.7, 1.0, 1.6, 2.0]
    values = [3 * math.log(b) ** 2 + math.log(b) for b in betas]  # d^2/dt^2 = 6
    d2 = F.second_derivative(betas, values)
    assert all(v == pytest.approx(6.0) for v in d2[1:-1]) and math.isnan(d2[0])


def test_bad_arguments():
    with pytest.raises(ValueError, match="beta"):
        F.solve(torch.zeros(2, 2), beta=0.0)
    with pytest.raises(ValueError, match="rate"):
        F.solve(torch.zeros(2, 2), beta=1.0, rate=0.0)
    with pytest.raises(ValueError, match="at least 3"):
        F.sweep(torch.zeros(2, 2), [1.0, 2.0])


def test_geco_study_script_smoke(tmp_path):
    """The benchmark's fixed-point part end to end (quick sizes), writing its report and plot to tmp_path."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import geco_study
    finally:
        sys.path.pop(0)
    assert geco_study.main(["--quick", "--out", str(tmp_path), "--parts", "fixed_points"]) == 0
    assert (tmp_path / "geco_fixed_points.png").stat().st_size > 0 and "critical betas" in (tmp_path / "geco_study.md").read_text()
    assert geco_study.main(["--quick"]) == 2  # a smoke run never overwrites the committed results
