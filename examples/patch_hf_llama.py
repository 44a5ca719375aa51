"""Run an HF transformers Llama on llama_ext with one call, train it a few steps, generate.

    python examples/patch_hf_llama.py [--device cuda] [--steps 5]

(with llama_ext installed by pip; after `make build`, an in-place build, run it from the repo root
as `PYTHONPATH=. python examples/patch_hf_llama.py`).

Builds a small random Llama (no download), copies it, patches the copy with
``llama_ext.transformers.patch_model`` and compares the two on the same work: a few AdamW
steps on random tokens (the losses agree, the step time gives the speedup), then greedy
generation with the KV cache from the trained weights (the tokens match).
"""
import argparse
import copy
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from llama_ext.transformers import patch_model


def timed(fn, device):
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return result, time.perf_counter() - start


def train(model, batches, steps):
    """Returns (losses, seconds per step after the first, warm-up, step)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    losses, seconds = [], []
    for step in range(steps):
        ids = batches[step]

        def one_step():
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss.item()

        loss, elapsed = timed(one_step, ids.device.type)
        losses.append(loss)
        seconds.append(elapsed)
    return losses, sum(seconds[1:]) / max(1, len(seconds) - 1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args()
    torch.manual_seed(0)

    config = LlamaConfig(
        vocab_size=2048,
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=4,
        num_attention_heads=8,  # head_dim 32
        num_key_value_heads=2,  # grouped-query attention
        max_position_embeddings=1024,
        pad_token_id=0,
        eos_token_id=None,
    )
    hf = AutoModelForCausalLM.from_config(config, attn_implementation="eager").to(args.device)
    ours = patch_model(copy.deepcopy(hf))  # one line: RMSNorm, rotary and attention on llama_ext

    batches = [torch.randint(1, config.vocab_size, (args.batch, args.seq), device=args.device) for _ in range(args.steps)]
    hf_losses, hf_step = train(hf, batches, args.steps)
    our_losses, our_step = train(ours, batches, args.steps)
    print(f"training {args.steps} steps of {args.batch}x{args.seq} tokens on {args.device}")
    print("  loss HF eager:", " ".join(f"{x:.4f}" for x in hf_losses))
    print("  loss llama_ext:", " ".join(f"{x:.4f}" for x in our_losses))
    print(
        f"  step time: HF eager {hf_step * 1e3:.1f} ms, llama_ext {our_step * 1e3:.1f} ms, "
        f"speedup {hf_step / our_step:.2f}x"
    )

    # The patched model's state dict is HF's (same names, same Parameters): hand its trained
    # weights back to the HF model and both generate from the same weights.
    hf.load_state_dict(ours.state_dict())
    prompt = torch.randint(1, config.vocab_size, (1, 16), device=args.device)
    generate = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
    with torch.no_grad():
        hf.eval().generate(prompt, **generate)  # warm-up
        ours.eval().generate(prompt, **generate)
        hf_tokens, hf_time = timed(lambda: hf.generate(prompt, **generate), args.device)
        our_tokens, our_time = timed(lambda: ours.generate(prompt, **generate), args.device)
    same = torch.equal(hf_tokens, our_tokens)
    print(f"greedy generation of {args.new_tokens} tokens: identical tokens: {same}")
    print(f"  HF eager {hf_time * 1e3:.0f} ms, llama_ext {our_time * 1e3:.0f} ms, speedup {hf_time / our_time:.2f}x")
    print("  tokens:", our_tokens[0, prompt.shape[1]:].tolist())


if __name__ == "__main__":
    main()
