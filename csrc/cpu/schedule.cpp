// CPU kernel of dspark::schedule. The values are checked here (a host read is free), so bad
// input raises instead of being sanitized.
//
// Algorithm 1 walks the candidates in descending survival and usually stops early, so instead
// of sorting all R * K candidates this walks a max-heap of each request's next position: rows
// are non-increasing in j, so popping the best head yields exactly the global sorted order
// (ties: lower request, then lower position) and costs O(R + admitted * log R); survival is
// computed only for the heads it reaches.
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

#include "../core/schedule.h"
#include "../schedule_launch.h"

namespace dspark::cpu {
namespace {

constexpr const char* kOp = "dspark::schedule";

// Branch-free range tests over all values first (they vectorize); only a failure pays for a
// second pass that finds the first offending entry for the message.
bool all_probabilities(const core::ScheduleProblem& p) {
  int bad = 0;
  for (int64_t r = 0; r < p.num_requests; ++r) {
    const float* row = p.confidence + r * p.confidence_stride_r;
    if (p.confidence_stride_k == 1) {
      for (int64_t j = 0; j < p.num_draft; ++j) bad |= static_cast<int>(!(row[j] >= 0.0f)) | static_cast<int>(row[j] > 1.0f);
    } else {
      for (int64_t j = 0; j < p.num_draft; ++j) {
        const float c = row[j * p.confidence_stride_k];
        bad |= static_cast<int>(!(c >= 0.0f)) | static_cast<int>(c > 1.0f);  // NaN fails c >= 0
      }
    }
  }
  return bad == 0;
}

void check_schedule_values(const core::ScheduleProblem& p) {
  if (!all_probabilities(p)) {
    for (int64_t r = 0; r < p.num_requests; ++r)
      for (int64_t j = 0; j < p.num_draft; ++j) {
        const float c = p.confidence[r * p.confidence_stride_r + j * p.confidence_stride_k];
        TORCH_CHECK(c >= 0.0f && c <= 1.0f, kOp, ": confidence must hold probabilities in [0, 1], got ", c,
                    " at [", r, ", ", j, "]");
      }
  }
  if (p.max_len != nullptr) {
    for (int64_t r = 0; r < p.num_requests; ++r) {
      const int32_t cap = p.max_len[r * p.max_len_stride];
      TORCH_CHECK(cap >= 0, kOp, ": max_len must be >= 0, got ", cap, " at [", r, "]");
    }
  }
  // Only batch sizes from R to N are ever read; index 0 (and anything below R) is unused.
  const int64_t first = std::max<int64_t>(p.num_requests, 1);
  const auto invalid_sps = [](float s) {  // NaN fails s > 0; inf is above the largest float
    return static_cast<int>(!(s > 0.0f)) | static_cast<int>(s > std::numeric_limits<float>::max());
  };
  int bad = 0;
  if (p.sps_stride == 1) {
    for (int64_t n = first; n <= p.max_batch; ++n) bad |= invalid_sps(p.sps[n]);
  } else {
    for (int64_t n = first; n <= p.max_batch; ++n) bad |= invalid_sps(p.sps[n * p.sps_stride]);
  }
  if (bad != 0) {
    for (int64_t n = first; n <= p.max_batch; ++n) {
      const float s = p.sps[n * p.sps_stride];
      TORCH_CHECK(std::isfinite(s) && s > 0.0f, kOp, ": sps must hold finite steps per second > 0 for batch sizes ",
                  first, "..", p.max_batch, ", got ", s, " at [", n, "]");
    }
  }
}

// Heap entry: survival bits above, the complement of the request below, so that the max is the
// highest survival and, among equal ones, the lowest request.
uint64_t head_key(float survival, int64_t r) {
  return (uint64_t{core::survival_key(survival)} << 32) | (0xFFFFFFFFull - static_cast<uint64_t>(r));
}

int64_t request_of(uint64_t key) { return static_cast<int64_t>(0xFFFFFFFFull - (key & 0xFFFFFFFFull)); }

// A max-heap of head keys in heap[0, size), with one spare slot so that the child selection can
// read heap[size] without a branch (the read value is never chosen).
struct HeadHeap {
  std::vector<uint64_t> heap;
  size_t size = 0;

  explicit HeadHeap(int64_t capacity) : heap(static_cast<size_t>(capacity) + 1, 0) {}
  void push_unordered(uint64_t key) { heap[size++] = key; }
  void heapify() { std::make_heap(heap.begin(), heap.begin() + static_cast<std::ptrdiff_t>(size)); }
  uint64_t top() const { return heap[0]; }
  void replace_top(uint64_t key) {
    heap[0] = key;
    sift_down();
  }
  void pop() {
    heap[0] = heap[--size];
    sift_down();
  }

 private:
  void sift_down() {  // one sift-down instead of pop + push; the child choice compiles to a cmov
    const uint64_t moving = heap[0];
    size_t i = 0;
    for (size_t child = 1; child < size; child = 2 * i + 1) {
      child += static_cast<size_t>((child + 1 < size) & (heap[child + 1] > heap[child]));
      if (heap[child] <= moving) break;
      heap[i] = heap[child];
      i = child;
    }
    heap[i] = moving;
  }
};

void schedule_requests(const core::ScheduleProblem& p) {
  const int64_t R = p.num_requests;
  std::fill(p.num_draft_out, p.num_draft_out + R, 0);
  // Each request's head: its next position num_draft_out[r] and that position's survival, one
  // product per admitted draft (rounded after every product, like every other backend).
  std::vector<float> head_survival(static_cast<size_t>(R));
  HeadHeap heads(R);
  for (int64_t r = 0; r < R; ++r) {
    head_survival[r] = p.num_draft > 0 ? p.confidence_at(r, 0) : 0.0f;
    if (p.cap(r) > 0 && head_survival[r] > 0.0f) heads.push_unordered(head_key(head_survival[r], r));
  }
  heads.heapify();

  int64_t tau = core::tau_of_anchors(R);
  for (int64_t position = 0; heads.size > 0; ++position) {
    const int64_t r = request_of(heads.top());
    const int j = p.num_draft_out[r];
    const float a = head_survival[r];
    if (!core::improves_throughput(a, tau, position, R, p.sps, p.sps_stride, p.max_batch)) break;  // early stop
    tau += core::tau_increment(a);
    p.num_draft_out[r] = j + 1;
    const float next = j + 1 < p.cap(r) ? a * p.confidence_at(r, j + 1) : 0.0f;
    if (next > 0.0f) {
      head_survival[r] = next;
      heads.replace_top(head_key(next, r));
    } else {
      heads.pop();
    }
  }
}

at::Tensor schedule_cpu(const at::Tensor& confidence, const at::Tensor& sps, const std::optional<at::Tensor>& max_len) {
  PreparedSchedule s = prepare_schedule(confidence, sps, max_len);
  check_schedule_values(s.problem);
  schedule_requests(s.problem);
  return s.num_draft;
}

}  // namespace
}  // namespace dspark::cpu

TORCH_LIBRARY_IMPL(dspark, CPU, m) { m.impl("schedule", &dspark::cpu::schedule_cpu); }
