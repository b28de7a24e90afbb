"""DRAW and ConvDRAW: the attention filterbank against direct computation, the per-datum log weights against a
hand computation of all T steps, every objective, the captured step against the plain one, and training."""
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch.nn.functional import binary_cross_entropy_with_logits

import pyrovae.evaluate as E
from pyrovae.evaluate.pictures import write_draw_pictures
from pyrovae.nn.attention import Attention, Window, box, filterbank, read, window, write
from pyrovae.guides import ConvDRAWGuide, DRAWGuide
from pyrovae.models import DRAW, ConvDRAW
from pyrovae.objectives import ELBO, GECO, IWAE, BetaELBO, LogVarianceLoss, Renyi, VarianceLoss
from pyrovae.cli.registry import build_guide, build_model
from pyrovae.train import Trainer

SIDE = 8


@pytest.fixture(autouse=True)
def _one_thread():
    """Small recurrent steps: thread hand-offs cost more than they save on the shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _images(n: int = 16, side: int = SIDE, channels: int = 1, seed: int = 1) -> torch.Tensor:
    """Binary blobs: a bright square at a random place, so that there is structure to learn."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, channels, side, side)
    for i in range(n):
        r, c = torch.randint(0, side - 3, (2,), generator=g).tolist()
        x[i, :, r : r + 3, c : c + 3] = 1.0
    return torch.bernoulli(x * 0.9 + 0.05, generator=g)


def _prototypes(n: int, seed: int) -> torch.Tensor:
    """Noisy copies (3% of pixels flipped) of 8 random binary images: z has to say which one."""
    protos = torch.bernoulli(torch.full((8, 1, SIDE, SIDE), 0.5), generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(seed)
    which = torch.randint(0, 8, (n,), generator=g)
    return (protos[which] - torch.bernoulli(torch.full((n, 1, SIDE, SIDE), 0.03), generator=g)).abs()


def _draw(attention: bool = True, steps: int = 3, **kwargs):
    model = DRAW((1, SIDE, SIDE), steps=steps, z_dim=3, hidden=12, attention=attention, read_size=2, write_size=3, **kwargs)
    return model, DRAWGuide(model)


def _convdraw(**kwargs):
    model = ConvDRAW((kwargs.pop("channels", 1), SIDE, SIDE), steps=2, z_channels=2, hidden=4, kernel=3, **kwargs)
    return model, ConvDRAWGuide(model)


# --------------------------------------------------------------------------------------------------
# the filterbank


def test_filterbank_matches_the_formula_and_rows_sum_to_one():
    g, delta, sigma2 = torch.tensor([3.2, 10.0]), torch.tensor([1.5, 0.7]), torch.tensor([0.8, 2.0])
    f = filterbank(g, delta, sigma2, size=4, length=14)
    for b in range(2):
        for i in range(4):
            mu = g[b] + (i - 1.5) * delta[b]
            row = torch.tensor([math.exp(-((a - mu) ** 2) / (2 * sigma2[b])) for a in range(14)])
            torch.testing.assert_close(f[b, i], row / row.sum(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(f.sum(-1), torch.ones(2, 4))


def _window(height: int, width: int, size: int, gx: float, gy: float, delta: float, sigma2: float, gamma: float, batch: int = 2) -> Window:
    t = lambda v: torch.full((batch,), float(v))
    return Window(filterbank(t(gy), t(delta), t(sigma2), size, height), filterbank(t(gx), t(delta), t(sigma2), size, width), t(gx), t(gy), t(delta), t(sigma2), t(gamma))


def test_full_grid_with_stride_one_reads_the_image():
    x = torch.rand(2, 3, 7, 7)
    w = _window(7, 7, 7, gx=3.0, gy=3.0, delta=1.0, sigma2=1e-3, gamma=1.0)
    torch.testing.assert_close(read(x, w), x)


def test_window_parameters_of_zero_outputs_cover_the_image():
    # g~ = 0 centres the grid; delta~ = 1 spreads N filters over the whole image, one pixel apart for N = side
    w = window(torch.tensor([[0.0, 0.0, math.log(1e-3), 0.0, 0.0]]), 9, 9, 9)
    torch.testing.assert_close(w.fx[0], torch.eye(9), atol=1e-6, rtol=0)
    torch.testing.assert_close(w.fy[0], torch.eye(9), atol=1e-6, rtol=0)


def test_window_centres_are_the_documented_scaling_not_the_papers():
    # what window()'s docstring states: g = (L - 1)/2 (g~ + 1) in 0-based pixels (g~ = -1, 0, 1 -> 0, (L-1)/2, L-1),
    # on a non-square image; the paper's (L + 1)/2 (g~ + 1) in 1-based pixels would give -1, (L-1)/2, L (0-based)
    height, width = 9, 13
    raw = torch.tensor([[-1.0, -1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0, 0.0]])
    w = window(raw, height, width, 3)
    torch.testing.assert_close(w.gx, torch.tensor([0.0, (width - 1) / 2, width - 1]))
    torch.testing.assert_close(w.gy, torch.tensor([0.0, (height - 1) / 2, height - 1]))
    torch.testing.assert_close(w.delta, torch.full((3,), (max(height, width) - 1) / 2))  # the paper's stride, eq. 24
    assert "(L - 1) / 2 (g~ + 1)" in window.__doc__ and "(L + 1) / 2 (g~ + 1)" in window.__doc__


def test_writing_a_patch_then_reading_the_same_window_returns_it():
    patch = torch.randn(2, 1, 3, 3)
    w = _window(12, 10, 3, gx=4.0, gy=6.0, delta=2.0, sigma2=0.01, gamma=2.5)
    canvas = write(patch, w)
    assert canvas.shape == (2, 1, 12, 10)
    torch.testing.assert_close(read(canvas, w), patch)
    # and the write lands where the window is: outside its rows and columns the canvas is zero
    rows = torch.tensor([4, 6, 8]), torch.tensor([2, 4, 6])
    mask = torch.ones(12, 10, dtype=torch.bool)
    mask[rows[0][:, None], rows[1]] = False
    assert canvas[..., mask].abs().max() < 1e-6


def _mnist_like(n: int = 6, seed: int = 0) -> torch.Tensor:
    """28 x 28 binary images whose ink lies in the central 20 x 20 box, blank borders (as in MNIST)."""
    x = torch.zeros(n, 1, 28, 28)
    x[..., 4:24, 4:24] = torch.bernoulli(torch.full((n, 1, 20, 20), 0.3), generator=torch.Generator().manual_seed(seed))
    return x


def test_windows_start_tiling_the_image_so_the_first_read_sees_the_digit():
    # issue 27: with near-zero head outputs ("unit") the 2 x 2 read's one-pixel filters sit on the blank corners,
    # so the first glimpse is 0 for every image; "tile" (the default) starts each filter averaging its own quadrant
    torch.manual_seed(0)
    x, h = _mnist_like(), torch.zeros(6, 256)  # the paper's 256-unit state: PyTorch's bias init is +-1/16
    tile = Attention(256, 28, 28, 2)(h)
    torch.testing.assert_close(box(tile)[0], torch.tensor([6.5, 6.5, 20.5, 20.5]))
    torch.testing.assert_close(tile.sigma2, torch.full((6,), 49.0)), torch.testing.assert_close(tile.gamma, torch.ones(6))
    quadrants = x.unfold(-2, 14, 14).unfold(-2, 14, 14).mean((-1, -2))  # [6, 1, 2, 2]: the ink of each quadrant
    glimpse = read(x, tile)
    assert glimpse.min() > 0.05 and (glimpse - quadrants).abs().max() < 0.1  # a blurred quadrant average
    assert glimpse.flatten(1).std(0).min() > 1e-3  # and it tells the images apart
    for seed in range(5):  # the old start: (almost) nothing of x, whatever PyTorch's bias draw
        torch.manual_seed(seed)
        assert read(x, Attention(256, 28, 28, 2, init="unit")(h)).abs().max() < 0.02
    # the 5 x 5 write grid tiles too: stride 28 / 5, sigma half of it
    w5 = Attention(256, 28, 28, 5)(h[:1])
    torch.testing.assert_close(w5.delta, torch.tensor([5.6])), torch.testing.assert_close(w5.sigma2, torch.tensor([2.8**2]))
    with pytest.raises(ValueError, match="attention init='corner' is not one of .*'tile'"):
        Attention(256, 28, 28, 2, init="corner")


def test_the_models_attention_init_reaches_its_guides_read_window():
    torch.manual_seed(0)
    x, h = _mnist_like(1), torch.zeros(1, 256)
    unit, tile = (DRAW((1, 28, 28), steps=2, z_dim=3, hidden=256, attention=True, **kw) for kw in ({"attention_init": "unit"}, {}))
    assert read(x, DRAWGuide(unit).read_window(h)).abs().max() < 0.02
    assert read(x, DRAWGuide(tile).read_window(h)).min() > 0.05
    torch.testing.assert_close(box(tile.write_window(h))[0], torch.tensor([2.3, 2.3, 24.7, 24.7]))


# --------------------------------------------------------------------------------------------------
# the log weights are exactly log p(x, z_1:T) - log q(z_1:T | x)


def _by_hand(model: DRAW, guide: DRAWGuide, x: torch.Tensor, zs: list[torch.Tensor]) -> torch.Tensor:
    """log p(x, z) - log q(z | x) per datum, from the modules, written out step by step."""
    h_dec = c_dec = x.new_zeros(x.shape[0], model.hidden)
    h_enc = c_enc = x.new_zeros(x.shape[0], guide.encoder.hidden_dim)
    canvas = torch.zeros_like(x)

    def lstm(cell, inp, h, c):
        i, f, g, o = (cell.ih(inp) + cell.hh(h)).chunk(4, -1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c

    total = 0.0
    for z in zs:
        error = x - torch.sigmoid(canvas)
        if model.attention:
            w = guide.read_window(h_dec)
            glimpse = torch.cat([read(x, w).flatten(1), read(error, w).flatten(1)], -1)
        else:
            glimpse = torch.cat([x.flatten(1), error.flatten(1)], -1)
        h_enc, c_enc = lstm(guide.encoder, torch.cat([glimpse, h_dec], -1), h_enc, c_enc)
        loc, raw = guide.head(h_enc).chunk(2, -1)
        log_q = torch.distributions.Normal(loc, torch.nn.functional.softplus(raw) + 1e-4).log_prob(z).sum(-1)
        log_p = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
        total = total + log_p - log_q
        h_dec, c_dec = lstm(model.decoder, z, h_dec, c_dec)
        out = model.write_patch(h_dec)
        if model.attention:
            n = model.write_size
            canvas = canvas + write(out.reshape(-1, 1, n, n), model.write_window(h_dec))
        else:
            canvas = canvas + out.reshape(x.shape)
    return total - binary_cross_entropy_with_logits(canvas, x, reduction="none").sum((1, 2, 3))


@pytest.mark.parametrize("attention", [False, True], ids=["no-attention", "attention"])
@pytest.mark.parametrize("share_steps", [True, False], ids=["shared-steps", "recomputed-steps"])
def test_log_weight_is_the_sum_of_the_steps_terms(attention, share_steps):
    steps = 4
    model, guide = _draw(attention, steps=steps, share_steps=share_steps)
    x = _images(6)
    lw = ELBO().log_weights(model, guide, x)
    zs = [lw.guide_trace.nodes[f"z_{t + 1}"]["value"].reshape(x.shape[0], -1) for t in range(steps)]  # one particle: no particle dimension
    assert sorted(n for n, s in lw.model_trace.nodes.items() if s["type"] == "sample" and not s["is_observed"]) == sorted(f"z_{t + 1}" for t in range(steps))
    with torch.no_grad():
        want = _by_hand(model, guide, x, zs)
    torch.testing.assert_close(lw.log_w[0].detach(), want, rtol=1e-5, atol=1e-4)


def test_shared_steps_give_the_same_loss_and_gradients_as_recomputed_ones():
    x = _images(6)
    results = []
    for share in (True, False):
        pyro.clear_param_store()
        torch.manual_seed(0)
        model, guide = _draw(True, share_steps=share)
        pyro.set_rng_seed(3)
        loss = IWAE(num_particles=3).differentiable_loss(model, guide, x)
        loss.backward()
        grads = [p.grad.clone() for p in [*model.parameters(), *guide.parameters()]]
        results.append((loss.detach(), grads))
    torch.testing.assert_close(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# every objective, both models


OBJECTIVES = {
    "elbo": ELBO,
    "iwae": lambda: IWAE(num_particles=3),
    "iwae-dreg": lambda: IWAE(num_particles=3, estimator="dreg"),
    "renyi": lambda: Renyi(alpha=0.5, num_particles=3),
    "beta": lambda: BetaELBO(beta=2.0),
    "geco": lambda: GECO(tolerance=0.05),
    "variance": lambda: VarianceLoss(num_particles=3),
    "logvariance": lambda: LogVarianceLoss(num_particles=3),
}

MODELS = {
    "draw": lambda: _draw(False),
    "draw-attention": lambda: _draw(True),
    "convdraw": _convdraw,
    "convdraw-colour-gaussian": lambda: _convdraw(channels=3, likelihood="gaussian"),
}


@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
@pytest.mark.parametrize("build", sorted(MODELS))
def test_every_objective_trains_both_models(objective, build):
    model, guide = MODELS[build]()
    x = _images(8, channels=3 if "colour" in build else 1)
    if "gaussian" in build:
        x = x * 0.8 + 0.1 * torch.rand_like(x)
    trainer = Trainer(model, guide, OBJECTIVES[objective](), lr=1e-2, progress=False, capture="off")
    trainer.setup(x)
    before = {k: v.detach().clone() for k, v in trainer.params.items()}
    loss, norm = trainer.step(x)
    assert torch.isfinite(loss) and torch.isfinite(norm)
    moved = [k for k, v in trainer.params.items() if not torch.equal(v, before[k])]
    # the decoder (model) and the encoder (guide) are both trained, the decoder once, under the model's name
    assert any(k.startswith(model.pyro_name + "$$$decoder") for k in moved)
    assert any("_encoder$$$encoder" in k for k in moved)
    assert len({id(p) for p in trainer.params.values()}) == len(trainer.params)  # no weight under two names


def test_conditional_convdraw_reads_its_context():
    model, guide = _convdraw(context_shape=(1, SIDE, SIDE))
    x, context = _images(6), _images(6, seed=2)
    objective = IWAE(num_particles=4)
    pyro.set_rng_seed(0)
    a = objective.loss(model, guide, x, context)
    pyro.set_rng_seed(0)
    b = objective.loss(model, guide, x, 1 - context)
    assert math.isfinite(a) and a != b  # the same draws, another context: another bound
    loss = objective.differentiable_loss(model, guide, x, context)
    loss.backward()
    assert model.context_net[0].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="model\\(x, context\\)"):
        objective.loss(model, guide, x)


def test_bad_shapes_and_pairings_are_refused():
    with pytest.raises(ValueError, match="channels, height, width"):
        DRAW((784,))
    with pytest.raises(ValueError, match="divisible by 4"):
        ConvDRAW((1, 30, 30))
    with pytest.raises(TypeError, match="DRAW model"):
        DRAWGuide(ConvDRAW((1, 8, 8)))
    cfg = {"model": "draw", "guide": "flow", "draw_steps": 2, "draw_z": 2, "lstm_size": 4}
    model = build_model(cfg, (1, 8, 8))
    with pytest.raises(ValueError, match="--guide draw"):
        build_guide(cfg, (1, 8, 8), model)
    cfg["guide"] = "gaussian"  # the CLI's default: replaced by the model's own guide
    assert isinstance(build_guide(cfg, (1, 8, 8), model), DRAWGuide) and cfg["guide"] == "draw"


# --------------------------------------------------------------------------------------------------
# the captured step replays the plain one bit for bit


def _train(build, capture: str, steps: int = 4, objective=ELBO):
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    model, guide = build()
    trainer = Trainer(model, guide, objective(), lr=1e-2, progress=False, capture=capture, clip_norm=5.0)
    x = _images(16)
    trainer.setup(x[:8])
    losses = [trainer.step(x[(i * 8) % 16 :][:8])[0].clone() for i in range(steps)]
    return trainer, losses, torch.get_rng_state()


@pytest.mark.parametrize(
    "build, objective",
    [
        pytest.param(lambda: _draw(True, steps=4), ELBO, id="draw-attention-elbo"),
        pytest.param(lambda: _draw(True, steps=4), lambda: IWAE(num_particles=3), id="draw-attention-iwae"),
        pytest.param(_convdraw, lambda: GECO(tolerance=0.05), id="convdraw-geco"),
    ],
)
def test_replay_trains_exactly_like_the_plain_step(build, objective):
    plain, plain_losses, plain_rng = _train(build, "off", objective=objective)
    fast, fast_losses, fast_rng = _train(build, "replay", objective=objective)
    assert fast.gradients.capture.captured == 1, fast.capture_report
    assert all(torch.equal(a, b) for a, b in zip(plain_losses, fast_losses))
    for (name, p0), p1 in zip(plain.params.items(), fast.params.values()):
        assert torch.equal(p0, p1), name
    assert torch.equal(plain_rng, fast_rng)


def test_compile_takes_each_recurrent_weights_gradient_from_one_product_and_matches_the_plain_step(monkeypatch):
    # torch.compile stands aside (its kernels are tested in test_capture.py): what it is given is the graph to check
    monkeypatch.setattr(torch, "compile", lambda gm, **kwargs: gm)
    build = lambda: (lambda m: (m, DRAWGuide(m)))(DRAW((1, SIDE, SIDE), steps=6, z_dim=3, hidden=32, attention=False))
    plain, plain_losses, _ = _train(build, "off")
    replay, _, _ = _train(build, "replay", steps=2)
    fast, fast_losses, _ = _train(build, "compile")
    assert fast.gradients.capture.captured == 1, fast.capture_report  # checked against the plain step to 1e-4
    graphs = [next(iter(t.gradients.capture.graphs.values())).run for t in (replay, fast)]
    graphs[0] = graphs[0].args[0]  # replay runs the graph module's code with its ops bound directly
    products = [sum(n.target is torch.ops.aten.mm.default for n in g.graph.nodes) for g in graphs]
    # both LSTMs' recurrent weights, the encoder's input weights and the write layer: 6 per-step products each become
    # one (the decoder's input weights from the 3-d z and the 6 x 32 posterior layer are too thin to pay)
    assert products[0] - products[1] == 4 * 5, products
    assert torch.allclose(torch.stack(fast_losses), torch.stack(plain_losses), rtol=1e-5, atol=0)


# --------------------------------------------------------------------------------------------------
# a trained model: IWAE tightens with K; training lowers the bound on real data


def test_iwae_bound_increases_with_k_on_a_trained_model():
    model, guide = _draw(False, steps=3)
    Trainer(model, guide, ELBO(), lr=2e-2, progress=False).fit(_prototypes(256, seed=1), epochs=15, batch_size=32)
    test = _prototypes(512, seed=7)
    pyro.set_rng_seed(1)
    bounds = {k: E.log_likelihood(model, guide, test, num_samples=k).values for k in (1, 10, 100)}
    for small, large in ((1, 10), (10, 100)):
        diff = bounds[large] - bounds[small]
        stderr = diff.std() / math.sqrt(diff.numel())
        assert diff.mean() > 3 * stderr, (small, large, diff.mean(), stderr)


@pytest.mark.parametrize("attention", [False, True], ids=["no-attention", "attention"])
def test_training_on_binarized_mnist_lowers_the_bound(data_root, attention):
    from pyrovae.data import load_dataset

    data = load_dataset("binarized-mnist", data_dir=data_root)
    train, test = data.train[:1000], data.test[:200]
    model = DRAW((1, 28, 28), steps=4, z_dim=10, hidden=64, attention=attention)
    guide = DRAWGuide(model)
    objective = ELBO()
    trainer = Trainer(model, guide, objective, lr=3e-3, progress=False)
    trainer.setup(train[:100])
    pyro.set_rng_seed(0)
    before = E.elbo_terms(model, guide, test, num_particles=4)["elbo"]
    trainer.fit(train, epochs=3, batch_size=50)
    after = E.elbo_terms(model, guide, test, num_particles=4)["elbo"]
    assert after > before + 50, (before, after)  # from ~-550 nats (random weights) to well under -250


# --------------------------------------------------------------------------------------------------
# pictures


def test_pictures_are_written(tmp_path):
    from PIL import Image

    model, guide = _draw(True, steps=3)
    written = write_draw_pictures(model, guide, _images(5), tmp_path, num=5)
    names = sorted(p.name for p in written)
    assert names == ["draw_attention.png", "draw_generation.gif", "draw_generation.png", "draw_reconstruction.png"]
    grid = Image.open(tmp_path / "draw_generation.png")
    assert grid.size == (3 * (SIDE + 1) + 1, 5 * (SIDE + 1) + 1)  # columns = steps, rows = examples
    gif = Image.open(tmp_path / "draw_generation.gif")
    assert gif.n_frames == 3
    record = guide.trajectory(_images(5))
    assert record["canvas"].shape == (3, 5, 1, SIDE, SIDE) and record["read"].shape == record["write"].shape == (3, 5, 4)


# --------------------------------------------------------------------------------------------------
# the hand-written reference of benchmarks/speed.py computes the same bound


@pytest.mark.parametrize("attention", [False, True], ids=["no-attention", "attention"])
def test_hand_written_reference_draws_the_same_noise_and_bound(attention):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from draw_reference import HandDRAW

    model, guide = _draw(attention, steps=4)
    x = _images(6)
    objective = ELBO()
    objective.log_weights(model, guide, x)  # guesses the plate nesting once
    pyro.set_rng_seed(5)
    want = objective.log_weights(model, guide, x).log_w[0]
    pyro.set_rng_seed(5)
    got = HandDRAW(model, guide).log_weights(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)


@pytest.mark.slow  # recording 64 unrolled steps: minutes on the shared 2-core machine
def test_a_64_step_unrolled_step_replays_exactly():
    # the paper's 64 steps (tiny networks): one graph of 64 steps x (read, encoder, sample, decoder, write)
    build = lambda: (lambda m: (m, DRAWGuide(m)))(DRAW((1, SIDE, SIDE), steps=64, z_dim=2, hidden=4, attention=True, write_size=3))
    plain, plain_losses, _ = _train(build, "off", steps=3)
    fast, fast_losses, _ = _train(build, "replay", steps=3)
    assert fast.gradients.capture.captured == 1, fast.capture_report
    assert all(torch.equal(a, b) for a, b in zip(plain_losses, fast_losses))
    assert all(torch.equal(p0, p1) for p0, p1 in zip(plain.params.values(), fast.params.values()))


@pytest.mark.parametrize("x_shape", [(1, 28, 28), (3, 32, 32)], ids=["28x28", "32x32x3"])
def test_convdraw_image_sizes(x_shape):
    model = ConvDRAW(x_shape, steps=2, z_channels=2, hidden=4, kernel=3, likelihood="gaussian" if x_shape[0] == 3 else "bernoulli")
    guide = ConvDRAWGuide(model)
    x = torch.rand(3, *x_shape) if x_shape[0] == 3 else torch.bernoulli(torch.rand(3, *x_shape))
    lw = ELBO().log_weights(model, guide, x)
    assert lw.log_w.shape == (1, 3) and torch.isfinite(lw.log_w).all()
    assert lw.guide_trace.nodes["z_1"]["value"].shape[-3:] == (x_shape[1] // 4, x_shape[2] // 4, 2)
    assert model.trajectory(2)["canvas"].shape == (2, 2, *x_shape)


def test_cli_trains_evaluates_and_samples_draw_with_pictures(data_root, tmp_path):
    import json

    from pyrovae.cli import main

    run = tmp_path / "run"
    common = ["--no-progress", "--data-dir", str(data_root), "--device", "cpu"]
    code = main([
        "train", "--dataset", "binarized-mnist", "--model", "draw", "--attention", "--draw-steps", "3", "--draw-z", "4",
        "--lstm-size", "16", "--read-size", "3", "--write-size", "4", "--train-limit", "500", "--epochs", "1",
        "--run-dir", str(run), "--eval-samples", "5", "--eval-limit", "10", *common,
    ])
    assert code == 0
    config = json.loads((run / "config.json").read_text())
    assert config["guide"] == "draw" and config["attention"] and config["draw_steps"] == 3
    result = json.loads((run / "evaluation.json").read_text())
    assert math.isfinite(result["test_nll"]) and set(result["active_units"]) == {"z_1", "z_2", "z_3"}
    for name in ("draw_generation.png", "draw_generation.gif", "draw_reconstruction.png", "draw_attention.png"):
        assert (run / name).stat().st_size > 0, name
    before = {name: (run / name).read_bytes() for name in ("draw_generation.png", "draw_generation.gif")}
    assert main(["sample", str(run), "-n", "4", "--device", "cpu"]) == 0
    # sample names its pictures after its own output and leaves the evaluation's in place
    assert (run / "draw_generation-samples-seed0-n4.gif").stat().st_size > 0 and (run / "draw_generation-samples-seed0-n4.png").exists()
    assert {name: (run / name).read_bytes() for name in before} == before
