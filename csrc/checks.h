// Argument validation shared by every launcher: one message style, always naming the
// argument ("dspark::verify: target_logits must be ...").
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <initializer_list>
#include <string>

namespace dspark {

inline std::string dtype_list(std::initializer_list<at::ScalarType> dtypes) {
  std::string out;
  for (at::ScalarType t : dtypes) out += (out.empty() ? "" : " or ") + std::string(c10::toString(t));
  return out;
}

inline void check_dtype(const char* op, const char* name, const at::Tensor& t,
                        std::initializer_list<at::ScalarType> allowed) {
  for (at::ScalarType a : allowed)
    if (t.scalar_type() == a) return;
  TORCH_CHECK(false, op, ": ", name, " must be ", dtype_list(allowed), ", got ", t.scalar_type());
}

inline void check_dim(const char* op, const char* name, const at::Tensor& t, int64_t dim) {
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must be ", dim, "-D, got shape ", t.sizes());
}

inline void check_size(const char* op, const char* name, const at::Tensor& t, int64_t dim, int64_t expected,
                       const char* meaning) {
  TORCH_CHECK(t.size(dim) == expected, op, ": ", name, " must have size ", expected, " (", meaning, ") in dim ", dim,
              ", got shape ", t.sizes());
}

inline void check_same_device(const char* op, const char* name, const at::Tensor& t, const at::Tensor& reference,
                              const char* reference_name) {
  TORCH_CHECK(t.device() == reference.device(), op, ": ", name, " must be on ", reference.device(), " like ",
              reference_name, ", got ", t.device());
}

// A 1-D tensor with one entry per item (a bias, a per-request cap, a per-rank weight): its
// dimension, dtype, size and device, checked in that order.
inline void check_vector(const char* op, const char* name, const at::Tensor& t, at::ScalarType dtype, int64_t size,
                         const char* meaning, const at::Tensor& reference, const char* reference_name) {
  check_dim(op, name, t, 1);
  check_dtype(op, name, t, {dtype});
  check_size(op, name, t, 0, size, meaning);
  check_same_device(op, name, t, reference, reference_name);
}

// A pair of KV caches (cached_attention, draft_layer, draft_context): key_cache 4-D float32, value_cache float32
// of key_cache's shape, both on the reference's device.
inline void check_kv_caches(const char* op, const at::Tensor& key_cache, const at::Tensor& value_cache,
                            const at::Tensor& reference, const char* reference_name) {
  check_dim(op, "key_cache", key_cache, 4);
  check_dtype(op, "key_cache", key_cache, {at::kFloat});
  check_dtype(op, "value_cache", value_cache, {at::kFloat});
  check_same_device(op, "key_cache", key_cache, reference, reference_name);
  check_same_device(op, "value_cache", value_cache, reference, reference_name);
  TORCH_CHECK(value_cache.sizes() == key_cache.sizes(), op, ": value_cache must have key_cache's shape ",
              key_cache.sizes(), ", got ", value_cache.sizes());
}

// The per-request sampling controls every sampling op takes: temperature [B] float32,
// seed and offset [B] int64.
inline void check_sampling_controls(const char* op, const at::Tensor& temperature, const at::Tensor& seed,
                                    const at::Tensor& offset, int64_t B) {
  check_dim(op, "temperature", temperature, 1);
  check_dtype(op, "temperature", temperature, {at::kFloat});
  check_size(op, "temperature", temperature, 0, B, "B");
  check_dim(op, "seed", seed, 1);
  check_dtype(op, "seed", seed, {at::kLong});
  check_size(op, "seed", seed, 0, B, "B");
  check_dim(op, "offset", offset, 1);
  check_dtype(op, "offset", offset, {at::kLong});
  check_size(op, "offset", offset, 0, B, "B");
}

}  // namespace dspark
