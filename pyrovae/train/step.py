"""The objective's gradients on one batch, as a function of its inputs: the part of a training step that the fast
path (:mod:`pyrovae.capture`) records once per step signature and replays without Pyro's Python."""
from __future__ import annotations

from typing import Callable, Optional

import pyro
import torch
from pyro.infer.util import is_validation_enabled

from pyrovae.capture import GraphCache, grad_norm
from pyrovae.objectives.base import Objective


def capture_refusal(objective) -> Optional[str]:
    """Why the fast path cannot take an objective's steps (None if it can): state kept outside ``Objective.state``
    would be frozen into a recorded graph."""
    if isinstance(objective, Objective):
        held, declared = set(objective.state_dict()), set(objective.initial_state())
        if held != declared:
            return (
                f"{type(objective).__name__} keeps state between steps outside its state dict ({sorted(held - declared)}), "
                "which a captured graph would freeze: keep it in Objective.state (initial_state, and estimate's returned state)"
            )
    return None


class Gradients:
    """``gradients(batch)`` -> ``(loss per datum, gradient norm, gradients, metrics, next objective state)`` of
    ``objective`` on ``batch`` from the objective's current state, all on the device.

    Pyro's and torch.distributions' argument/support validation runs on the first call only (unless
    ``validate_every_step``): each check is a host read, and non-finite values are caught anyway by the trainer's
    periodic finiteness check. Later calls take the captured fast path (``capture``: ``replay``, ``compile`` or
    ``off``), whose graphs are checked against the plain call every ``verify_every`` replays and then at doubling
    intervals; :attr:`report` says which calls ran captured and why any ran plainly.

    Args:
        params: a function returning the parameters to differentiate, in a fixed order.
        modules: the ``nn.Module`` programs (their buffers are inputs of a recorded graph).
    """

    def __init__(self, model, guide, objective, params: Callable[[], list], modules: list, capture: str = "replay",
                 verify_every: int = 100, validate_every_step: bool = False):
        self.model, self.guide, self.objective, self.params = model, guide, objective, params
        self.validate_every_step, self._validate_next = bool(validate_every_step), True
        self.capture: Optional[GraphCache] = None
        if capture != "off":
            self.capture = GraphCache(self._plain, capture, params=params, modules=lambda: modules, verify_every=verify_every, what="step", no_grad=False,
                                        max_compiled=1)
            self.capture.refused = capture_refusal(objective)

    @property
    def report(self) -> str:
        """Which steps run captured, and why any run plainly."""
        return "plain steps (capture='off')" if self.capture is None else self.capture.summary()

    def __call__(self, batch: tuple):
        validate = self._validate_next and is_validation_enabled()
        self._validate_next = self.validate_every_step
        inputs, static = self._inputs(batch)
        if validate or self.capture is None:
            return self._plain(inputs, *static, validate=validate)
        return self.capture(inputs, *static)

    def plain(self, batch: tuple, validate: bool = False):
        """The same through Pyro, never captured (the objective's state is not advanced)."""
        inputs, static = self._inputs(batch)
        return self._plain(inputs, *static, validate=validate)

    def _inputs(self, batch: tuple) -> tuple[tuple, tuple]:
        """The tensor inputs (the batch, then the objective's state) and the static arguments."""
        state = self.objective.state if isinstance(self.objective, Objective) else {}
        return (*batch, *state.values()), (len(batch), tuple(state))

    def _plain(self, inputs: tuple, num_batch: int, state_keys: tuple, validate: bool = False):
        batch, state = inputs[:num_batch], dict(zip(state_keys, inputs[num_batch:]))
        with pyro.validation_enabled(validate):
            if isinstance(self.objective, Objective):
                est = self.objective.estimate(self.model, self.guide, batch, {}, state)
                loss, metrics, state = est.differentiable(), est.metrics, est.state
            else:  # Pyro's own ELBOs keep no state
                loss, metrics, state = self.objective.differentiable_loss(self.model, self.guide, *batch), {}, {}
            loss = loss / batch[0].shape[0]
        grads = torch.autograd.grad(loss, self.params(), allow_unused=True)
        metrics = {k: v.detach() for k, v in metrics.items() if torch.is_tensor(v)}
        return loss.detach(), grad_norm(grads), grads, metrics, {k: v.detach() for k, v in state.items()}
