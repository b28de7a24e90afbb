"""Discrete latents with VIMCO: a VAE with Bernoulli codes, trained by the multi-sample bound's VIMCO estimator.

The codes cannot be reparameterised, so the pathwise IWAE gradient does not exist (`IWAE(K)` refuses them);
`IWAE(K, estimator="vimco")` gives each sample's log q(z) the bound minus the bound with that sample left out
(Mnih & Rezende 2016). With a small code the model's exact log p(x), a sum over all 2^z_dim codes
(`DiscreteVAE.log_marginal`), checks the importance-sampled estimate.

    PYROVAE_DATA=../shared/data python examples/discrete_vimco.py   # binarized MNIST, 10-bit codes, 5 epochs
    python examples/discrete_vimco.py --smoke                       # synthetic images, seconds
"""

import argparse

import pyro
import torch

from pyrovae import evaluate
from pyrovae.data import from_array, load_dataset
from pyrovae.guides import BernoulliEncoder
from pyrovae.models import DiscreteVAE
from pyrovae.objectives import IWAE
from pyrovae.train import Trainer


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a few steps on synthetic data")
    args = parser.parse_args(argv)
    capture = "off" if args.smoke else "replay"  # recording the fast step takes longer than a smoke run
    if args.smoke:
        data = from_array(torch.rand(256, 1, 28, 28).round(), test=torch.rand(32, 1, 28, 28).round())
        epochs, k, hidden = 1, 10, (64,)
    else:
        data = load_dataset("binarized-mnist")
        epochs, k, hidden = 5, 1000, (200, 200)
    shape, bits = (1, 28, 28), 10

    pyro.clear_param_store()
    model = DiscreteVAE(x_shape=shape, z_dim=bits, hidden=hidden)
    guide = BernoulliEncoder(x_shape=shape, z_dim=bits, hidden=hidden)
    Trainer(model, guide, IWAE(num_particles=8, estimator="vimco"), progress=False, capture=capture).fit(data.train, epochs=epochs, batch_size=64)

    test = data.test[:500]
    with torch.no_grad():
        exact = model.log_marginal(test)  # sum over all 2^bits codes
    ll = evaluate.log_likelihood(model, guide, test, num_samples=k)
    print(f"test NLL: exact {-exact.mean():.2f}, importance sampled {-ll.values.mean():.2f} (k = {k}) nats")


if __name__ == "__main__":
    main()
