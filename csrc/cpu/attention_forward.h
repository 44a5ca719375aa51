// The CPU attention forward (attention.cpp) as a function, for the KV-cache kernel's
// prefill-shaped calls (kvcache_attention.cpp), which read a paged cache in place.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#include "../attention.h"

namespace llama_ext::cpu {

// Runs a checked, batched or varlen call whose q and k hold a token each, into call.out and
// call.lse (views allowed). With a block table (int32 [batch, >= ceil(seq_k / block_size)], the
// entries it uses checked by the caller; batched calls only), call.k and call.v are a paged
// cache's pools [num_blocks, block_size, n_kv_heads, d]: key t of sequence b is row
// t % block_size of block block_table[b][t / block_size].
void attention_forward(const AttentionCall& call, const std::optional<at::Tensor>& block_table);

}  // namespace llama_ext::cpu
