"""RMSNorm and fused add+RMSNorm, forward and backward, over a sweep of token counts at
hidden 4096 (Llama-7B/8B).

GB/s counts the minimum bytes any implementation must move (n = tokens * hidden, e = element
size, the weight's h*e terms included):
- rms_norm forward: read x, write y: 2*n*e.  Backward: read dy and x, write dx, plus dweight: 3*n*e.
- fused_add_rms_norm forward: read x and residual, write y and x + residual: 4*n*e.
  Backward: read dy, d(residual_out) and the saved sum, write the one gradient both inputs
  share: 4*n*e.
"""
import torch
import torch.nn.functional as F

import llama_ext
from llama_ext.reference import hf_rms_norm

from .common import backward_closure, compiled, llama_ext_cuda_skip, random_inputs, sweep
from .harness import CPU_HEADLINE_MAX_OUTPUT_BYTES, Case, OpBench, Provider

HIDDEN = 4096
EPS = 1e-6
FULL_TOKENS = {"cpu": [128, 256, 512, 1024, 2048, 4096, 8192],
               "cuda": [512, 1024, 2048, 4096, 8192, 16384, 32768, 65536]}
CUDA_QUICK_TOKENS = [32768]  # 32768 x 4096 bf16: the CUDA reference point
SMOKE_TOKENS = [16]
SMOKE_HIDDEN = 64


def _eager_rms_norm():
    """HF's LlamaRMSNorm.forward when transformers is installed, else its copy in reference."""
    try:
        from transformers.models.llama.modeling_llama import LlamaRMSNorm
    except ImportError:
        return hf_rms_norm, "llama_ext.reference.hf_rms_norm (transformers not installed)"

    class Attributes:  # all that LlamaRMSNorm.forward reads from its module (dynamo traces this class)
        def __init__(self, weight, eps):
            self.weight, self.variance_epsilon = weight, eps

    def hf(x, weight, eps):
        return LlamaRMSNorm.forward(Attributes(weight, eps), x)

    return hf, "transformers LlamaRMSNorm.forward"


def _cases(cfg, fused: bool):
    hidden = SMOKE_HIDDEN if cfg.smoke else HIDDEN
    streams = {"fwd": 4 if fused else 2, "bwd": 4 if fused else 3}
    cases = []
    for dtype in cfg.dtypes:
        e = torch.empty((), dtype=dtype).element_size()
        # The quick CPU point is a 16 MB output (cache-resident copies, no page faults): 1024 tokens fp32, 2048 bf16.
        cpu_quick = [CPU_HEADLINE_MAX_OUTPUT_BYTES // (HIDDEN * e)]
        tokens_sweep = sweep(cfg, {"cpu": (cpu_quick, FULL_TOKENS["cpu"]),
                                   "cuda": (CUDA_QUICK_TOKENS, FULL_TOKENS["cuda"])}, SMOKE_TOKENS)
        for mode, n_streams in streams.items():
            for tokens in tokens_sweep:
                n = tokens * hidden
                cases.append(Case(mode=mode, dtype=dtype, size=tokens, label=f"{tokens}x{hidden}", unit="GB/s",
                                  work=n_streams * n * e + 2 * hidden * e, out_bytes=n * e,
                                  params={"tokens": tokens, "hidden": hidden, "eps": EPS}))
    return cases


def _make_inputs(case, device, fused):
    rand = random_inputs(case, device)
    shape = (case.params["tokens"], case.params["hidden"])

    inputs = {"x": rand(*shape), "weight": rand(shape[-1]), "grad": rand(*shape)}
    if fused:
        inputs["residual"], inputs["grad_residual"] = rand(*shape), rand(*shape)
    return inputs


def build(cfg, fused: bool):
    eager_fn, eager_src = _eager_rms_norm()
    if fused:
        def eager(x, residual, weight):
            res = x + residual  # HF's decoder layer: residual add, then the norm
            return eager_fn(res, weight, EPS), res

        def native(x, residual, weight):
            res = x + residual
            return F.rms_norm(res, (res.shape[-1],), weight, EPS), res

        def ours(x, residual, weight):
            return llama_ext.fused_add_rms_norm(x, residual, weight, EPS)

        names = ("x", "residual", "weight")
    else:
        def eager(x, weight):
            return eager_fn(x, weight, EPS)

        def native(x, weight):
            return F.rms_norm(x, (x.shape[-1],), weight, EPS)

        def ours(x, weight):
            return llama_ext.rms_norm(x, weight, EPS)

        names = ("x", "weight")

    def provider(get_fn):  # get_fn() gives the function to run, per case (torch.compile: a fresh one)
        def make(case, inputs):
            fn = get_fn()
            args = [inputs[n] for n in names]
            if case.mode == "fwd":
                return lambda: fn(*args)
            args = [a.detach().requires_grad_() for a in args]
            grads = [inputs["grad"], inputs["grad_residual"]] if fused else [inputs["grad"]]
            return backward_closure(fn(*args), args, grads)
        return make

    op = "fused_add_rms_norm" if fused else "rms_norm"
    providers = [
        Provider("eager", provider(lambda: eager), eager_src),
        Provider("native", provider(lambda: native), "torch.nn.functional.rms_norm" + (" after x + residual" if fused else "")),
        Provider("compile", provider(compiled(eager)), "torch.compile of eager"),
        Provider("llama_ext", provider(lambda: ours), f"llama_ext.{op}", llama_ext_cuda_skip(cfg, op)),
    ]
    return OpBench(
        name=op,
        title="fused add + RMSNorm (y, x + residual)" if fused else "RMSNorm",
        size_name="tokens",
        cases=_cases(cfg, fused),
        providers=providers,
        make_inputs=lambda case: _make_inputs(case, cfg.device, fused),
        notes=["bwd times the backward pass alone (autograd.grad on a retained graph) for dx and dweight"
               + (" (dx = dresidual)" if fused else "")],
    )


def build_rms_norm(cfg):
    return build(cfg, fused=False)


def build_fused_add_rms_norm(cfg):
    return build(cfg, fused=True)
