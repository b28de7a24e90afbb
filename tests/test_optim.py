"""NaturalGradient against closed forms: the Fisher of a linear-Gaussian model, F^-1 g, and an ill-conditioned
quadratic."""
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

from pyrovae.optim import NaturalGradient

Z = 5.0


def _linear_gaussian(n=4000, d_in=3, d_out=2, scales=(1.0, 2.0, 0.5), at_truth=True):
    """y = W x + eps, eps ~ N(0, I): the Fisher of W on the design x is exactly I (x) E_n[x x^T]."""
    torch.manual_seed(0)
    x = torch.randn(n, d_in) * torch.tensor(scales)
    layer = nn.Linear(d_in, d_out, bias=False)
    w_true = layer.weight.detach().clone() if at_truth else torch.randn(d_out, d_in)
    y = x @ w_true.T + torch.randn(n, d_out)
    return layer, x, y


def _mean_nll(layer, x, y):
    return 0.5 * ((y - layer(x)) ** 2).sum(-1).mean()


def test_kfac_factors_match_the_closed_form_fisher():
    """At the true weights A = E_n[x x^T] exactly, and G = mean eps eps^T is I within standard errors
    (diagonal entries: sqrt(2/n), off-diagonal: sqrt(1/n))."""
    layer, x, y = _linear_gaussian()
    opt = NaturalGradient(layer.parameters(), lr=1.0, damping=0.0, kl_clip=None, modules=[layer], decay=0.0)
    _mean_nll(layer, x, y).backward()
    opt.step()
    state = opt.state[layer.weight]
    n = x.shape[0]
    assert torch.allclose(state["A"], x.T @ x / n, rtol=1e-5)
    se = torch.full((2, 2), math.sqrt(1 / n)).fill_diagonal_(math.sqrt(2 / n))
    assert ((state["G"] - torch.eye(2)).abs() <= Z * se).all()


@pytest.mark.parametrize("with_bias", [False, True])
def test_one_kfac_step_is_the_inverse_kronecker_fisher_times_the_gradient(with_bias):
    """One undamped step with lr=1 is vec^-1((G (x) A)^-1 vec g), G and A from the per-example gradients and
    inputs (bias: a column of ones), solved densely; and it is within the sampling error of G of the exact
    natural gradient F^-1 g = g E_n[x x^T]^-1 (F = I (x) E_n[x x^T])."""
    layer, x, y = _linear_gaussian()
    if with_bias:
        layer = nn.Linear(3, 2)
        with torch.no_grad():
            layer.weight.copy_(torch.randn(2, 3))
    params = list(layer.parameters())
    before = [p.detach().clone() for p in params]
    opt = NaturalGradient(params, lr=1.0, damping=0.0, kl_clip=None, modules=[layer], decay=0.0)
    loss = _mean_nll(layer, x, y)
    loss.backward()
    grad = torch.cat([layer.weight.grad, layer.bias.grad[:, None]], 1) if with_bias else layer.weight.grad.clone()
    opt.step()
    step = torch.cat([before[0] - layer.weight.detach(), (before[1] - layer.bias.detach())[:, None]], 1) if with_bias else before[0] - layer.weight.detach()
    n = x.shape[0]
    a = torch.cat([x, torch.ones(n, 1)], 1) if with_bias else x
    d = x @ before[0].T + (before[1] if with_bias else 0) - y  # per-example d loss_n / d s at the old weights
    A, G = a.T @ a / n, d.T @ d / n
    F = torch.kron(G, A).double()  # row-major vec(g) of a [out, in] matrix
    expected = torch.linalg.solve(F, grad.double().reshape(-1)).reshape(grad.shape).float()
    assert torch.allclose(step, expected, rtol=1e-3, atol=1e-6)
    if not with_bias:  # at the true W: compare with the closed-form Fisher, ||G^-1 - I||_F ~ ||G - I||_F
        exact = grad @ torch.linalg.inv(x.T @ x / n)
        bound = Z * math.sqrt(2 * 3 / n) * 2  # E||G - I||_F^2 = d(d+1)/n with d = 2; a factor 2 for G^-1 vs G
        assert (step - exact).norm() <= bound * exact.norm()


def test_diagonal_fisher_matches_the_closed_form_diagonal():
    """fisher='diagonal': F_jk = E_n[eps_j^2 x_k^2] -> E_n[x_k^2] (the diagonal of I (x) E[x x^T]), within the
    standard error of that mean."""
    layer, x, y = _linear_gaussian()
    opt = NaturalGradient(layer.parameters(), lr=1.0, damping=0.0, kl_clip=None, modules=[layer], decay=0.0, fisher="diagonal")
    _mean_nll(layer, x, y).backward()
    opt.step()
    with torch.no_grad():
        eps = y - x @ layer.weight.T  # (the step is tiny at the truth; recompute from the stored statistics instead)
    F = opt.state[layer.weight]["F"]
    n = x.shape[0]
    per = (eps**2)[:, :, None] * (x**2)[:, None, :]  # only for the standard error
    se = per.std(0) / math.sqrt(n)
    assert ((F - (x**2).mean(0).expand(2, 3)).abs() <= Z * se).all()


def test_trust_region_limits_the_step():
    """The step s = lr nu V has predicted KL s^T F s = (lr nu)^2 V.g equal to kl_clip when the plain step's is larger."""
    layer, x, y = _linear_gaussian(at_truth=False)
    before = layer.weight.detach().clone()
    kl_clip = 1e-4
    opt = NaturalGradient(layer.parameters(), lr=1.0, damping=1e-3, kl_clip=kl_clip, modules=[layer])
    _mean_nll(layer, x, y).backward()
    g = layer.weight.grad.clone()
    opt.step()
    step = before - layer.weight.detach()
    state = opt.state[layer.weight]
    v = state["G_inv"] @ g @ state["A_inv"]
    assert float((v * g).sum()) > kl_clip * 100  # the unclipped step would be far outside the region
    c = float(step.norm() / v.norm())
    assert torch.allclose(step, c * v, rtol=1e-4, atol=1e-7)
    assert math.isclose(c**2 * float((v * g).sum()), kl_clip, rel_tol=1e-4)


def test_converges_much_faster_than_sgd_on_an_ill_conditioned_quadratic():
    """Least squares with input scales 1 and 30 (condition number 900 of E[x x^T]), from W = 0. Full batch,
    deterministic (measured: K-FAC 518 steps, SGD 7408 to reach the optimum's loss + 1e-6). K-FAC's direction is
    the Newton direction from the first step; the *empirical* Fisher's G = E[r^2] is large while the residuals
    are, so its steps are the Newton step over 2 x loss: about d^2/2 steps to get within the noise (d the
    distance in the A-norm), then halving. SGD at its fastest stable rate 1/lambda_max contracts the
    low-curvature direction by 1 - 1/900 per step."""
    torch.manual_seed(1)
    n = 500
    x = torch.randn(n, 2) * torch.tensor([1.0, 30.0])
    y = x @ torch.tensor([[2.0], [-1.0]]) + torch.randn(n, 1)
    w_opt = torch.linalg.lstsq(x, y).solution.T
    best = float(0.5 * ((y - x @ w_opt.T) ** 2).mean())

    def steps_to_converge(make_opt, max_steps):
        layer = nn.Linear(2, 1, bias=False)
        with torch.no_grad():
            layer.weight.zero_()
        opt = make_opt(layer)
        for t in range(1, max_steps + 1):
            opt.zero_grad()
            loss = 0.5 * ((y - layer(x)) ** 2).mean()
            if float(loss.detach()) <= best + 1e-6:
                return t - 1
            loss.backward()
            opt.step()
        return max_steps

    lam_max = float(torch.linalg.eigvalsh(x.T @ x / n).max())
    kfac = steps_to_converge(lambda l: NaturalGradient(l.parameters(), lr=1.0, damping=1e-6, kl_clip=None, modules=[l], decay=0.0), 3000)
    sgd = steps_to_converge(lambda l: torch.optim.SGD(l.parameters(), lr=1.0 / lam_max), 30000)
    assert kfac <= 600, kfac
    assert sgd >= 10 * kfac, (kfac, sgd)


def test_pyro_optim_and_svi():
    """Through pyro.optim.PyroOptim (one optimiser per parameter: weight and bias in separate blocks) with
    SVI's summed loss: a linear-Gaussian regression reaches its least-squares fit."""
    torch.manual_seed(2)
    x = torch.randn(500, 3)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]]) + 0.3 + torch.randn(500, 1)
    net = nn.Linear(3, 1)

    def model(x, y):
        pyro.module("net", net)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("y", dist.Normal(net(x), 1.0).to_event(1), obs=y)

    def guide(x, y):
        pass

    optim = pyro.optim.PyroOptim(NaturalGradient, {"lr": 1.0, "damping": 1e-4, "kl_clip": None, "modules": [net], "reduction": "sum", "decay": 0.0})
    svi = pyro.infer.SVI(model, guide, optim, pyro.infer.Trace_ELBO())
    for _ in range(30):
        svi.step(x, y)
    a = torch.cat([x, torch.ones(500, 1)], 1)
    fit = torch.linalg.lstsq(a, y).solution.squeeze()
    got = torch.cat([net.weight.detach()[0], net.bias.detach()])
    assert torch.allclose(got, fit, atol=1e-3), (got, fit)


def test_without_hooks_it_refuses():
    """A layer with a gradient but no statistics this step (a replayed graph fires no hooks) is an error."""
    layer = nn.Linear(2, 1)
    opt = NaturalGradient(layer.parameters(), modules=[layer])
    layer(torch.randn(4, 2)).sum().backward()
    opt.step()
    opt.remove_hooks()
    opt.zero_grad()
    layer(torch.randn(4, 2)).sum().backward()
    with pytest.raises(RuntimeError, match="capture='off'"):
        opt.step()


def test_bad_arguments_name_the_fix():
    p = [nn.Parameter(torch.zeros(1))]
    with pytest.raises(ValueError, match="fisher"):
        NaturalGradient(p, fisher="full")
    with pytest.raises(ValueError, match="damping"):
        NaturalGradient(p, damping=-1.0)
    with pytest.raises(ValueError, match="reduction"):
        NaturalGradient(p, reduction="max")
