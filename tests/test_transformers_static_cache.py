"""patch_model with HF's static KV cache (cache_implementation="static"), served by
gqa_attention_with_kvcache: greedy generate() token-identical to HF eager, and a compiled
decode step (fullgraph) equal to HF's."""
import os

import pytest
import torch

from conftest import DEVICES

if os.environ.get("CI") == "true":
    import transformers
else:
    transformers = pytest.importorskip("transformers", minversion="5.0", reason="needs transformers >= 5.0")

from llama_ext.transformers import _cache_kwarg  # noqa: E402
from test_transformers import VOCAB, build_pair as family_pair  # noqa: E402


def build_pair(family, device):
    """(HF eager model, patched copy), both in eval mode: test_transformers' tiny family configs."""
    hf, ours = family_pair(family, device)
    return hf.eval(), ours.eval()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("prompt", [9, 150], ids=["short", "long"])
def test_static_cache_generate_matches_hf_eager(device, batch, prompt):
    """A long prompt's prefill is a 150-token call of gqa_attention_with_kvcache (on the CPU it
    runs on the prefill kernel)."""
    hf, ours = build_pair("llama", device)
    ids = torch.randint(2, VOCAB, (batch, prompt), device=device)
    kwargs = dict(max_new_tokens=24, min_new_tokens=24, do_sample=False, use_cache=True, pad_token_id=0)
    with torch.no_grad():
        expected = hf.generate(ids, **kwargs)
        static = ours.generate(ids, cache_implementation="static", **kwargs)
        dynamic = ours.generate(ids, **kwargs)
    assert torch.equal(static, expected), f"static cache tokens differ:\n{static}\n{expected}"
    assert torch.equal(dynamic, expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", ["mistral", "gemma2", "gemma3", "cohere2"])
@pytest.mark.parametrize("prompt", [5, 20], ids=["within_window", "past_window"])
def test_static_cache_with_sliding_window_layers_matches_hf_eager(device, family, prompt):
    """Sliding layers of a static cache (StaticSlidingWindowLayer: a ring of the last W = 8 tokens)
    beside full ones (Gemma 2 and 3 and Cohere 2 alternate them): prompts shorter and longer than
    the window, and more new tokens than it."""
    hf, ours = build_pair(family, device)
    ids = torch.randint(2, VOCAB, (2, prompt), device=device)
    kwargs = dict(max_new_tokens=14, min_new_tokens=14, do_sample=False, use_cache=True, pad_token_id=0)
    with torch.no_grad():
        expected = hf.generate(ids, **kwargs)
        static = ours.generate(ids, cache_implementation="static", **kwargs)
    assert torch.equal(static, expected), f"static cache tokens differ:\n{static}\n{expected}"


def assert_compiled_decode_matches_hf(hf, ours, device, prompt, last_position):
    """Steps of one decode step compiled with fullgraph=True (a graph break or a data-dependent host
    read fails the compile) give HF eager's logits, step after step. The decode then runs again from
    the start of the reset cache, on the graphs the first pass compiled (a recompile raises); on
    CUDA a host sync in its steps raises. Compiling syncs on its own (inductor reads constants
    back to the host), hence the second pass."""
    ids = torch.randint(2, VOCAB, (2, prompt), device=device)
    cache = transformers.StaticCache(config=ours.config, max_cache_len=32)
    cache_name = _cache_kwarg(ours)  # the same class as hf's: patch_model keeps the forward's signature

    def step(token, position):
        return ours(input_ids=token, cache_position=position, position_ids=position[None], use_cache=True,
                    **{cache_name: cache}).logits

    compiled = torch.compile(step, fullgraph=True)

    def decode(syncs_raise):
        hf_cache = transformers.DynamicCache(config=hf.config)
        with torch.no_grad():
            ours(input_ids=ids, use_cache=True, **{cache_name: cache})
            hf_logits = hf(input_ids=ids, use_cache=True, **{cache_name: hf_cache}).logits
            token = hf_logits[:, -1:].argmax(-1)
            for pos in range(prompt, last_position + 1):
                position = torch.tensor([pos], device=device)
                if syncs_raise:
                    torch.cuda.set_sync_debug_mode("error")
                try:
                    logits = compiled(token, position) if pos > prompt else step(token, position)
                finally:
                    if syncs_raise:
                        torch.cuda.set_sync_debug_mode("default")
                expected = hf(input_ids=token, use_cache=True, **{cache_name: hf_cache}).logits
                torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)
                token = expected[:, -1:].argmax(-1)

    decode(syncs_raise=False)
    cache.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        decode(syncs_raise=device == "cuda")


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_decode_step_under_static_cache(device):
    torch._dynamo.reset()
    hf, ours = build_pair("llama", device)
    assert_compiled_decode_matches_hf(hf, ours, device, prompt=7, last_position=10)


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_decode_step_with_sliding_window_layers(device):
    """Gemma 2's sliding (window 8) and full layers, decoding past the window. transformers' own
    mask code reads the sliding layers' host-side token count, so dynamo recompiles the step for
    each count until the window is full, for HF's attention as for ours: the limit is raised."""
    torch._dynamo.reset()
    hf, ours = build_pair("gemma2", device)
    with torch._dynamo.config.patch(recompile_limit=32):
        assert_compiled_decode_matches_hf(hf, ours, device, prompt=5, last_position=12)
