"""Training: the :class:`Trainer` (:mod:`trainer`), callbacks, checkpoints, resume, divergence rollback, input
checks, run folders, torch.distributed and the natural-gradient optimiser."""

from pyrovae.train.trainer import (  # noqa: F401
    SCHEDULES,
    Trainer,
    lr_factor,
)
from pyrovae.train.divergence import (  # noqa: F401
    DivergenceError,
)
from pyrovae.train.resume import (  # noqa: F401
    TrainingInterrupted,
)
from pyrovae.train.checks import (  # noqa: F401
    check_fit_data,
)
