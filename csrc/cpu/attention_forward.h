// The CPU attention forward (attention.cpp) as a function, for the KV-cache kernel's
// prefill-shaped calls (kvcache_attention.cpp), which read a paged cache in place.
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <optional>

#include "../attention.h"

namespace llama_ext::cpu {

// Query tokens per forward task (one task per sequence, kv head and query block; keys are not
// split): the rows of all G heads of a query block together, G * block_q ~ 256, keep the score
// tile in L2 and the products large enough for BLAS to run at full rate.
inline int64_t block_q_for(int64_t group) { return std::clamp<int64_t>(256 / group, 16, 128); }

// Runs a checked, batched or varlen call whose q and k hold a token each, into call.out and
// call.lse (views allowed). With a block table (int32 [batch, >= ceil(seq_k / block_size)], the
// entries it uses checked by the caller; batched calls only), call.k and call.v are a paged
// cache's pools [num_blocks, block_size, n_kv_heads, d]: key t of sequence b is row
// t % block_size of block block_table[b][t / block_size].
void attention_forward(const AttentionCall& call, const std::optional<at::Tensor>& block_table);

}  // namespace llama_ext::cpu
