// Keyed counter-based RNG: every random number is a pure function of
// (seed, offset, position, index, purpose), so results never depend on batch
// composition, thread layout or a global generator (Philox4x32-10, Salmon et al. 2011).
#pragma once

#include <cmath>
#include <cstdint>

#include "host_device.h"

namespace dspark::core {

// Distinct streams per use. The high nibble names the op so ops never share a stream.
enum class RandomPurpose : uint32_t {
  kVerifyAccept = 0x11,            // u_k of the accept test at draft position k
  kVerifyTileRace = 0x12,          // race between vocabulary tiles of the emitted row
  kVerifyTokenRace = 0x13,         // race between tokens inside the winning tile
  kVerifyFallbackTileRace = 0x14,  // residual had no mass: sample the target row instead
  kVerifyFallbackTokenRace = 0x15,
  kMarkovDraftTileRace = 0x21,     // reserved for markov_draft
  kMarkovDraftTokenRace = 0x22,
};

constexpr uint32_t kMaxRandomPosition = (1u << 24) - 1;

struct Philox4x32 {
  uint32_t v[4];
};

DSPARK_HOST_DEVICE uint32_t mulhilo32(uint32_t a, uint32_t b, uint32_t* hi) {
  const uint64_t product = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *hi = static_cast<uint32_t>(product >> 32);
  return static_cast<uint32_t>(product);
}

DSPARK_HOST_DEVICE Philox4x32 philox4x32_10(Philox4x32 counter, uint32_t key0, uint32_t key1) {
  constexpr uint32_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u;
  constexpr uint32_t kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, hi1;
    const uint32_t lo0 = mulhilo32(kMul0, counter.v[0], &hi0);
    const uint32_t lo1 = mulhilo32(kMul1, counter.v[2], &hi1);
    counter = Philox4x32{{hi1 ^ counter.v[1] ^ key0, lo1, hi0 ^ counter.v[3] ^ key1, lo0}};
    key0 += kWeyl0;
    key1 += kWeyl1;
  }
  return counter;
}

DSPARK_HOST_DEVICE Philox4x32 random_block(uint64_t seed, uint64_t offset, uint32_t position,
                                           uint32_t group, RandomPurpose purpose) {
  const Philox4x32 counter{{group,
                            (static_cast<uint32_t>(purpose) << 24) | (position & kMaxRandomPosition),
                            static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32)}};
  return philox4x32_10(counter, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// Uniform in the open interval (0, 1): 23 random bits centred in their bin, so that
// both log(u) and log(-log(u)) are finite.
DSPARK_HOST_DEVICE float bits_to_open_uniform(uint32_t bits) {
  return (static_cast<float>(bits >> 9) + 0.5f) * (1.0f / 8388608.0f);
}

// One Philox call yields the words of four consecutive indices (index / 4 is the counter,
// index % 4 the lane), so a kernel racing over a tile pays one call per 4 ids.
DSPARK_HOST_DEVICE uint32_t random_word(uint64_t seed, uint64_t offset, uint32_t position, uint32_t index,
                                        RandomPurpose purpose) {
  return random_block(seed, offset, position, index >> 2, purpose).v[index & 3u];
}

DSPARK_HOST_DEVICE float uniform(uint64_t seed, uint64_t offset, uint32_t position, uint32_t index,
                                 RandomPurpose purpose) {
  return bits_to_open_uniform(random_word(seed, offset, position, index, purpose));
}

// Exp(1) variate from 32 random bits: E = -log(1 - v), v = (bits + 1/2) / 2^32, kept below 1.
// Races are won by the smallest E, and v (unlike u = 1 - v) keeps 2^-32 resolution there,
// so two candidates practically never share a variate; with 23-bit uniforms they would in
// ~1e-4 of the races over a 2048-id tile, and the tie would go to the lower id.
DSPARK_HOST_DEVICE float race_variate_input(uint32_t bits) {
  const float v = (static_cast<float>(bits) + 0.5f) * (1.0f / 4294967296.0f);
  return v < 0.99999994f ? v : 0.99999994f;  // the largest float below 1
}

DSPARK_HOST_DEVICE float exponential_variate(uint32_t bits) { return -log1pf(-race_variate_input(bits)); }

}  // namespace dspark::core
