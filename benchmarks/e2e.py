"""End-to-end: a small random Llama and a Gemma-style model (``FAMILIES``) built with transformers, run with HF's eager attention,
HF's SDPA attention, and llama_ext (``llama_ext.transformers.patch_model``):

- train: one forward + backward of the causal-LM loss (gradients zeroed, no optimizer), tokens/s;
- prefill: the prompt's forward with the KV cache, tokens/s (the median ms is its latency);
- decode: greedy steps of one token on a copy of the prefilled cache, tokens/s;
- generate (Llama): ``model.generate()`` with HF's static KV cache and its decode step compiled by
  ``torch.compile(fullgraph=True)`` (transformers' own ``compile_config`` path), new tokens/s of
  the whole call, prefill included; the warm-up call compiles.

``python -m benchmarks --e2e`` adds it to the op benchmarks; ``--op none --e2e`` runs it alone. All three providers build the
same weights from the same seed; "max diff vs eager" compares the prefill logits, and the
decoded token ids (0 means the same greedy tokens).
"""
import copy
from typing import Optional

import torch

from .harness import Case, OpBench, Provider, RunConfig

MODELS = {  # Llama-shaped: GQA 4:1, SwiGLU MLP of ~2.75x hidden. The CPU model's vocabulary is kept
    # small so that the LM head does not dwarf the layers the kernels serve.
    "cpu": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
                num_key_value_heads=4, vocab_size=8192),
    "cuda": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=8, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=32000),
    "smoke": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128),
}
# Model rows: the Llama shape above, and a Gemma-style one with Gemma 3's attention on the same
# widths: head_dim 256 (fewer heads), sliding-window layers (window a quarter of the training
# sequence; every 4th layer full), QK norms and (1 + weight) RMSNorms, per-layer-type rope bases.
FAMILIES = ("llama", "gemma3")
SHAPES = {  # (batch, train seq, prompt, decoded tokens); --full doubles the sequence lengths
    "cpu": (1, 256, 128, 16),
    "cuda": (4, 2048, 1024, 64),
    "smoke": (1, 16, 8, 4),
}


def _kind(cfg: RunConfig) -> str:
    return "smoke" if cfg.smoke else ("cuda" if cfg.is_cuda else "cpu")


def _transformers_missing() -> Optional[str]:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return "transformers is not installed (pip install .[transformers])"
    return None


def _config(cfg: RunConfig, family: str):
    from transformers import Gemma3TextConfig, LlamaConfig

    shape = MODELS[_kind(cfg)]
    if family == "llama":
        return LlamaConfig(**shape, max_position_embeddings=8192)
    heads = max(shape["hidden_size"] // 256, 1)
    layers = shape["num_hidden_layers"]
    return Gemma3TextConfig(
        **dict(shape, num_attention_heads=heads, num_key_value_heads=max(heads // 2, 1)), head_dim=256,
        query_pre_attn_scalar=256, sliding_window=max(SHAPES[_kind(cfg)][1] // 4, 1), max_position_embeddings=8192,
        layer_types=["full_attention" if (i + 1) % 4 == 0 else "sliding_attention" for i in range(layers)])


def _model(cfg: RunConfig, dtype: torch.dtype, provider: str, family: str = "llama"):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)  # the same weights for every provider
    config = _config(cfg, family)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa" if provider == "sdpa" else "eager")
    model = model.to(device=cfg.device, dtype=dtype)
    if provider == "llama_ext":
        from llama_ext.transformers import patch_model

        patch_model(model)
    return model


def _closure(case: Case, inputs, model, smoke: bool):
    ids = inputs["ids"]
    if case.mode == "train":
        model.train()

        def train_step():
            model(input_ids=ids, labels=ids).loss.backward()
            model.zero_grad(set_to_none=True)

        return train_step
    model.eval()
    prompt = ids[:, : case.params["prompt"]]
    if case.mode == "prefill":
        def prefill():
            with torch.no_grad():
                return model(input_ids=prompt, use_cache=True).logits

        return prefill
    if case.mode == "generate":
        return _generate(case, prompt, model, smoke)
    from llama_ext.transformers import _cache_kwarg

    cache_name = _cache_kwarg(model)
    with torch.no_grad():
        first = model(input_ids=prompt, use_cache=True)
    prefilled, first_token = getattr(first, cache_name), first.logits[:, -1:].argmax(-1)

    def decode():
        cache, token, tokens = copy.deepcopy(prefilled), first_token, []
        with torch.no_grad():
            for _ in range(case.params["new_tokens"]):
                out = model(input_ids=token, use_cache=True, **{cache_name: cache})
                cache, token = getattr(out, cache_name), out.logits[:, -1:].argmax(-1)
                tokens.append(token)
        return torch.cat(tokens, dim=1)

    return decode


def _generate(case: Case, prompt, model, smoke: bool):
    """generate() as transformers serves compiled decoding: a static cache, the decode step
    compiled with fullgraph (a graph break fails the case), the prefill left eager. On CPU
    transformers compiles only when asked (``_compile_all_devices``). The smoke run traces with
    the eager backend: it checks the graph is whole, without paying for inductor's C++ compiles."""
    from transformers import CompileConfig

    compile_config = CompileConfig(fullgraph=True, dynamic=False, backend="eager" if smoke else "inductor",
                                   mode="reduce-overhead" if prompt.is_cuda else "default")
    compile_config._compile_all_devices = True
    torch._dynamo.reset()  # each provider's model compiles afresh, within dynamo's recompile limit
    new_tokens = case.params["new_tokens"]

    def generate():
        with torch.no_grad():
            ids = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                 cache_implementation="static", compile_config=compile_config,
                                 pad_token_id=model.config.eos_token_id)
        return ids[:, prompt.shape[1]:]

    return generate


def build(cfg: RunConfig) -> OpBench:
    batch, seq, prompt, new_tokens = SHAPES[_kind(cfg)]
    if cfg.full and not cfg.smoke:
        seq, prompt = 2 * seq, 2 * prompt
    model_desc = MODELS[_kind(cfg)]
    cases = []
    labels = {"train": f"s{seq}", "prefill": f"prompt {prompt}", "decode": f"prompt {prompt} +{new_tokens}",
              "generate": f"prompt {prompt} +{new_tokens}, static cache, compiled"}
    for family in FAMILIES:
        modes = [("train", batch * seq, seq), ("prefill", batch * prompt, prompt), ("decode", batch * new_tokens, prompt)]
        if family == "llama":  # the compiled generate() row: Llama only (each provider pays a compile)
            modes.append(("generate", batch * new_tokens, prompt))
        for dtype in cfg.dtypes:
            for mode, tokens, size in modes:
                cases.append(Case(mode=mode, dtype=dtype, size=size, label=f"{family} b{batch} {labels[mode]}",
                                  unit="tokens/s", work=tokens, out_bytes=0,
                                  params={"batch": batch, "seq": seq, "prompt": prompt, "new_tokens": new_tokens,
                                          "model": model_desc, "family": family}))

    def provider(name):
        return lambda case, inputs: _closure(case, inputs, _model(cfg, case.dtype, name, case.params["family"]),
                                             cfg.smoke)

    def make_inputs(case):
        g = torch.Generator().manual_seed(0)
        return {"ids": torch.randint(model_desc["vocab_size"], (batch, seq), generator=g).to(cfg.device)}

    return OpBench(
        name="e2e",
        title=f"end-to-end Llama and Gemma-style ({model_desc['num_hidden_layers']} layers, hidden {model_desc['hidden_size']}, "
              f"{model_desc['num_attention_heads']}/{model_desc['num_key_value_heads']} heads, "
              f"vocab {model_desc['vocab_size']})",
        size_name="tokens",
        cases=cases,
        providers=[
            Provider("eager", provider("eager"), "transformers, attn_implementation='eager'"),
            Provider("sdpa", provider("sdpa"), "transformers, attn_implementation='sdpa'"),
            Provider("llama_ext", provider("llama_ext"), "llama_ext.transformers.patch_model on the eager model"),
        ],
        make_inputs=make_inputs,
        skip_reason=_transformers_missing(),
        notes=["train: forward + backward of the LM loss, gradients zeroed, no optimizer step",
               "decode: greedy steps on a deep copy of the prefilled KV cache (the copy is timed too; it is small)",
               "generate: model.generate(cache_implementation='static') with transformers' compile_config "
               "(torch.compile fullgraph of the decode step" + (", eager backend in --smoke" if cfg.smoke else "")
               + "); tokens/s of new tokens over the whole call, prefill included"],
    )

