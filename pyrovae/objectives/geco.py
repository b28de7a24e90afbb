"""GECO: constrained optimisation of a VAE (Rezende & Viola 2018, "Taming VAEs", Algorithm 1).

    minimise_{theta, phi} KL(q(z|x) || p(z))   subject to   E[C(x, g(z))] <= 0

with the Lagrangian L = KL + lambda * C_t, where C_t carries the value of the moving average
C_ma = alpha * C_ma + (1 - alpha) * C_hat and the gradient of the batch constraint C_hat, and
lambda <- lambda * exp(nu * C_ma) after each step (the paper's rule; kept in [lambda_min, lambda_max]).

``multiplier_step="clamped"`` limits each step of log lambda to +-(1 - alpha), so that lambda moves by at most
a factor e over the moving average's lag of about 1 / (1 - alpha) steps. Under the paper's rule a large early
violation (C_ma many times the tolerance) can drive lambda up by orders of magnitude within tens of steps,
and it stays high until the average forgets the first batches; the clamp trades that overshoot for a rule
in which nu no longer matters once |nu C_ma| > 1 - alpha (the step is then sign-based). Use it when the
constraint starts far from its tolerance (e.g. a small tolerance on an untrained decoder).

g(z) is the mean of the model's observed site. For numerical stability the gradient is taken of
L / (1 + lambda): the same direction as L, with bounded magnitude while lambda moves over orders of
magnitude, so a fast-growing multiplier early in training cannot wreck the optimiser's moment estimates.
Non-reparameterisable guide sites (discrete latents) get the score-function gradient of E_q[KL + lambda C],
with the ELBO's leave-one-out baseline.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from pyrovae.objectives.engine import observed_mean, observed_site  # noqa: F401  (observed_site: re-exported)
from pyrovae.objectives.base import Estimate, LogWeights, Objective, score_function_term
from pyrovae.utils.registry import register_objective

ConstraintFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _flat(t: torch.Tensor, event_ndim: int) -> torch.Tensor:
    return t.reshape(*t.shape[: t.dim() - event_ndim], -1)


class Constraint:
    """C(x, x_hat) per datum: ``x`` is ``[B, *event]``, ``x_hat`` is ``[P, B, *event]``; returns ``[P, B]``.
    Satisfied when <= 0."""

    name = "constraint"

    def __init__(self, tolerance: float):
        if not isinstance(tolerance, (int, float)) or not math.isfinite(tolerance) or tolerance < 0:
            raise ValueError(f"tolerance={tolerance!r} must be a finite number >= 0 (the constraint's allowed level)")
        self.tolerance = float(tolerance)

    def __call__(self, x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def evaluate(self, x: torch.Tensor, x_hat: torch.Tensor, args: tuple) -> torch.Tensor:
        """C for a batch whose program arguments are ``args`` (``x`` is the observed value); by default
        ``self(x, x_hat)``. A constraint that needs more than the data (labels) reads it from ``args``."""
        return self(x, x_hat)


class RE(Constraint):
    """Reconstruction error: mean over dimensions of (x - g(z))^2, minus tolerance^2 (tolerance: RMS error)."""

    name = "RE"

    def __call__(self, x, x_hat):
        event = x.dim() - 1
        return _flat((x - x_hat).pow(2), event).mean(-1) - self.tolerance**2


class FRE(Constraint):
    """Feature reconstruction error: RE in the space of a user-given feature map ``features``."""

    name = "FRE"

    def __init__(self, tolerance: float, features: Optional[Callable[[torch.Tensor], torch.Tensor]] = None):
        super().__init__(tolerance)
        if features is None or not callable(features):
            raise ValueError("FRE needs features=callable mapping a batch of data [N, *x_shape] to features [N, ...]")
        self.features = features

    def __call__(self, x, x_hat):
        f_x = self.features(x)
        f_hat = self.features(x_hat.reshape(-1, *x.shape[1:]))
        f_hat = f_hat.reshape(x_hat.shape[0], *f_x.shape)
        return _flat((f_x - f_hat).pow(2), f_x.dim() - 1).mean(-1) - self.tolerance**2


class CLA(Constraint):
    """Classification constraint: cross-entropy of a user-given ``classifier`` on the reconstruction, minus
    ``tolerance`` (nats). tolerance = -log(0.9) asks for probability >= 0.9 on the right class on average.

    Args:
        tolerance: in nats.
        classifier: maps a batch of data ``[N, *x_shape]`` to class logits ``[N, C]``.
        target: ``label`` (the paper's: the true class, read from the program's argument ``label_arg``, as
            class indices ``[B]`` or one-hot ``[B, C]``; the program is then ``model(x, y)``), or ``predicted``
            (the class the classifier assigns to the data itself; for data without labels).
        label_arg: the position of the labels among the program's arguments.
    """

    name = "CLA"
    TARGETS = ("label", "predicted")

    def __init__(self, tolerance: float, classifier: Optional[Callable[[torch.Tensor], torch.Tensor]] = None, target: str = "label", label_arg: int = 1):
        super().__init__(tolerance)
        if classifier is None or not callable(classifier):
            raise ValueError("CLA needs classifier=callable mapping a batch of data [N, *x_shape] to class logits [N, C]")
        if target not in self.TARGETS:
            raise ValueError(f"target={target!r} is not known; choose one of {list(self.TARGETS)}")
        self.classifier, self.target, self.label_arg = classifier, target, int(label_arg)

    def _cross_entropy(self, x_hat: torch.Tensor, target: torch.Tensor, x_shape) -> torch.Tensor:
        logits = self.classifier(x_hat.reshape(-1, *x_shape))
        target = target.expand(x_hat.shape[0], *target.shape).reshape(-1, *target.shape[1:])
        ce = F.cross_entropy(logits, target, reduction="none")
        return ce.reshape(x_hat.shape[:2]) - self.tolerance

    def __call__(self, x, x_hat):
        with torch.no_grad():
            target = self.classifier(x).argmax(-1)
        return self._cross_entropy(x_hat, target, x.shape[1:])

    def evaluate(self, x, x_hat, args):
        if self.target == "predicted":
            return self(x, x_hat)
        if len(args) <= self.label_arg or not torch.is_tensor(args[self.label_arg]):
            raise ValueError(
                f"CLA(target='label') reads the true labels from the program's argument {self.label_arg} (model(x, y)), "
                f"but the program got {len(args)} argument(s); pass the labels (Trainer.fit((x, y))), or use "
                "CLA(target='predicted') to take the classifier's own class for the data"
            )
        y = args[self.label_arg]
        if y.dim() == 2:  # one-hot (or class probabilities): F.cross_entropy takes them as soft targets
            y = y.to(x_hat.dtype)
        return self._cross_entropy(x_hat, y, x.shape[1:])


class PNCC(Constraint):
    """Patch normalised cross-correlation: tolerance - mean over non-overlapping ``patch x patch`` patches of
    NCC(x, g(z)). NCC lies in [-1, 1]; tolerance in (0, 1] is the mean correlation asked for."""

    name = "pNCC"

    def __init__(self, tolerance: float, patch: int = 7, eps: float = 1e-4):
        super().__init__(tolerance)
        if not 0 < tolerance <= 1:
            raise ValueError(f"tolerance={tolerance!r}: pNCC asks for a mean patch correlation, so it must be in (0, 1]")
        if int(patch) < 2:
            raise ValueError(f"patch={patch!r} must be at least 2 pixels")
        self.patch, self.eps = int(patch), float(eps)

    def _patches(self, t: torch.Tensor) -> torch.Tensor:
        c, h, w = t.shape[-3:]
        t = t.reshape(-1, c, h, w)
        p = F.unfold(t, self.patch, stride=self.patch)  # [N, c*k*k, L]
        return p

    def __call__(self, x, x_hat):
        if x.dim() != 4:
            raise ValueError(f"pNCC needs image data [batch, channels, height, width]; got a batch of shape {tuple(x.shape)}")
        a = self._patches(x.expand_as(x_hat))
        b = self._patches(x_hat)
        a = a - a.mean(1, keepdim=True)
        b = b - b.mean(1, keepdim=True)
        ncc = (a * b).sum(1) / torch.sqrt((a * a).sum(1) * (b * b).sum(1) + self.eps)
        return self.tolerance - ncc.mean(-1).reshape(x_hat.shape[:2])


CONSTRAINTS: dict[str, type] = {"RE": RE, "FRE": FRE, "CLA": CLA, "pNCC": PNCC}


def make_constraint(constraint: Union[str, Constraint, ConstraintFn], tolerance: float, **kwargs) -> Constraint:
    if isinstance(constraint, Constraint):
        return constraint
    if isinstance(constraint, str):
        if constraint not in CONSTRAINTS:
            raise ValueError(f"constraint={constraint!r} is not known; choose one of {sorted(CONSTRAINTS)} or pass a callable C(x, x_hat)")
        return CONSTRAINTS[constraint](tolerance, **kwargs)
    if callable(constraint):
        return _Callable(tolerance, constraint)
    raise TypeError(f"constraint must be a name {sorted(CONSTRAINTS)}, a Constraint or a callable; got {type(constraint).__name__}")


class _Callable(Constraint):
    name = "custom"

    def __init__(self, tolerance, fn):
        super().__init__(tolerance)
        self.fn = fn

    def __call__(self, x, x_hat):
        return self.fn(x, x_hat) - self.tolerance


MULTIPLIER_STEPS = ("paper", "clamped")
_BASE_ARGS = ("max_plate_nesting", "data_plate", "vectorize_particles", "strict_enumeration_warning", "retain_graph", "max_iarange_nesting", "ignore_jit_warnings", "jit_options")


@register_objective(
    "geco", flags={"alpha": "geco_alpha", "nu": "geco_nu", "multiplier_step": "geco_multiplier_step"},
    choices={"constraint": ("RE", "pNCC"), "multiplier_step": MULTIPLIER_STEPS}, exclude=("lambda_init", "lambda_min", "lambda_max", "obs_site"),
)
class GECO(Objective):
    """Rezende & Viola's GECO, Algorithm 1.

    Args:
        constraint: ``RE``, ``FRE``, ``CLA``, ``pNCC``, a :class:`Constraint`, or a callable C(x, x_hat) -> [P, B].
        tolerance: the constraint's allowed level (kappa), >= 0.
        alpha: moving-average rate of the constraint (0.99 in the paper).
        lambda_init: initial Lagrange multiplier.
        nu: multiplier rate: lambda <- lambda * exp(nu * C_ma).
        multiplier_step: ``paper`` (that rule) or ``clamped`` (each step of log lambda limited to +-(1 - alpha);
            see the module docstring for when to use it).
        lambda_min, lambda_max: bounds that keep lambda finite and positive.
        num_particles: samples per datum.
        obs_site: the observed site giving g(z) (default: the model's only observed site).
        **kwargs: :class:`~pyrovae.objectives.base.Objective`'s ``max_plate_nesting``, ``data_plate`` and
            ``vectorize_particles``; the rest go to the constraint: ``features=`` (FRE), ``classifier=``,
            ``target=``, ``label_arg=`` (CLA), ``patch=`` (pNCC).

    The logged loss is the Lagrangian KL + lambda * C_ma per batch (KL of the local latents summed over the
    batch, plus that of any global latents); ``metrics`` holds ``lambda``, ``constraint`` (C_ma),
    ``constraint_batch`` and ``kl``.
    """

    def __init__(
        self,
        constraint: Union[str, Constraint, ConstraintFn] = "RE",
        tolerance: float = 0.1,
        alpha: float = 0.99,
        lambda_init: float = 1.0,
        nu: float = 1.0,
        lambda_min: float = 1e-6,
        lambda_max: float = 1e6,
        num_particles: int = 1,
        obs_site: Optional[str] = None,
        multiplier_step: str = "paper",
        **kwargs,
    ):
        base = {k: kwargs.pop(k) for k in _BASE_ARGS if k in kwargs}
        super().__init__(num_particles=num_particles, **base)
        self.constraint = make_constraint(constraint, tolerance, **kwargs)
        if not 0 <= alpha < 1:
            raise ValueError(f"alpha={alpha!r} must be in [0, 1): it is the moving-average rate of the constraint")
        if not (0 < lambda_min <= lambda_init <= lambda_max):
            raise ValueError(f"need 0 < lambda_min <= lambda_init <= lambda_max; got {lambda_min}, {lambda_init}, {lambda_max}")
        if not nu > 0:
            raise ValueError(f"nu={nu!r} must be positive (the multiplier's rate)")
        if multiplier_step not in MULTIPLIER_STEPS:
            raise ValueError(f"multiplier_step={multiplier_step!r} is not known; choose one of {list(MULTIPLIER_STEPS)}")
        self.alpha, self.nu, self.multiplier_step = float(alpha), float(nu), multiplier_step
        self.log_lambda_min, self.log_lambda_max = math.log(lambda_min), math.log(lambda_max)
        self.lambda_init = float(lambda_init)
        self.obs_site = obs_site

    def initial_state(self) -> dict[str, torch.Tensor]:
        # c_ma is NaN until the first training step: the moving average then starts at that step's C_hat
        return {"log_lambda": torch.tensor(math.log(self.lambda_init)), "c_ma": torch.tensor(float("nan"))}

    @property
    def log_lambda(self) -> torch.Tensor:
        return self.state["log_lambda"]

    @property
    def c_ma(self) -> Optional[torch.Tensor]:
        """The constraint's moving average after the last training step (None before the first)."""
        c_ma = self.state["c_ma"]
        return None if bool(torch.isnan(c_ma)) else c_ma

    @property
    def lagrange_multiplier(self) -> torch.Tensor:
        return self.log_lambda.exp()

    def constraint_values(self, lw: LogWeights, args: tuple) -> torch.Tensor:
        """C per particle and datum, ``[P, B]``: the constraint on g(z), the mean of the observed site. A
        subclass may constrain another function of the log weights (e.g. the reconstruction NLL per token)."""
        x_hat, x = observed_mean(lw, self.obs_site, args[0] if args and torch.is_tensor(args[0]) else None)
        return self.constraint.evaluate(x, x_hat, args)

    def estimate(self, model, guide, args, kwargs, state):
        lw = self.log_weights(model, guide, *args, **kwargs)
        c = self.constraint_values(lw, args)  # [P, B]
        c_hat = c.mean()
        glob_kl = lw.glob_qz - lw.glob_pz  # [P]: KL terms of global latents, shared by the batch
        kl = lw.kl.mean(0).sum() + glob_kl.mean()
        prev = state["c_ma"].to(c_hat)
        c_ma = torch.where(torch.isnan(prev), c_hat.detach(), self.alpha * prev + (1 - self.alpha) * c_hat.detach())
        c_t = c_hat + (c_ma - c_hat).detach()
        log_lambda = state["log_lambda"].to(c_hat)
        lam = log_lambda.exp()
        batch = lw.batch_size
        lagrangian = kl + lam * c_t * batch
        metrics = self._record(lw, **{"kl": kl / batch, "lambda": lam, "constraint": c_ma, "constraint_batch": c_hat})
        surrogate = lagrangian
        if lw.nonreparam_sites:  # d/dphi E_q[KL + lambda C] through q's own density
            kl_coefficients = {"log_pz": -1.0, "log_qz": 1.0, "glob_pz": -1.0, "glob_qz": 1.0}
            surrogate = surrogate + score_function_term(lw, kl_coefficients, lam * c).mean(0)
        delta = self.nu * c_ma
        if self.multiplier_step == "clamped":
            rate = 1.0 - self.alpha
            delta = delta.clamp(-rate, rate)
        next_state = {"log_lambda": (log_lambda + delta).clamp(self.log_lambda_min, self.log_lambda_max), "c_ma": c_ma}
        return Estimate(lagrangian, surrogate / (1 + lam), metrics, next_state)

    def load_state_dict(self, state: dict) -> None:
        if state.get("c_ma", 0) is None:  # checkpoints before the first step (and of earlier versions) hold None
            state = {**state, "c_ma": torch.tensor(float("nan"))}
        super().load_state_dict(state)

    def __repr__(self) -> str:
        return (
            f"GECO(constraint={self.constraint.name}, tolerance={self.constraint.tolerance}, alpha={self.alpha}, nu={self.nu}, "
            f"multiplier_step={self.multiplier_step!r})"
        )
