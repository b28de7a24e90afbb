"""``python -m pyrovae``: the ``pyrovae`` command."""
import sys

from pyrovae.cli import main

sys.exit(main())
