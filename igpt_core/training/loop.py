"""The one training loop: batches -> forward/backward over micro-batches -> clip -> optimizer step.

`Trainer` knows nothing of the model family, of AR vs BERT, or of pre-training vs fine-tuning: it
calls the loss function it is given and the callbacks it is given. Pre-training (pretrain.py) gives
it the model's own generative loss and callbacks that log, evaluate, checkpoint and save the resume
state; fine-tuning (finetune.py) gives it L_CLF + L_GEN and callbacks for validation accuracy and
early stopping.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext

import torch

from .schedule import set_lr

# loss_fn(net, batch) -> {"loss": the tensor to minimise, other names: parts worth logging}
LossFn = Callable[[torch.nn.Module, object], dict[str, torch.Tensor]]


def generative_loss(net: torch.nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """The model's own objective on a batch of palette ids (AR or BERT: the model decides)."""
    return {"loss": net(ids, targets=ids)[1]}


def make_optimizer(model: torch.nn.Module, tc, device: torch.device) -> torch.optim.AdamW:
    """AdamW with the paper's β = (0.9, tc.beta2) (§3.3); fused kernels on CUDA.

    Weight decay (if any) applies to matrices only — tensors with >= 2 dimensions: linear and
    embedding weights — never to norm gains or biases, whose scale decay would only pull to zero.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": params, "weight_decay": 0.0}]  # no decay (the default): one group, as resume states hold
    if tc.weight_decay:
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": tc.weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=tc.lr, betas=(0.9, tc.beta2),
                             fused=device.type == "cuda")


def copy_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A snapshot of module's state dict on the CPU (cloned), e.g. the best weights so far: it costs
    no device memory and later steps cannot change it."""
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def forward_backward(net, micro_batches: Sequence, *, loss_fn: LossFn = generative_loss, autocast=None, seeds=None,
                     no_sync=None) -> dict[str, torch.Tensor]:
    """Accumulate the gradients of the mean loss over micro-batches (each scaled by 1/n before backward).

    seeds[i] seeds torch's generators before micro-batch i (BERT masks); no_sync is DDP's context
    manager, used on every micro-batch but the last. Returns the mean of each of loss_fn's values as
    detached tensors on the device: nothing is read back, so the host never waits for the device here.
    """
    n = len(micro_batches)
    totals: dict[str, torch.Tensor] = {}
    for micro, batch in enumerate(micro_batches):
        if seeds is not None:
            torch.manual_seed(seeds[micro])
        quiet = no_sync is not None and micro < n - 1
        with autocast or nullcontext(), no_sync() if quiet else nullcontext():
            losses = loss_fn(net, batch)
            (losses["loss"] / n).backward()
        for name, value in losses.items():
            part = value.detach() / n
            totals[name] = part if name not in totals else totals[name] + part
    return totals


def optimizer_update(model: torch.nn.Module, optimizer, grad_clip: float) -> None:
    """Clip the gradient norm (if grad_clip), step, and free the gradients."""
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


class Callback:
    """What a Trainer calls around each step; override what you need."""

    def after_backward(self, step: int, losses: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Between backward and the optimizer update (e.g. average the losses over processes)."""
        return losses

    def on_step(self, step: int, losses: dict[str, torch.Tensor]) -> bool:
        """After the update of step `step`: log, evaluate, save, show progress. True stops training."""
        return False


class Trainer:
    """Runs optimizer steps: for each step, the learning rate of the schedule, forward and backward
    over the step's micro-batches (under autocast), gradient clipping, the optimizer step, then the
    callbacks in order (one asking to stop ends training after that step; later ones are not called).

    model: whose parameters are clipped; net: what a step calls (the model, or DDP / torch.compile
    around it). batches(step) -> (micro-batches, seeds or None): what step `step` (1-based) trains on.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, lr_at: Callable[[int], float],
                 loss_fn: LossFn = generative_loss, grad_clip: float = 1.0, net: torch.nn.Module | None = None,
                 autocast=None, no_sync=None, callbacks: Sequence[Callback] = ()):
        self.model, self.optimizer, self.net = model, optimizer, net if net is not None else model
        self.lr_at, self.loss_fn, self.grad_clip = lr_at, loss_fn, grad_clip
        self.autocast, self.no_sync, self.callbacks = autocast, no_sync, list(callbacks)
        self.completed = 0  # the last step whose optimizer update is done
        self.updating = False  # inside the optimizer update: the weights are half-way between two steps

    def step(self, step: int, micro_batches: Sequence, seeds: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
        """One optimizer step; returns the step's mean losses (device tensors, as the callbacks left them)."""
        set_lr(self.optimizer, self.lr_at(step))
        losses = forward_backward(self.net, micro_batches, loss_fn=self.loss_fn, autocast=self.autocast, seeds=seeds,
                                  no_sync=self.no_sync)
        for callback in self.callbacks:
            losses = callback.after_backward(step, losses)
        self.updating = True
        optimizer_update(self.model, self.optimizer, self.grad_clip)
        self.updating = False
        self.completed = step
        return losses

    def fit(self, batches: Callable[[int], tuple[Sequence, Sequence[int] | None]], first: int, last: int) -> int:
        """Train steps first..last (1-based, inclusive); returns the last step run (< last if a callback stopped it)."""
        self.completed = first - 1
        for step in range(first, last + 1):
            losses = self.step(step, *batches(step))
            if any(callback.on_step(step, losses) for callback in self.callbacks):  # any(): stops at the first True
                return step
        return self.completed
