// torch.ops.adaswitch.gumbel_argmax: the decode step's per-row Gumbel-max draw on CPU, fused;
// torch.ops.adaswitch.logit_rank, SKD's teacher top-k membership test in one pass; and
// torch.ops.adaswitch.step_decide / lookahead_decide, the whole per-step decision of fused_step /
// fused_lookahead (draws, SKD rank test, the AdaSwitch switching rule and the state updates) in one call,
// so that a decode step with small models does not pay a dozen small PyTorch ops (see the end of the file).
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
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

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

// #{i : x[i] > x[id]} + #{i < id : x[i] == x[id]}: the position of id in the row sorted by logit, ties to the
// lower id, compared in fp32 (SKD keeps a draft whose teacher rank is < top_k).
template <typename scalar_t>
int64_t rank_row(const scalar_t* row, int64_t vocab, int64_t id) {
  const float ty = static_cast<float>(row[id]);
  int64_t above = 0;
  for (int64_t i = 0; i < vocab; ++i) above += static_cast<float>(row[i]) > ty;
  for (int64_t i = 0; i < id; ++i) above += static_cast<float>(row[i]) == ty;
  return above;
}

// rank[r] = rank_row(logits[r], token[r]).
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
        const int64_t id = yp[r];
        TORCH_CHECK(id >= 0 && id < vocab, "logit_rank: token ", id, " outside the vocabulary of ", vocab);
        op[r] = rank_row(xp + r * vocab, vocab, id);
      }
    });
  });
  return out;
}

// ------------------------------------------------------------------------------------ the decisions
//
// step_decide / lookahead_decide do what _step_eager / _lookahead_eager in adaswitch/ops/step.py do with
// PyTorch ops, row by row in one pass (rows are independent: each reads and writes only its own state),
// drawing only the tokens that are used (a draw depends only on (seed, key, position, stream), so a
// skipped draw changes nothing). The divergence d comes in from the native token_divergence op.

// What the step does per row: the policy's kind (_KIND_* in adaswitch/ops/step.py).
enum Kind : int64_t { kStudent = 0, kTeacher = 1, kSkd = 2, kAdaSwitch = 3, kScheduled = 4 };
// The RNG streams of the two models' draws (STREAM_STUDENT / STREAM_TEACHER in adaswitch/ops/rng.py).
constexpr int64_t kStreamStudent = 0, kStreamTeacher = 1;

// One model's logits and sampling settings: the draw (gumbel_argmax's, for one row) and the rank of a token.
struct Model {
  at::Tensor x;  // contiguous [N, V]
  int64_t vocab = 0;
  uint32_t seed_hash = 0, stream = 0;
  float inv_t = 1.0f;
  const float* thr = nullptr;
  bool greedy = false;

  template <typename scalar_t>
  int64_t draw_as(int64_t r, int64_t key, int64_t position) const {
    const scalar_t* row = x.const_data_ptr<scalar_t>() + r * vocab;
    if (greedy) return greedy_row(row, vocab);
    return gumbel_row(row, vocab, row_hash(seed_hash, key, position, stream), inv_t,
                      thr ? thr[r] : -std::numeric_limits<float>::infinity());
  }

  int64_t draw(int64_t r, int64_t key, int64_t position) const {
    switch (x.scalar_type()) {
      case at::kFloat: return draw_as<float>(r, key, position);
      case at::kDouble: return draw_as<double>(r, key, position);
      case at::kHalf: return draw_as<at::Half>(r, key, position);
      default: return draw_as<at::BFloat16>(r, key, position);
    }
  }

  int64_t rank(int64_t r, int64_t id) const {
    switch (x.scalar_type()) {
      case at::kFloat: return rank_row(x.const_data_ptr<float>() + r * vocab, vocab, id);
      case at::kDouble: return rank_row(x.const_data_ptr<double>() + r * vocab, vocab, id);
      case at::kHalf: return rank_row(x.const_data_ptr<at::Half>() + r * vocab, vocab, id);
      default: return rank_row(x.const_data_ptr<at::BFloat16>() + r * vocab, vocab, id);
    }
  }
};

Model make_model(const at::Tensor& logits, int64_t rows, int64_t seed_hash, int64_t stream, double inv_t,
                 const std::optional<at::Tensor>& threshold, bool greedy, const char* name) {
  TORCH_CHECK(logits.dim() >= 2 && logits.size(-1) > 0 && logits.numel() / logits.size(-1) == rows,
              "decide: ", name, " logits must hold ", rows, " rows, got ", logits.sizes());
  const auto type = logits.scalar_type();
  TORCH_CHECK(type == at::kFloat || type == at::kDouble || type == at::kHalf || type == at::kBFloat16,
              "decide: ", name, " logits must be floating point, got ", type);
  TORCH_CHECK(!threshold || (threshold->scalar_type() == at::kFloat && threshold->is_contiguous() &&
                             threshold->numel() == rows),
              "decide: ", name, " threshold must be contiguous float32 [", rows, "]");
  Model m;
  m.x = logits.contiguous();
  m.vocab = logits.size(-1);
  m.seed_hash = static_cast<uint32_t>(seed_hash);
  m.stream = static_cast<uint32_t>(stream);
  m.inv_t = static_cast<float>(inv_t);
  m.thr = threshold ? threshold->const_data_ptr<float>() : nullptr;
  m.greedy = greedy;
  return m;
}

// The rows' SwitchState (contiguous; null where the kind does not use it) and the rule's parameters.
struct State {
  at::Tensor window_tensor;
  float* window = nullptr;
  int64_t* count = nullptr;
  bool* switched = nullptr;
  int64_t* switch_pos = nullptr;
  bool* finished = nullptr;
  const int64_t* switch_at = nullptr;  // the scheduled controls' switch positions, else null
  int64_t length = 0;
};

struct Rule {
  bool scheduled;
  int64_t min_history;
  double k, floor, level;
};

// The state's tensors the kind uses (finished always; the rest for the rule kinds), checked.
State state_of(const at::Tensor& window, const at::Tensor& count, const at::Tensor& switched,
               const at::Tensor& switch_pos, const at::Tensor& finished, const std::optional<at::Tensor>& switch_at,
               int64_t rows, int64_t kind) {
  auto ok = [rows](const at::Tensor& t, at::ScalarType type) {
    return t.scalar_type() == type && t.is_contiguous() && t.dim() == 1 && t.size(0) == rows;
  };
  TORCH_CHECK(ok(finished, at::kBool), "decide: state.finished must be contiguous bool [", rows, "]");
  State s{};
  s.finished = finished.data_ptr<bool>();
  if (kind != kAdaSwitch && kind != kScheduled) return s;
  TORCH_CHECK(window.scalar_type() == at::kFloat && window.is_contiguous() && window.dim() == 2 &&
                  window.size(0) == rows && window.size(1) >= 1,
              "decide: state.window must be contiguous float32 [", rows, ", L]");
  TORCH_CHECK(ok(count, at::kLong) && ok(switch_pos, at::kLong) && ok(switched, at::kBool),
              "decide: state.count / switch_pos (int64) and switched (bool) must be contiguous [", rows, "]");
  TORCH_CHECK(kind != kScheduled || (switch_at && ok(*switch_at, at::kLong)),
              "decide: a scheduled control needs state.switch_at, contiguous int64 [", rows, "]");
  s.window_tensor = window;
  s.window = window.data_ptr<float>();
  s.count = count.data_ptr<int64_t>();
  s.switched = switched.data_ptr<bool>();
  s.switch_pos = switch_pos.data_ptr<int64_t>();
  s.switch_at = kind == kScheduled ? switch_at->const_data_ptr<int64_t>() : nullptr;
  s.length = window.size(1);
  return s;
}

// Every row's window sum in float64 when some exploring row may need its relative trigger, else an undefined
// tensor: computed by torch's own sum on window.double(), as the reference does, because the summation order
// rounds the threshold and another order could flip a decision at the boundary.
at::Tensor window_sums(const State& s, const Rule& rule, const uint8_t* exploring) {
  if (rule.scheduled) return at::Tensor();
  const int64_t rows = s.window_tensor.size(0);
  for (int64_t r = 0; r < rows; ++r) {
    if (exploring[r] && !s.switched[r] && s.count[r] >= rule.min_history) {
      return s.window_tensor.to(at::kDouble).sum(-1).contiguous();
    }
  }
  return at::Tensor();
}

// The switching rule (docs/spec.md section 2.1, _switch_rule in adaswitch/ops/step.py) for row r at one
// position: returns whether the row switches there; updates its state. AdaSwitch fires on d > A, d = +inf or
// (>= max(L, W) divergences held, d >= F, d > tau = K * (sum / L)), in float64 as the reference, `sum` the
// row's window sum from window_sums; the scheduled controls at position >= switch_at. A non-switching finite d
// joins the ring at count mod L.
__attribute__((optimize("fp-contract=off"))) bool switch_rule(const State& s, const Rule& rule, const double* sums,
                                                               int64_t r, float d, bool explore, int64_t position) {
  if (!explore) return false;
  bool fire;
  if (rule.scheduled) {
    fire = position >= s.switch_at[r];
  } else {
    const double dd = static_cast<double>(d);
    fire = dd > rule.level || dd == std::numeric_limits<double>::infinity();
    if (!fire && s.count[r] >= rule.min_history && dd >= rule.floor) {
      fire = dd > rule.k * (sums[r] / static_cast<double>(s.length));
    }
  }
  if (fire) {
    s.switched[r] = true;
    s.switch_pos[r] = position;
    return true;
  }
  if (std::isfinite(d)) {
    const int64_t c = s.count[r];
    int64_t slot = c % s.length;
    if (slot < 0) slot += s.length;  // torch's remainder takes the divisor's sign
    s.window[r * s.length + slot] = d;
    s.count[r] = c + 1;
  }
  return false;
}

const float* divergence_of(const std::optional<at::Tensor>& divergence, int64_t n, bool needed) {
  if (!needed) return nullptr;
  TORCH_CHECK(divergence && divergence->scalar_type() == at::kFloat && divergence->is_contiguous() &&
                  divergence->numel() == n,
              "decide: this policy needs the divergence, contiguous float32 with ", n, " entries");
  return divergence->const_data_ptr<float>();
}

// fused_step's decision for every row: (token int64 [B], from_teacher bool [B], divergence float32 [B]).
std::tuple<at::Tensor, at::Tensor, at::Tensor> step_decide(
    const std::optional<at::Tensor>& student_logits, const std::optional<at::Tensor>& teacher_logits,
    const std::optional<at::Tensor>& divergence, const at::Tensor& keys, const at::Tensor& position,
    const at::Tensor& window, const at::Tensor& count, const at::Tensor& switched, const at::Tensor& switch_pos,
    const at::Tensor& finished, const std::optional<at::Tensor>& switch_at, int64_t kind, int64_t seed_hash,
    double student_inv_t, const std::optional<at::Tensor>& student_threshold, bool student_greedy,
    double teacher_inv_t, const std::optional<at::Tensor>& teacher_threshold, bool teacher_greedy,
    int64_t min_history, double k, double min_divergence, double max_divergence, int64_t top_k, int64_t eos,
    int64_t pad) {
  TORCH_CHECK(kind >= kStudent && kind <= kScheduled, "step_decide: unknown kind ", kind);
  const int64_t rows = keys.numel();
  TORCH_CHECK(keys.scalar_type() == at::kLong && position.scalar_type() == at::kLong && position.numel() == rows,
              "step_decide: keys and position must be int64 [B]");
  const bool rule_kind = kind == kAdaSwitch || kind == kScheduled;
  const bool needs_student = kind != kTeacher, needs_teacher = kind != kStudent;
  TORCH_CHECK(!needs_student || student_logits, "step_decide: this kind needs student_logits");
  TORCH_CHECK(!needs_teacher || teacher_logits, "step_decide: this kind needs teacher_logits");
  Model student, teacher;
  if (needs_student)
    student = make_model(*student_logits, rows, seed_hash, kStreamStudent, student_inv_t, student_threshold,
                         student_greedy, "student");
  if (needs_teacher)
    teacher = make_model(*teacher_logits, rows, seed_hash, kStreamTeacher, teacher_inv_t, teacher_threshold,
                         teacher_greedy, "teacher");
  TORCH_CHECK(!(needs_student && needs_teacher) || student.vocab == teacher.vocab,
              "step_decide: student and teacher logits must have the same vocabulary size");
  const State s = state_of(window, count, switched, switch_pos, finished, switch_at, rows, kind);
  const Rule rule{kind == kScheduled, min_history, k, min_divergence, max_divergence};
  const float* dp = divergence_of(divergence, rows, rule_kind);
  const at::Tensor kc = keys.contiguous(), pc = position.contiguous();
  const int64_t* kp = kc.const_data_ptr<int64_t>();
  const int64_t* pp = pc.const_data_ptr<int64_t>();
  at::Tensor token = at::empty({rows}, keys.options());
  at::Tensor from_teacher = at::empty({rows}, keys.options().dtype(at::kBool));
  at::Tensor div_out = at::empty({rows}, keys.options().dtype(at::kFloat));
  int64_t* tp = token.data_ptr<int64_t>();
  bool* fp = from_teacher.data_ptr<bool>();
  float* dvp = div_out.data_ptr<float>();
  const int64_t vocab = needs_teacher ? teacher.vocab : student.vocab;
  std::vector<uint8_t> live_rows(rows);
  for (int64_t r = 0; r < rows; ++r) live_rows[r] = !s.finished[r];
  const at::Tensor sums = kind == kAdaSwitch ? window_sums(s, rule, live_rows.data()) : at::Tensor();
  const double* sp = sums.defined() ? sums.const_data_ptr<double>() : nullptr;
  at::parallel_for(0, rows, grain_rows(vocab), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const bool live = !s.finished[r];
      const int64_t key = kp[r], pos = pp[r];
      int64_t tok = pad;
      bool by_teacher = false;
      float dv = std::numeric_limits<float>::quiet_NaN();
      if (kind == kStudent) {
        if (live) tok = student.draw(r, key, pos);
      } else if (kind == kTeacher) {
        if (live) tok = teacher.draw(r, key, pos);
        by_teacher = live;
      } else if (kind == kSkd) {
        if (live) {
          const int64_t ys = student.draw(r, key, pos);
          by_teacher = teacher.rank(r, ys) >= top_k;
          tok = by_teacher ? teacher.draw(r, key, pos) : ys;
        }
      } else {
        const bool explore = live && !s.switched[r];
        switch_rule(s, rule, sp, r, dp[r], explore, pos);
        if (explore) dv = dp[r];
        by_teacher = live && s.switched[r];
        if (live) tok = s.switched[r] ? teacher.draw(r, key, pos) : student.draw(r, key, pos);
      }
      if (live && tok == eos) s.finished[r] = true;
      tp[r] = tok;
      fp[r] = by_teacher;
      dvp[r] = dv;
    }
  });
  return {token, from_teacher, div_out};
}

// fused_lookahead's scan of G drafted positions per row: (accepted int64 [B], token int64 [B], from_teacher
// bool [B], divergence float32 [B, G]). A row stops at its switch (AdaSwitch: also at index 0 once
// switched), its first rejected draft (SKD; a draft outside [0, V) is rejected), index 0 (Teacher) or EOS;
// the teacher's token (stream 1 at position + j) is drawn only at the stop.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> lookahead_decide(
    const at::Tensor& teacher_logits, const at::Tensor& draft, const std::optional<at::Tensor>& divergence,
    const at::Tensor& keys, const at::Tensor& position, const at::Tensor& window, const at::Tensor& count,
    const at::Tensor& switched, const at::Tensor& switch_pos, const at::Tensor& finished,
    const std::optional<at::Tensor>& switch_at, int64_t kind, int64_t seed_hash, double teacher_inv_t,
    const std::optional<at::Tensor>& teacher_threshold, bool teacher_greedy, int64_t min_history, double k,
    double min_divergence, double max_divergence, int64_t top_k, int64_t eos, int64_t pad) {
  TORCH_CHECK(kind >= kStudent && kind <= kScheduled, "lookahead_decide: unknown kind ", kind);
  TORCH_CHECK(teacher_logits.dim() == 3, "lookahead_decide: teacher_logits must be [B, G, V]");
  const int64_t rows = teacher_logits.size(0), g = teacher_logits.size(1);
  TORCH_CHECK(keys.scalar_type() == at::kLong && keys.numel() == rows && position.scalar_type() == at::kLong &&
                  position.numel() == rows,
              "lookahead_decide: keys and position must be int64 [B]");
  TORCH_CHECK(draft.scalar_type() == at::kLong && draft.dim() == 2 && draft.size(0) == rows && draft.size(1) == g,
              "lookahead_decide: draft must be int64 [B, G]");
  const Model teacher = make_model(teacher_logits, rows * g, seed_hash, kStreamTeacher, teacher_inv_t,
                                   teacher_threshold, teacher_greedy, "teacher");
  const bool rule_kind = kind == kAdaSwitch || kind == kScheduled;
  const State s = state_of(window, count, switched, switch_pos, finished, switch_at, rows, kind);
  const Rule rule{kind == kScheduled, min_history, k, min_divergence, max_divergence};
  const float* dp = divergence_of(divergence, rows * g, rule_kind);
  const at::Tensor kc = keys.contiguous(), pc = position.contiguous(), dc = draft.contiguous();
  const int64_t* kp = kc.const_data_ptr<int64_t>();
  const int64_t* pp = pc.const_data_ptr<int64_t>();
  const int64_t* drp = dc.const_data_ptr<int64_t>();
  at::Tensor accepted = at::empty({rows}, keys.options());
  at::Tensor token = at::empty({rows}, keys.options());
  at::Tensor from_teacher = at::empty({rows}, keys.options().dtype(at::kBool));
  at::Tensor div_out =
      at::full({rows, g}, std::numeric_limits<float>::quiet_NaN(), keys.options().dtype(at::kFloat));
  int64_t* ap = accepted.data_ptr<int64_t>();
  int64_t* tp = token.data_ptr<int64_t>();
  bool* fp = from_teacher.data_ptr<bool>();
  float* dvp = div_out.data_ptr<float>();
  constexpr int64_t kOutOfVocabRank = int64_t{1} << 62;  // OUT_OF_VOCAB_RANK in adaswitch/ops/step.py
  // Positions in order, rows within each (the window sums must be the reference's at every position).
  std::vector<uint8_t> active(rows);
  for (int64_t r = 0; r < rows; ++r) {
    active[r] = !s.finished[r];
    ap[r] = 0;
    tp[r] = pad;
    fp[r] = false;
  }
  const int64_t grain = grain_rows(teacher.vocab);
  for (int64_t j = 0; j < g; ++j) {
    const at::Tensor sums = kind == kAdaSwitch ? window_sums(s, rule, active.data()) : at::Tensor();
    const double* sp = sums.defined() ? sums.const_data_ptr<double>() : nullptr;
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        if (!active[r]) continue;
        const int64_t flat = r * g + j, pos = pp[r] + j, y = drp[flat];
        bool stop;
        if (rule_kind) {
          const bool explore = !s.switched[r];
          stop = !explore;
          if (explore) {
            dvp[flat] = dp[flat];
            stop = switch_rule(s, rule, sp, r, dp[flat], true, pos);
          }
        } else if (kind == kSkd) {
          const int64_t rank = (y >= 0 && y < teacher.vocab) ? teacher.rank(flat, y) : kOutOfVocabRank;
          stop = !(rank < top_k);
        } else {
          stop = kind == kTeacher;
        }
        bool done;
        if (stop) {
          tp[r] = teacher.draw(flat, kp[r], pos);
          fp[r] = true;
          done = tp[r] == eos;
        } else {
          ++ap[r];
          done = y == eos;
        }
        if (done) s.finished[r] = true;
        active[r] = !stop && !done;
      }
    });
  }
  return {accepted, token, from_teacher, div_out};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(adaswitch, m) {
  m.def(
      "gumbel_argmax(Tensor logits, Tensor keys, Tensor positions, int seed_hash, int stream, "
      "float inv_temperature, Tensor? threshold, bool greedy, Tensor? rows_needed=None) -> Tensor");
  m.def("logit_rank(Tensor logits, Tensor token) -> Tensor");
  m.def(
      "step_decide(Tensor? student_logits, Tensor? teacher_logits, Tensor? divergence, Tensor keys, "
      "Tensor position, Tensor(a!) window, Tensor(b!) count, Tensor(c!) switched, Tensor(d!) switch_pos, "
      "Tensor(e!) finished, Tensor? switch_at, int kind, int seed_hash, float student_inv_t, "
      "Tensor? student_threshold, bool student_greedy, float teacher_inv_t, Tensor? teacher_threshold, "
      "bool teacher_greedy, int min_history, float k, float min_divergence, float max_divergence, int top_k, "
      "int eos, int pad) -> (Tensor, Tensor, Tensor)");
  m.def(
      "lookahead_decide(Tensor teacher_logits, Tensor draft, Tensor? divergence, Tensor keys, Tensor position, "
      "Tensor(a!) window, Tensor(b!) count, Tensor(c!) switched, Tensor(d!) switch_pos, Tensor(e!) finished, "
      "Tensor? switch_at, int kind, int seed_hash, float teacher_inv_t, Tensor? teacher_threshold, "
      "bool teacher_greedy, int min_history, float k, float min_divergence, float max_divergence, int top_k, "
      "int eos, int pad) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(adaswitch, CPU, m) {
  m.impl("gumbel_argmax", &gumbel_argmax);
  m.impl("logit_rank", &logit_rank);
  m.impl("step_decide", &step_decide);
  m.impl("lookahead_decide", &lookahead_decide);
}

}  // namespace adaswitch
