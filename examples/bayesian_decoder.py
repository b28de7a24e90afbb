"""A Bayesian decoder with the local reparameterisation, trained with Adam and with the natural gradient.

`BayesVAE(bayesian_decoder=True)` gives the decoder's weights a N(0, 1) prior; `BayesEncoder(model=model)` is the
amortised q(z | x) together with a factorised Normal q(W) over those weights (full-Bayes AEVB, Kingma & Welling 2014,
appendix F). With `local_reparam=True` each example draws its own pre-activations B ~ N(A mu, A^2 sigma^2) instead
of sharing one weight sample per batch (Kingma, Salimans & Welling 2015): the same ELBO with a lower-variance
gradient. The same pair is then trained with `NaturalGradient` (K-FAC blocks for the linear layers; plain steps,
since a replayed graph fires no hooks). In eval mode the decoder uses the posterior means.

    PYROVAE_DATA=../shared/data python examples/bayesian_decoder.py   # MNIST, 3 epochs per optimiser
    python examples/bayesian_decoder.py --smoke                       # synthetic images, seconds
"""

import argparse

import pyro
import torch

from pyrovae.data import from_array, load_dataset
from pyrovae.evaluate import elbo_terms
from pyrovae.guides.bayesian import BayesEncoder
from pyrovae.models.bayesian import BayesVAE
from pyrovae.objectives import ELBO
from pyrovae.train import Trainer
from pyrovae.train.optim import NaturalGradient


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a few steps on synthetic data")
    args = parser.parse_args(argv)
    if args.smoke:
        data = from_array(torch.rand(256, 1, 28, 28).round(), test=torch.rand(64, 1, 28, 28).round())
        epochs, hidden, capture = 1, (64,), "off"
    else:
        data = load_dataset("mnist", binarize="dynamic")
        epochs, hidden, capture = 3, (200, 200), "replay"
    n = data.train.shape[0]

    optimisers = {
        "Adam": dict(lr=1e-3, capture=capture),
        "natural gradient (K-FAC)": dict(lr=1.0, optimizer=NaturalGradient, capture="off"),  # lr 1, damping 1, kl_clip 10: see docs
    }
    for name, options in optimisers.items():
        pyro.clear_param_store()
        model = BayesVAE(x_shape=(1, 28, 28), z_dim=20, hidden=hidden, bayesian_decoder=True, num_data=n, local_reparam=True)
        guide = BayesEncoder(x_shape=(1, 28, 28), z_dim=20, hidden=hidden, model=model, num_data=n)
        if options.get("optimizer") is NaturalGradient:
            options["optimizer_kwargs"] = {"modules": [model, guide], "damping": 1.0, "kl_clip": 10.0}
        Trainer(model, guide, ELBO(), progress=False, **options).fit(data.train, epochs=epochs, batch_size=100, dynamic_binarize=True)
        model.eval(), guide.eval()  # the decoder's posterior means, as `pyrovae evaluate` measures
        terms = elbo_terms(model, guide, torch.bernoulli(data.test[:1000]))
        print(f"{name:26s} test ELBO {terms['elbo']:.2f}  KL {terms['kl']:.2f}")


if __name__ == "__main__":
    main()
