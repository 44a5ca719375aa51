"""Pieces the op modules share: size sweeps, provider closures, the CUDA kernel check."""
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch


def random_inputs(case, device) -> Callable[..., torch.Tensor]:
    """rand(*shape): normal samples in the case's dtype, seeded by its size, never zeros (timing on
    zeros can flatter some kernels)."""
    generator = torch.Generator(device=device).manual_seed(case.size)

    def rand(*shape):
        return torch.randn(*shape, generator=generator, device=device).to(case.dtype)

    return rand


def sweep(cfg, sizes: Dict[str, Tuple[List[int], List[int]]], smoke_sizes: List[int]) -> List[int]:
    """The sizes to run: ``sizes[device] = (quick, full)``; tiny ones for the smoke test."""
    if cfg.smoke:
        return smoke_sizes
    if cfg.sizes:
        return list(cfg.sizes)
    quick, full = sizes["cuda" if cfg.is_cuda else "cpu"]
    return full if cfg.full else quick


def backward_closure(outputs, inputs: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> Callable:
    """Times the backward pass alone: the forward graph is built once and retained."""
    outputs = tuple(outputs) if isinstance(outputs, (tuple, list)) else (outputs,)
    return lambda: torch.autograd.grad(outputs, inputs, grads, retain_graph=True)


def compiled(fn: Callable) -> Callable[[], Callable]:
    """A fresh ``torch.compile(fn, fullgraph=True)`` per case. Dynamo's caches are cleared
    first: they are keyed by the code object, and past the recompile limit dynamo would
    silently run eager code under the compile label."""

    def make() -> Callable:
        torch._dynamo.reset()
        return torch.compile(fn, fullgraph=True, dynamic=False)

    return make


def llama_ext_cuda_skip(cfg, schema_name: str) -> Optional[str]:
    """On CUDA, the llama_ext provider runs only when this build has the op's CUDA kernel."""
    if cfg.is_cuda and not torch._C._dispatch_has_kernel_for_dispatch_key(f"llama_ext::{schema_name}", "CUDA"):
        return f"this llama_ext build has no CUDA kernel for {schema_name}"
    return None
