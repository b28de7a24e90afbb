"""Training on several processes with torchrun: the same script on 1 or N devices, one line to join the group.

torchrun starts one process per device; `distributed.init()` joins its process group (NCCL on CUDA, each process on
`cuda:LOCAL_RANK`; gloo on CPU) and does nothing in a single process. `Trainer.fit` then shards each global batch
over the ranks and averages the gradients, so the optimiser steps are those of one process on the global batch.
Rank 0 alone prints and writes files. The CLI does the same with `torchrun ... -m pyrovae train ...`.

    PYROVAE_DATA=../shared/data torchrun --nproc-per-node 4 examples/torchrun_launch.py   # 4 GPUs (or CPU processes)
    python examples/torchrun_launch.py --smoke     # launches itself under torchrun: 2 CPU processes, gloo, seconds
"""

import argparse
import os
import subprocess
import sys

import pyro
import torch

from pyrovae.data import from_array, load_dataset
from pyrovae.guides import GaussianEncoder
from pyrovae.models import VAE
from pyrovae.objectives import IWAE
from pyrovae.train import Trainer, distributed


def train(smoke: bool) -> None:
    """What every process runs."""
    device = distributed.init("cpu" if smoke else None)  # this rank's device; the process group when launched
    if smoke:
        torch.manual_seed(0)  # every rank must hold the same data: it is checked
        data = from_array(torch.rand(256, 1, 28, 28).round(), device=device)
        epochs, hidden, capture = 1, ((64,),), "off"
    else:
        data = load_dataset("binarized-mnist", device=device)
        epochs, hidden, capture = 10, None, "replay"
    pyro.clear_param_store()
    model = VAE(x_shape=(1, 28, 28), z_dims=(20,), hidden=hidden).to(device)
    guide = GaussianEncoder(x_shape=(1, 28, 28), z_dims=(20,), hidden=hidden).to(device)
    trainer = Trainer(model, guide, IWAE(num_particles=5), progress=False, capture=capture)
    history = trainer.fit(data.train, epochs=epochs, batch_size=100)  # the global batch: 100 / world size per rank
    if distributed.is_main():
        print(f"{distributed.world_size()} process(es): train bound {history[-1]['train_bound']:.2f} after {epochs} epoch(s)")
    distributed.shutdown()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="2 CPU processes under torchrun, a few steps on synthetic data")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.smoke and not args.worker and not distributed.launched():
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                   os.path.abspath(__file__), "--smoke", "--worker"]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYROVAE_DIST_TIMEOUT="60")
        sys.exit(subprocess.run(command, env=env, timeout=240).returncode)
    train(args.smoke)


if __name__ == "__main__":
    main()
