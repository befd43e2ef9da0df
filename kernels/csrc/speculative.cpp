// torch.ops.adaswitch.speculative_stats: per drafted position, what speculative teacher guidance needs
// (adaswitch/ops/speculative.py): q = p_T(draft), p = p_S(draft) and the residual draw
// z = argmax_i(log(max(0, p_T(i) - p_S(i))) + g_i), g the Gumbel noise of rng stream 5 at the position
// (when the residual is zero everywhere: argmax_i(log p_T(i) + g_i)). p_X is the sampling distribution
// of a side: exp(x_i - max) / sum over the entries >= threshold of x = logits * inv_temperature, or the
// point mass at the raw logits' argmax (ties to the lowest id) when greedy. fp32 throughout, one row per
// drafted position, rows in parallel for large batches. Same hash as kernels/csrc/step.cpp.

#include "sampling.h"
#include "vec.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

namespace adaswitch {
namespace {

constexpr uint32_t kStreamResidual = 5;

using namespace sampling;

// One side's distribution over a row, written to `prob` (fp32 [V]).
template <typename scalar_t>
__attribute__((optimize("fp-contract=off"))) void side_probs(const scalar_t* x, int64_t vocab, float inv_t,
                                                             float thr, bool greedy, float* prob) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  if (greedy) {
    std::fill(prob, prob + vocab, 0.0f);
    prob[greedy_row(x, vocab)] = 1.0f;
    return;
  }
  float m = kNegInf;
  for (int64_t i = 0; i < vocab; ++i) {
    const float s = static_cast<float>(x[i]) * inv_t;
    prob[i] = s >= thr ? s : kNegInf;
    m = std::max(m, prob[i]);
  }
  float z = 0.0f;
  for (int64_t i = 0; i < vocab; ++i) {
    prob[i] = std::exp(prob[i] - m);
    z += prob[i];
  }
  for (int64_t i = 0; i < vocab; ++i) prob[i] = prob[i] / z;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> speculative_stats(
    const at::Tensor& student_logits, const at::Tensor& teacher_logits, const at::Tensor& draft,
    const at::Tensor& keys, const at::Tensor& positions, int64_t seed_hash, double inv_ts, double inv_tt,
    const std::optional<at::Tensor>& thr_s, const std::optional<at::Tensor>& thr_t, bool greedy_s,
    bool greedy_t) {
  TORCH_CHECK(teacher_logits.dim() == 2 && student_logits.sizes() == teacher_logits.sizes(),
              "speculative_stats: logits must be two [N, V] tensors of one shape");
  const int64_t rows = teacher_logits.size(0), vocab = teacher_logits.size(1);
  TORCH_CHECK(draft.scalar_type() == at::kLong && draft.numel() == rows, "speculative_stats: draft must be int64 [N]");
  TORCH_CHECK(keys.scalar_type() == at::kLong && keys.numel() == rows, "speculative_stats: keys must be int64 [N]");
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.numel() == rows,
              "speculative_stats: positions must be int64 [N]");
  for (const auto& thr : {thr_s, thr_t}) {
    TORCH_CHECK(!thr || (thr->scalar_type() == at::kFloat && thr->numel() == rows),
                "speculative_stats: thresholds must be float32 [N]");
  }
  const at::Tensor s = student_logits.contiguous(), t = teacher_logits.contiguous();
  const at::Tensor d = draft.contiguous(), k = keys.contiguous(), p = positions.contiguous();
  const at::Tensor ts = thr_s ? thr_s->contiguous() : at::Tensor();
  const at::Tensor tt = thr_t ? thr_t->contiguous() : at::Tensor();
  at::Tensor q_out = at::empty({rows}, keys.options().dtype(at::kFloat));
  at::Tensor p_out = at::empty({rows}, keys.options().dtype(at::kFloat));
  at::Tensor z_out = at::empty({rows}, keys.options());
  const int64_t* dp = d.data_ptr<int64_t>();
  const int64_t* kp = k.data_ptr<int64_t>();
  const int64_t* pp = p.data_ptr<int64_t>();
  const float* tsp = ts.defined() ? ts.data_ptr<float>() : nullptr;
  const float* ttp = tt.defined() ? tt.data_ptr<float>() : nullptr;
  float* qp = q_out.data_ptr<float>();
  float* psp = p_out.data_ptr<float>();
  int64_t* zp = z_out.data_ptr<int64_t>();
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  TORCH_CHECK(s.scalar_type() == t.scalar_type(), "speculative_stats: logits must share a dtype");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "speculative_stats", [&] {
    const scalar_t* sp = s.data_ptr<scalar_t>();
    const scalar_t* tp = t.data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 21) / vocab);
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      std::vector<float> ps(vocab), pt(vocab);
      for (int64_t r = begin; r < end; ++r) {
        side_probs(sp + r * vocab, vocab, static_cast<float>(inv_ts), tsp ? tsp[r] : kNegInf, greedy_s, ps.data());
        side_probs(tp + r * vocab, vocab, static_cast<float>(inv_tt), ttp ? ttp[r] : kNegInf, greedy_t, pt.data());
        const int64_t y = dp[r];
        const bool ok = y >= 0 && y < vocab;
        qp[r] = ok ? pt[y] : 0.0f;
        psp[r] = ok ? ps[y] : 0.0f;
        const uint32_t rowh = row_hash(static_cast<uint32_t>(seed_hash), kp[r], pp[r], kStreamResidual);
        float best = kNegInf, best_t = kNegInf;
        int64_t arg = 0, arg_t = 0;
        bool any = false;
        for (int64_t i = 0; i < vocab; ++i) {
          const float g = -std::log(-std::log(uniform(rowh, i)));
          const float res = std::max(pt[i] - ps[i], 0.0f);
          any = any || res > 0.0f;
          const float score = std::log(res) + g;
          if (score > best) {
            best = score;
            arg = i;
          }
          const float score_t = std::log(pt[i]) + g;
          if (score_t > best_t) {
            best_t = score_t;
            arg_t = i;
          }
        }
        zp[r] = any ? arg : arg_t;
      }
    });
  });
  return {q_out, p_out, z_out};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(adaswitch, m) {
  m.def(
      "speculative_stats(Tensor student_logits, Tensor teacher_logits, Tensor draft, Tensor keys, "
      "Tensor positions, int seed_hash, float inv_ts, float inv_tt, Tensor? thr_s, Tensor? thr_t, "
      "bool greedy_s, bool greedy_t) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(adaswitch, CPU, m) { m.impl("speculative_stats", &speculative_stats); }

}  // namespace adaswitch
