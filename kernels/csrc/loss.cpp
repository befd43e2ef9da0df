// torch.ops.adaswitch.distill_loss_rows: per-row distillation loss and its gradient w.r.t. the student
// logits on CPU, in one call (the CPU counterpart of kernels/triton/loss.py; formulas documented in
// adaswitch/ops/loss.py). Rows run in parallel (at::parallel_for); each row is copied once into
// per-thread float buffers (scaled by 1/T), so the exponentials are computed once per entry with
// at::vec (SIMD exp_u20, about 1e-6 relative error) and the terms and the gradient are then formed from
// those buffers in cache. No [N, V] float32 buffer: the gradient is written in the input dtype,
// multiplied by scale / T. Rows with valid == false get loss 0 and a zero gradient without reading
// their logits. Mixtures are formed in probability space (m = w p_a + (1 - w) p_b), so w in {0, 1}
// needs no special case. float16/bfloat16/float32 inputs accumulate in float, float64 in double.
// Optional hard-label term (labels + hard_weight, one per row): hard_weight * -log softmax(z_S / T_h)[label]
// added to the loss and hard_weight * (softmax(z_S / T_h) - onehot) / T_h to the gradient; kind -1 drops the
// soft term (the teacher is not read), which the sampled-token loss uses (adaswitch/ops/sampled.py).


#include "vec.h"

#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

namespace adaswitch {
namespace {

using at::vec::Vectorized;

// e[j] = exp(x[j] - shift) for j < n (SIMD), returns the sum (accumulated in double).
template <typename acc_t>
double exp_shift_sum(const acc_t* x, acc_t* e, int64_t n, acc_t shift) {
  using Vec = Vectorized<acc_t>;
  const Vec vshift(shift);
  int64_t j = 0;
  for (; j + Vec::size() <= n; j += Vec::size()) {
    Vec v = Vec::loadu(x + j) - vshift;
    if constexpr (std::is_same_v<acc_t, float>) {
      v = v.exp_u20();
    } else {
      v = v.exp();
    }
    v.store(e + j);
  }
  for (; j < n; ++j) e[j] = std::exp(x[j] - shift);
  double sum = 0.0;
  for (j = 0; j < n; ++j) sum += e[j];
  return sum;
}

template <typename acc_t>
inline acc_t row_max(const acc_t* x, int64_t n) {
  acc_t m = -std::numeric_limits<acc_t>::infinity();
  for (int64_t j = 0; j < n; ++j) m = x[j] > m ? x[j] : m;
  return m;
}

template <typename scalar_t, typename acc_t>
void rows_kernel(const at::Tensor& s, const at::Tensor& t, at::Tensor& grad, at::Tensor& loss, const bool* valid,
                 const double* scale, int64_t scale_stride, int64_t kind, acc_t w, acc_t inv_temp, bool write_grad,
                 acc_t soft_w, const int64_t* labels, const double* hard_w, acc_t inv_temp_hard) {
  const int64_t n = s.size(0), V = s.size(1);
  const scalar_t* sp = s.const_data_ptr<scalar_t>();
  const bool has_soft = kind >= 0, has_hard = labels != nullptr;
  const bool hard_same = has_soft && has_hard && inv_temp_hard == inv_temp;
  const scalar_t* tp = has_soft ? t.const_data_ptr<scalar_t>() : nullptr;
  scalar_t* gp = write_grad ? grad.mutable_data_ptr<scalar_t>() : nullptr;
  acc_t* lossp = loss.mutable_data_ptr<acc_t>();
  const int64_t ss = s.stride(0), ts = t.stride(0), gs = write_grad ? grad.stride(0) : 0;
  const acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> buf((has_hard && !hard_same ? 5 : 4) * V);
    acc_t *xs = buf.data(), *xt = xs + V, *ps = xt + V, *pt = ps + V;
    acc_t* ph = has_hard && !hard_same ? pt + V : ps;  // softmax(z_S / T_h) of the hard-label term
    for (int64_t r = begin; r < end; ++r) {
      scalar_t* g = write_grad ? gp + r * gs : nullptr;
      if (valid != nullptr && !valid[r]) {
        lossp[r] = 0;
        if (write_grad) std::fill(g, g + V, scalar_t(0));
        continue;
      }
      const scalar_t* srow = sp + r * ss;
      const scalar_t* trow = has_soft ? tp + r * ts : nullptr;
      // hard-label term: q = softmax(z_S / T_h) in ph (ps when T_h = T), its loss hw * (lse_h - z_y / T_h)
      const acc_t hw = has_hard ? static_cast<acc_t>(hard_w[r]) : acc_t(0);
      const int64_t y = has_hard ? labels[r] : 0;
      double hard_loss = 0.0;
      if (has_hard && !hard_same) {
        for (int64_t j = 0; j < V; ++j) xt[j] = static_cast<acc_t>(srow[j]) * inv_temp_hard;
        const acc_t mh = row_max(xt, V);
        const acc_t dh = static_cast<acc_t>(exp_shift_sum(xt, ph, V, mh));
        const acc_t ih = acc_t(1) / dh;
        for (int64_t j = 0; j < V; ++j) ph[j] *= ih;
        if (hw != 0) hard_loss = static_cast<double>(hw) * static_cast<double>(mh + std::log(dh) - xt[y]);
      }
      const acc_t sc = write_grad ? static_cast<acc_t>(scale[r * scale_stride]) : acc_t(0);
      if (!has_soft) {  // the hard-label term alone
        lossp[r] = static_cast<acc_t>(hard_loss);
        if (write_grad) {
          const acc_t k = sc * hw * inv_temp_hard;
          for (int64_t j = 0; j < V; ++j) g[j] = static_cast<scalar_t>(k * (ph[j] - (j == y ? acc_t(1) : acc_t(0))));
        }
        continue;
      }
      for (int64_t j = 0; j < V; ++j) {
        xs[j] = static_cast<acc_t>(srow[j]) * inv_temp;
        xt[j] = static_cast<acc_t>(trow[j]) * inv_temp;
      }
      // pass 1: log-sum-exps, probabilities kept in ps / pt; xs / xt become log-probabilities
      const acc_t ms = row_max(xs, V), mt = row_max(xt, V);
      const acc_t ds = static_cast<acc_t>(exp_shift_sum(xs, ps, V, ms));
      const acc_t dt = static_cast<acc_t>(exp_shift_sum(xt, pt, V, mt));
      const acc_t lse_s = ms + std::log(ds), lse_t = mt + std::log(dt);
      const acc_t is = acc_t(1) / ds, it = acc_t(1) / dt;
      for (int64_t j = 0; j < V; ++j) {
        ps[j] *= is;
        pt[j] *= it;
        xs[j] -= lse_s;
        xt[j] -= lse_t;
      }
      // pass 2: loss terms; xt is reused for p_S * h (the gradient numerator) where c is needed
      double total = 0.0, c = 0.0;
      const acc_t ss_ = sc * soft_w * inv_temp;  // the soft gradient's factor
      if (hard_same && hw != 0) hard_loss = -static_cast<double>(hw) * static_cast<double>(xs[y]);
      const acc_t hk = sc * hw * inv_temp_hard;
      auto hard_grad = [&](int64_t j) -> acc_t {
        return has_hard ? hk * (ph[j] - (j == y ? acc_t(1) : acc_t(0))) : acc_t(0);
      };
      switch (kind) {
        case 0:  // forward KL; gradient p_S - p_T
          for (int64_t j = 0; j < V; ++j) {
            total += pt[j] > 0 ? pt[j] * (xt[j] - xs[j]) : acc_t(0);
            if (write_grad) g[j] = static_cast<scalar_t>((ps[j] - pt[j]) * ss_ + hard_grad(j));
          }
          break;
        case 1:  // reverse KL; h = log p_S - log p_T
          for (int64_t j = 0; j < V; ++j) {
            const acc_t psh = ps[j] > 0 ? ps[j] * (xs[j] - xt[j]) : acc_t(0);
            total += psh;
            xt[j] = psh;
          }
          c = total;
          break;
        case 2:  // JSD, m = w p_T + (1 - w) p_S; p_S h = (1 - w) p_S (log p_S - log m)
          for (int64_t j = 0; j < V; ++j) {
            const acc_t m = w * pt[j] + (acc_t(1) - w) * ps[j];
            const acc_t lm = m > 0 ? std::log(m) : ninf;
            const acc_t kt = pt[j] > 0 ? pt[j] * (xt[j] - lm) : acc_t(0);
            const acc_t ks = ps[j] > 0 ? ps[j] * (xs[j] - lm) : acc_t(0);
            total += w * kt + (acc_t(1) - w) * ks;
            c += (acc_t(1) - w) * ks;
            xt[j] = (acc_t(1) - w) * ks;
          }
          break;
        case 3:  // TVD; h = sign(p_S - p_T) / 2
          for (int64_t j = 0; j < V; ++j) {
            const acc_t d = ps[j] - pt[j];
            total += acc_t(0.5) * std::abs(d);
            const acc_t psh = acc_t(0.5) * ps[j] * (d > 0 ? acc_t(1) : (d < 0 ? acc_t(-1) : acc_t(0)));
            c += psh;
            xt[j] = psh;
          }
          break;
        case 4:  // skew forward KL, m = w p_T + (1 - w) p_S; p_S h = -(1 - w) p_S p_T / m
          for (int64_t j = 0; j < V; ++j) {
            const acc_t m = w * pt[j] + (acc_t(1) - w) * ps[j];
            total += pt[j] > 0 ? pt[j] * (xt[j] - std::log(m)) : acc_t(0);
            const acc_t psh = (pt[j] > 0 && ps[j] > 0) ? -(acc_t(1) - w) * ps[j] * pt[j] / m : acc_t(0);
            c += psh;
            xt[j] = psh;
          }
          break;
        default:  // 5, skew reverse KL, m = w p_S + (1 - w) p_T; h = log p_S - log m - w p_S / m
          for (int64_t j = 0; j < V; ++j) {
            acc_t psh = 0;
            if (ps[j] > 0) {
              const acc_t m = w * ps[j] + (acc_t(1) - w) * pt[j];
              const acc_t d = xs[j] - std::log(m);
              total += ps[j] * d;
              psh = ps[j] * (d - w * ps[j] / m);
            }
            c += psh;
            xt[j] = psh;
          }
          break;
      }
      lossp[r] = static_cast<acc_t>(static_cast<double>(soft_w) * total + hard_loss);
      if (write_grad && kind != 0) {  // pass 3: p_S h - p_S c, from the buffers
        const acc_t cc = static_cast<acc_t>(c);
        for (int64_t j = 0; j < V; ++j) g[j] = static_cast<scalar_t>((xt[j] - ps[j] * cc) * ss_ + hard_grad(j));
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> distill_loss_rows_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                                         const std::optional<at::Tensor>& valid,
                                                         const at::Tensor& scale, int64_t kind, double w,
                                                         double temperature, bool write_grad, double soft_weight,
                                                         const std::optional<at::Tensor>& labels,
                                                         const std::optional<at::Tensor>& hard_weight,
                                                         double hard_temperature) {
  TORCH_CHECK(student.dim() == 2 && teacher.sizes() == student.sizes(),
              "distill_loss_rows: student and teacher must be 2-D tensors of one shape");
  TORCH_CHECK(student.scalar_type() == teacher.scalar_type(), "distill_loss_rows: student and teacher dtypes differ");
  TORCH_CHECK(kind >= -1 && kind <= 5, "distill_loss_rows: kind must be in [-1, 5] (-1: no soft term)");
  TORCH_CHECK(temperature > 0 && hard_temperature > 0, "distill_loss_rows: temperatures must be > 0");
  TORCH_CHECK(labels.has_value() == hard_weight.has_value(),
              "distill_loss_rows: labels and hard_weight come together (the hard-label term)");
  TORCH_CHECK(kind >= 0 || labels.has_value(), "distill_loss_rows: kind -1 needs the hard-label term");
  const at::Tensor s = student.stride(1) == 1 ? student : student.contiguous();
  const at::Tensor t = teacher.stride(1) == 1 ? teacher : teacher.contiguous();
  const int64_t n = s.size(0), V = s.size(1);
  at::Tensor valid_c, labels_c, hard_c;
  if (valid.has_value()) {
    TORCH_CHECK(valid->scalar_type() == at::kBool && valid->numel() == n, "distill_loss_rows: valid must be bool [N]");
    valid_c = valid->contiguous();
  }
  if (labels.has_value()) {
    TORCH_CHECK(labels->scalar_type() == at::kLong && labels->numel() == n, "distill_loss_rows: labels must be int64 [N]");
    TORCH_CHECK(hard_weight->is_floating_point() && hard_weight->numel() == n,
                "distill_loss_rows: hard_weight must be a float [N] tensor");
    labels_c = labels->contiguous();
    hard_c = hard_weight->to(at::kDouble).contiguous();  // read in double: float64 inputs keep their precision
    if (n > 0) {
      TORCH_CHECK(labels_c.min().item<int64_t>() >= 0 && labels_c.max().item<int64_t>() < V,
                  "distill_loss_rows: labels must be in [0, V)");
    }
  }
  const at::Tensor scale_c = scale.to(at::kDouble).contiguous();  // float64 inputs keep their precision
  TORCH_CHECK(scale_c.numel() == 1 || scale_c.numel() == n, "distill_loss_rows: scale must have 1 or N elements");
  const bool is_double = s.scalar_type() == at::kDouble;
  at::Tensor loss = at::empty({n}, s.options().dtype(is_double ? at::kDouble : at::kFloat));
  at::Tensor grad = write_grad ? at::empty_like(s, at::MemoryFormat::Contiguous) : at::empty({0}, s.options());
  const bool* vp = valid.has_value() ? valid_c.const_data_ptr<bool>() : nullptr;
  const int64_t* lp = labels.has_value() ? labels_c.const_data_ptr<int64_t>() : nullptr;
  const double* hp = labels.has_value() ? hard_c.const_data_ptr<double>() : nullptr;
  const double* scp = scale_c.const_data_ptr<double>();
  const int64_t scs = scale_c.numel() == 1 ? 0 : 1;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "distill_loss_rows", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    rows_kernel<scalar_t, acc_t>(s, t, grad, loss, vp, scp, scs, kind, static_cast<acc_t>(w),
                                 static_cast<acc_t>(1.0 / temperature), write_grad, static_cast<acc_t>(soft_weight),
                                 lp, hp, static_cast<acc_t>(1.0 / hard_temperature));
  });
  return {loss, grad};
}

}  // namespace
}  // namespace adaswitch

TORCH_LIBRARY_FRAGMENT(adaswitch, m) {
  m.def(
      "distill_loss_rows(Tensor student, Tensor teacher, Tensor? valid, Tensor scale, int kind, float w, "
      "float temperature, bool write_grad, float soft_weight=1.0, Tensor? labels=None, Tensor? hard_weight=None, "
      "float hard_temperature=1.0) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(adaswitch, CPU, m) { m.impl("distill_loss_rows", &adaswitch::distill_loss_rows_cpu); }
