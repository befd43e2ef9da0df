// torch.ops.adaswitch.gumbel_argmax: the decode step's per-row Gumbel-max draw on CPU, fused; and
// torch.ops.adaswitch.logit_rank, SKD's teacher top-k membership test in one pass.
//
// token[r] = argmax_i(logits[r, i] * inv_temperature + g[r, i]) over entries >= threshold[r] (top_k /
// top_p, when given), g = -log(-log u) with u the counter-based uniform of adaswitch/ops/rng.py for
// (seed, keys[r], positions[r], stream, i); greedy: argmax of the raw logits. Ties go to the lowest id.
// The PyTorch reference needs ~40 passes over [B, V] int64 tensors for the hash; here the hash, the
// two logs and the argmax run in one pass over L1-sized blocks (hash loop auto-vectorised in uint32,
// logs with at::vec, i.e. the same Sleef routine torch.log uses), rows in parallel for large batches.
//
// `rows_needed` (bool [N], optional) skips rows whose draw the caller will discard (AdaSwitch needs the
// teacher's draw only on switched rows, SKD only on rejected drafts): their token is 0.
//
// Same bits as the reference and kernels/triton/step.py: murmur3 fmix32 chained over the counters,
// u = ((bits >> 9) + 0.5) / 2^23. Scores are formed as (x * inv_t) + g with no FMA contraction, as
// PyTorch does, so tokens agree with the reference up to a last-ulp difference of log in a near-tie.

#include "sampling.h"
#include "vec.h"

#include <algorithm>
#include <cstdint>
#include <limits>

namespace adaswitch {
namespace {

using at::vec::Vectorized;

constexpr int64_t kBlock = 512;
// Rows per parallel chunk: a decode step (B = 8, V = 152k, ~2 ms) runs inline; threads only pay off for
// several million logits (waking the pool costs tens of ms when the cores are shared).
inline int64_t grain_rows(int64_t vocab) { return std::max<int64_t>(1, (int64_t{1} << 22) / vocab); }

using namespace sampling;

template <typename scalar_t>
__attribute__((optimize("fp-contract=off"))) int64_t gumbel_row(const scalar_t* x, int64_t vocab, uint32_t rowh,
                                                                 float inv_t, float thr) {
  using Vec = Vectorized<float>;
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  const uint32_t twist = (rowh >> 7) | ((rowh & 0x7Fu) << 25);
  alignas(64) float scaled[kBlock];
  alignas(64) float score[kBlock];
  float best = kNegInf;
  int64_t arg = 0;
  for (int64_t start = 0; start < vocab; start += kBlock) {
    const int64_t n = std::min(kBlock, vocab - start);
    for (int64_t j = 0; j < n; ++j) {
      const float s = static_cast<float>(x[start + j]) * inv_t;
      scaled[j] = s >= thr ? s : kNegInf;
      const uint32_t t = fmix32((static_cast<uint32_t>(start + j) * kGolden) ^ rowh);
      const uint32_t bits = fmix32(t ^ twist);
      score[j] = (static_cast<float>(bits >> 9) + 0.5f) * (1.0f / 8388608.0f);
    }
    int64_t j = 0;
    for (; j + Vec::size() <= n; j += Vec::size()) {
      const Vec g = Vec::loadu(score + j).log().neg().log().neg();
      (Vec::loadu(scaled + j) + g).store(score + j);
    }
    for (; j < n; ++j) score[j] = scaled[j] + (-std::log(-std::log(score[j])));
    for (int64_t k = 0; k < n; ++k) {
      if (score[k] > best) {
        best = score[k];
        arg = start + k;
      }
    }
  }
  return arg;
}

at::Tensor gumbel_argmax(const at::Tensor& logits, const at::Tensor& keys, const at::Tensor& positions,
                         int64_t seed_hash, int64_t stream, double inv_temperature,
                         const std::optional<at::Tensor>& threshold, bool greedy,
                         const std::optional<at::Tensor>& rows_needed) {
  TORCH_CHECK(logits.dim() == 2 && logits.size(1) > 0, "gumbel_argmax: logits must be [N, V], got ",
              logits.sizes());
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  TORCH_CHECK(keys.scalar_type() == at::kLong && keys.numel() == rows, "gumbel_argmax: keys must be int64 [N]");
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.numel() == rows,
              "gumbel_argmax: positions must be int64 [N]");
  TORCH_CHECK(!threshold || (threshold->scalar_type() == at::kFloat && threshold->numel() == rows),
              "gumbel_argmax: threshold must be float32 [N]");
  TORCH_CHECK(!rows_needed || (rows_needed->scalar_type() == at::kBool && rows_needed->numel() == rows),
              "gumbel_argmax: rows_needed must be bool [N]");
  const at::Tensor x = logits.contiguous();
  const at::Tensor k = keys.contiguous(), p = positions.contiguous();
  const at::Tensor thr = threshold ? threshold->contiguous() : at::Tensor();
  const at::Tensor need = rows_needed ? rows_needed->contiguous() : at::Tensor();
  at::Tensor out = at::empty({rows}, keys.options());
  const int64_t* kp = k.data_ptr<int64_t>();
  const int64_t* pp = p.data_ptr<int64_t>();
  const float* tp = thr.defined() ? thr.data_ptr<float>() : nullptr;
  const bool* np = need.defined() ? need.data_ptr<bool>() : nullptr;
  int64_t* op = out.data_ptr<int64_t>();
  const float inv_t = static_cast<float>(inv_temperature);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gumbel_argmax", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain_rows(vocab), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* row = xp + r * vocab;
        if (np && !np[r]) {
          op[r] = 0;  // the caller discards this row's draw
        } else if (greedy) {
          op[r] = greedy_row(row, vocab);
        } else {
          const uint32_t rowh = row_hash(static_cast<uint32_t>(seed_hash), kp[r], pp[r],
                                         static_cast<uint32_t>(stream));
          op[r] = gumbel_row(row, vocab, rowh, inv_t, tp ? tp[r] : -std::numeric_limits<float>::infinity());
        }
      }
    });
  });
  return out;
}

// rank[r] = #{i : x[r, i] > x[r, y]} + #{i < y : x[r, i] == x[r, y]}, y = token[r]: the position of y in
// the row sorted by logit, ties to the lower id (SKD keeps a draft whose teacher rank is < top_k).
at::Tensor logit_rank(const at::Tensor& logits, const at::Tensor& token) {
  TORCH_CHECK(logits.dim() == 2 && logits.size(1) > 0, "logit_rank: logits must be [N, V], got ", logits.sizes());
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  TORCH_CHECK(token.scalar_type() == at::kLong && token.numel() == rows, "logit_rank: token must be int64 [N]");
  const at::Tensor x = logits.contiguous(), y = token.contiguous();
  at::Tensor out = at::empty({rows}, token.options());
  const int64_t* yp = y.data_ptr<int64_t>();
  int64_t* op = out.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "logit_rank", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain_rows(vocab), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* row = xp + r * vocab;
        const int64_t id = yp[r];
        TORCH_CHECK(id >= 0 && id < vocab, "logit_rank: token ", id, " outside the vocabulary of ", vocab);
        const float ty = static_cast<float>(row[id]);
        int64_t above = 0;
        for (int64_t i = 0; i < vocab; ++i) above += static_cast<float>(row[i]) > ty;
        for (int64_t i = 0; i < id; ++i) above += static_cast<float>(row[i]) == ty;
        op[r] = above;
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(adaswitch, m) {
  m.def(
      "gumbel_argmax(Tensor logits, Tensor keys, Tensor positions, int seed_hash, int stream, "
      "float inv_temperature, Tensor? threshold, bool greedy, Tensor? rows_needed=None) -> Tensor");
  m.def("logit_rank(Tensor logits, Tensor token) -> Tensor");
}

TORCH_LIBRARY_IMPL(adaswitch, CPU, m) {
  m.impl("gumbel_argmax", &gumbel_argmax);
  m.impl("logit_rank", &logit_rank);
}

}  // namespace adaswitch
