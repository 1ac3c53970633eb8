// der_fast::bn_gate and der_fast::bn_gate_backward: BatchNorm (train or eval) + gate, CPU kernels.
//
//   a = alpha[c] * z + beta[c] (+ residual),  h = relu(a) (or a),  y = g[c] * h
//   alpha = weight * invstd, beta = bias - mean * alpha, invstd = 1 / sqrt(var + eps)
//   g = sigmoid(s * e) (1 without e)
//   training: mean / var = the batch statistics of z over (N, H, W) (biased variance);
//   eval:     mean / var = the running statistics given (mean_in / var_in).
//
// Backward (x_hat = (z - mean) * invstd, pos = [a > 0] or 1 without ReLU, M = N * H * W):
//   da = grad_y * g * pos, grad_residual = da, grad_bias = sum da,
//   grad_weight = sum da * x_hat, grad_e = s * g * (1 - g) * sum grad_y * h,
//   training: grad_z = weight * invstd * (da - grad_bias / M - x_hat * grad_weight / M)
//   eval:     grad_z = da * alpha.
// The pre-activation a is recomputed from z (and the residual) in the backward with the same
// arithmetic as the forward, so its ReLU mask is the forward's.
//
// Rounding (float32): the forward reproduces ATen's CPU BatchNorm + the reference's gated ReLU:
//   * NCHW: mean = float(double sum of z / M); var_sum = float(double sum of the float
//     products (z - mean) * (z - mean)); var = var_sum / float(M) in float: ATen's
//     batch_norm_cpu_collect_stats_contiguous_impl and update_stats (two passes over z).
//     channels_last: exact double statistics per block of rows merged with Chan's formula,
//     correctly rounded (ATen's channels_last kernel sums differently; not matched).
//   * invstd = float(1 / sqrt(double(var) + eps)) in training, 1 / sqrt(var + eps) in float in
//     eval, alpha = invstd * weight, beta = bias - mean * alpha and a = z * alpha + beta: ATen's
//     kernels (AVX2 / AVX-512 builds) contract the last two into fused multiply-adds, so this
//     file contracts them too ("fp-contract=fast" below; the x86-64-v3 / v4 clones have FMA,
//     the baseline clone, like ATen's DEFAULT build, has not). The rest of der_fast is built
//     with -ffp-contract=off.
//   So with NCHW input the forward is bit-identical to nn.BatchNorm2d followed by gated_relu
//   (tests/test_bn_gate.py), and the fast model's ReLU masks are the reference's.
//   * the backward's reductions are double sums of exact products (ATen: float products, float
//     sums within a plane, double across planes).
//
// Layouts: dense NCHW ("planes" of HW) or dense channels_last ("rows" of C). Every reduction
// writes one slot per (group, channel), group = sample (NCHW) or block of rows
// (channels_last), merged in a fixed order: results do not depend on the number of threads.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common.h"
#include "cpu_simd.h"
#include "gate_math.h"
#include "index_math.h"

namespace der_fast {
namespace {

constexpr int64_t kGrainElems = 16384;  // below this many elements per task: stay serial

// ------------------------------------------------------------------------------------------
// argument checks (same messages as der_fast/ops/bn_gate.py:_check_bn_gate)

// Statistics (mean / var) have z's dtype, or float32 when z is float16 / bfloat16: the forward
// returns a reduced-precision z's batch statistics in float32, so that the backward recomputes
// the forward's pre-activation from the same numbers.
void check_stat(const at::Tensor& t, const at::Tensor& z, const char* op, const char* name) {
  const bool reduced = z.scalar_type() == at::kHalf || z.scalar_type() == at::kBFloat16;
  check_per_channel(t, z, op, name, "z", !(reduced && t.scalar_type() == at::kFloat));
}

void check_bn_gate(const char* op, const at::Tensor& z, const at::Tensor& weight,
                   const at::Tensor& bias, const std::optional<at::Tensor>& mean,
                   const std::optional<at::Tensor>& var, const std::optional<at::Tensor>& e,
                   const std::optional<at::Tensor>& residual, bool stats_required,
                   const char* mean_name, const char* var_name) {
  TORCH_CHECK_VALUE(z.dim() == 4, op, ": z must be 4-D [N, C, H, W], got a ", z.dim(),
                    "-D tensor of shape ", z.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(z.scalar_type()), op,
                   ": z must be a floating point tensor, got dtype ", dtype_name(z.scalar_type()));
  check_per_channel(weight, z, op, "weight", "z");
  check_per_channel(bias, z, op, "bias", "z");
  if (stats_required)
    TORCH_CHECK_VALUE(has(mean) && has(var), op, ": ", mean_name, " and ", var_name,
                      " (the running statistics) are required when training=False");
  if (has(mean)) check_stat(*mean, z, op, mean_name);
  if (has(var)) check_stat(*var, z, op, var_name);
  if (has(e)) check_per_channel(*e, z, op, "e", "z");
  if (has(residual)) check_same_shape(*residual, z, op, "residual", "z");
}

// ------------------------------------------------------------------------------------------
// Kernels. Multiply-adds are contracted here (see the header comment: ATen's rounding).
#pragma GCC push_options
#pragma GCC optimize("fp-contract=fast")

// Per-channel constants, computed in a cloned function so that beta's multiply-add is fused
// exactly where the vector kernels' are (x86-64-v3 / v4), as in ATen's kernels.
template <typename T>
DER_CLONES void channel_consts(const T* __restrict__ mean, const T* __restrict__ var,
                               const T* __restrict__ w, const T* __restrict__ b, double eps,
                               bool training, int64_t C, T* __restrict__ invstd,
                               T* __restrict__ alpha, T* __restrict__ beta) {
  for (int64_t c = 0; c < C; ++c) {
    T inv;
    if (training) {  // ATen: VarTransform<double>(var_sum / M, eps), stored as T
      const double v = static_cast<double>(var[c]);
      inv = (v != 0.0 || eps != 0.0) ? static_cast<T>(1.0 / std::sqrt(v + eps)) : T(0);
    } else {  // ATen (batch_norm_cpu_collect_linear_and_constant_terms): in T
      inv = T(1) / std::sqrt(var[c] + static_cast<T>(eps));
    }
    invstd[c] = inv;
    const T a = inv * w[c];
    alpha[c] = a;
    beta[c] = b[c] - mean[c] * a;
  }
}

// float -> two 8-lane double vectors
DER_ALWAYS_INLINE void widen(der_v16f v, der_v8d& lo, der_v8d& hi) {
  lo = __builtin_convertvector(__builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7), der_v8d);
  hi = __builtin_convertvector(__builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15),
                               der_v8d);
}

DER_ALWAYS_INLINE double hsum_d(der_v8d a) { return Vec<double>::hsum(a); }

// Values in double, for the double sums: 16 float lanes as two 8-lane halves, 8 double lanes
// as they are, a scalar as a double.
struct Halves {
  der_v8d lo, hi;
};
DER_ALWAYS_INLINE Halves to_d(der_v16f v) {
  Halves h;
  widen(v, h.lo, h.hi);
  return h;
}
DER_ALWAYS_INLINE der_v8d to_d(der_v8d v) { return v; }
DER_ALWAYS_INLINE double to_d(float v) { return static_cast<double>(v); }
DER_ALWAYS_INLINE double to_d(double v) { return v; }
// the halves of a per-channel value: a scalar is both
DER_ALWAYS_INLINE der_v8d lo(const Halves& h) { return h.lo; }
DER_ALWAYS_INLINE der_v8d hi(const Halves& h) { return h.hi; }
DER_ALWAYS_INLINE double lo(double v) { return v; }
DER_ALWAYS_INLINE double hi(double v) { return v; }

// The double parameter q of the channel(s) at position at, shaped like to_d of its values.
template <typename At>
DER_ALWAYS_INLINE double ch_d(const At& at, const double* q) {
  return at.ch(q);
}
DER_ALWAYS_INLINE Halves ch_d(const RowLanes<float>& at, const double* q) {
  return {Vec<double>::load(q + at.c), Vec<double>::load(q + at.c + 8)};
}

// channels_last float kernels take 16 channels at a time in registers (the rest, and float64,
// one channel per lane of an `omp simd` loop over C).
template <typename T>
constexpr bool kChunked = std::is_same_v<T, float>;

// --- statistics: one slot per plane (NCHW) / per (row block, channel) (channels_last) -----
// NCHW, as ATen's CPU BatchNorm computes them: the double sum of z, then the double sum of
// the float products (z - mean) * (z - mean) around the mean rounded to T.

// adds 8-lane groups of values in double to a[0], a[1], ...
DER_ALWAYS_INLINE void add_lanes(der_v8d* a, Halves x) {
  a[0] += x.lo;
  a[1] += x.hi;
}
DER_ALWAYS_INLINE void add_lanes(der_v8d* a, der_v8d x) { a[0] += x; }

// The sum of f(v) over the n contiguous values v of p, f computed in T and summed in double:
// four 8-lane accumulators, a[k] taking the values [8k, 8k + 8) of each block of 32 (a[0] and
// a[1] those of each whole vector after the blocks), then the other values added in order.
template <typename T, typename F>
DER_ALWAYS_INLINE double plane_dsum(const T* __restrict__ p, int64_t n, F f) {
  using VT = Vec<T>;
  constexpr int L = VT::L;
  der_v8d a[4] = {};
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
#pragma GCC unroll 4
    for (int k = 0; k < 32 / L; ++k)
      add_lanes(a + k * L / 8, to_d(f(VT::load(p + i + k * L))));
  }
  for (; i + L <= n; i += L) add_lanes(a, to_d(f(VT::load(p + i))));
  double s = hsum_d((a[0] + a[2]) + (a[1] + a[3]));
  for (; i < n; ++i) s += static_cast<double>(f(p[i]));
  return s;
}

template <typename T>
DER_CLONES void sum_planes(const T* __restrict__ z, double* __restrict__ gsum, int64_t p0,
                           int64_t p1, int64_t HW) {
  for (int64_t pl = p0; pl < p1; ++pl)
    gsum[pl] = plane_dsum(z + pl * HW, HW, [](auto v) DER_INLINE_LAMBDA { return v; });
}

// (z - mean) * (z - mean) in T
template <typename T>
DER_CLONES void sqdev_planes(const T* __restrict__ z, const T* __restrict__ mean,
                             double* __restrict__ gq, int64_t p0, int64_t p1, int64_t HW,
                             int64_t C) {
  for (int64_t pl = p0; pl < p1; ++pl) {
    const T m = mean[pl % C];
    gq[pl] = plane_dsum(z + pl * HW, HW, [m](auto v) DER_INLINE_LAMBDA {
      const auto d = v - m;
      return d * d;
    });
  }
}

template <typename T>
DER_CLONES void stats_rows(const T* __restrict__ z, double* __restrict__ gsum,
                           double* __restrict__ gm2, double* __restrict__ wk, int64_t b0,
                           int64_t b1, int64_t R, int64_t C, int64_t B) {
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t r0 = b * B, r1 = std::min(R, r0 + B);
    double* __restrict__ s = gsum + b * C;
    double* __restrict__ q = gm2 + b * C;
    const double inv_n = 1.0 / static_cast<double>(r1 - r0);
    const int64_t cv = kChunked<T> ? C - C % 16 : 0;
    for (int64_t c0 = 0; c0 < cv; c0 += 16) {  // 16 channels in registers, rows in order
      der_v8d s0 = {}, s1 = {};
      for (int64_t row = r0; row < r1; ++row) {
        der_v8d l, h;
        widen(Vec<float>::load(reinterpret_cast<const float*>(z) + row * C + c0), l, h);
        s0 += l;
        s1 += h;
      }
      const der_v8d m0 = s0 * inv_n, m1 = s1 * inv_n;
      der_v8d q0 = {}, q1 = {};
      for (int64_t row = r0; row < r1; ++row) {
        der_v8d l, h;
        widen(Vec<float>::load(reinterpret_cast<const float*>(z) + row * C + c0), l, h);
        l -= m0;
        h -= m1;
        q0 += l * l;
        q1 += h * h;
      }
      Vec<double>::store(s + c0, s0);
      Vec<double>::store(s + c0 + 8, s1);
      Vec<double>::store(q + c0, q0);
      Vec<double>::store(q + c0 + 8, q1);
    }
    for (int64_t c = cv; c < C; ++c) s[c] = 0.0;
    along_row_tail<T>(r0, r1, C, cv, [=](auto at) DER_INLINE_LAMBDA {
      s[at.c] += static_cast<double>(at.ld(z));
    });
    for (int64_t c = cv; c < C; ++c) {
      wk[c] = s[c] * inv_n;
      q[c] = 0.0;
    }
    along_row_tail<T>(r0, r1, C, cv, [=](auto at) DER_INLINE_LAMBDA {
      const double d = static_cast<double>(at.ld(z)) - wk[at.c];
      q[at.c] += d * d;
    });
  }
}

// --- forward output: y = g * act(alpha * z + beta (+ r)) ----------------------------------
// over the planes (NCHW) or rows (channels_last) [o0, o1)
template <typename T, bool HAS_R, bool RELU, bool ROWS>
DER_CLONES void out_kernel(const T* __restrict__ z, const T* __restrict__ r, T* __restrict__ y,
                           const T* __restrict__ al, const T* __restrict__ be,
                           const T* __restrict__ g, int64_t o0, int64_t o1, int64_t C,
                           int64_t HW) {
  along<T, ROWS, kChunked<T>>(o0, o1, C, HW, [=](auto at) DER_INLINE_LAMBDA {
    at.st(y, gate_act<RELU>(preact<HAS_R>(at, at.ld(z), r, al, be)) * at.ch(g));
  });
}

// --- backward pass 1: reductions [sum da | sum da * (z - mean) | sum grad_y * h] per slot,
// grad_residual = da and (eval) grad_z = da * alpha written on the way. The sums are taken in
// double from exact products of the stored values (da = grad_y * g in double): ATen sums float
// products in float within a plane, and a float sum here measured as often 2x worse as 2x
// better than ATen's, so only double accumulation is reliably at least as accurate.
struct BwdPtrs {
  const void* gy;
  const void* z;
  const void* r;
  void* gr;  // may be null
  void* gz;  // eval only (else null)
  double* s_da;
  double* s_dax;
  double* s_gyh;
};

// the three sums of a slot (D: 8 double lanes or a double; double&: slots in memory)
template <typename D>
struct Sums {
  D da, dax, gyh;
};

// The terms of one position (values in double), gd = g and md = mean of its channel(s).
template <bool RELU, typename S, typename D, typename G>
DER_ALWAYS_INLINE void add_terms(S& s, D gy, D z, D a, G gd, G md) {
  const D da = gate_grad<RELU>(a, gy, gd);
  s.da += da;
  s.dax += da * (z - md);
  s.gyh += gy * gate_act<RELU>(a);
}

// The vector sums of a slot: lanes 0-7 (all lanes of a double vector) and 8-15 of a float one.
struct VecSums {
  Sums<der_v8d> lo, hi;
  DER_ALWAYS_INLINE Sums<double> fold() const {
    return {hsum_d(lo.da + hi.da), hsum_d(lo.dax + hi.dax), hsum_d(lo.gyh + hi.gyh)};
  }
  DER_ALWAYS_INLINE void store(double* da, double* dax, double* gyh) const {  // 16 channels
    Vec<double>::store(da, lo.da);
    Vec<double>::store(da + 8, hi.da);
    Vec<double>::store(dax, lo.dax);
    Vec<double>::store(dax + 8, hi.dax);
    Vec<double>::store(gyh, lo.gyh);
    Vec<double>::store(gyh + 8, hi.gyh);
  }
};
template <bool RELU, typename G>
DER_ALWAYS_INLINE void add_terms(VecSums& s, Halves gy, Halves z, Halves a, G gd, G md) {
  add_terms<RELU>(s.lo, gy.lo, z.lo, a.lo, lo(gd), lo(md));
  add_terms<RELU>(s.hi, gy.hi, z.hi, a.hi, hi(gd), hi(md));
}
template <bool RELU, typename G>
DER_ALWAYS_INLINE void add_terms(VecSums& s, der_v8d gy, der_v8d z, der_v8d a, G gd, G md) {
  add_terms<RELU>(s.lo, gy, z, a, gd, md);
}

// over the planes (NCHW; a slot per plane) or row blocks of B rows (channels_last; a slot per
// block and channel, blk: 3 * C doubles of scratch) [o0, o1); gd / md: g / mean in double
template <typename T, bool HAS_R, bool RELU, bool ROWS>
DER_CLONES void reduce_kernel(const BwdPtrs& P, const T* __restrict__ al,
                              const T* __restrict__ be, const T* __restrict__ g,
                              const double* __restrict__ gd, const double* __restrict__ md,
                              double* __restrict__ blk, int64_t o0, int64_t o1, int64_t R,
                              int64_t C, int64_t HW, int64_t B) {
  const T* __restrict__ gy = static_cast<const T*>(P.gy);
  const T* __restrict__ z = static_cast<const T*>(P.z);
  const T* __restrict__ r = static_cast<const T*>(P.r);
  T* __restrict__ gr = static_cast<T*>(P.gr);
  T* __restrict__ gz = static_cast<T*>(P.gz);
  const bool wgr = gr != nullptr, wgz = gz != nullptr;
  // da = grad_y * g * [a > 0] written as grad_residual and (eval) grad_z = da * alpha
  auto put_da = [=](auto at, auto a, auto gv) DER_INLINE_LAMBDA {
    const auto da = gate_grad<RELU>(a, gv, at.ch(g));
    if (wgr) at.st(gr, da);
    if (wgz) at.st(gz, da * at.ch(al));
  };
  // a position: a recomputed as in the forward, da written (put), the terms added to s
  auto step = [=](auto at, auto& s, bool put) DER_INLINE_LAMBDA {
    const auto zv = at.ld(z);
    const auto a = preact<HAS_R>(at, zv, r, al, be);
    const auto gv = at.ld(gy);
    if (put) put_da(at, a, gv);
    add_terms<RELU>(s, to_d(gv), to_d(zv), to_d(a), ch_d(at, gd), ch_d(at, md));
  };
  if constexpr (!ROWS) {
    auto plane = [&](int64_t pl, int64_t c, int64_t i0, int64_t i1) DER_INLINE_LAMBDA {
      const Sums<double> s = reduce_plane<T>(
          i0, i1, c, VecSums{}, [](const VecSums& v) DER_INLINE_LAMBDA { return v.fold(); },
          [&](auto at, auto& acc) DER_INLINE_LAMBDA { step(at, acc, wgr || wgz); });
      P.s_da[pl] = s.da;
      P.s_dax[pl] = s.dax;
      P.s_gyh[pl] = s.gyh;
    };
    each_plane(o0, o1, C, HW, plane);
  } else {
    double* __restrict__ b_da = blk;
    double* __restrict__ b_dax = blk + C;
    double* __restrict__ b_gyh = blk + 2 * C;
    const int64_t cv = kChunked<T> ? C - C % 16 : 0;
    for (int64_t b = o0; b < o1; ++b) {
      const int64_t r0 = b * B, r1 = std::min(R, r0 + B);
      for (int64_t j = 0; j < 3 * C; ++j) blk[j] = 0.0;
      if constexpr (kChunked<T>) {
        for (int64_t c0 = 0; c0 < cv; c0 += 16) {  // 16 channels in registers, rows in order
          VecSums s{};
          for (int64_t row = r0; row < r1; ++row)
            step(RowLanes<T>{row * C + c0, c0}, s, wgr || wgz);
          s.store(b_da + c0, b_dax + c0, b_gyh + c0);
        }
      }
      // the other channels: da (T lanes), then the sums (double lanes), rows in order
      if (wgr || wgz)
        along_row_tail<T>(r0, r1, C, cv, [=](auto at) DER_INLINE_LAMBDA {
          put_da(at, preact<HAS_R>(at, at.ld(z), r, al, be), at.ld(gy));
        });
      along_row_tail<T>(r0, r1, C, cv, [=](auto at) DER_INLINE_LAMBDA {
        Sums<double&> s{b_da[at.c], b_dax[at.c], b_gyh[at.c]};
        step(at, s, false);
      });
      for (int64_t c = 0; c < C; ++c) {
        P.s_da[b * C + c] = b_da[c];
        P.s_dax[b * C + c] = b_dax[c];
        P.s_gyh[b * C + c] = b_gyh[c];
      }
    }
  }
}

// --- backward pass 2 (training): grad_z = (da - gm - (z - mean) * k) * c1 -------------------
// da read from grad_residual when it was written (FROM_GR), else recomputed.
template <typename T, bool HAS_R, bool RELU, bool FROM_GR, bool ROWS>
DER_CLONES void dz_kernel(const T* __restrict__ gy, const T* __restrict__ z,
                          const T* __restrict__ r, const T* __restrict__ gr, T* __restrict__ gz,
                          const T* __restrict__ al, const T* __restrict__ be,
                          const T* __restrict__ g, const T* __restrict__ mean,
                          const T* __restrict__ c1, const T* __restrict__ gm,
                          const T* __restrict__ kx, int64_t o0, int64_t o1, int64_t C,
                          int64_t HW) {
  along<T, ROWS, kChunked<T>>(o0, o1, C, HW, [=](auto at) DER_INLINE_LAMBDA {
    auto zv = at.ld(z);
    decltype(zv) da;
    if constexpr (FROM_GR) da = at.ld(gr);
    else da = gate_grad<RELU>(preact<HAS_R>(at, zv, r, al, be), at.ld(gy), at.ch(g));
    at.st(gz, (da - at.ch(gm) - (zv - at.ch(mean)) * at.ch(kx)) * at.ch(c1));
  });
}

#pragma GCC pop_options

// ------------------------------------------------------------------------------------------
// host side
struct Geom {
  int64_t N, C, HW;
  bool rows;  // channels_last: rows of C; else NCHW planes of HW
  int64_t R;  // pixel rows N * HW
  int64_t B;  // rows per block (rows layout)
  int64_t nb;  // blocks
  int64_t M() const { return N * HW; }
  // reduction groups: samples (planes) or row blocks; slots are group * C + c
  int64_t groups() const { return rows ? nb : N; }
  int64_t count(int64_t gi) const { return rows ? std::min(B, R - gi * B) : HW; }
};

Geom geometry(const at::Tensor& z, bool channels_last) {
  Geom G;
  G.N = z.size(0);
  G.C = z.size(1);
  G.HW = z.size(2) * z.size(3);
  G.rows = channels_last;
  G.R = G.N * G.HW;
  // a block of rows stays in L1 for the statistics' second pass: ~32 KiB of float
  G.B = std::max<int64_t>(8, std::min<int64_t>(256, 8192 / std::max<int64_t>(1, G.C)));
  G.nb = G.rows ? idx::ceil_div(G.R, G.B) : 0;
  return G;
}

int64_t plane_grain(const Geom& G) { return std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, G.HW)); }
int64_t row_grain(const Geom& G) { return std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, G.C)); }
int64_t block_grain(const Geom& G) {
  return std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, G.B * G.C));
}

// The kernels' per-channel values: weight, invstd, alpha and beta (channel_consts), the gate g.
template <typename T>
struct ChannelValues {
  std::vector<T> w, inv, al, be, g;
};

template <typename T>
ChannelValues<T> channel_values(const std::vector<T>& mean, const std::vector<T>& var,
                                const at::Tensor& weight, const at::Tensor& bias,
                                const std::optional<at::Tensor>& e, double s, double eps,
                                bool training) {
  const int64_t C = static_cast<int64_t>(mean.size());
  ChannelValues<T> v{to_vec<T>(weight), std::vector<T>(C), std::vector<T>(C),
                     std::vector<T>(C), gate_values<T>(e, s, C)};
  const auto b = to_vec<T>(bias);
  channel_consts<T>(mean.data(), var.data(), v.w.data(), b.data(), eps, training, C,
                    v.inv.data(), v.al.data(), v.be.data());
  return v;
}

// f(o0, o1) in parallel over the planes (NCHW) or the rows (channels_last) of z
template <typename F>
void parallel_outer(const Geom& G, const F& f) {
  if (G.rows) at::parallel_for(0, G.R, row_grain(G), f);
  else at::parallel_for(0, G.N * G.C, plane_grain(G), f);
}

// Batch statistics per channel: mean and biased variance, rounded to T.
// NCHW: ATen's CPU BatchNorm arithmetic (see the header): mean = T(sum / M), var_sum = T(double
// sum of T((z - mean)^2)), var = var_sum / T(M) in T. Two passes over z (the second needs the
// rounded mean); the planes' sums are merged in a fixed order.
// channels_last: per block of rows a double sum and sum of squared deviations, merged with
// Chan's formula (exact statistics, correctly rounded).
template <typename T>
void batch_stats(const Geom& G, const T* zp, std::vector<T>& mean, std::vector<T>& var) {
  const int64_t C = G.C, ng = G.groups(), M = G.M();
  mean.assign(C, T(0));
  var.assign(C, T(0));
  if (M == 0 || C == 0) return;
  std::vector<double> gsum(ng * C), gm2(ng * C);
  if (!G.rows) {
    at::parallel_for(0, G.N * C, plane_grain(G), [&](int64_t p0, int64_t p1) {
      sum_planes<T>(zp, gsum.data(), p0, p1, G.HW);
    });
    for (int64_t c = 0; c < C; ++c) {
      double s = 0.0;
      for (int64_t n = 0; n < G.N; ++n) s += gsum[n * C + c];
      mean[c] = static_cast<T>(s / static_cast<double>(M));
    }
    at::parallel_for(0, G.N * C, plane_grain(G), [&](int64_t p0, int64_t p1) {
      sqdev_planes<T>(zp, mean.data(), gm2.data(), p0, p1, G.HW, C);
    });
    for (int64_t c = 0; c < C; ++c) {
      double q = 0.0;
      for (int64_t n = 0; n < G.N; ++n) q += gm2[n * C + c];
      var[c] = static_cast<T>(q) / static_cast<T>(M);
    }
    return;
  }
  at::parallel_for(0, G.nb, block_grain(G), [&](int64_t b0, int64_t b1) {
    std::vector<double> wk(C);
    stats_rows<T>(zp, gsum.data(), gm2.data(), wk.data(), b0, b1, G.R, C, G.B);
  });
  // Chan et al.: M2 = sum_g [M2_g + n_g (mean_g - mean)^2]
  for (int64_t c = 0; c < C; ++c) {
    double s = 0.0;
    for (int64_t gi = 0; gi < ng; ++gi) s += gsum[gi * C + c];
    const double m = s / static_cast<double>(M);
    double q = 0.0;
    for (int64_t gi = 0; gi < ng; ++gi) {
      const double n = static_cast<double>(G.count(gi));
      const double d = gsum[gi * C + c] / n - m;
      q += gm2[gi * C + c] + n * d * d;
    }
    mean[c] = static_cast<T>(m);
    var[c] = static_cast<T>(q / static_cast<double>(M));
  }
}

// float32 / float64; float16 / bfloat16 are computed in float32
bool is_kernel_dtype(at::ScalarType t) { return t == at::kFloat || t == at::kDouble; }

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_gate_cpu(
    const at::Tensor& z_in, const at::Tensor& weight, const at::Tensor& bias,
    const std::optional<at::Tensor>& mean_in, const std::optional<at::Tensor>& var_in,
    const std::optional<at::Tensor>& e, double s, const std::optional<at::Tensor>& residual,
    bool training, double eps, bool relu) {
  check_bn_gate("der_fast.bn_gate", z_in, weight, bias, mean_in, var_in, e, residual, !training,
                "mean_in", "var_in");
  if (!is_kernel_dtype(z_in.scalar_type())) {
    auto res = bn_gate_cpu(z_in.to(at::kFloat), weight.to(at::kFloat), bias.to(at::kFloat),
                           to_float(mean_in), to_float(var_in), to_float(e), s,
                           to_float(residual), training, eps, relu);
    std::get<0>(res) = std::get<0>(res).to(z_in.scalar_type());  // the statistics: float32
    return res;
  }
  const auto fmt = kernel_format(z_in);
  const at::Tensor z = dense_as(z_in, fmt);
  const bool has_r = has(residual);
  const at::Tensor r = has_r ? dense_as(*residual, fmt) : at::Tensor();
  const auto opts = z.options();
  at::Tensor y = at::empty(z.sizes(), opts.memory_format(fmt));
  const Geom G = geometry(z, fmt == at::MemoryFormat::ChannelsLast);
  const int64_t C = G.C;
  at::Tensor mean_out = at::empty({C}, opts);
  at::Tensor var_out = at::empty({C}, opts);

  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "bn_gate_cpu", [&] {
    using T = scalar_t;
    const T* zp = z.const_data_ptr<T>();
    std::vector<T> mean(C), var(C);
    if (training) {
      batch_stats<T>(G, zp, mean, var);
    } else {
      mean = to_vec<T>(*mean_in);
      var = to_vec<T>(*var_in);
    }
    const auto consts = channel_values<T>(mean, var, weight, bias, e, s, eps, training);
    std::copy(mean.begin(), mean.end(), mean_out.mutable_data_ptr<T>());
    std::copy(var.begin(), var.end(), var_out.mutable_data_ptr<T>());
    if (z.numel() == 0) return;
    const T* rp = has_r ? r.const_data_ptr<T>() : nullptr;
    T* yp = y.mutable_data_ptr<T>();
    with_flags(
        [&](auto hr, auto rl, auto rows) {
          parallel_outer(G, [&](int64_t o0, int64_t o1) {
            out_kernel<T, hr, rl, rows>(zp, rp, yp, consts.al.data(), consts.be.data(),
                                        consts.g.data(), o0, o1, C, G.HW);
          });
        },
        has_r, relu, G.rows);
  });
  return {y, mean_out, var_out};
}

template <typename T, bool HAS_R, bool RELU>
void run_reduce(const Geom& G, const BwdPtrs& P, const T* al, const T* be, const T* g,
                const T* mean) {
  const int64_t C = G.C;
  const std::vector<double> gd(g, g + C), md(mean, mean + C);
  auto run = [&](auto rows, int64_t o0, int64_t o1, double* blk) {
    reduce_kernel<T, HAS_R, RELU, rows>(P, al, be, g, gd.data(), md.data(), blk, o0, o1, G.R, C,
                                        G.HW, G.B);
  };
  if (G.rows) {
    at::parallel_for(0, G.nb, block_grain(G), [&](int64_t b0, int64_t b1) {
      std::vector<double> blk(3 * C);
      run(std::true_type{}, b0, b1, blk.data());
    });
  } else {
    at::parallel_for(0, G.N * C, plane_grain(G), [&](int64_t p0, int64_t p1) {
      run(std::false_type{}, p0, p1, nullptr);
    });
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bn_gate_backward_cpu(
    const at::Tensor& grad_y_in, const at::Tensor& z_in, const at::Tensor& weight,
    const at::Tensor& bias, const at::Tensor& mean_t, const at::Tensor& var_t,
    const std::optional<at::Tensor>& e, double s, const std::optional<at::Tensor>& residual,
    bool training, double eps, bool relu, std::array<bool, 5> mask) {
  const char* op = "der_fast.bn_gate_backward";
  check_bn_gate(op, z_in, weight, bias, mean_t, var_t, e, residual, true, "mean", "var");
  TORCH_CHECK_VALUE(grad_y_in.sizes() == z_in.sizes(), op, ": grad_y has shape ",
                    grad_y_in.sizes(), " but z has shape ", z_in.sizes());
  check_like(grad_y_in, z_in, op, "grad_y", "z");
  TORCH_CHECK_VALUE(!mask[3] || has(e), op, ": e is required for grad_e");
  TORCH_CHECK_VALUE(!mask[4] || has(residual), op, ": residual is required for grad_residual");
  if (!is_kernel_dtype(z_in.scalar_type())) {
    return to_dtype(bn_gate_backward_cpu(grad_y_in.to(at::kFloat), z_in.to(at::kFloat),
                                         weight.to(at::kFloat), bias.to(at::kFloat),
                                         mean_t.to(at::kFloat), var_t.to(at::kFloat),
                                         to_float(e), s, to_float(residual), training, eps, relu,
                                         mask),
                    z_in.scalar_type());
  }
  const auto fmt = kernel_format(z_in);
  const at::Tensor z = dense_as(z_in, fmt);
  const at::Tensor gy = dense_as(grad_y_in, fmt);
  const bool has_r = has(residual);
  const at::Tensor r = has_r ? dense_as(*residual, fmt) : at::Tensor();
  const auto opts = z.options();
  const Geom G = geometry(z, fmt == at::MemoryFormat::ChannelsLast);
  const int64_t C = G.C, M = G.M();
  at::Tensor gz = output_if(mask[0], z.sizes(), opts, fmt), gw = output_if(mask[1], {C}, opts),
             gb = output_if(mask[2], {C}, opts), ge = output_if(mask[3], {C}, opts),
             gr = output_if(mask[4], z.sizes(), opts, fmt);
  // which sums are needed: grad_z in training needs sum da and sum da * x_hat
  const bool need_red = mask[1] || mask[2] || mask[3] || (mask[0] && training);
  const bool pass1 = need_red || mask[4] || (mask[0] && !training);
  if (!pass1) return {gz, gw, gb, ge, gr};

  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "bn_gate_backward_cpu", [&] {
    using T = scalar_t;
    const auto mean = to_vec<T>(mean_t);
    const auto consts =
        channel_values<T>(mean, to_vec<T>(var_t), weight, bias, e, s, eps, training);
    const auto &w = consts.w, &inv = consts.inv, &al = consts.al, &be = consts.be, &g = consts.g;
    const int64_t ng = G.groups();
    std::vector<double> red(3 * ng * C, 0.0);
    const T* zp = z.const_data_ptr<T>();
    const T* gyp = gy.const_data_ptr<T>();
    const T* rp = has_r ? r.const_data_ptr<T>() : nullptr;
    T* grp = mask[4] ? gr.mutable_data_ptr<T>() : nullptr;
    T* gzp = mask[0] ? gz.mutable_data_ptr<T>() : nullptr;
    if (z.numel() > 0) {
      BwdPtrs P{gyp, zp, rp, grp, training ? nullptr : gzp,
                red.data(), red.data() + ng * C, red.data() + 2 * ng * C};
      with_flags(
          [&](auto hr, auto rl) {
            run_reduce<T, hr, rl>(G, P, al.data(), be.data(), g.data(), mean.data());
          },
          has_r, relu);
    }
    std::vector<double> s_da(C, 0.0), s_dax(C, 0.0), s_gyh(C, 0.0);
    for (int64_t gi = 0; gi < ng; ++gi)
      for (int64_t c = 0; c < C; ++c) {
        s_da[c] += red[gi * C + c];
        s_dax[c] += red[(ng + gi) * C + c];
        s_gyh[c] += red[(2 * ng + gi) * C + c];
      }
    fill_channels<T>(gw, mask[1], [&](int64_t c) {
      return static_cast<T>(s_dax[c] * static_cast<double>(inv[c]));
    });
    fill_channels<T>(gb, mask[2], [&](int64_t c) { return static_cast<T>(s_da[c]); });
    fill_channels<T>(ge, mask[3], [&](int64_t c) {
      const double gc = static_cast<double>(g[c]);
      return static_cast<T>(s * gc * (1.0 - gc) * s_gyh[c]);
    });
    if (mask[0] && training && z.numel() > 0) {
      std::vector<T> c1(C), gm(C), kx(C);
      const double Md = static_cast<double>(M);
      for (int64_t c = 0; c < C; ++c) {
        const double iv = static_cast<double>(inv[c]);
        c1[c] = static_cast<T>(static_cast<double>(w[c]) * iv);
        gm[c] = static_cast<T>(s_da[c] / Md);
        kx[c] = static_cast<T>(s_dax[c] * iv * iv / Md);
      }
      auto dz = [&](auto hr, auto rl, auto from_gr, auto rows) {
        parallel_outer(G, [&](int64_t o0, int64_t o1) {
          dz_kernel<T, hr, rl, from_gr, rows>(gyp, zp, rp, grp, gzp, al.data(), be.data(),
                                              g.data(), mean.data(), c1.data(), gm.data(),
                                              kx.data(), o0, o1, C, G.HW);
        });
      };
      // da from grad_residual when it was written (then the residual and the ReLU no longer
      // matter)
      if (mask[4]) {
        with_flags(
            [&](auto rows) { dz(std::false_type{}, std::false_type{}, std::true_type{}, rows); },
            G.rows);
      } else {
        with_flags([&](auto hr, auto rl, auto rows) { dz(hr, rl, std::false_type{}, rows); },
                   has_r, relu, G.rows);
      }
    }
  });
  return {gz, gw, gb, ge, gr};
}

}  // namespace

TORCH_LIBRARY_IMPL(der_fast, CPU, m) {
  m.impl("bn_gate", &bn_gate_cpu);
  m.impl("bn_gate_backward", &bn_gate_backward_cpu);
}

}  // namespace der_fast
