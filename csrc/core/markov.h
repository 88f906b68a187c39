// Markov-head correction and confidence of one draft position (DSpark Eq. 4, 5, 7), and the
// raw-pointer problem of dspark::markov_draft shared by the CPU and CUDA kernels.
//
// Per row b and draft position k = 0..K-1 (paper position k + 1), with x_{-1} the anchor:
//   a       = W1[x_{k-1}]                       (float32)
//   l_k[v]  = round(U_k[v] + W2[v] . a)          written to draft_logits, in its dtype
//   x_k     = argmax l_k (T = 0), else a draw from softmax(l_k / T) by the two-level race of
//             core/race.h over the *rounded* l_k, so verify's q is the q that drew x_k
//   c_k     = sigmoid((conf_base_k + w_prev . a) / sts_k)
#pragma once

#include <cmath>
#include <cstdint>

#include "host_device.h"
#include "rng.h"
#include "sampling.h"

namespace dspark::core {

// The CUDA kernel sweeps the vocabulary in units of this many ids (one thread per id);
// tile stats are kept per unit and merged into kVocabTile tiles for the race.
constexpr int64_t kMarkovUnitIds = 256;
static_assert(kVocabTile % kMarkovUnitIds == 0, "units must tile a vocabulary tile exactly");

DSPARK_HOST_DEVICE int64_t num_markov_units(int64_t vocab_size) {
  return (vocab_size + kMarkovUnitIds - 1) / kMarkovUnitIds;
}

constexpr RandomPurpose kMarkovTilePurpose = RandomPurpose::kMarkovDraftTileRace;
constexpr RandomPurpose kMarkovTokenPurpose = RandomPurpose::kMarkovDraftTokenRace;

// The W1 row an anchor selects, or -1 for an id outside the vocabulary (only reachable on
// CUDA, where values are not checked on the host): no transition bias, no confidence term.
DSPARK_HOST_DEVICE int64_t transition_row(int64_t previous_token, int64_t vocab_size) {
  return previous_token >= 0 && previous_token < vocab_size ? previous_token : -1;
}

// Eq. 7 with Sequential Temperature Scaling: conditional acceptance of position k.
// prev_term = w_prev . W1[x_{k-1}]; the token-independent w_h . h_k + bias is conf_base.
DSPARK_HOST_DEVICE float markov_confidence(float conf_base, float prev_term, float sts_temperature) {
  const float z = (conf_base + prev_term) / sts_temperature;
  return 1.0f / (1.0f + expf(-z));
}

template <typename LogitT, typename WeightT>
struct MarkovDraftProblem {
  const LogitT* base_logits;       // [B, K, V] contiguous: U_k from the backbone
  const int64_t* prev_token_ids;   // [B]: the anchors
  const WeightT* markov_w1;        // [V, r] contiguous
  const WeightT* markov_w2;        // [V, r] contiguous
  const float* temperature;        // [B]
  const int64_t* seed;             // [B]
  const int64_t* offset;           // [B]
  const float* conf_base;          // [B, K] or nullptr (no confidence)
  const float* conf_w_prev;        // [r] or nullptr (no previous-token term)
  const float* conf_temperature;   // [K] or nullptr (all 1)
  int64_t batch, steps, vocab_size, rank;
  int64_t* draft_token_ids;        // [B, K]
  LogitT* draft_logits;            // [B, K, V] contiguous
  float* confidence;               // [B, K] or nullptr
  // Scratch, carved by MarkovDraftScratch.
  float* prev_embedding;           // [B, r]: float32 W1[x_{k-1}] of the step being drafted
  TileStats* unit_stats;           // [B, num_markov_units(V)]
};

struct MarkovDraftScratch {
  int64_t unit_stats_offset, total_bytes;

  DSPARK_HOST_DEVICE static int64_t align16(int64_t bytes) { return (bytes + 15) / 16 * 16; }

  DSPARK_HOST_DEVICE static MarkovDraftScratch layout(int64_t batch, int64_t vocab_size, int64_t rank) {
    MarkovDraftScratch s{};
    s.unit_stats_offset = align16(batch * rank * static_cast<int64_t>(sizeof(float)));
    s.total_bytes = s.unit_stats_offset +
                    align16(batch * num_markov_units(vocab_size) * static_cast<int64_t>(sizeof(TileStats)));
    return s;
  }

  template <typename LogitT, typename WeightT>
  DSPARK_HOST_DEVICE void carve(unsigned char* base, MarkovDraftProblem<LogitT, WeightT>* p) const {
    p->prev_embedding = reinterpret_cast<float*>(base);
    p->unit_stats = reinterpret_cast<TileStats*>(base + unit_stats_offset);
  }
};

}  // namespace dspark::core
