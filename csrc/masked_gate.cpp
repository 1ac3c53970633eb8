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
#include "index_math.h"

namespace der_fast {
namespace {

constexpr int64_t kGrainElems = 16384;  // below this many elements per task: stay serial

// ------------------------------------------------------------------------------------------
// forward
template <typename T, bool HAS_R>
DER_CLONES void fwd_planes(const T* __restrict__ x, const T* __restrict__ r, T* __restrict__ y,
                           const acc_t<T>* __restrict__ a, const acc_t<T>* __restrict__ b,
                           const acc_t<T>* __restrict__ g, int64_t p0, int64_t p1, int64_t C,
                           int64_t HW) {
  using A = acc_t<T>;
  using VT = Vec<T>;
  using V = typename VT::V;
  // (n, c) of the first plane, then stepped (no division per plane)
  int64_t n = idx::plane_sample(p0, C), c = idx::plane_channel(p0, C);
  for (int64_t pl = p0; pl < p1; ++pl, c = (c + 1 == C) ? 0 : c + 1, n += (c == 0)) {
    const A sa = a[c], sb = b[c], sg = g[c];
    const int64_t base = idx::nchw_offset(n, c, 0, C, HW);
    const T* __restrict__ xr = x + base;
    T* __restrict__ yr = y + base;
    const T* __restrict__ rr = HAS_R ? r + base : nullptr;
    int64_t i = 0;
    const V zero = {};
    for (; i + VT::L <= HW; i += VT::L) {
      V z = VT::load(xr + i) * sa + sb;
      if constexpr (HAS_R) z += VT::load(rr + i);
      z = (z < zero) ? zero : z;
      VT::store(yr + i, z * sg);
    }
    for (; i < HW; ++i) {
      A z = sa * Cvt<T>::load(xr[i]) + sb;
      if constexpr (HAS_R) z += Cvt<T>::load(rr[i]);
      z = z < A(0) ? A(0) : z;
      yr[i] = Cvt<T>::store(z * sg);
    }
  }
}

template <typename T, bool HAS_R>
DER_CLONES void fwd_rows(const T* __restrict__ x, const T* __restrict__ r, T* __restrict__ y,
                         const acc_t<T>* __restrict__ a, const acc_t<T>* __restrict__ b,
                         const acc_t<T>* __restrict__ g, int64_t r0, int64_t r1, int64_t C) {
  using A = acc_t<T>;
  for (int64_t row = r0; row < r1; ++row) {
    const int64_t base = row * C;
    const T* __restrict__ xr = x + base;
    T* __restrict__ yr = y + base;
    const T* __restrict__ rr = HAS_R ? r + base : nullptr;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      A z = a[c] * Cvt<T>::load(xr[c]) + b[c];
      if constexpr (HAS_R) z += Cvt<T>::load(rr[c]);
      z = z < A(0) ? A(0) : z;
      yr[c] = Cvt<T>::store(z * g[c]);
    }
  }
}

// ------------------------------------------------------------------------------------------
// backward. acc: 3*C doubles: [sum dz | sum dz*x | sum gy*y]
template <typename T, bool HAS_X, bool WGX, bool WGR>
DER_CLONES void bwd_planes(const T* __restrict__ gy, const T* __restrict__ y,
                           const T* __restrict__ x, T* __restrict__ gx, T* __restrict__ gr,
                           const acc_t<T>* __restrict__ scale, const acc_t<T>* __restrict__ g,
                           double* __restrict__ acc, int64_t p0, int64_t p1, int64_t C,
                           int64_t HW) {
  using A = acc_t<T>;
  using VT = Vec<T>;
  using V = typename VT::V;
  int64_t n = idx::plane_sample(p0, C), c = idx::plane_channel(p0, C);
  for (int64_t pl = p0; pl < p1; ++pl, c = (c + 1 == C) ? 0 : c + 1, n += (c == 0)) {
    const A sg = g[c], ss = scale[c];
    const int64_t base = idx::nchw_offset(n, c, 0, C, HW);
    const T* __restrict__ gyr = gy + base;
    const T* __restrict__ yr = y + base;
    const T* __restrict__ xr = HAS_X ? x + base : nullptr;
    T* __restrict__ gxr = WGX ? gx + base : nullptr;
    T* __restrict__ grr = WGR ? gr + base : nullptr;
    const V zero = {};
    V v_dz = {}, v_dzx = {}, v_gyy = {};
    int64_t i = 0;
    for (; i + VT::L <= HW; i += VT::L) {
      const V gv = VT::load(gyr + i);
      const V yv = VT::load(yr + i);
      const V dz = (yv > zero) ? gv * sg : zero;
      if constexpr (WGX) VT::store(gxr + i, dz * ss);
      if constexpr (WGR) VT::store(grr + i, dz);
      v_dz += dz;
      if constexpr (HAS_X) v_dzx += dz * VT::load(xr + i);
      v_gyy += gv * yv;
    }
    A s_dz = VT::hsum(v_dz), s_dzx = HAS_X ? VT::hsum(v_dzx) : A(0), s_gyy = VT::hsum(v_gyy);
    for (; i < HW; ++i) {
      const A gv = Cvt<T>::load(gyr[i]);
      const A yv = Cvt<T>::load(yr[i]);
      const A dz = yv > A(0) ? gv * sg : A(0);
      if constexpr (WGX) gxr[i] = Cvt<T>::store(dz * ss);
      if constexpr (WGR) grr[i] = Cvt<T>::store(dz);
      s_dz += dz;
      if constexpr (HAS_X) s_dzx += dz * Cvt<T>::load(xr[i]);
      s_gyy += gv * yv;
    }
    acc[c] += s_dz;
    acc[C + c] += s_dzx;
    acc[2 * C + c] += s_gyy;
  }
}

constexpr int64_t kRowBlock = 64;  // rows accumulated in the compute type before a double flush

template <typename T, bool HAS_X, bool WGX, bool WGR>
DER_CLONES void bwd_rows(const T* __restrict__ gy, const T* __restrict__ y,
                         const T* __restrict__ x, T* __restrict__ gx, T* __restrict__ gr,
                         const acc_t<T>* __restrict__ scale, const acc_t<T>* __restrict__ g,
                         acc_t<T>* __restrict__ blk, double* __restrict__ acc, int64_t r0,
                         int64_t r1, int64_t C) {
  using A = acc_t<T>;
  A* __restrict__ b_dz = blk;
  A* __restrict__ b_dzx = blk + C;
  A* __restrict__ b_gyy = blk + 2 * C;
  for (int64_t rb = r0; rb < r1; rb += kRowBlock) {
    const int64_t re = rb + kRowBlock < r1 ? rb + kRowBlock : r1;
    for (int64_t j = 0; j < 3 * C; ++j) blk[j] = A(0);
    for (int64_t row = rb; row < re; ++row) {
      const int64_t base = row * C;
      const T* __restrict__ gyr = gy + base;
      const T* __restrict__ yr = y + base;
      const T* __restrict__ xr = HAS_X ? x + base : nullptr;
      T* __restrict__ gxr = WGX ? gx + base : nullptr;
      T* __restrict__ grr = WGR ? gr + base : nullptr;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) {
        const A gv = Cvt<T>::load(gyr[c]);
        const A yv = Cvt<T>::load(yr[c]);
        const A dz = yv > A(0) ? gv * g[c] : A(0);
        if constexpr (WGX) gxr[c] = Cvt<T>::store(dz * scale[c]);
        if constexpr (WGR) grr[c] = Cvt<T>::store(dz);
        b_dz[c] += dz;
        if constexpr (HAS_X) b_dzx[c] += dz * Cvt<T>::load(xr[c]);
        b_gyy[c] += gv * yv;
      }
    }
    for (int64_t j = 0; j < 3 * C; ++j) acc[j] += static_cast<double>(blk[j]);
  }
}

// ------------------------------------------------------------------------------------------
// host side
template <typename A>
std::vector<A> to_acc_vec(const at::Tensor& t) {
  auto td = t.to(std::is_same_v<A, double> ? at::kDouble : at::kFloat).contiguous();
  const A* p = td.template const_data_ptr<A>();
  return std::vector<A>(p, p + td.numel());
}

// g = sigmoid(s * e) computed by ATen exactly as the reference writes it (`torch.sigmoid(s * e)`,
// in e's dtype), so that the gate, and with -ffp-contract=off the whole forward, matches
// masked_gate_ref bit for bit.
template <typename A>
std::vector<A> gate_values(const std::optional<at::Tensor>& e, double s, int64_t C) {
  if (!(e.has_value() && e->defined())) return std::vector<A>(C, A(1));
  return to_acc_vec<A>(at::sigmoid(e->mul(s)));
}

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

inline bool has(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

at::Tensor masked_gate_cpu(const at::Tensor& x_in, const at::Tensor& scale,
                           const at::Tensor& shift, const std::optional<at::Tensor>& e,
                           double s, const std::optional<at::Tensor>& residual) {
  check_masked_gate(x_in, scale, shift, e, residual);
  if (x_in.scalar_type() == at::kHalf) {  // half: compute in float (no dedicated kernels)
    auto f = [](const std::optional<at::Tensor>& t) -> std::optional<at::Tensor> {
      if (!has(t)) return std::nullopt;
      return t->to(at::kFloat);
    };
    return masked_gate_cpu(x_in.to(at::kFloat), scale.to(at::kFloat), shift.to(at::kFloat),
                           f(e), s, f(residual))
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
    const auto a = to_acc_vec<A>(scale);
    const auto b = to_acc_vec<A>(shift);
    const auto g = gate_values<A>(e, s, G.C);
    const T* xp = x.const_data_ptr<T>();
    const T* rp = has_r ? r.const_data_ptr<T>() : nullptr;
    T* yp = y.mutable_data_ptr<T>();
    const int64_t grain = std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, G.inner()));
    at::parallel_for(0, G.outer(), grain, [&](int64_t o0, int64_t o1) {
      if (G.rows) {
        if (has_r) fwd_rows<T, true>(xp, rp, yp, a.data(), b.data(), g.data(), o0, o1, G.C);
        else fwd_rows<T, false>(xp, rp, yp, a.data(), b.data(), g.data(), o0, o1, G.C);
      } else {
        if (has_r) fwd_planes<T, true>(xp, rp, yp, a.data(), b.data(), g.data(), o0, o1, G.C, G.HW);
        else fwd_planes<T, false>(xp, rp, yp, a.data(), b.data(), g.data(), o0, o1, G.C, G.HW);
      }
    });
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
      if (G.rows)
        bwd_rows<T, HAS_X, WGX, WGR>(gy, y, x, gx, gr, scale, g, blk.data(), slot, o0, o1, C);
      else
        bwd_planes<T, HAS_X, WGX, WGR>(gy, y, x, gx, gr, scale, g, slot, o0, o1, C, G.HW);
    }
  });
}

template <typename T>
void run_bwd_dispatch(bool has_x, bool wgx, bool wgr, const Geometry& G, const T* gy, const T* y,
                      const T* x, T* gx, T* gr, const acc_t<T>* scale, const acc_t<T>* g,
                      std::vector<double>& acc, int64_t nchunks) {
  const int code = (has_x ? 4 : 0) | (wgx ? 2 : 0) | (wgr ? 1 : 0);
#define DER_BWD_CASE(K, HX, WX, WR)                                               \
  case K:                                                                         \
    run_bwd<T, HX, WX, WR>(G, gy, y, x, gx, gr, scale, g, acc, nchunks); \
    break;
  switch (code) {
    DER_BWD_CASE(0, false, false, false)
    DER_BWD_CASE(1, false, false, true)
    DER_BWD_CASE(2, false, true, false)
    DER_BWD_CASE(3, false, true, true)
    DER_BWD_CASE(4, true, false, false)
    DER_BWD_CASE(5, true, false, true)
    DER_BWD_CASE(6, true, true, false)
    DER_BWD_CASE(7, true, true, true)
  }
#undef DER_BWD_CASE
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
    auto f = [](const std::optional<at::Tensor>& t) -> std::optional<at::Tensor> {
      if (!has(t)) return std::nullopt;
      return t->to(at::kFloat);
    };
    auto res = masked_gate_backward_cpu(grad_y_in.to(at::kFloat), y_in.to(at::kFloat), f(x_in),
                                        scale.to(at::kFloat), f(e), s, mask);
    auto h = [](const at::Tensor& t) { return t.to(at::kHalf); };
    return {h(std::get<0>(res)), h(std::get<1>(res)), h(std::get<2>(res)), h(std::get<3>(res)),
            h(std::get<4>(res))};
  }
  const auto fmt = kernel_format(y_in);
  const at::Tensor y = dense_as(y_in, fmt);
  const at::Tensor gy = dense_as(grad_y_in, fmt);
  const bool has_x = mask[1];
  const at::Tensor x = has_x ? dense_as(*x_in, fmt) : at::Tensor();
  const auto opts = y.options();
  const int64_t C = y.size(1);
  at::Tensor gx = mask[0] ? at::empty(y.sizes(), opts.memory_format(fmt)) : at::empty({0}, opts);
  at::Tensor gr = mask[4] ? at::empty(y.sizes(), opts.memory_format(fmt)) : at::empty({0}, opts);
  at::Tensor gscale = mask[1] ? at::empty({C}, opts) : at::empty({0}, opts);
  at::Tensor gshift = mask[2] ? at::empty({C}, opts) : at::empty({0}, opts);
  at::Tensor ge = mask[3] ? at::empty({C}, opts) : at::empty({0}, opts);
  const Geometry G = geometry(y, fmt == at::MemoryFormat::ChannelsLast);
  const int64_t numel = y.numel();

  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, y.scalar_type(), "masked_gate_backward_cpu", [&] {
    using T = scalar_t;
    using A = acc_t<T>;
    const auto sc = to_acc_vec<A>(scale);
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
      run_bwd_dispatch<T>(has_x, mask[0], mask[4], G, gyp, yp, xp, gxp, grp, sc.data(), g.data(),
                          acc, nchunks);
    std::vector<double> tot(3 * C, 0.0);
    for (int64_t k = 0; k < nchunks; ++k)
      for (int64_t j = 0; j < 3 * C; ++j) tot[j] += acc[k * 3 * C + j];
    if (mask[2]) {
      T* p = gshift.mutable_data_ptr<T>();
      for (int64_t c = 0; c < C; ++c) p[c] = Cvt<T>::store(static_cast<A>(tot[c]));
    }
    if (mask[1]) {
      T* p = gscale.mutable_data_ptr<T>();
      for (int64_t c = 0; c < C; ++c) p[c] = Cvt<T>::store(static_cast<A>(tot[C + c]));
    }
    if (mask[3]) {
      T* p = ge.mutable_data_ptr<T>();
      for (int64_t c = 0; c < C; ++c)
        p[c] = Cvt<T>::store(static_cast<A>(s * (1.0 - static_cast<double>(g[c])) * tot[2 * C + c]));
    }
  });
  return {gx, gscale, gshift, ge, gr};
}

}  // namespace

TORCH_LIBRARY_IMPL(der_fast, CPU, m) {
  m.impl("masked_gate", &masked_gate_cpu);
  m.impl("masked_gate_backward", &masked_gate_backward_cpu);
}

}  // namespace der_fast
