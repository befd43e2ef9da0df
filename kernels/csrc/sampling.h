// What every native sampling op shares: the counter-based random bits (adaswitch/ops/rng.py states the
// scheme: murmur3 fmix32 chained over (seed hash, example key, position, stream), then per vocabulary index
// u = ((bits >> 9) + 0.5) / 2^23; same bits as the PyTorch reference and the Triton kernels) and the
// greedy choice (the first maximum, as torch.argmax).
#pragma once

#include <cstdint>
#include <limits>

namespace adaswitch {
namespace sampling {

constexpr uint32_t kM1 = 0x85EBCA6Bu;
constexpr uint32_t kM2 = 0xC2B2AE35u;
constexpr uint32_t kGolden = 0x9E3779B1u;

inline uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= kM1;
  h ^= h >> 13;
  h *= kM2;
  return h ^ (h >> 16);
}

inline uint32_t combine(uint32_t h, uint32_t word) { return fmix32((h * kGolden) ^ word); }

// The hash of one row's draw: (seed hash, key, position, stream).
inline uint32_t row_hash(uint32_t seed_hash, int64_t key, int64_t position, uint32_t stream) {
  const uint64_t k = static_cast<uint64_t>(key);
  uint32_t h = combine(seed_hash, static_cast<uint32_t>(k));
  h = combine(h, static_cast<uint32_t>(k >> 32));
  h = combine(h, static_cast<uint32_t>(static_cast<uint64_t>(position)));
  return combine(h, stream);
}

// The uniform draw in (0, 1) of vocabulary index i under a row hash.
inline float uniform(uint32_t rowh, int64_t i) {
  const uint32_t twist = (rowh >> 7) | ((rowh & 0x7Fu) << 25);
  const uint32_t t = fmix32((static_cast<uint32_t>(i) * kGolden) ^ rowh);
  const uint32_t bits = fmix32(t ^ twist);
  return (static_cast<float>(bits >> 9) + 0.5f) * (1.0f / 8388608.0f);
}

// The index of a row's first maximum (the greedy token), compared in fp32.
template <typename scalar_t>
int64_t greedy_row(const scalar_t* x, int64_t vocab) {
  float best = -std::numeric_limits<float>::infinity();
  int64_t arg = 0;
  for (int64_t i = 0; i < vocab; ++i) {
    const float v = static_cast<float>(x[i]);
    if (v > best) {
      best = v;
      arg = i;
    }
  }
  return arg;
}

}  // namespace sampling
}  // namespace adaswitch
