"""A new model and guide as plain Pyro programs, trained under three objectives with one line changed.

The model and the guide are two functions; nothing in them knows which objective trains them. The loop below
trains a fresh copy under the ELBO, IWAE (K = 5) and IWAE with the DReG estimator: the only line that differs
is the objective. Each is then scored by the same k-sample importance-sampled log-likelihood.

    PYROVAE_DATA=../shared/data python examples/custom_model.py    # MNIST, 5 epochs per objective (minutes)
    python examples/custom_model.py --smoke                        # synthetic images, a few steps (seconds)
"""

import argparse

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from pyrovae import evaluate
from pyrovae.data import from_array, load_dataset
from pyrovae.objectives import ELBO, IWAE
from pyrovae.train import Trainer

Z = 16


def make_model_and_guide(pixels: int):
    decoder = nn.Sequential(nn.Linear(Z, 256), nn.Tanh(), nn.Linear(256, pixels))
    encoder = nn.Sequential(nn.Linear(pixels, 256), nn.Tanh(), nn.Linear(256, 2 * Z))

    def model(x):  # p(z) p(x | z): every per-example site inside the data plate, x observed
        pyro.module("decoder", decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], Z), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=decoder(z)).to_event(1), obs=x.flatten(1))

    def guide(x):  # q(z | x): the same plate, the same latent site
        pyro.module("encoder", encoder)
        with pyro.plate("data", x.shape[0]):
            loc, log_scale = encoder(x.flatten(1)).chunk(2, -1)
            pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))

    return model, guide


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a few steps on synthetic data")
    args = parser.parse_args(argv)
    capture = "off" if args.smoke else "replay"  # recording the fast step takes longer than a smoke run
    if args.smoke:
        data = from_array(torch.rand(256, 1, 28, 28).round(), test=torch.rand(32, 1, 28, 28).round())
        epochs, k = 1, 10
    else:
        data = load_dataset("mnist", binarize="dynamic")
        epochs, k = 5, 1000
    test = torch.bernoulli(data.test[:500])

    for name, objective in [("ELBO", ELBO()), ("IWAE-5", IWAE(num_particles=5)), ("IWAE-5 DReG", IWAE(num_particles=5, estimator="dreg"))]:
        pyro.clear_param_store()
        model, guide = make_model_and_guide(pixels=28 * 28)
        Trainer(model, guide, objective, lr=1e-3, progress=False, capture=capture).fit(data.train, epochs=epochs, batch_size=64, dynamic_binarize=True)
        ll = evaluate.log_likelihood(model, guide, test, num_samples=k)
        print(f"{name:12s} test NLL {-ll.values.mean():.2f} nats (k = {k})")


if __name__ == "__main__":
    main()
