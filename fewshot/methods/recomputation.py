"""Gradient checkpointing of an inner step: keep its input weights, recompute its graph in backward."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from fewshot.models.functional import Weights

Step = Callable[[Weights], Weights]


def recomputed(step: Step, weights: Weights) -> Weights:
    """`step(weights)`, keeping none of the step's graph alive: only `weights` are saved, and the
    outer backward pass runs the step again (with grad) to differentiate it.

    `step` must be a deterministic function of `weights` alone (it may close over constants such
    as the support set and base_lr, but not over tensors that need a gradient: those would get
    none). It may itself differentiate, with torch.autograd.grad(create_graph=True) or
    torch.func.grad: its second-order term reaches `weights` in the backward pass. Costs one more
    run of the step per outer backward; saves the step's activations and its backward graph.
    """
    names = tuple(weights)
    return dict(zip(names, _Recomputed.apply(step, names, *weights.values())))


class _Recomputed(torch.autograd.Function):
    # A custom Function rather than torch.utils.checkpoint: the non-reentrant checkpoint works
    # through saved-tensor hooks, which torch.func.grad refuses to run under; the reentrant one
    # works here too but refuses torch.autograd.grad on the outer loss.

    @staticmethod
    def forward(ctx, step: Step, names: tuple[str, ...], *tensors: Tensor) -> tuple[Tensor, ...]:
        ctx.step, ctx.names = step, names
        # The recomputation must round as the forward did (under trainer.precision=bf16-mixed).
        ctx.autocast = [
            (device, torch.get_autocast_dtype(device))
            for device in ("cpu", "cuda")
            if torch.is_autocast_enabled(device)
        ]
        ctx.save_for_backward(*tensors)
        # The step needs grad to take its inner gradient; the graph it builds here on detached
        # copies dies with this call.
        with torch.enable_grad():
            out = step({n: t.detach().requires_grad_() for n, t in zip(names, tensors)})
        return tuple(t.detach() for t in out.values())

    @staticmethod
    @once_differentiable  # the meta-gradient is not differentiated again (no third order)
    def backward(ctx, *grads: Tensor) -> tuple[Tensor | None, ...]:
        inputs = [t.detach().requires_grad_() for t in ctx.saved_tensors]
        with torch.enable_grad(), ExitStack() as autocast:
            for device, dtype in ctx.autocast:
                autocast.enter_context(torch.autocast(device, dtype))
            out = ctx.step(dict(zip(ctx.names, inputs)))
        # Differentiated outside autocast, as the plain graph is by a backward pass outside it.
        input_grads = torch.autograd.grad(list(out.values()), inputs, grads, allow_unused=True)
        return (None, None, *input_grads)
