"""``python -m pyrovae ...``: the command line, also under torchrun (``torchrun --nproc-per-node N -m pyrovae train ...``)."""
import sys

from pyrovae.cli import main

sys.exit(main())
