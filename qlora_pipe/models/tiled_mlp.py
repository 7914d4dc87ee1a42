"""Tiled MLP: each decoder layer's MLP computed over tiles of the sequence, in forward and in backward.

An MLP acts on every token alone, so the sequence can be cut into tiles of ``TILE_TOKENS`` and each tile
run through it on its own. The forward keeps only the MLP's input (one hidden state per token); the backward
runs each tile again with gradients, takes that tile's gradients and frees it, so the MLP's intermediate
activations (gate, up and their product, ``intermediate_size`` wide: 18,944 for Qwen2.5-7B against a hidden
size of 3,584) exist for one tile at a time, never for the whole sequence. With gradient checkpointing the
layer is recomputed first and this again per tile in its backward: one more MLP forward per step.

Dropout (LoRA's) draws its masks per tile in forward; each tile's random state is kept and restored for its
backward, so backward sees the same masks. Autocast is re-entered as the forward had it. The result equals the
untiled MLP up to the order of floating-point sums (tests/test_tiled_mlp.py).
"""

from __future__ import annotations

import functools
import re
from contextlib import nullcontext

import torch
from torch import nn

from qlora_pipe.errors import UserError

TILE_TOKENS = 2048  # tokens per tile: an 8B's intermediate for one tile is 14,336 x 2,048 x 3 x 2 bytes = 168 MiB
MLP_NAME = re.compile(r"(^|\.)layers\.\d+\.mlp$")  # the decoder layers' MLPs (Llama, Qwen2, Mistral, Gemma)


class _TiledForward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run, tile, x, *params):
        ctx.run, ctx.tile, ctx.params = run, tile, params
        ctx.autocast = _autocast_state(x.device.type)
        ctx.states = []
        ctx.save_for_backward(x)
        outputs = []
        for piece in x.split(tile, dim=1):
            ctx.states.append(_rng_state(x.device))
            outputs.append(run(piece))
        return torch.cat(outputs, dim=1)

    @staticmethod
    def backward(ctx, grad_output):
        (x,) = ctx.saved_tensors
        params = ctx.params
        wanted = [p for p, need in zip(params, ctx.needs_input_grad[3:], strict=True) if need]
        grad_x = torch.empty_like(x) if ctx.needs_input_grad[2] else None
        sums = [torch.zeros_like(p, dtype=torch.float32) for p in wanted]
        start = 0
        pieces = zip(x.split(ctx.tile, dim=1), grad_output.split(ctx.tile, dim=1), ctx.states, strict=True)
        for piece, grad, state in pieces:
            piece = piece.detach().requires_grad_(grad_x is not None)
            with torch.enable_grad(), _restored_rng(x.device, state), _autocast(x.device.type, ctx.autocast):
                out = ctx.run(piece)
            inputs = ([piece] if grad_x is not None else []) + wanted
            grads = torch.autograd.grad(out, inputs, grad, allow_unused=True) if inputs else ()
            if grad_x is not None:
                grad_x[:, start : start + piece.shape[1]] = grads[0]
                grads = grads[1:]
            for total, g in zip(sums, grads, strict=True):
                if g is not None:
                    total += g
            start += piece.shape[1]
        found = iter(total.to(p.dtype) for total, p in zip(sums, wanted, strict=True))
        param_grads = [next(found) if need else None for need in ctx.needs_input_grad[3:]]
        return (None, None, grad_x, *param_grads)


def _autocast_state(device_type: str) -> tuple[bool, torch.dtype]:
    return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


def _autocast(device_type: str, state: tuple[bool, torch.dtype]):
    enabled, dtype = state
    return torch.autocast(device_type, dtype=dtype) if enabled else nullcontext()


def _rng_state(device: torch.device):
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


class _restored_rng:
    """Run a block with the random state a tile had in forward, leaving the global state as it was."""

    def __init__(self, device: torch.device, state) -> None:
        self.device, self.state = device, state

    def __enter__(self):
        devices = [self.device] if self.device.type == "cuda" else []
        self.fork = torch.random.fork_rng(devices=devices, device_type="cuda")
        self.fork.__enter__()
        cpu, cuda = self.state
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, self.device)

    def __exit__(self, *exc):
        return self.fork.__exit__(*exc)


_TILED: dict[type, type] = {}  # an MLP class -> its tiled subclass


def tiled_class(cls: type) -> type:
    """The subclass of an MLP class whose forward runs over sequence tiles of ``self.tiled_mlp_tokens`` tokens
    (dimension 1 of its input). A class, not a closure on the instance: a copied model (``copy.deepcopy``) tiles
    its own modules."""
    if cls in _TILED.values():
        return cls
    if cls not in _TILED:

        def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            run = functools.partial(cls.forward, self)  # this module's own, untiled forward
            tile = self.tiled_mlp_tokens
            if args or kwargs or x.dim() != 3 or x.shape[1] <= tile:
                return run(x, *args, **kwargs)
            if not torch.is_grad_enabled():
                return torch.cat([run(piece) for piece in x.split(tile, dim=1)], dim=1)
            params = [p for p in self.parameters() if p.requires_grad]
            return _TiledForward.apply(run, tile, x, *params)

        _TILED[cls] = type(f"Tiled{cls.__name__}", (cls,), {"forward": forward, "__module__": __name__})
    return _TILED[cls]


def untiled_forward(mlp: nn.Module):
    """The MLP's own forward, bound to it, whether it is tiled or not."""
    base = type(mlp).__mro__[1] if type(mlp) in _TILED.values() else type(mlp)
    return functools.partial(base.forward, mlp)


def tile_mlps(model: nn.Module, tile: int | None = None) -> int:
    """Make every decoder layer's MLP tiled (``tile`` tokens, default TILE_TOKENS); returns how many. A model
    without ``layers.N.mlp`` is refused."""
    count = 0
    for name, module in model.named_modules():
        if MLP_NAME.search(name):
            module.tiled_mlp_tokens = tile or TILE_TOKENS
            module.__class__ = tiled_class(type(module))
            count += 1
    if count == 0:
        raise UserError(
            "training.tiled_mlp: this model's decoder layers have no `mlp` module (layers.N.mlp) to tile; "
            "set training.tiled_mlp: false"
        )
    return count


def untile_mlps(model: nn.Module) -> int:
    """Give every tiled MLP its own class back; returns how many."""
    count = 0
    for _, module in model.named_modules():
        if type(module) in _TILED.values():
            module.__class__ = type(module).__mro__[1]
            del module.tiled_mlp_tokens
            count += 1
    return count
