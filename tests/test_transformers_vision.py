"""``patch_model`` on vision-language models: the text decoder runs on llama_ext, the vision tower
and projector stay HF's.

Tiny random configs (no downloads): a 2-layer text decoder with 8 query / 2 kv heads and a
1-layer vision tower. Each test builds an HF eager model, deep-copies it, patches the copy and
compares on the same inputs with an image in the prompt (fp32 logits and every parameter's
gradient, the vision tower's included; greedy generate() with the dynamic and the static cache,
batch 1 and left-padded), as tests/test_transformers.py does for text models.
"""
import copy

import pytest
import torch

import llama_ext

from conftest import DEVICES
from test_transformers import (
    NEW_TOKENS, VOCAB, WINDOW, assert_grads_close, assert_rel_close, loss_and_grads, transformers)

from llama_ext.transformers import _PATCHED_FORWARDS, _is_registry_attention, patch_model  # noqa: E402

IMAGE = VOCAB - 1  # the image placeholder token
IMAGE_START, IMAGE_END = VOCAB - 3, VOCAB - 2  # the Qwen-VL families' and Gemma 3's markers around an image


def text_settings(**family_settings):
    return dict(
        vocab_size=VOCAB, hidden_size=256, intermediate_size=192, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, max_position_embeddings=256, attention_dropout=0.0, tie_word_embeddings=False,
        pad_token_id=0, bos_token_id=1, eos_token_id=None, initializer_range=0.1, **family_settings,
    )


def multimodal_rope(section, **settings):
    """Multimodal rope: HF's rotary module takes each band of the table (``mrope_section``
    frequencies each) from the t, h or w position angles, or, interleaved, mixes them per column."""
    return {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section, **settings}


QWEN_TOKENS = dict(image_token_id=IMAGE, video_token_id=VOCAB - 4, vision_start_token_id=IMAGE_START,
                   vision_end_token_id=IMAGE_END)
GLM_TOKENS = dict(image_token_id=IMAGE, video_token_id=VOCAB - 4, image_start_token_id=IMAGE_START,
                  image_end_token_id=IMAGE_END, video_start_token_id=VOCAB - 5, video_end_token_id=VOCAB - 6)


def qwen_style_config(config_class, text, vision=None, tokens=QWEN_TOKENS):
    """A Qwen-VL-style model (Qwen2-VL to Qwen3.5, GLM-4.1V/4.5V): 14-pixel patches of 2 frames,
    merged 2 x 2 into the text's width; the image's placeholders between start and end markers."""
    vision_config = {**dict(depth=1, hidden_size=64, intermediate_size=96, num_heads=2, out_hidden_size=256,
                            patch_size=14, spatial_merge_size=2, temporal_patch_size=2), **(vision or {})}
    return config_class(text_config=text_settings(**text), vision_config=vision_config, **tokens)


def qwen2_vl_config(config_class):  # its vision width is embed_dim; hidden_size is the text's
    return qwen_style_config(config_class, dict(rope_parameters=multimodal_rope([8, 4, 4])),
                             dict(embed_dim=64, hidden_size=256, mlp_ratio=2))


def qwen2_5_vl_config(config_class):  # windowed vision attention in its first layer
    return qwen_style_config(config_class, dict(rope_parameters=multimodal_rope([8, 4, 4])),
                             dict(depth=2, window_size=28, fullatt_block_indexes=[1]))


def qwen3_vl_config(config_class):
    return qwen_style_config(
        config_class, dict(head_dim=32, rope_parameters=multimodal_rope([8, 4, 4], mrope_interleaved=True)),
        dict(deepstack_visual_indexes=[0]))


def qwen3_vl_moe_config(config_class):
    return qwen_style_config(config_class,
        dict(head_dim=32, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=96,
             rope_parameters=multimodal_rope([8, 4, 4], mrope_interleaved=True)),
        dict(deepstack_visual_indexes=[0]))


def qwen3_5_config(config_class):  # a hybrid text decoder (its linear-attention layers stay HF's), partial rotary
    return qwen_style_config(config_class, dict(
        head_dim=32, layer_types=["linear_attention", "full_attention"], linear_num_value_heads=4,
        linear_num_key_heads=2, linear_key_head_dim=32, linear_value_head_dim=32,
        rope_parameters=multimodal_rope([4, 2, 2], partial_rotary_factor=0.5, mrope_interleaved=True)))


def glm4v_config(config_class):  # GLM-4.1V: GLM-4's interleaved rotary on multimodal tables
    return qwen_style_config(config_class, dict(rope_parameters=multimodal_rope([2, 3, 3], partial_rotary_factor=0.5)),
        dict(image_size=28), GLM_TOKENS)


def glm4v_moe_config(config_class):  # GLM-4.5V
    return qwen_style_config(config_class,
        dict(head_dim=32, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=96, first_k_dense_replace=1,
             n_group=1, topk_group=1, rope_parameters=multimodal_rope([2, 3, 3], partial_rotary_factor=0.5)),
        dict(image_size=28), GLM_TOKENS)


def llava_config(config_class):
    return config_class(
        text_config=transformers.LlamaConfig(**text_settings()),
        vision_config=dict(model_type="clip_vision_model", hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                           num_attention_heads=2, image_size=28, patch_size=14, projection_dim=64),
        image_token_index=IMAGE)  # features from the second-to-last vision layer: the last one gets no gradient


def llava_next_config(config_class):  # anyres: the image, downscaled, and its tiles
    return config_class(
        text_config=transformers.MistralConfig(**text_settings(head_dim=32)),
        vision_config=dict(model_type="clip_vision_model", hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                           num_attention_heads=2, image_size=28, patch_size=14, projection_dim=64),
        image_token_index=IMAGE, image_grid_pinpoints=[[28, 28]])


def llava_onevision_config(config_class):
    return config_class(
        text_config=transformers.Qwen2Config(**text_settings()),
        vision_config=dict(model_type="siglip_vision_model", hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                           num_attention_heads=2, image_size=28, patch_size=14),
        image_token_index=IMAGE, image_grid_pinpoints=[[28, 28]], vision_feature_layer=-1)


def mistral3_config(config_class):
    return config_class(
        text_config=transformers.MistralConfig(**text_settings(head_dim=32, sliding_window=WINDOW)),
        vision_config=dict(model_type="pixtral", hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                           num_attention_heads=2, image_size=56, patch_size=14, head_dim=32),
        image_token_index=IMAGE, spatial_merge_size=2)


def internvl_config(config_class):
    return config_class(
        text_config=transformers.Qwen2Config(**text_settings()),
        vision_config=dict(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=2,
                           image_size=[56, 56], patch_size=[14, 14]),
        image_token_id=IMAGE, downsample_ratio=0.5)


def aya_vision_config(config_class):  # Cohere 2's interleaved rotary and sliding layers under a SigLIP tower
    return config_class(
        text_config=transformers.Cohere2Config(**text_settings(
            sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"])),
        vision_config=dict(model_type="siglip_vision_model", hidden_size=64, intermediate_size=96,
                           num_hidden_layers=1, num_attention_heads=2, image_size=56, patch_size=14),
        image_token_index=IMAGE, downsample_factor=2)


def smolvlm_config(config_class):
    return config_class(
        text_config=transformers.LlamaConfig(**text_settings()).to_dict(),
        vision_config=dict(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=2,
                           image_size=56, patch_size=14),
        image_token_id=IMAGE, scale_factor=2)


def gemma3_config(config_class):
    return config_class(
        text_config=text_settings(head_dim=32, query_pre_attn_scalar=24, sliding_window=WINDOW,
                                  layer_types=["sliding_attention", "full_attention"]),
        vision_config=dict(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14),
        mm_tokens_per_image=4, image_token_index=IMAGE, boi_token_index=IMAGE_START, eoi_token_index=IMAGE_END)


# family -> (config class name, builder of its tiny config from the class). Each image becomes IMAGE_TOKENS
# placeholder tokens (LLaVA-NeXT / OneVision: more, image_prompt).
VISION_FAMILIES = {
    "qwen3_vl": ("Qwen3VLConfig", qwen3_vl_config),
    "qwen3_vl_moe": ("Qwen3VLMoeConfig", qwen3_vl_moe_config),
    "qwen2_vl": ("Qwen2VLConfig", qwen2_vl_config),
    "qwen2_5_vl": ("Qwen2_5_VLConfig", qwen2_5_vl_config),
    "qwen3_5": ("Qwen3_5Config", qwen3_5_config),
    "glm4v": ("Glm4vConfig", glm4v_config),
    "glm4v_moe": ("Glm4vMoeConfig", glm4v_moe_config),
    "llava": ("LlavaConfig", llava_config),
    "mistral3": ("Mistral3Config", mistral3_config),
    "llava_next": ("LlavaNextConfig", llava_next_config),
    "llava_onevision": ("LlavaOnevisionConfig", llava_onevision_config),
    "internvl": ("InternVLConfig", internvl_config),
    "aya_vision": ("AyaVisionConfig", aya_vision_config),
    "smolvlm": ("SmolVLMConfig", smolvlm_config),
    "gemma3": ("Gemma3Config", gemma3_config),
}
IMAGE_TOKENS = 4


def vision_param(family, *rest):
    config_class = VISION_FAMILIES[family][0]
    missing = not hasattr(transformers, config_class)
    reason = f"transformers {transformers.__version__} has no {config_class}"
    return pytest.param(family, *rest, marks=pytest.mark.skipif(missing, reason=reason))


# Gemma 3 attends bidirectionally within an image, which llama_ext's causal kernels do not compute:
# with an image it raises (test_gemma3_image_attention_raises), so its parity runs on text.
CAUSAL_IMAGE_FAMILIES = [vision_param(family) for family in VISION_FAMILIES if family != "gemma3"]
ALL_FAMILIES = [vision_param(family) for family in VISION_FAMILIES]


def build_vision_pair(family, device):
    torch.manual_seed(0)
    config_class, builder = VISION_FAMILIES[family]
    config = builder(getattr(transformers, config_class))
    hf = transformers.AutoModelForImageTextToText.from_config(config, attn_implementation="eager")
    hf = hf.to(device)
    return hf, patch_model(copy.deepcopy(hf))


def image_prompt(family, text_tokens, device, seed=1, with_image=True):
    """(input_ids [1, seq], the model's image kwargs): 5 text tokens, an image, ``text_tokens``
    more text tokens."""
    generator = torch.Generator().manual_seed(seed)

    def text(n):
        return torch.randint(2, VOCAB - 4, (1, n), generator=generator)

    if not with_image:
        return text(5 + text_tokens).to(device), {}
    image = torch.full((1, IMAGE_TOKENS), IMAGE)
    kwargs = {}
    if family.startswith(("qwen", "glm")):  # a 4 x 4 patch grid, merged 2 x 2
        image = torch.cat([torch.tensor([[IMAGE_START]]), image, torch.tensor([[IMAGE_END]])], 1)
        kwargs["pixel_values"] = torch.randn(16, 3 * 2 * 14 * 14, generator=generator)
        kwargs["image_grid_thw"] = torch.tensor([[1, 4, 4]])
    elif family == "gemma3":
        image = torch.cat([torch.tensor([[IMAGE_START]]), image, torch.tensor([[IMAGE_END]])], 1)
        kwargs["pixel_values"] = torch.randn(1, 3, 28, 28, generator=generator)
    elif family == "llava":  # 2 x 2 patches
        kwargs["pixel_values"] = torch.randn(1, 3, 28, 28, generator=generator)
    elif family in ("llava_next", "llava_onevision"):
        # the image and its one 28-pixel tile, 2 x 2 patches each, and a newline after each of the tile's rows
        image = torch.full((1, 2 * IMAGE_TOKENS + 2), IMAGE)
        kwargs["pixel_values"] = torch.randn(1, 2, 3, 28, 28, generator=generator)
        kwargs["image_sizes"] = torch.tensor([[28, 28]])
    elif family == "mistral3":  # 4 x 4 patches, merged 2 x 2
        kwargs["pixel_values"] = torch.randn(1, 3, 56, 56, generator=generator)
        kwargs["image_sizes"] = torch.tensor([[56, 56]])
    elif family in ("internvl", "aya_vision"):  # 4 x 4 patches, shuffled 2 x 2 into the channels
        kwargs["pixel_values"] = torch.randn(1, 3, 56, 56, generator=generator)
    elif family == "smolvlm":  # [batch, images, ...]; 4 x 4 patches, shuffled 2 x 2
        kwargs["pixel_values"] = torch.randn(1, 1, 3, 56, 56, generator=generator)
    ids = torch.cat([text(5), image, text(text_tokens)], 1)
    kwargs = {name: value.to(device) for name, value in kwargs.items()}
    return ids.to(device), kwargs


def with_token_types(family, ids, kwargs):
    """The token-type ids that the family's processor returns with an image prompt."""
    if family.startswith(("qwen", "glm")):
        return {**kwargs, "mm_token_type_ids": (ids == IMAGE).int()}
    if family == "gemma3":
        return {**kwargs, "token_type_ids": (ids == IMAGE).long()}
    return kwargs


def left_padded_image_batch(family, device):
    """Two image prompts of different lengths, the shorter left-padded: (ids, mask, image kwargs)."""
    long_ids, long_kwargs = image_prompt(family, 15, device, seed=1)
    short_ids, short_kwargs = image_prompt(family, 8, device, seed=2)
    pad = long_ids.shape[1] - short_ids.shape[1]
    ids = torch.cat([long_ids, torch.cat([short_ids.new_zeros(1, pad), short_ids], 1)])
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    kwargs = {name: torch.cat([long_kwargs[name], short_kwargs[name]]) for name in long_kwargs}
    return ids, mask, with_token_types(family, ids, kwargs)


# ---- structure ----------------------------------------------------------------------------


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_only_the_text_decoder_is_patched(family):
    hf, ours = build_vision_pair(family, "cpu")
    decoder = ours.get_decoder()
    inside = {id(m) for m in decoder.modules()}
    text_norms = [m for m in decoder.modules() if type(m).__name__.endswith("RMSNorm")]
    assert all(isinstance(m, llama_ext.RMSNorm) for m in text_norms)
    assert text_norms or family == "aya_vision"  # Cohere 2's LayerNorms stay HF's
    attention = [m for m in ours.modules() if _is_registry_attention(m)]
    patched = [m for m in attention if "forward" in vars(m)]
    assert patched and all(id(m) in inside for m in patched)
    # every text decoder here rotates q and k: its forward runs with the rotary bound to llama_ext's
    assert all(_PATCHED_FORWARDS[type(m)] is not type(m).forward for m in patched)
    assert any(id(m) not in inside for m in attention), "the vision tower's attention modules"
    outside = [m for m in ours.modules() if id(m) not in inside]
    assert not any(isinstance(m, llama_ext.RMSNorm) for m in outside), "vision tower or projector norm replaced"
    assert ours.config.get_text_config(decoder=True)._attn_implementation == "llama_ext"
    assert ours.config.vision_config._attn_implementation == "eager"
    assert hf.config.get_text_config(decoder=True)._attn_implementation == "eager"


def test_unsupported_text_decoder_raises():
    config = llava_config(transformers.LlavaConfig)
    config.text_config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=256, n_layer=1, n_head=8)
    model = transformers.AutoModelForImageTextToText.from_config(config)
    with pytest.raises(ValueError, match="text decoder of LlavaForConditionalGeneration has model_type 'gpt2'"):
        patch_model(model)


def test_context_parallel_raises():
    model = transformers.AutoModelForImageTextToText.from_config(llava_config(transformers.LlavaConfig))
    with pytest.raises(ValueError, match="context_parallel_group is supported for text models only"):
        patch_model(model, context_parallel_group=object())
    assert not any(isinstance(m, llama_ext.RMSNorm) for m in model.modules()), "the model was changed"


# ---- parity with HF eager -----------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", ALL_FAMILIES)
@pytest.mark.parametrize("text_tokens", [1, 40])
def test_logits_and_grads_match_hf_eager(device, family, text_tokens):
    hf, ours = build_vision_pair(family, device)
    with_image = family != "gemma3"
    ids, kwargs = image_prompt(family, text_tokens, device, with_image=with_image)
    kwargs = with_token_types(family, ids, kwargs) if with_image else kwargs
    expected_logits, expected_grads = loss_and_grads(hf, ids, **kwargs)
    logits, grads = loss_and_grads(ours, ids, **kwargs)
    assert_rel_close(logits, expected_logits, 1e-4, "logits")
    unused = {name for name, grad in expected_grads.items() if grad is None}  # LLaVA's last vision layer
    assert unused == {name for name, grad in grads.items() if grad is None}
    # A vision tower's key bias (no rotary there) adds one constant to all of a query's scores,
    # which the softmax cancels: its exact gradient is zero, and both models' are rounding noise.
    largest = max(grad.abs().max().item() for grad in expected_grads.values() if grad is not None)
    text = {id(p) for p in ours.get_decoder().parameters()}
    key_biases = {name for name, p in ours.named_parameters() if id(p) not in text and name.endswith("k_proj.bias")}
    for name in key_biases - unused:
        assert max(grads[name].abs().max().item(), expected_grads[name].abs().max().item()) <= 1e-5 * largest, name
    compared = unused | key_biases
    assert_grads_close(
        *({name: grad for name, grad in g.items() if name not in compared} for g in (grads, expected_grads)), 1e-3)
    if with_image:  # the gradient reaches the vision tower and projector through the patched decoder
        head = {id(p) for p in ours.get_output_embeddings().parameters()}
        assert any(id(p) not in text | head and grads[name] is not None and grads[name].abs().max() > 0
                   for name, p in ours.named_parameters())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", CAUSAL_IMAGE_FAMILIES)
# (padded, cache): padded batches on a static cache raise (test_transformers)
@pytest.mark.parametrize("padded, cache", [(False, "dynamic"), (False, "static"), (True, "dynamic")],
                         ids=["batch1-dynamic", "batch1-static", "left_padded-dynamic"])
def test_greedy_generate_with_image_matches_hf_eager(device, family, padded, cache):
    hf, ours = build_vision_pair(family, device)
    if padded:
        ids, mask, kwargs = left_padded_image_batch(family, device)
    else:
        ids, kwargs = image_prompt(family, 9, device)
        mask, kwargs = torch.ones_like(ids), with_token_types(family, ids, kwargs)
    settings = dict(max_new_tokens=NEW_TOKENS, do_sample=False, cache_implementation=cache)
    expected = hf.generate(input_ids=ids, attention_mask=mask, **kwargs, **settings)
    assert torch.equal(ours.generate(input_ids=ids, attention_mask=mask, **kwargs, **settings), expected)


def test_gemma3_image_attention_raises():
    """Gemma 3 attends bidirectionally among an image's tokens; its text runs, its images raise."""
    hf, ours = build_vision_pair("gemma3", "cpu")
    text_ids, _ = image_prompt("gemma3", 9, "cpu", with_image=False)
    settings = dict(max_new_tokens=NEW_TOKENS, do_sample=False)
    assert torch.equal(ours.generate(input_ids=text_ids, **settings), hf.generate(input_ids=text_ids, **settings))
    ids, kwargs = image_prompt("gemma3", 9, "cpu")
    kwargs = with_token_types("gemma3", ids, kwargs)
    with pytest.raises(ValueError, match="bidirectional attention"):
        ours(input_ids=ids, **kwargs)
    with pytest.raises(ValueError, match="bidirectional attention"):  # compiled code checks its masks too
        torch.compile(ours)(input_ids=ids, **kwargs)
