// torch.ops.adaswitch.token_divergence: per-row divergence between softmax(student / t) and
// softmax(teacher / t) on CPU. Rows run in parallel (at::parallel_for, OpenMP); each row is walked in
// L1-sized blocks with SIMD vectors (at::vec::Vectorized), one running max per lane.
//
// Same maths and conventions as kernels/triton/divergence.py and adaswitch/reference.py:
//  - KL kinds read each logit once: KL(p_x || p_y) = sum p_x (x - y) - lse_x + lse_y, accumulated
//    online; per block the lane maxima are found first (the block stays in L1), then one rescale.
//  - JSD, TVD, skewed KLs: pass 1 the two log-sum-exps, pass 2 the exact per-entry terms.
//  - 0 * log 0 = 0; +inf where p_x > 0 and p_y = 0; NaN for rows that are all -inf, hold NaN or +inf.
// float16/bfloat16/float32 inputs accumulate in float, float64 in double. Per-entry exponentials use
// at::vec's exp_u20 (~1e-6 relative error, ~25% faster than the 1-ulp Sleef exp here; exact for
// double); measured against float64 the results stay within ~4e-5 relative even on logits of scale
// 200, where the rounding of the cancelling sums dominates. NaN inputs are detected explicitly
// (exp_u20 clamps them away).


#include "vec.h"

#include <cmath>
#include <limits>

namespace adaswitch {
namespace {

using at::vec::Vectorized;

enum Mode { kKL = 0, kJSD = 1, kTVD = 2, kSkew = 3 };

// Loads `count` (<= Vec::size()) entries as acc_t, padding the tail with -inf (masked vocabulary).
template <typename acc_t, typename scalar_t>
inline Vectorized<acc_t> load_acc(const scalar_t* p, int64_t count) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (count == W) return Vec::loadu(p);
    return Vec::set(Vec(-std::numeric_limits<acc_t>::infinity()), Vec::loadu(p, count), count);
  } else {
    __at_align__ acc_t buf[W];
    int64_t k = 0;
    for (; k < count; ++k) buf[k] = static_cast<acc_t>(p[k]);
    for (; k < W; ++k) buf[k] = -std::numeric_limits<acc_t>::infinity();
    return Vec::loadu(buf);
  }
}

template <>
inline Vectorized<float> load_acc<float, c10::BFloat16>(const c10::BFloat16* p, int64_t count) {
  using Vec = Vectorized<float>;
  if (count == Vec::size()) {
    Vec out;
    at::vec::load_fp32_from_bf16(p, out);
    return out;
  }
  __at_align__ float buf[Vec::size()];
  for (int64_t k = 0; k < Vec::size(); ++k)
    buf[k] = k < count ? static_cast<float>(p[k]) : -std::numeric_limits<float>::infinity();
  return Vec::loadu(buf);
}

template <>
inline Vectorized<float> load_acc<float, c10::Half>(const c10::Half* p, int64_t count) {
  using Vec = Vectorized<float>;
  if (count == Vec::size()) {
    Vec out;
    at::vec::load_fp32_from_fp16(p, out);
    return out;
  }
  __at_align__ float buf[Vec::size()];
  for (int64_t k = 0; k < Vec::size(); ++k)
    buf[k] = k < count ? static_cast<float>(p[k]) : -std::numeric_limits<float>::infinity();
  return Vec::loadu(buf);
}

// One row: returns D(p_x, p_y) with p_x = softmax(x * inv_t), p_y = softmax(y * inv_t).
template <typename scalar_t, typename acc_t>
acc_t row_divergence(const scalar_t* x, const scalar_t* y, int64_t V, acc_t inv_t, Mode mode, acc_t w) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t W = Vec::size();
  constexpr int64_t kVecsPerBlock = 64;  // 64 vectors of x and y: a few KiB, stays in L1
  constexpr int64_t kBlock = W * kVecsPerBlock;
  const acc_t inf = std::numeric_limits<acc_t>::infinity();
  const Vec vinf(inf), vninf(-inf), vzero(acc_t(0)), vscale(inv_t);

  // Pass 1: per-lane running max m, normaliser z (relative to m) and, for KL, E[x - y] unnormalised.
  Vec m_x(-inf), z_x(0), m_y(-inf), z_y(0), acc(0), nan_seen(0);
  Vec xs[kVecsPerBlock], ys[kVecsPerBlock];
  for (int64_t start = 0; start < V; start += kBlock) {
    const int64_t n = std::min(kBlock, V - start);
    const int64_t nv = (n + W - 1) / W;
    Vec bx = m_x, by = m_y;
    for (int64_t j = 0; j < nv; ++j) {
      const int64_t off = start + j * W;
      const int64_t cnt = std::min<int64_t>(W, V - off);
      xs[j] = load_acc<acc_t>(x + off, cnt) * vscale;
      ys[j] = load_acc<acc_t>(y + off, cnt) * vscale;
      nan_seen = nan_seen | (xs[j] != xs[j]) | (ys[j] != ys[j]);
      bx = at::vec::maximum(bx, xs[j]);
      by = at::vec::maximum(by, ys[j]);
    }
    // Reference point per lane: the new max, or 0 while a lane has seen only -inf.
    const Vec rx = Vec::blendv(bx, vzero, bx == vninf);
    const Vec ry = Vec::blendv(by, vzero, by == vninf);
    // once per block: the 1-ulp exp, so rescaling errors do not pile up over a long row
    const Vec sx = (m_x - rx).exp();
    z_x = z_x * sx;
    z_y = z_y * (m_y - ry).exp();
    if (mode == kKL) acc = Vec::blendv(acc * sx, acc, acc == vinf);  // keep +inf (no inf * 0)
    for (int64_t j = 0; j < nv; ++j) {
      const Vec ex = (xs[j] - rx).exp_u20();
      z_x = z_x + ex;
      z_y = z_y + (ys[j] - ry).exp_u20();
      if (mode == kKL) {
        // p_x = 0 entries contribute 0; a finite x with y = -inf makes the KL +inf, also where
        // exp(x - max) underflows in float (as in the float64 reference)
        const Vec term = Vec::blendv(ex * (xs[j] - ys[j]), vinf, ys[j] == vninf);
        acc = acc + Vec::blendv(term, vzero, xs[j] == vninf);
      }
    }
    m_x = bx;
    m_y = by;
  }

  // Combine the lanes: bring every lane to the row max.
  __at_align__ acc_t mxa[W], zxa[W], mya[W], zya[W], acca[W], nana[W];
  m_x.store(mxa); z_x.store(zxa); m_y.store(mya); z_y.store(zya); acc.store(acca); nan_seen.store(nana);
  acc_t Mx = -inf, My = -inf;
  bool has_nan = false;
  for (int64_t k = 0; k < W; ++k) {
    Mx = std::max(Mx, mxa[k]);
    My = std::max(My, mya[k]);
    has_nan = has_nan || nana[k] != acc_t(0);  // the mask lanes are NaN bit patterns when set
  }
  if (has_nan || !std::isfinite(Mx) || !std::isfinite(My)) return std::numeric_limits<acc_t>::quiet_NaN();
  acc_t Zx = 0, Zy = 0, A = 0;
  for (int64_t k = 0; k < W; ++k) {
    if (mxa[k] != -inf) {
      const acc_t s = std::exp(mxa[k] - Mx);
      Zx += zxa[k] * s;
      A += acca[k] == inf ? inf : acca[k] * s;
    }
    if (mya[k] != -inf) Zy += zya[k] * std::exp(mya[k] - My);
  }
  const acc_t log_zx = std::log(Zx), log_zy = std::log(Zy);
  // = E[x - y] - lse_x + lse_y, without rounding lse_x, lse_y at their (possibly large) scale
  if (mode == kKL) return A / Zx - (Mx - My) - (log_zx - log_zy);

  // Pass 2: the exact per-entry terms. log p = (x - max) - log z: subtracting the max first keeps
  // log-probabilities near 0 exact (x - lse would round at the scale of lse).
  const Vec vmx(Mx), vmy(My), vlzx(log_zx), vlzy(log_zy), vw(w), vw1(acc_t(1) - w);
  Vec sum(0);
  for (int64_t off = 0; off < V; off += W) {
    const int64_t cnt = std::min<int64_t>(W, V - off);
    const Vec lx = (load_acc<acc_t>(x + off, cnt) * vscale - vmx) - vlzx;
    const Vec ly = (load_acc<acc_t>(y + off, cnt) * vscale - vmy) - vlzy;
    const Vec px = lx.exp_u20(), py = ly.exp_u20();
    if (mode == kTVD) {
      sum = sum + (px - py).abs();
      continue;
    }
    const Vec mix = vw * px + vw1 * py;
    const Vec lm = mix.log();
    if (mode == kJSD) {
      const Vec wx = vw * px, wy = vw1 * py;
      sum = sum + Vec::blendv(vzero, wx * (lx - lm), wx > vzero) + Vec::blendv(vzero, wy * (ly - lm), wy > vzero);
    } else {
      // mix == 0 with px > 0 only when w * px underflows: the term is below 1e-36
      sum = sum + Vec::blendv(vzero, px * (lx - lm), (px > vzero) & (mix > vzero));
    }
  }
  const acc_t total = at::vec::vec_reduce_all<acc_t>([](Vec& a, Vec& b) { return a + b; }, sum);
  return mode == kTVD ? acc_t(0.5) * total : total;
}

at::Tensor token_divergence_cpu(const at::Tensor& student, const at::Tensor& teacher, int64_t kind, double beta,
                                double alpha, double temperature) {
  TORCH_CHECK_VALUE(student.dim() == 2 && teacher.dim() == 2,
                    "token_divergence: student and teacher must be 2-D [N, V], got ", student.sizes(), " and ",
                    teacher.sizes());
  TORCH_CHECK_VALUE(student.sizes() == teacher.sizes(), "token_divergence: student and teacher shapes differ: ",
                    student.sizes(), " vs ", teacher.sizes());
  TORCH_CHECK_VALUE(at::isFloatingType(student.scalar_type()) && at::isFloatingType(teacher.scalar_type()),
                    "token_divergence: student and teacher must be floating point, got ", student.scalar_type(),
                    " and ", teacher.scalar_type());
  TORCH_CHECK_VALUE(student.size(1) > 0, "token_divergence: the vocabulary (dim 1) must be non-empty");
  TORCH_CHECK_VALUE(kind >= 0 && kind <= 5, "token_divergence: kind must be in 0..5, got ", kind);
  TORCH_CHECK_VALUE(beta >= 0.0 && beta <= 1.0, "token_divergence: beta must be in [0, 1], got ", beta);
  TORCH_CHECK_VALUE(alpha >= 0.0 && alpha <= 1.0, "token_divergence: alpha must be in [0, 1], got ", alpha);
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0.0,
                    "token_divergence: temperature must be finite and > 0, got ", temperature);

  // Route the public kind onto (mode, student-is-x, weight); the JSD endpoints and alpha = 0 are the
  // plain KLs exactly (TRL / Liger convention).
  Mode mode = kKL;
  bool swap = false;  // false: x = teacher, y = student
  double w = 0.0;
  switch (kind) {
    case 0: break;
    case 1: swap = true; break;
    case 2:
      if (beta == 0.0) break;
      if (beta == 1.0) { swap = true; break; }
      mode = kJSD; w = beta; break;
    case 3: mode = kTVD; break;
    default:
      swap = kind == 5;
      if (alpha != 0.0) { mode = kSkew; w = alpha; }
  }

  // Mixed dtypes (say a bf16 student against an fp32 teacher) run in the promoted dtype, as the
  // Triton and PyTorch paths effectively do; the common case (one dtype) copies nothing.
  const auto common = at::promote_types(student.scalar_type(), teacher.scalar_type());
  const at::Tensor s = student.to(common).contiguous(), t = teacher.to(common).contiguous();
  const at::Tensor& xt = swap ? s : t;
  const at::Tensor& yt = swap ? t : s;
  const int64_t N = s.size(0), V = s.size(1);
  at::Tensor out = at::empty({N}, s.options().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "token_divergence", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* xp = xt.data_ptr<scalar_t>();
    const scalar_t* yp = yt.data_ptr<scalar_t>();
    const acc_t inv_t = static_cast<acc_t>(1.0 / temperature);
    // At least ~1M entries (~0.3 ms) per task: waking a second OpenMP thread costs far more than
    // a small batch's work on a busy machine (measured here: 8 x 32000 took 0.14 ms on one thread,
    // 12-24 ms on two under load), so small inputs run inline on the calling thread.
    const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 20) / V);
    at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const float d = static_cast<float>(
            row_divergence<scalar_t, acc_t>(xp + r * V, yp + r * V, V, inv_t, mode, static_cast<acc_t>(w)));
        o[r] = d < 0.0f ? 0.0f : d;  // every kind is >= 0: rounding of equal rows (about -1e-7) is 0; NaN stays
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(adaswitch, m) {
  m.def("token_divergence(Tensor student, Tensor teacher, int kind, float beta, float alpha, float temperature) "
        "-> Tensor");
}

TORCH_LIBRARY_IMPL(adaswitch, CPU, m) { m.impl("token_divergence", &token_divergence_cpu); }

}  // namespace adaswitch
