// The two-level exponential race every sampling op uses: a race between vocabulary tiles
// on their totals, then a race between the tokens of the winning tile. Exact (a tile wins
// with probability mass(tile) / total, then a token with w / mass(tile)), and it re-reads
// one tile instead of the row. Each op races in its own RandomPurpose streams.
#pragma once

#include <cstdint>

#include "host_device.h"
#include "rng.h"
#include "sampling.h"

namespace dspark::core {

// Key of vocabulary tile `tile`. `shift` is the largest tile max of the row: it keeps the
// keys' precision (see race_key).
DSPARK_HOST_DEVICE float tile_race_key(MaxSum tile_total, float shift, uint64_t seed, uint64_t offset,
                                       int32_t position, int64_t tile, RandomPurpose purpose) {
  const uint32_t bits =
      random_word(seed, offset, static_cast<uint32_t>(position), static_cast<uint32_t>(tile), purpose);
  return race_key(shifted_log_total(tile_total, shift), exponential_variate(bits));
}

// The random words of the token race for ids 4*group .. 4*group + 3 (one Philox call):
// token id i races with race_key(log_weight_i - shift, exponential_variate(block.v[i % 4])),
// shift being the winning tile's max.
DSPARK_HOST_DEVICE Philox4x32 token_race_block(uint64_t seed, uint64_t offset, int32_t position, int64_t group,
                                               RandomPurpose purpose) {
  return random_block(seed, offset, static_cast<uint32_t>(position), static_cast<uint32_t>(group), purpose);
}

}  // namespace dspark::core
