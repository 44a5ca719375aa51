"""Train an HF Llama on sequences split across processes (context parallelism) with llama_ext's
ring attention, and report the communication volume per step against the compute.

    torchrun --nproc-per-node 2 examples/context_parallel_llama.py [--seq 1024] [--steps 3]
    python examples/context_parallel_llama.py --volume-only     # the volume table alone, no processes

(from an in-place build, prefix ``PYTHONPATH=.``). gloo on CPU; NCCL with one GPU per rank when
CUDA is available. Every rank holds the whole (small, random) model and 1/W of each sequence,
zigzag-sharded by ``shard_for_context_parallel``; attention is ring attention over the group;
gradients are summed over the group, as data parallelism would. Rank 0 also runs each step on
the whole sequence in one process and prints both losses, which agree to float32 rounding.
"""
import argparse
import copy
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from llama_ext.distributed import ring_communication_bytes, shard_for_context_parallel
from llama_ext.transformers import patch_model


def tiny_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=8192, attention_dropout=0.0, use_cache=False,
        tie_word_embeddings=False,
    )


def llama3_8b_config() -> LlamaConfig:
    """Llama-3-8B's shapes (for the volume table only; never instantiated)."""
    return LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8,
    )


def step_volume(config: LlamaConfig, batch: int, seq: int, world: int, dtype: torch.dtype) -> dict:
    """Per training step and rank: bytes sent by ring attention (all layers, forward + backward) and
    by the gradient all-reduce (fp32, ring algorithm), against the FLOPs of the whole step on one
    device (matmuls 6 * params * tokens; causal attention 7 * batch * heads * head_dim * seq^2:
    2 products forward, 5 backward, half the score matrix each)."""
    head_dim = config.hidden_size // config.num_attention_heads
    k_l = torch.empty(batch, seq // world, config.num_key_value_heads, head_dim, dtype=dtype, device="meta")
    ring = ring_communication_bytes(k_l, k_l, world)
    ring_bytes = config.num_hidden_layers * (ring["forward"] + ring["backward"])
    kv_dim = config.num_key_value_heads * head_dim
    layer_params = (
        config.hidden_size * (2 * config.hidden_size + 2 * kv_dim) + 3 * config.hidden_size * config.intermediate_size
    )
    matmul_params = config.num_hidden_layers * layer_params + config.hidden_size * config.vocab_size  # + lm_head
    all_params = matmul_params + config.hidden_size * config.vocab_size  # + embedding
    grad_bytes = 2 * (world - 1) * all_params * 4 // world
    attention_flops = 7 * config.num_hidden_layers * batch * config.num_attention_heads * head_dim * seq**2
    flops = 6 * matmul_params * batch * seq + attention_flops
    return dict(ring_bytes=ring_bytes, grad_bytes=grad_bytes, single_device_flops=flops)


def print_volume(name, config, batch, seq, world, dtype):
    v = step_volume(config, batch, seq, world, dtype)
    per_rank_flops = v["single_device_flops"] / world
    print(
        f"{name}: batch {batch} x {seq} tokens, {world} ranks, {str(dtype).split('.')[-1]}: per rank and step "
        f"{v['ring_bytes'] / 1e6:,.1f} MB ring attention + {v['grad_bytes'] / 1e6:,.1f} MB gradient all-reduce; "
        f"one device computes {v['single_device_flops'] / 1e12:,.3f} TFLOP per step, each rank "
        f"{per_rank_flops / 1e12:,.3f} TFLOP: {per_rank_flops / v['ring_bytes']:,.0f} FLOP per ring byte"
    )


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--volume-only", action="store_true")
    args = parser.parse_args()
    if args.volume_only:
        for world in (2, 8):
            print_volume("tiny model", tiny_config(), args.batch, args.seq, world, torch.float32)
            print_volume("Llama-3-8B shapes", llama3_8b_config(), 1, 131072, world, torch.bfloat16)
        return

    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda" if use_cuda else "cpu")
    if not use_cuda:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))

    torch.manual_seed(0)
    base = patch_model(LlamaForCausalLM(tiny_config()).to(device))
    model = patch_model(copy.deepcopy(base), context_parallel_group=dist.group.WORLD)
    reference = base if rank == 0 else None
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    ref_optimizer = torch.optim.SGD(reference.parameters(), lr=0.5) if reference is not None else None
    positions = torch.arange(args.seq, device=device).expand(args.batch, -1)

    for step in range(args.steps):
        ids = torch.randint(0, 256, (args.batch, args.seq), device=device)
        dist.broadcast(ids, 0)  # one batch for the whole group
        labels = F.pad(ids[:, 1:], (0, 1), value=-100)  # shift on the whole sequence, then shard
        logits = model(
            input_ids=shard_for_context_parallel(ids, 1), position_ids=shard_for_context_parallel(positions, 1)
        ).logits
        loss = F.cross_entropy(
            logits.float().flatten(0, 1), shard_for_context_parallel(labels, 1).flatten(), reduction="sum"
        ) / (labels != -100).sum()
        loss.backward()
        for p in model.parameters():
            dist.all_reduce(p.grad)
        optimizer.step()
        optimizer.zero_grad()
        loss = loss.detach()
        dist.all_reduce(loss)
        if reference is not None:
            ref_loss = reference(input_ids=ids, labels=ids).loss
            ref_loss.backward()
            ref_optimizer.step()
            ref_optimizer.zero_grad()
            print(f"step {step}: loss {loss.item():.6f} on {world} ranks, {ref_loss.item():.6f} in one process")
    if rank == 0:
        print_volume("this run", tiny_config(), args.batch, args.seq, world, torch.float32)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
