"""A conditional VAE on (x, y) tuples: p(z) p(x | z, y) and q(z | x, y), written as plain Pyro programs.

The data is a tuple `(images, one_hot_labels)`; the trainer slices every batch from both tensors with the same
permutation and calls `model(x, y)`, `guide(x, y)`, and the log-likelihood takes the same tuple. After training,
`evaluate.sample(model, n, x_shape, inputs=(y,))` draws images of chosen classes.

    PYROVAE_DATA=../shared/data python examples/conditional_vae.py   # MNIST with its labels, 10 epochs
    python examples/conditional_vae.py --smoke                       # synthetic images and labels, seconds
"""

import argparse

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from pyrovae import evaluate
from pyrovae.data import load_dataset
from pyrovae.objectives import IWAE
from pyrovae.train import Trainer

Z, CLASSES, PIXELS = 16, 10, 28 * 28

decoder = nn.Sequential(nn.Linear(Z + CLASSES, 256), nn.Tanh(), nn.Linear(256, PIXELS))
encoder = nn.Sequential(nn.Linear(PIXELS + CLASSES, 256), nn.Tanh(), nn.Linear(256, 2 * Z))


def model(x, y):  # y: one-hot labels [batch, CLASSES]
    pyro.module("decoder", decoder)
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(x.new_zeros(x.shape[0], Z), 1.0).to_event(1))
        y = y.expand(*z.shape[:-1], CLASSES)  # under vectorised particles z has a particle dimension in front
        logits = decoder(torch.cat([z, y], -1)).reshape(*z.shape[:-1], *x.shape[1:])
        pyro.sample("x", dist.Bernoulli(logits=logits).to_event(x.dim() - 1), obs=x)


def guide(x, y):
    pyro.module("encoder", encoder)
    with pyro.plate("data", x.shape[0]):
        loc, log_scale = encoder(torch.cat([x.flatten(1), y], -1)).chunk(2, -1)
        pyro.sample("z", dist.Normal(loc, log_scale.exp()).to_event(1))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a few steps on synthetic data")
    parser.add_argument("--out", default="conditional_samples.png", help="picture of samples, one row per class")
    args = parser.parse_args(argv)
    capture = "off" if args.smoke else "replay"  # recording the fast step takes longer than a smoke run
    if args.smoke:
        x, labels = torch.rand(288, 1, 28, 28).round(), torch.randint(CLASSES, (288,))
        train, test, epochs, k = (x[:256], labels[:256]), (x[256:], labels[256:]), 1, 10
    else:
        data = load_dataset("mnist", binarize="dynamic")
        train, test, epochs, k = (data.train, data.train_labels), (data.test.bernoulli()[:1000], data.test_labels[:1000]), 10, 1000
    one_hot = lambda labels: nn.functional.one_hot(labels, CLASSES).float()  # noqa: E731
    train, test = (train[0], one_hot(train[1])), (test[0], one_hot(test[1]))

    pyro.clear_param_store()
    Trainer(model, guide, IWAE(num_particles=4), progress=False, capture=capture).fit(train, epochs=epochs, batch_size=64, dynamic_binarize=True)
    ll = evaluate.log_likelihood(model, guide, test, num_samples=k)
    print(f"test NLL {-ll.values.mean():.2f} nats (k = {k})")

    y = one_hot(torch.arange(CLASSES).repeat_interleave(8))  # 8 samples of each class
    images = evaluate.sample(model, len(y), (1, 28, 28), inputs=(y,))
    import torchvision

    torchvision.utils.save_image(images, args.out, nrow=8)
    print(f"samples of each class in {args.out}")


if __name__ == "__main__":
    main()
