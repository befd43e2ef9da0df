// torch.ops.adaswitch.speculative_stats: per teacher position, what speculative teacher guidance needs
// (adaswitch/ops/speculative.py): q = p_T(draft), p = p_S(draft) and the residual draw
// z = argmax_i(log(max(0, p_T(i) - p_S(i))) + g_i), g the Gumbel noise of rng stream 5 at the position
// (when the residual is zero everywhere: argmax_i(log p_T(i) + g_i)). p_X is the sampling distribution
// of a side: exp(x_i - max) / sum over the entries >= threshold of x = logits * inv_temperature, or the
// point mass at the raw logits' argmax (ties to the lowest id) when greedy. Each batch row has `drafted`
// (G) student positions and `scored` (G or G + 1) teacher positions; index G, the bonus position, has no
// draft and p_S = 0 there (q = p = 0, z = the p_T draw). fp32 throughout, one row per teacher position,
// rows in parallel for large batches. Same hash as kernels/csrc/step.cpp.

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
    bool greedy_t, int64_t drafted, int64_t scored) {
  TORCH_CHECK(teacher_logits.dim() == 2 && student_logits.dim() == 2 &&
                  student_logits.size(1) == teacher_logits.size(1),
              "speculative_stats: logits must be [B * G, V] (student) and [B * GT, V] (teacher) tensors");
  const int64_t rows_s = student_logits.size(0), rows = teacher_logits.size(0), vocab = teacher_logits.size(1);
  TORCH_CHECK(drafted >= 1 && (scored == drafted || scored == drafted + 1) && rows_s % drafted == 0 &&
                  rows == rows_s / drafted * scored,
              "speculative_stats: expected G >= 1 drafted and G or G + 1 scored positions per row, got drafted=",
              drafted, " scored=", scored, " for ", rows_s, " student and ", rows, " teacher rows");
  TORCH_CHECK(draft.scalar_type() == at::kLong && draft.numel() == rows_s,
              "speculative_stats: draft must be int64 [B * G]");
  TORCH_CHECK(keys.scalar_type() == at::kLong && keys.numel() == rows,
              "speculative_stats: keys must be int64 [B * GT]");
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.numel() == rows,
              "speculative_stats: positions must be int64 [B * GT]");
  TORCH_CHECK(!thr_s || (thr_s->scalar_type() == at::kFloat && thr_s->numel() == rows_s),
              "speculative_stats: thr_s must be float32 [B * G]");
  TORCH_CHECK(!thr_t || (thr_t->scalar_type() == at::kFloat && thr_t->numel() == rows),
              "speculative_stats: thr_t must be float32 [B * GT]");
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
        // teacher row r is batch row r / scored, index j = r % scored; the student's row of a drafted index
        const int64_t j = r % scored, rs = r / scored * drafted + j;
        const bool has_draft = j < drafted;
        if (has_draft) {
          side_probs(sp + rs * vocab, vocab, static_cast<float>(inv_ts), tsp ? tsp[rs] : kNegInf, greedy_s,
                     ps.data());
        } else {
          std::fill(ps.begin(), ps.end(), 0.0f);  // the bonus position: nothing drafted
        }
        side_probs(tp + r * vocab, vocab, static_cast<float>(inv_tt), ttp ? ttp[r] : kNegInf, greedy_t, pt.data());
        const int64_t y = has_draft ? dp[rs] : -1;
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
      "bool greedy_s, bool greedy_t, int drafted, int scored) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(adaswitch, CPU, m) { m.impl("speculative_stats", &speculative_stats); }

}  // namespace adaswitch
