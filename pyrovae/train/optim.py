"""Natural-gradient optimisation: :class:`NaturalGradient` (K-FAC blocks for linear layers, diagonal otherwise).

Amari (1998) preconditions the gradient with the inverse Fisher, ``theta <- theta - lr F^-1 g``. For a layer
``s = W a + b`` K-FAC (Martens & Grosse 2015) approximates its Fisher block by a Kronecker product,
``F_W ~= G (x) A`` with ``A = E[a a^T]`` (inputs, a column of ones appended for the bias) and ``G = E[d d^T]``
(``d`` the per-datum gradient of the loss with respect to ``s``), so that ``F_W^-1 vec(grad) = vec(G^-1 grad A^-1)``.
A layer used T times per step (a recurrent cell) sums ``G`` over its uses and averages ``A`` (independence across
uses, Martens, Ba & Johnson 2018), so that the Fisher is not T times too small.
"""
from __future__ import annotations

import math
from typing import Iterable, Optional

import torch
from torch import nn

FISHERS = ("kfac", "diagonal")


class _Block:
    """One ``nn.Linear``'s parameters in this optimiser, with the statistics its hooks collected this step."""

    def __init__(self, module: nn.Linear, weight: Optional[nn.Parameter], bias: Optional[nn.Parameter]):
        self.module, self.weight, self.bias = module, weight, bias
        self.reset()

    def reset(self) -> None:
        self.aa, self.gg, self.ga_sq, self.rows, self.max_rows, self.calls = None, None, None, 0, 0, 0

    def inputs(self, a: torch.Tensor) -> torch.Tensor:
        a = a.reshape(-1, a.shape[-1]) if self.weight is not None else a.new_zeros(a.reshape(-1, a.shape[-1]).shape[0], 0)
        if self.bias is not None:
            a = torch.cat([a, a.new_ones(a.shape[0], 1)], dim=1)
        return a

    def record(self, a: torch.Tensor, g: torch.Tensor, diagonal: bool) -> None:
        """Add one use of the layer: sums over its rows of ``a a^T`` and ``g g^T`` (or ``g^2 (a^2)^T``), unscaled."""
        a, g = self.inputs(a).detach(), g.reshape(-1, g.shape[-1]).detach()
        n = a.shape[0]
        if g.shape[0] != n:  # the output was broadcast against something larger: its rows are not the input's
            a = a.expand(g.shape[0] // n, n, a.shape[1]).reshape(-1, a.shape[1]) if g.shape[0] % n == 0 else None
            if a is None:
                return
            n = g.shape[0]
        if diagonal:
            ga = (g * g).T @ (a * a)
            self.ga_sq = ga if self.ga_sq is None else self.ga_sq + ga
        else:
            aa, gg = a.T @ a, g.T @ g
            self.aa = aa if self.aa is None else self.aa + aa
            self.gg = gg if self.gg is None else self.gg + gg
        self.rows += n
        self.max_rows = max(self.max_rows, n)
        self.calls += 1

    def g_scale(self, reduction: str) -> int:
        """The factor that turns the summed ``g g^T`` of all uses into ``G``: with a mean over N examples the rows'
        gradients are d / N, so ``N sum g g^T = (1/N) sum_n sum_uses d d^T``; with a sum, 1. N is the rows of the
        largest use (every use of an RNN cell sees the whole batch; a shrinking packed batch sees fewer)."""
        return self.max_rows if reduction == "mean" else 1

    def grad_matrix(self) -> Optional[torch.Tensor]:
        parts = []
        if self.weight is not None:
            if self.weight.grad is None:
                return None
            parts.append(self.weight.grad)
        if self.bias is not None:
            if self.bias.grad is None:
                return None
            parts.append(self.bias.grad[:, None])
        return torch.cat(parts, dim=1)

    def set_update(self, v: torch.Tensor) -> list[tuple[nn.Parameter, torch.Tensor]]:
        out = []
        if self.weight is not None:
            out.append((self.weight, v[:, : self.weight.shape[1]]))
        if self.bias is not None:
            out.append((self.bias, v[:, -1]))
        return out


class NaturalGradient(torch.optim.Optimizer):
    """Natural-gradient descent with Kronecker-factored (K-FAC) or diagonal Fisher blocks, damping and a
    trust region.

    Which Fisher: the **empirical** Fisher of the objective, ``E_data[grad l_n grad l_n^T]`` over the per-datum
    terms ``l_n`` of the loss (for a VAE, the per-datum negative ELBO at the drawn z). The Fisher of the model
    ``p(x | theta)`` would need a backward pass per sampled data set, and the ELBO is not the log-density of one
    distribution of the data; the Fisher of q is the natural metric for the *guide* only. The empirical Fisher
    is what the minibatch's own gradients give, equals the model's Fisher in expectation where the model fits
    the data, and is what the AEVB-extensions report preconditions with; its known weakness away from an
    optimum (Kunstner et al. 2019) is what the damping and the trust region are for.

    Per step: ``A``, ``G`` (K-FAC) or the per-weight diagonal ``E[d^2] E[a^2]``-style sums (``fisher="diagonal"``)
    come from hooks on the ``nn.Linear`` layers of ``modules`` (forward: inputs ``a``; backward: output
    gradients ``d``) and are averaged over steps with weight ``decay``. Parameters outside such layers get a
    diagonal Fisher ``N g^2`` from the minibatch gradient itself (``N`` the rows of the largest call the hooks
    saw, else 1), averaged the same way. The rows of one call are its examples: ``reduction="mean"`` means a
    mean over them.

    A layer called several times per step (an RNN cell in a loop, DRAW's read/write layers, a layer shared by
    model and guide) has the per-example gradient ``sum_t d_t a_t^T``, a sum over its T uses. Its Fisher
    ``E_n[vec(sum_t d_t a_t^T) vec(sum_t d_t a_t^T)^T]`` is approximated with the uses taken to be independent,
    so that its cross-use terms drop out (Martens, Ba & Johnson 2018, "Kronecker-factored curvature
    approximations for recurrent neural networks": independence across time, ``F ~= T A_0 (x) G_0``; the
    KFAC-expand of Eschenhagen et al. 2023 for weight sharing)::

        F ~= G (x) A,  A = (1 / (N T)) sum_n sum_t a_nt a_nt^T,  G = (1/N) sum_n sum_t d_nt d_nt^T

    i.e. A averages over all uses and G sums them (T times one use's G), so that the Fisher's trace grows
    with T as the exact one does; with T = 1 it is plain K-FAC, and the diagonal Fisher is summed over uses
    the same way. It is exact where the uses' output gradients are uncorrelated (a loss on every use with
    independent noise). Uses correlated through a recurrent state make it an approximation: on a tanh RNN
    with 8 steps its trace is 0.97-1.30 of the exact per-example Fisher's (``tests/test_optim.py``), where
    averaging the uses gave 0.12-0.16. The uses of one layer need not see the same rows; ``N`` is the rows
    of its largest call (a shrinking packed batch sees fewer). A layer applied to a whole sequence
    ``[N, L, in]`` in *one* call is a different case: its ``N L`` rows count as examples, which is right when
    the loss is a mean over them; with a mean over the N sequences its ``G`` comes out L times too large (a
    smaller step, not a wrong direction): call the layer once per position to have its uses counted as uses.

    With factored Tikhonov damping (Martens & Grosse 2015, sec. 6.3)::

        V = (G + sqrt(lambda)/pi I)^-1 grad_W (A + pi sqrt(lambda) I)^-1,  pi = sqrt((tr A / dim A) / (tr G / dim G))

    and the trust region of Ba et al. (2017): the step ``lr nu V`` with
    ``nu = min(1, sqrt(kl_clip / (lr^2 sum V . grad)))`` keeps the predicted KL of the step below ``kl_clip``.

    Args:
        params: parameters (or param groups) as for any ``torch.optim.Optimizer``.
        lr: step size (1 is the plain natural-gradient step).
        damping: lambda above; the diagonal blocks use ``F + damping``.
        kl_clip: trust-region bound on ``lr^2 g^T F^-1 g``; None: no limit.
        fisher: ``kfac`` or ``diagonal``.
        modules: modules whose ``nn.Linear`` layers get K-FAC/diagonal blocks from hooks (``[model, guide]``).
            Their steps must run through Python (``Trainer(..., capture="off")``): a replayed graph fires no hooks.
        decay: weight of the previous statistics in their running average (0: this minibatch's only).
        update_every: steps between inversions of the K-FAC factors.
        reduction: ``mean`` when the loss is a mean over the rows the layers see (the Trainer's loss per datum),
            ``sum`` when it is a sum (``pyro.infer.SVI``'s ELBO loss); it fixes the scale of ``G``.

    With ``pyro.optim.PyroOptim(NaturalGradient, {"lr": ..., "modules": [model, guide]})`` Pyro builds one
    optimiser per parameter, after the first step's backward pass: the weight and bias of a layer then form
    separate blocks (``G^-1 grad_W A^-1`` and ``G^-1 grad_b``), each with its own trust region, and the first
    step, which has no statistics yet, moves nothing.
    """

    def __init__(
        self,
        params,
        lr: float = 0.1,
        damping: float = 1e-3,
        kl_clip: Optional[float] = 1e-3,
        fisher: str = "kfac",
        modules: Iterable[nn.Module] = (),
        decay: float = 0.95,
        update_every: int = 1,
        reduction: str = "mean",
    ):
        if not (lr > 0 and math.isfinite(lr)):
            raise ValueError(f"lr={lr!r} must be a positive number")
        if not damping >= 0:
            raise ValueError(f"damping={damping!r} must be >= 0 (1e-3 is a common start)")
        if kl_clip is not None and not kl_clip > 0:
            raise ValueError(f"kl_clip={kl_clip!r} must be positive, or None for no trust region")
        if fisher not in FISHERS:
            raise ValueError(f"fisher={fisher!r} is not known; choose one of {list(FISHERS)}")
        if not 0 <= decay < 1:
            raise ValueError(f"decay={decay!r} must be in [0, 1)")
        if int(update_every) < 1:
            raise ValueError(f"update_every={update_every!r} must be a positive number of steps")
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction={reduction!r}: choose 'mean' (loss per datum) or 'sum' (summed over the batch)")
        if isinstance(modules, nn.Module):
            modules = [modules]
        super().__init__(params, dict(lr=lr, damping=damping, kl_clip=kl_clip))
        self.fisher, self.decay, self.update_every, self.reduction = fisher, float(decay), int(update_every), reduction
        mine = {id(p) for group in self.param_groups for p in group["params"]}
        self.blocks: list[_Block] = []
        self._hooks = []
        seen = set()
        for root in modules:
            for m in root.modules():
                if not isinstance(m, nn.Linear) or id(m) in seen:
                    continue
                seen.add(id(m))
                w = m.weight if id(m.weight) in mine else None
                b = m.bias if m.bias is not None and id(m.bias) in mine else None
                if w is None and b is None:
                    continue
                block = _Block(m, w, b)
                self.blocks.append(block)
                self._hooks.append(m.register_forward_hook(self._forward_hook(block)))
        self._in_block = {id(p) for blk in self.blocks for p in (blk.weight, blk.bias) if p is not None}
        self.steps = 0

    def _forward_hook(self, block: _Block):
        diagonal = self.fisher == "diagonal"

        def hook(module, inputs, output):
            if torch.is_grad_enabled() and output.requires_grad:
                a = inputs[0].detach()
                output.register_hook(lambda g: block.record(a, g, diagonal))

        return hook

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def _average(self, state: dict, key: str, value: torch.Tensor) -> torch.Tensor:
        old = state.get(key)
        state[key] = value if old is None else self.decay * old + (1 - self.decay) * value
        return state[key]

    def _kfac_direction(self, block: _Block, grad: torch.Tensor, damping: float) -> torch.Tensor:
        state = self.state[block.weight if block.weight is not None else block.bias]
        if block.calls:
            # independence across uses (see the class docstring): A averages over all uses, G sums them
            A = self._average(state, "A", block.aa / block.rows)
            G = self._average(state, "G", block.gg * block.g_scale(self.reduction))
        elif "A" in state:
            raise RuntimeError(self._no_stats(block))
        else:
            return None
        if "A_inv" not in state or self.steps % self.update_every == 0:
            pi = torch.sqrt(A.diagonal().mean().clamp_min(1e-30) / G.diagonal().mean().clamp_min(1e-30))
            root = math.sqrt(damping)
            eye_a = torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
            eye_g = torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
            state["A_inv"] = torch.linalg.inv(A + pi * root * eye_a) if damping > 0 else torch.linalg.inv(A)
            state["G_inv"] = torch.linalg.inv(G + root / pi * eye_g) if damping > 0 else torch.linalg.inv(G)
        return state["G_inv"] @ grad @ state["A_inv"]

    def _diag_block_direction(self, block: _Block, grad: torch.Tensor, damping: float) -> torch.Tensor:
        state = self.state[block.weight if block.weight is not None else block.bias]
        if block.calls:
            F = self._average(state, "F", block.ga_sq * block.g_scale(self.reduction))
        elif "F" in state:
            raise RuntimeError(self._no_stats(block))
        else:
            return None
        return grad / (F + damping)

    @staticmethod
    def _no_stats(block: _Block) -> str:
        return (
            f"NaturalGradient: {block.module!r} has a gradient but its hooks saw no forward/backward pass this step, so there "
            "is no Fisher estimate: pass the module in modules=[...] and run the steps through Python (Trainer(..., capture='off')), "
            "not a replayed graph"
        )

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        rows = max((blk.max_rows for blk in self.blocks if blk.calls), default=1.0)
        for group in self.param_groups:
            lr, damping = group["lr"], group["damping"]
            updates: list[tuple[nn.Parameter, torch.Tensor, torch.Tensor]] = []
            for block in self.blocks:
                ps = [p for p in (block.weight, block.bias) if p is not None]
                if not any(any(p is q for q in group["params"]) for p in ps):
                    continue
                grad = block.grad_matrix()
                if grad is None:
                    continue
                v = self._kfac_direction(block, grad, damping) if self.fisher == "kfac" else self._diag_block_direction(block, grad, damping)
                if v is None:
                    if self.steps > 0:
                        raise RuntimeError(self._no_stats(block))
                    continue  # built after this step's backward (PyroOptim builds lazily): no statistics yet, no step
                for p, u in block.set_update(v):
                    updates.append((p, u.reshape(p.shape), p.grad))
            for p in group["params"]:
                if p.grad is None or id(p) in self._in_block:
                    continue
                n = rows if self.reduction == "mean" else 1.0
                F = self._average(self.state[p], "F", n * p.grad * p.grad)
                updates.append((p, p.grad / (F + damping), p.grad))
            if not updates:
                continue
            nu = 1.0
            if group["kl_clip"] is not None:
                quad = sum(float((u * g).sum()) for _, u, g in updates) * lr**2
                if quad > group["kl_clip"]:
                    nu = math.sqrt(group["kl_clip"] / quad)
            for p, u, _ in updates:
                p.add_(u, alpha=-lr * nu)
        for block in self.blocks:
            block.reset()
        self.steps += 1
        return loss
