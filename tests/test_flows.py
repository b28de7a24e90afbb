"""Flows: log-determinants against autograd Jacobians, inverse round trips, normalisation of the flow
density, the FlowEncoder guide under vectorised particles, and a fit to a curved posterior."""
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.distributions.conditional import ConditionalTransformModule
from pyro.infer import SVI, Trace_ELBO
from pyro.poutine.util import prune_subsample_sites
from torch.autograd.functional import jacobian
from torch.distributions import ComposeTransform

from pyrovae.nn.flows import ANALYTIC_INVERSE, FLOWS, build_flow, conditioned_distribution
from pyrovae.guides import FlowEncoder
from pyrovae.models import VAE

NAMES = sorted(FLOWS)
NO_INVERSE = sorted(set(FLOWS) - ANALYTIC_INVERSE)
VOLUME_PRESERVING = {"householder"}


def _flows(name, z_dim, context_dim, num_flows=2, hidden=(16,)):
    return build_flow(name, z_dim, context_dim, num_flows, list(hidden)).double()


def _conditioned(flows, context):
    """A fresh composite transform (fresh caches: nothing is remembered from earlier calls)."""
    return ComposeTransform([f.condition(context) for f in flows])


def _slogdet(J):
    sign, logabs = torch.linalg.slogdet(J)
    assert (sign != 0).all()
    return logabs


# ---------------------------------------------------------------------------------------------- registry
def test_build_flow_returns_conditional_modules():
    for name in NAMES:
        flows = build_flow(name, 3, 4, 3)
        assert isinstance(flows, torch.nn.ModuleList)
        assert all(isinstance(f, ConditionalTransformModule) for f in flows)
        assert sum(p.numel() for p in flows.parameters()) > 0


def test_build_flow_rejects_bad_input():
    with pytest.raises(ValueError, match="choose one of") as err:
        build_flow("glow", 2, 2, 1)
    assert str(sorted(FLOWS)) in str(err.value)
    with pytest.raises(ValueError, match="num_flows=0"):
        build_flow("planar", 2, 2, 0)
    with pytest.raises(ValueError, match="z_dim"):
        build_flow("realnvp", 1, 2, 1)
    with pytest.raises(ValueError, match="flow="):
        FlowEncoder((4,), 2, (8,), flow="nope")


# ------------------------------------------------------------------------------------ log-det vs Jacobian
@pytest.mark.parametrize("name", NAMES)
def test_log_det_matches_autograd_jacobian(name):
    D, C = 3, 4
    flows = _flows(name, D, C, num_flows=3)
    context = torch.randn(C, dtype=torch.float64)
    x = 0.7 * torch.randn(D, dtype=torch.float64)
    total, x0 = 0.0, x
    for f in flows:
        t = f.condition(context)
        J = jacobian(t, x)
        y = t(x)
        logdet = t.log_abs_det_jacobian(x, y)
        assert torch.allclose(logdet, _slogdet(J), atol=1e-6, rtol=0)
        total, x = total + logdet, y
    # the whole stack, as the TransformedDistribution sees it
    T = _conditioned(flows, context)
    assert torch.allclose(total, _slogdet(jacobian(T, x0)), atol=1e-6, rtol=0)
    if name not in VOLUME_PRESERVING:
        assert abs(float(total.detach())) > 1e-3, "log-det is ~0: the test would not see a dropped log-det term"


@pytest.mark.parametrize("name", NAMES)
def test_log_det_broadcasts_over_particles(name):
    # inside the vectorised ELBO the guide sees z of shape [P, B, D] and a context of shape [B, C]
    P, B, D, C = 2, 3, 3, 4
    flows = _flows(name, D, C, num_flows=2)
    context = torch.randn(B, C, dtype=torch.float64)
    x = torch.randn(P, B, D, dtype=torch.float64)
    T = _conditioned(flows, context)
    J = jacobian(T, x)  # [P, B, D, P, B, D]: block diagonal if examples do not mix
    y = T(x)
    logdet = T.log_abs_det_jacobian(x, y)
    assert y.shape == (P, B, D) and logdet.shape == (P, B)
    for p in range(P):
        for b in range(B):
            block = J[p, b, :, p, b, :]
            assert torch.allclose(logdet[p, b], _slogdet(block), atol=1e-6, rtol=0)
            # row (p, b) is transformed with context b and nothing else
            single = _conditioned(flows, context[b])
            assert torch.allclose(y[p, b], single(x[p, b]), atol=1e-12)
            off = J[p, b].clone()
            off[:, p, b] = 0
            assert off.abs().max() == 0


@pytest.mark.parametrize("name", ["planar", "radial", "sylvester"])
def test_invertibility_constraint_holds_for_large_hypernet_outputs(name):
    # These maps are invertible only under a constraint (w.u > -1; beta > -alpha; r_ii r~_ii > -1/h').
    # With the hypernetwork's output layer blown up, an unconstrained map would fold (det J changes sign);
    # the constrained one keeps det J > 0 everywhere, and the log-det stays exact.
    D, C, N = 3, 4, 256
    flows = _flows(name, D, C, num_flows=1, hidden=(16,))
    with torch.no_grad():
        for p in flows[0].nn.layers[-1].parameters():
            p.mul_(30.0)
    t = flows[0].condition(torch.randn(C, dtype=torch.float64))
    x = 2.0 * torch.randn(N, D, dtype=torch.float64)
    J = jacobian(t, x).diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # per-point [N, D, D]
    sign, logabs = torch.linalg.slogdet(J)
    assert (sign > 0).all()
    assert torch.allclose(t.log_abs_det_jacobian(x, t(x)), logabs, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------------------------- inverse
@pytest.mark.parametrize("name", sorted(ANALYTIC_INVERSE))
def test_inverse_round_trip(name):
    P, B, D, C = 2, 5, 4, 3
    flows = _flows(name, D, C, num_flows=3)
    context = torch.randn(B, C, dtype=torch.float64)
    x = torch.randn(P, B, D, dtype=torch.float64)
    y = _conditioned(flows, context)(x)
    assert not torch.allclose(x, y)
    x_back = _conditioned(flows, context).inv(y.clone())  # fresh transforms: no cached x to fall back on
    assert torch.allclose(x_back, x, atol=1e-10)
    assert torch.allclose(_conditioned(flows, context)(x_back), y, atol=1e-10)


@pytest.mark.parametrize("name", NO_INVERSE)
def test_families_without_inverse_score_only_their_own_samples(name):
    flows = _flows(name, 2, 3, num_flows=2)
    context = torch.randn(3, dtype=torch.float64)
    base = dist.Normal(torch.zeros(2, dtype=torch.float64), 1.0).to_event(1)
    q = conditioned_distribution(base, flows, context)
    z = q.sample((4,))
    assert torch.isfinite(q.log_prob(z)).all()  # cached inverse
    with pytest.raises((KeyError, NotImplementedError)):
        conditioned_distribution(base, flows, context).log_prob(z.clone())


# ---------------------------------------------------------------------------------- density normalises
def _base_2d():
    loc = torch.tensor([0.3, -0.2], dtype=torch.float64)
    scale = torch.tensor([0.8, 1.3], dtype=torch.float64)
    return dist.Normal(loc, scale).to_event(1)


@pytest.mark.parametrize("name", NAMES)
def test_density_integrates_to_one_by_pushing_a_grid_forward(name):
    # Integrate q over z-space using the cells of a u-grid mapped through T: the area of T(cell) is measured
    # geometrically (half the cross product of the image quadrilateral's diagonals), independently of the
    # log-det code, while q is evaluated at T(cell centre) by the TransformedDistribution (log base - sum of
    # log-dets). So sum_cells q(T(u_c)) area(T(cell)) = 1 only if the log-dets and their assembly are right;
    # int q(T(u)) |det J_T(u)| du, by contrast, is the base integral by construction and tests nothing.
    # Needs no inverse (q scores its own forward values), so it covers planar, radial and sylvester too.
    # Midpoint/area error is O(h^2): ~3e-5 at h = 0.07 here (it drops 4x when h halves); the base mass
    # outside [-7, 7]^2 (5.4 sigma) is ~1e-7. Tolerance 2e-4.
    torch.manual_seed(1)
    flows = _flows(name, 2, 3, num_flows=3, hidden=(16, 16))
    context = torch.randn(3, dtype=torch.float64)
    q = conditioned_distribution(_base_2d(), flows, context)
    n, L = 200, 7.0
    edges = torch.linspace(-L, L, n + 1, dtype=torch.float64)
    mids = 0.5 * (edges[1:] + edges[:-1])
    with torch.no_grad():
        corners = torch.stack(torch.meshgrid(edges, edges, indexing="ij"), -1)
        zc = ComposeTransform(q.transforms)(corners)
        d1 = zc[1:, 1:] - zc[:-1, :-1]
        d2 = zc[:-1, 1:] - zc[1:, :-1]
        area = 0.5 * (d1[..., 0] * d2[..., 1] - d1[..., 1] * d2[..., 0]).abs()
        u = torch.stack(torch.meshgrid(mids, mids, indexing="ij"), -1)
        z = u
        for t in q.transforms:  # layer by layer, so that every transform caches its own (x, y)
            z = t(z)
        integral = float((q.log_prob(z).exp() * area).sum())
        no_log_det = float((_base_2d().log_prob(u).exp() * area).sum())
    assert abs(integral - 1.0) < 2e-4
    # the check has teeth: leaving out the log-dets (q(T(u)) := base(u)) misses 1 by far more
    if name not in VOLUME_PRESERVING:
        assert abs(no_log_det - 1.0) > 5e-3


@pytest.mark.parametrize("name", sorted(ANALYTIC_INVERSE))
def test_density_integrates_to_one_on_a_z_grid(name):
    # Where an inverse exists q can be scored anywhere: trapezoid rule on a fixed z-grid, which exercises the
    # inverse and the log-dets at points the flow never produced. Trapezoid error is ~3e-6 at h = 0.08 here
    # (smooth density, ~0 at the edges); mass outside [-8, 8]^2 is ~1e-9. Tolerance 1e-4.
    torch.manual_seed(1)
    flows = _flows(name, 2, 3, num_flows=3, hidden=(16, 16))
    context = torch.randn(3, dtype=torch.float64)
    q = conditioned_distribution(_base_2d(), flows, context)
    g = torch.linspace(-8.0, 8.0, 201, dtype=torch.float64)
    z = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1)
    with torch.no_grad():
        integral = float(torch.trapezoid(torch.trapezoid(q.log_prob(z).exp(), g), g))
        u = ComposeTransform(q.transforms).inv(z)
        no_log_det = float(torch.trapezoid(torch.trapezoid(_base_2d().log_prob(u).exp(), g), g))
    assert abs(integral - 1.0) < 1e-4
    if name not in VOLUME_PRESERVING:
        assert abs(no_log_det - 1.0) > 5e-3


# --------------------------------------------------------------------------------- FlowEncoder with VAE
@pytest.mark.parametrize("name", NAMES)
def test_flow_encoder_vectorised_elbo_and_gradients(name):
    x_shape, z_dim, B, P = (6,), 3, 4, 3
    x = torch.bernoulli(torch.full((B, *x_shape), 0.4))
    model = VAE(x_shape, z_dims=(z_dim,), hidden=((8,),))
    guide = FlowEncoder(x_shape, z_dim, hidden=(8,), flow=name, num_flows=2, context_dim=5)
    elbo = Trace_ELBO(num_particles=P, vectorize_particles=True, max_plate_nesting=1)
    loss = elbo.differentiable_loss(model, guide, x)
    assert torch.isfinite(loss)
    loss.backward()
    for pname, p in guide.flows.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().max() > 0, pname
    assert guide.context[0].weight.grad.abs().max() > 0  # the flow's context is learned through the trunk
    # one site "z", shapes [P, B, D] / [P, B] under the particle plate
    with pyro.plate("particles", P, dim=-2):
        tr = pyro.poutine.trace(guide).get_trace(x)
    tr = prune_subsample_sites(tr)
    tr.compute_log_prob()
    assert set(tr.stochastic_nodes) == {"z"}
    assert tr.nodes["z"]["value"].shape == (P, B, z_dim)
    assert tr.nodes["z"]["log_prob"].shape == (P, B)


@pytest.mark.cuda
@pytest.mark.parametrize("name", NAMES)
def test_flow_encoder_follows_the_device(name):
    x = torch.bernoulli(torch.full((4, 6), 0.4, device="cuda"))
    model = VAE((6,), z_dims=(3,), hidden=((8,),)).cuda()
    guide = FlowEncoder((6,), 3, hidden=(8,), flow=name, num_flows=2).cuda()
    loss = Trace_ELBO(num_particles=3, vectorize_particles=True, max_plate_nesting=1).differentiable_loss(model, guide, x)
    assert loss.is_cuda and torch.isfinite(loss)


# ---------------------------------------------------------------------- fit to a curved (banana) posterior
OBS, NOISE = 1.5, 0.5


def _log_joint(z):
    """log p(z, y) with z ~ N(0, I), y | z ~ N(z_1^2 + z_2, 0.5^2), y = 1.5: a banana-shaped posterior."""
    lik = dist.Normal(z[..., 0] ** 2 + z[..., 1], NOISE).log_prob(torch.tensor(OBS))
    return dist.Normal(0.0, 1.0).log_prob(z).sum(-1) + lik


def _banana_model():
    z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    pyro.factor("y", _log_joint(z) - dist.Normal(0.0, 1.0).log_prob(z).sum(-1))


def _base():
    loc = pyro.param("loc", torch.zeros(2))
    scale = pyro.param("scale", torch.ones(2), constraint=dist.constraints.positive)
    return dist.Normal(loc, scale).to_event(1)


def _kl(q, log_Z, n=20000):
    """KL(q || p) = E_q[log q(z) - log p(z, y)] + log p(y), with its Monte Carlo standard error."""
    with torch.no_grad():
        z = q.sample((n,))
        w = q.log_prob(z) - _log_joint(z)
    return float(w.mean() + log_Z), float(w.std() / math.sqrt(n))


def test_flow_guide_fits_banana_posterior_better_than_gaussian():
    g = torch.linspace(-8.0, 8.0, 801)
    grid = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1)
    log_Z = torch.trapezoid(torch.trapezoid(_log_joint(grid).exp(), g), g).log()

    flows = build_flow("iaf", 2, 1, num_flows=3, hidden_dims=[16])
    context = torch.ones(1)  # non-amortised: one fixed context

    def gauss_guide():
        pyro.sample("z", _base())

    def flow_guide():
        pyro.module("flows", flows)
        pyro.sample("z", conditioned_distribution(_base(), flows, context))

    results = {}
    for label, guide in (("gauss", gauss_guide), ("flow", flow_guide)):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        elbo = Trace_ELBO(num_particles=32, vectorize_particles=True, max_plate_nesting=0)
        svi = SVI(_banana_model, guide, pyro.optim.Adam({"lr": 1e-2}), elbo)
        for _ in range(400):
            svi.step()
        q = _base() if label == "gauss" else conditioned_distribution(_base(), flows, context)
        results[label] = _kl(q, log_Z)

    (kl_g, se_g), (kl_f, se_f) = results["gauss"], results["flow"]
    # both estimates are of a non-negative quantity (checks log Z and the scoring)
    assert kl_g > -4 * se_g and kl_f > -4 * se_f
    # the Gaussian cannot bend: its KL stays well above the flow's (here 0.67 +- 0.008 vs 0.04 +- 0.002 nats)
    assert kl_f + 5 * math.hypot(se_g, se_f) < kl_g
    assert kl_g - kl_f > 0.2
