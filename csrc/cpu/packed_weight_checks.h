// Validation of a weight packed by dspark_ext.ops.pack_skinny_weight ([ceil(N / 16), K, 16]),
// shared by every launcher that streams one through the skinny_linear kernel.
#pragma once

#include <ATen/core/Tensor.h>

#include "../checks.h"
#include "skinny_linear_dispatch.h"

namespace dspark::cpu {

// `packed` must be a float32 or bfloat16 [N, K] weight (N = out_features, K = in_features, whose
// origin `in_meaning` names) packed for skinny_linear, on `reference`'s device.
inline void check_packed_weight(const char* op, const char* name, const at::Tensor& packed, int64_t out_features,
                                int64_t in_features, const char* in_meaning, const at::Tensor& reference,
                                const char* reference_name) {
  check_dim(op, name, packed, 3);
  check_dtype(op, name, packed, {at::kFloat, at::kBFloat16});
  check_same_device(op, name, packed, reference, reference_name);
  const int64_t blocks = (out_features + kSkinnyBlock - 1) / kSkinnyBlock;
  TORCH_CHECK(packed.size(0) == blocks && packed.size(1) == in_features && packed.size(2) == kSkinnyBlock, op, ": ",
              name, " must have shape [ceil(out_features / 16), K, 16] = [", blocks, ", ", in_features,
              ", 16] (out_features = ", out_features, ", K = ", in_meaning, "), got ", packed.sizes(),
              "; pack the [N, K] weight with dspark_ext.ops.pack_skinny_weight");
}

}  // namespace dspark::cpu
