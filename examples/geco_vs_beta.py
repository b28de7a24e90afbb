"""GECO against beta-VAE on the information plane (Rezende & Viola 2018, "Taming VAEs").

beta-VAE trades reconstruction for KL through a weight you must guess; GECO states the reconstruction error you
need (`GECO("RE", tolerance)`: mean squared error <= tolerance^2) and finds the multiplier that meets it with as
little KL as it can. Each trained pair becomes one point of the information plane: KL(q(z|x) || p(z)) against the
reconstruction NLL under one re-fitted decoder standard deviation (`information_plane`, the paper's Appendix D),
so that every model is compared on the same decoder. The plot is written to `--out`.

    PYROVAE_DATA=../shared/data python examples/geco_vs_beta.py   # MNIST, 10 epochs per point
    python examples/geco_vs_beta.py --smoke                       # synthetic images, two points each, seconds
"""

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pyro  # noqa: E402
import torch  # noqa: E402

from pyrovae.data import from_array, load_dataset  # noqa: E402
from pyrovae.evaluate import geco_trajectory, information_plane  # noqa: E402
from pyrovae.guides import GaussianEncoder  # noqa: E402
from pyrovae.models import VAE  # noqa: E402
from pyrovae.objectives import GECO, BetaELBO  # noqa: E402
from pyrovae.train import Trainer  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a few steps on synthetic data")
    parser.add_argument("--out", default="geco_info_plane.png", help="the information-plane plot")
    args = parser.parse_args(argv)
    if args.smoke:
        data = from_array(torch.rand(256, 1, 28, 28), test=torch.rand(64, 1, 28, 28))
        betas, tolerances, epochs, hidden, capture = [1.0, 4.0], [0.3, 0.4], 1, ((64,),), "off"
    else:
        data = load_dataset("mnist")
        betas, tolerances, epochs, hidden, capture = [0.5, 1.0, 2.0, 4.0, 8.0], [0.15, 0.2, 0.25], 10, None, "replay"
    shape = (1, 28, 28)

    points = {"beta-VAE": [], "GECO-RE": []}
    runs = [("beta-VAE", b, BetaELBO(beta=b)) for b in betas] + [("GECO-RE", t, GECO("RE", tolerance=t)) for t in tolerances]
    for family, setting, objective in runs:
        pyro.clear_param_store()
        model = VAE(x_shape=shape, z_dims=(20,), hidden=hidden, likelihood="continuous_bernoulli")
        guide = GaussianEncoder(x_shape=shape, z_dims=(20,), hidden=hidden)
        history = Trainer(model, guide, objective, progress=False, capture=capture).fit(data.train, epochs=epochs, batch_size=64)
        point = information_plane(model, guide, data.test)
        points[family].append((setting, point["kl"], point["recon_nll"]))
        extra = f", final lambda {geco_trajectory(history)['lambda'][-1]:.3g}" if family == "GECO-RE" else ""
        print(f"{family} {setting}: KL {point['kl']:.2f}, reconstruction NLL {point['recon_nll']:.2f}{extra}")

    fig, ax = plt.subplots(figsize=(5, 4))
    for family, marker in (("beta-VAE", "o"), ("GECO-RE", "s")):
        settings, kl, nll = zip(*points[family])
        ax.plot(kl, nll, marker=marker, label=family)
        for s, x, y in zip(settings, kl, nll):
            ax.annotate(f"{s:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("KL(q(z|x) || p(z)) [nats]")
    ax.set_ylabel("reconstruction NLL, re-fitted sigma [nats]")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    print("information plane in", args.out)


if __name__ == "__main__":
    main()
