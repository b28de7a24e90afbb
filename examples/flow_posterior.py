"""A flow posterior: q(z | x) a diagonal Gaussian pushed through amortised IAF layers, against the plain Gaussian.

`FlowEncoder` is one `pyro.sample` site, so every objective runs on it unchanged; the flow families are those of
`pyrovae.nn.flows.FLOWS` (planar, radial, iaf, realnvp, householder, sylvester), built on
`pyro.distributions.transforms`. Both guides train the same VAE under the same objective, then are compared on
the k-sample log-likelihood and the ELBO.

    PYROVAE_DATA=../shared/data python examples/flow_posterior.py   # binarized MNIST, 5 epochs each
    python examples/flow_posterior.py --smoke                       # synthetic images, seconds
"""

import argparse

import pyro
import torch

from pyrovae import evaluate
from pyrovae.data import from_array, load_dataset
from pyrovae.guides import FlowEncoder, GaussianEncoder
from pyrovae.models import VAE
from pyrovae.objectives import ELBO
from pyrovae.train import Trainer


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a few steps on synthetic data")
    parser.add_argument("--flow", default="iaf", help="planar, radial, iaf, realnvp, householder or sylvester")
    args = parser.parse_args(argv)
    capture = "off" if args.smoke else "replay"  # recording the fast step takes longer than a smoke run
    if args.smoke:
        data = from_array(torch.rand(256, 1, 28, 28).round(), test=torch.rand(32, 1, 28, 28).round())
        epochs, k, hidden = 1, 10, (64,)
    else:
        data = load_dataset("binarized-mnist")
        epochs, k, hidden = 5, 1000, (200, 200)
    shape, z = (1, 28, 28), 20

    guides = {
        "gaussian": lambda: GaussianEncoder(x_shape=shape, z_dims=(z,), hidden=(hidden,)),
        args.flow: lambda: FlowEncoder(x_shape=shape, z_dim=z, hidden=hidden, flow=args.flow, num_flows=4),
    }
    for name, make_guide in guides.items():
        pyro.clear_param_store()
        model, guide = VAE(x_shape=shape, z_dims=(z,), hidden=(hidden,)), make_guide()
        Trainer(model, guide, ELBO(), progress=False, capture=capture).fit(data.train, epochs=epochs, batch_size=64)
        test = data.test[:1000]
        ll = evaluate.log_likelihood(model, guide, test, num_samples=k)
        terms = evaluate.elbo_terms(model, guide, test)
        print(f"{name:10s} test NLL {-ll.values.mean():.2f}   ELBO {terms['elbo']:.2f}   KL {terms['kl']:.2f}")


if __name__ == "__main__":
    main()
