// der_fast::masked_gate and der_fast::masked_gate_backward: CPU kernels.
//
//   y[n,c,p] = g[c] * relu(scale[c] * x[n,c,p] + shift[c] (+ residual[n,c,p])),
//   g = sigmoid(s * e) (or 1 without e).
//
// Backward uses only (grad_y, y, x, scale, e): with dz = grad_y * g * [y > 0]
//   grad_x = dz * scale, grad_residual = dz,
//   grad_scale[c] = sum dz * x, grad_shift[c] = sum dz,
//   grad_e[c] = s * g * (1 - g) * sum grad_y * relu(z) = s * (1 - g) * sum grad_y * y.
// The pre-activation z is never stored (see der_fast/ops/masked_gate.py for the reasoning).
//
// Layouts: dense NCHW ("planes" of HW, channel = plane % C) or dense NHWC / 2-D ("rows" of C).
// Reductions accumulate in float (double for double) within a plane / block of rows and are then
// summed in double per chunk; chunks are fixed (not per thread), so results are deterministic.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <array>
#include <cmath>
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
// forward, over the planes (NCHW) or rows (NHWC / 2-D) [o0, o1)
template <typename T, bool HAS_R, bool ROWS>
DER_CLONES void fwd_kernel(const T* __restrict__ x, const T* __restrict__ r, T* __restrict__ y,
                           const acc_t<T>* __restrict__ a, const acc_t<T>* __restrict__ b,
                           const acc_t<T>* __restrict__ g, int64_t o0, int64_t o1, int64_t C,
                           int64_t HW) {
  along<T, ROWS, false>(o0, o1, C, HW, [=](auto at) DER_INLINE_LAMBDA {
    at.st(y, gate_act<true>(preact<HAS_R>(at, at.ld(x), r, a, b)) * at.ch(g));
  });
}

// ------------------------------------------------------------------------------------------
// backward. acc: 3*C doubles: [sum dz | sum dz*x | sum gy*y]
constexpr int64_t kRowBlock = 64;  // rows accumulated in the compute type before a double flush

// ROWS: blk is 3*C values of scratch in the compute type
template <typename T, bool HAS_X, bool WGX, bool WGR, bool ROWS>
DER_CLONES void bwd_kernel(const T* __restrict__ gy, const T* __restrict__ y,
                           const T* __restrict__ x, T* __restrict__ gx, T* __restrict__ gr,
                           const acc_t<T>* __restrict__ scale, const acc_t<T>* __restrict__ g,
                           acc_t<T>* __restrict__ blk, double* __restrict__ acc, int64_t o0,
                           int64_t o1, int64_t C, int64_t HW) {
  using A = acc_t<T>;
  // dz = grad_y * g * [y > 0] (g > 0: y > 0 where the pre-activation is), written as
  // grad_x = dz * scale and grad_residual = dz; the position's terms added to the three sums
  auto step = [=](auto at, auto& s_dz, auto& s_dzx, auto& s_gyy) DER_INLINE_LAMBDA {
    const auto gv = at.ld(gy);
    const auto yv = at.ld(y);
    const auto dz = gate_grad<true>(yv, gv, at.ch(g));
    if constexpr (WGX) at.st(gx, dz * at.ch(scale));
    if constexpr (WGR) at.st(gr, dz);
    s_dz += dz;
    if constexpr (HAS_X) s_dzx += dz * at.ld(x);
    s_gyy += gv * yv;
  };
  if constexpr (!ROWS) {
    using VT = Vec<T>;
    auto fold = [](const std::array<typename VT::V, 3>& v) DER_INLINE_LAMBDA {
      return std::array<A, 3>{VT::hsum(v[0]), HAS_X ? VT::hsum(v[1]) : A(0), VT::hsum(v[2])};
    };
    each_plane(o0, o1, C, HW, [&](int64_t, int64_t c, int64_t i0, int64_t i1) DER_INLINE_LAMBDA {
      const std::array<A, 3> s = reduce_plane<T>(
          i0, i1, c, std::array<typename VT::V, 3>{}, fold,
          [&](auto at, auto& sv) DER_INLINE_LAMBDA { step(at, sv[0], sv[1], sv[2]); });
      for (int k = 0; k < 3; ++k) acc[k * C + c] += s[k];
    });
  } else {
    A* __restrict__ b_dz = blk;
    A* __restrict__ b_dzx = blk + C;
    A* __restrict__ b_gyy = blk + 2 * C;
    for (int64_t rb = o0; rb < o1; rb += kRowBlock) {
      const int64_t re = rb + kRowBlock < o1 ? rb + kRowBlock : o1;
      for (int64_t j = 0; j < 3 * C; ++j) blk[j] = A(0);
      along_rows<T, false>(rb, re, C, [=](auto at) DER_INLINE_LAMBDA {
        step(at, b_dz[at.c], b_dzx[at.c], b_gyy[at.c]);
      });
      for (int64_t j = 0; j < 3 * C; ++j) acc[j] += static_cast<double>(blk[j]);
    }
  }
}

// ------------------------------------------------------------------------------------------
// host side
struct Geometry {
  int64_t N, C, HW;
  bool rows;  // NHWC / 2-D: rows of C; else NCHW planes of HW
  int64_t outer() const { return rows ? N * HW : N * C; }
  int64_t inner() const { return rows ? C : HW; }
};

Geometry geometry(const at::Tensor& x, bool channels_last) {
  Geometry g;
  g.N = x.size(0);
  g.C = x.size(1);
  g.HW = hw_of(x);
  g.rows = channels_last || x.dim() == 2;
  return g;
}

at::Tensor masked_gate_cpu(const at::Tensor& x_in, const at::Tensor& scale,
                           const at::Tensor& shift, const std::optional<at::Tensor>& e,
                           double s, const std::optional<at::Tensor>& residual) {
  check_masked_gate(x_in, scale, shift, e, residual);
  if (x_in.scalar_type() == at::kHalf) {  // half: compute in float (no dedicated kernels)
    return masked_gate_cpu(x_in.to(at::kFloat), scale.to(at::kFloat), shift.to(at::kFloat),
                           to_float(e), s, to_float(residual))
        .to(at::kHalf);
  }
  const auto fmt = kernel_format(x_in);
  const at::Tensor x = dense_as(x_in, fmt);
  const bool has_r = has(residual);
  const at::Tensor r = has_r ? dense_as(*residual, fmt) : at::Tensor();
  at::Tensor y = at::empty(x.sizes(), x.options().memory_format(fmt));
  if (x.numel() == 0) return y;
  const Geometry G = geometry(x, fmt == at::MemoryFormat::ChannelsLast);

  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "masked_gate_cpu", [&] {
    using T = scalar_t;
    using A = acc_t<T>;
    const auto a = to_vec<A>(scale);
    const auto b = to_vec<A>(shift);
    const auto g = gate_values<A>(e, s, G.C);
    const T* xp = x.const_data_ptr<T>();
    const T* rp = has_r ? r.const_data_ptr<T>() : nullptr;
    T* yp = y.mutable_data_ptr<T>();
    const int64_t grain = std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, G.inner()));
    with_flags(
        [&](auto hr, auto rows) {
          at::parallel_for(0, G.outer(), grain, [&](int64_t o0, int64_t o1) {
            fwd_kernel<T, hr, rows>(xp, rp, yp, a.data(), b.data(), g.data(), o0, o1, G.C, G.HW);
          });
        },
        has_r, G.rows);
  });
  return y;
}

template <typename T, bool HAS_X, bool WGX, bool WGR>
void run_bwd(const Geometry& G, const T* gy, const T* y, const T* x, T* gx, T* gr,
             const acc_t<T>* scale, const acc_t<T>* g, std::vector<double>& acc,
             int64_t nchunks) {
  using A = acc_t<T>;
  const int64_t outer = G.outer(), C = G.C;
  const int64_t per = idx::ceil_div(outer, nchunks);
  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    std::vector<A> blk(G.rows ? 3 * C : 0);
    for (int64_t k = c0; k < c1; ++k) {
      const int64_t o0 = k * per, o1 = std::min(outer, o0 + per);
      if (o0 >= o1) continue;
      double* slot = acc.data() + k * 3 * C;
      with_flags(
          [&](auto rows) {
            bwd_kernel<T, HAS_X, WGX, WGR, rows>(gy, y, x, gx, gr, scale, g, blk.data(), slot, o0,
                                                 o1, C, G.HW);
          },
          G.rows);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> masked_gate_backward_cpu(
    const at::Tensor& grad_y_in, const at::Tensor& y_in, const std::optional<at::Tensor>& x_in,
    const at::Tensor& scale, const std::optional<at::Tensor>& e, double s,
    std::array<bool, 5> mask) {
  const char* op = "der_fast.masked_gate_backward";
  TORCH_CHECK_VALUE(grad_y_in.sizes() == y_in.sizes(), op, ": grad_y shape ", grad_y_in.sizes(),
                    " does not match y shape ", y_in.sizes());
  check_like(grad_y_in, y_in, op, "grad_y", "y");
  if (has(x_in)) {
    TORCH_CHECK_VALUE(x_in->sizes() == y_in.sizes(), op, ": x shape ", x_in->sizes(),
                      " does not match y shape ", y_in.sizes());
    check_like(*x_in, y_in, op, "x", "y");
  }
  TORCH_CHECK_VALUE(!mask[1] || has(x_in), op, ": x is required for grad_scale");
  TORCH_CHECK_VALUE(!mask[3] || has(e), op, ": e is required for grad_e");
  check_masked_gate(y_in, scale, scale, e, std::nullopt);
  if (y_in.scalar_type() == at::kHalf) {
    return to_dtype(masked_gate_backward_cpu(grad_y_in.to(at::kFloat), y_in.to(at::kFloat),
                                             to_float(x_in), scale.to(at::kFloat), to_float(e),
                                             s, mask),
                    at::kHalf);
  }
  const auto fmt = kernel_format(y_in);
  const at::Tensor y = dense_as(y_in, fmt);
  const at::Tensor gy = dense_as(grad_y_in, fmt);
  const bool has_x = mask[1];
  const at::Tensor x = has_x ? dense_as(*x_in, fmt) : at::Tensor();
  const auto opts = y.options();
  const int64_t C = y.size(1);
  at::Tensor gx = output_if(mask[0], y.sizes(), opts, fmt),
             gr = output_if(mask[4], y.sizes(), opts, fmt), gscale = output_if(mask[1], {C}, opts),
             gshift = output_if(mask[2], {C}, opts), ge = output_if(mask[3], {C}, opts);
  const Geometry G = geometry(y, fmt == at::MemoryFormat::ChannelsLast);
  const int64_t numel = y.numel();

  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, y.scalar_type(), "masked_gate_backward_cpu", [&] {
    using T = scalar_t;
    using A = acc_t<T>;
    const auto sc = to_vec<A>(scale);
    const auto g = gate_values<A>(e, s, C);
    const int64_t nchunks = numel == 0 ? 1
                            : std::max<int64_t>(1, std::min<int64_t>({(int64_t)at::get_num_threads(),
                                                                     numel / kGrainElems,
                                                                     G.outer()}));
    std::vector<double> acc(nchunks * 3 * C, 0.0);
    const T* gyp = gy.const_data_ptr<T>();
    const T* yp = y.const_data_ptr<T>();
    const T* xp = has_x ? x.const_data_ptr<T>() : nullptr;
    T* gxp = mask[0] ? gx.mutable_data_ptr<T>() : nullptr;
    T* grp = mask[4] ? gr.mutable_data_ptr<T>() : nullptr;
    if (numel > 0)
      with_flags(
          [&](auto hx, auto wx, auto wr) {
            run_bwd<T, hx, wx, wr>(G, gyp, yp, xp, gxp, grp, sc.data(), g.data(), acc, nchunks);
          },
          has_x, mask[0], mask[4]);
    std::vector<double> tot(3 * C, 0.0);
    for (int64_t k = 0; k < nchunks; ++k)
      for (int64_t j = 0; j < 3 * C; ++j) tot[j] += acc[k * 3 * C + j];
    auto sum_out = [&](int64_t j) { return Cvt<T>::store(static_cast<A>(tot[j])); };
    fill_channels<T>(gshift, mask[2], [&](int64_t c) { return sum_out(c); });
    fill_channels<T>(gscale, mask[1], [&](int64_t c) { return sum_out(C + c); });
    fill_channels<T>(ge, mask[3], [&](int64_t c) {
      return Cvt<T>::store(
          static_cast<A>(s * (1.0 - static_cast<double>(g[c])) * tot[2 * C + c]));
    });
  });
  return {gx, gscale, gshift, ge, gr};
}

}  // namespace

TORCH_LIBRARY_IMPL(der_fast, CPU, m) {
  m.impl("masked_gate", &masked_gate_cpu);
  m.impl("masked_gate_backward", &masked_gate_backward_cpu);
}

}  // namespace der_fast
