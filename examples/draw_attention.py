"""DRAW with attention (Gregor et al. 2015): a recurrent VAE that reads and writes through Gaussian glimpses.

`DRAW` is a Pyro program with T latent sites z_1..z_T in the data plate; `DRAWGuide(model)` runs the model's own
decoder, so the two share one set of decoder weights. Any objective trains it (IWAE below). After training,
`write_draw_pictures` writes the canvas after each step, generation as a GIF, and the read (red) and write
(green) windows.

    PYROVAE_DATA=../shared/data python examples/draw_attention.py   # binarized MNIST, 16 steps, 2 epochs (CPU: an hour)
    python examples/draw_attention.py --smoke                       # 4 steps, small LSTMs, synthetic images, seconds
"""

import argparse

import pyro
import torch

from pyrovae import evaluate
from pyrovae.data import from_array, load_dataset
from pyrovae.evaluate.pictures import write_draw_pictures
from pyrovae.guides import DRAWGuide
from pyrovae.models import DRAW
from pyrovae.objectives import IWAE
from pyrovae.train import Trainer


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a few steps on synthetic data")
    parser.add_argument("--out", default="runs/draw-example", help="folder for the pictures")
    args = parser.parse_args(argv)
    capture = "off" if args.smoke else "replay"  # recording the fast step takes longer than a smoke run
    if args.smoke:
        data = from_array(torch.rand(128, 1, 28, 28).round(), test=torch.rand(16, 1, 28, 28).round())
        sizes, epochs, k = dict(steps=4, z_dim=4, hidden=32), 1, 5
    else:
        data = load_dataset("binarized-mnist")
        sizes, epochs, k = dict(steps=16, z_dim=100, hidden=256), 2, 100  # the paper: 64 steps, for a GPU

    pyro.clear_param_store()
    model = DRAW(x_shape=(1, 28, 28), attention=True, read_size=2, write_size=5, **sizes)
    guide = DRAWGuide(model)
    Trainer(model, guide, IWAE(num_particles=2), progress=False, capture=capture).fit(data.train, epochs=epochs, batch_size=64)

    test = data.test[:200]
    ll = evaluate.log_likelihood(model, guide, test, num_samples=k)
    print(f"test NLL {-ll.values.mean():.2f} nats (k = {k})")
    for path in write_draw_pictures(model, guide, test, args.out):
        print("wrote", path)


if __name__ == "__main__":
    main()
