// Element access shared by the CUDA kernels: bf16/fp16 <-> float conversions (exact
// widening, round-to-nearest-even narrowing, as c10 and at::vec do on CPU) and 8-wide loads.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "../core/host_device.h"

namespace dspark::gpu {

constexpr int kIdsPerThread = 8;    // 16 bytes of bf16/fp16, 32 bytes of fp32

DSPARK_HOST_DEVICE float to_float(float x) { return x; }
DSPARK_HOST_DEVICE float to_float(__half x) { return __half2float(x); }
DSPARK_HOST_DEVICE float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

__device__ __forceinline__ void load_aligned_chunk(const float* p, float (&out)[kIdsPerThread]) {
  const float4 a = reinterpret_cast<const float4*>(p)[0];
  const float4 b = reinterpret_cast<const float4*>(p)[1];
  out[0] = a.x, out[1] = a.y, out[2] = a.z, out[3] = a.w;
  out[4] = b.x, out[5] = b.y, out[6] = b.z, out[7] = b.w;
}

// 8 x 16-bit in one uint4; the element at the lower address is the low half of a word.
__device__ __forceinline__ void load_aligned_chunk(const __nv_bfloat16* p, float (&out)[kIdsPerThread]) {
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int w = 0; w < 4; ++w) {
    out[2 * w] = __uint_as_float(words[w] << 16);  // bf16 is the high half of a float
    out[2 * w + 1] = __uint_as_float(words[w] & 0xFFFF0000u);
  }
}

__device__ __forceinline__ void load_aligned_chunk(const __half* p, float (&out)[kIdsPerThread]) {
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
  for (int w = 0; w < 4; ++w) {
    out[2 * w] = __half2float(__ushort_as_half(static_cast<unsigned short>(words[w] & 0xFFFFu)));
    out[2 * w + 1] = __half2float(__ushort_as_half(static_cast<unsigned short>(words[w] >> 16)));
  }
}

// row[first, first + 8) as floats; ids >= vocab_size read as -inf and are never touched.
// The vector path needs a 16-byte aligned row (decided on the host) and a full chunk.
template <bool kVectorLoads, typename T>
__device__ __forceinline__ void load_chunk(const T* row, int64_t first, int64_t vocab_size,
                                           float (&out)[kIdsPerThread]) {
  if (kVectorLoads && first + kIdsPerThread <= vocab_size) {
    load_aligned_chunk(row + first, out);
  } else {
#pragma unroll
    for (int j = 0; j < kIdsPerThread; ++j) out[j] = first + j < vocab_size ? to_float(row[first + j]) : -INFINITY;
  }
}

// Whether 16-byte loads of 8 ids are aligned in every row: tiles start at multiples of
// 2048 ids and threads at multiples of 8 ids, so only the base and the row stride matter.
inline bool rows_allow_vector_loads(const void* base, int64_t row_stride, int64_t element_bytes) {
  return reinterpret_cast<uintptr_t>(base) % 16 == 0 && (row_stride * element_bytes) % 16 == 0;
}


template <typename T>
DSPARK_HOST_DEVICE T from_float(float x);
template <>
DSPARK_HOST_DEVICE float from_float<float>(float x) { return x; }
template <>
DSPARK_HOST_DEVICE __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
DSPARK_HOST_DEVICE __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

}  // namespace dspark::gpu
