// der_fast::concat_linear_head (+ backward): CPU kernels (pooling and its broadcast backward);
// the orchestration and GEMMs are in concat_linear_head.h, shared with the CUDA build.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "concat_linear_head.h"
#include "cpu_simd.h"
#include "index_math.h"

namespace der_fast {
namespace {

constexpr int64_t kGrainElems = 16384;

// mean over the HW plane of each (n, c) of a dense NCHW tensor, into features[n, off + c]
template <typename T>
DER_CLONES void pool_planes(const T* __restrict__ x, T* __restrict__ feat, int64_t p0,
                            int64_t p1, int64_t C, int64_t HW, int64_t D, int64_t off) {
  using A = acc_t<T>;
  // (n, c) of the first plane, then stepped (no division per plane)
  int64_t n = idx::plane_sample(p0, C), c = idx::plane_channel(p0, C);
  for (int64_t pl = p0; pl < p1; ++pl, c = (c + 1 == C) ? 0 : c + 1, n += (c == 0)) {
    const T* __restrict__ src = x + idx::nchw_offset(n, c, 0, C, HW);
    prefetch_ahead(src, HW * static_cast<int64_t>(sizeof(T)));
    const A s = sum_contig<T>(src, HW);
    feat[idx::feature_offset(n, off, c, D)] = Cvt<T>::store(s / static_cast<A>(HW));
  }
}

// same for a dense NHWC tensor: per sample, sum the HW rows of C
template <typename T>
DER_CLONES void pool_rows(const T* __restrict__ x, T* __restrict__ feat, acc_t<T>* __restrict__ s,
                          int64_t n0, int64_t n1, int64_t C, int64_t HW, int64_t D, int64_t off) {
  using A = acc_t<T>;
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t c = 0; c < C; ++c) s[c] = A(0);
    for (int64_t p = 0; p < HW; ++p) {
      const T* __restrict__ src = x + idx::nhwc_offset(n, 0, p, C, HW);
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) s[c] += Cvt<T>::load(src[c]);
    }
    T* __restrict__ dst = feat + idx::feature_offset(n, off, 0, D);
    for (int64_t c = 0; c < C; ++c) dst[c] = Cvt<T>::store(s[c] / static_cast<A>(HW));
  }
}

template <typename T>
DER_CLONES void expand_planes(const T* __restrict__ dp, T* __restrict__ out, int64_t p0,
                              int64_t p1, int64_t C, int64_t HW) {
  // (n, c) of the first plane, then stepped (no division per plane)
  int64_t n = idx::plane_sample(p0, C), c = idx::plane_channel(p0, C);
  for (int64_t pl = p0; pl < p1; ++pl, c = (c + 1 == C) ? 0 : c + 1, n += (c == 0)) {
    const T v = dp[idx::pooled_offset(n, c, C)];
    T* __restrict__ dst = out + idx::nchw_offset(n, c, 0, C, HW);
#pragma omp simd
    for (int64_t i = 0; i < HW; ++i) dst[i] = v;
  }
}

template <typename T>
DER_CLONES void expand_rows(const T* __restrict__ dp, T* __restrict__ out, int64_t r0, int64_t r1,
                            int64_t C, int64_t HW) {
  int64_t n = idx::pixel_row_sample(r0, HW), p = r0 - n * HW;
  for (int64_t row = r0; row < r1; ++row, p = (p + 1 == HW) ? 0 : p + 1, n += (p == 0)) {
    const T* __restrict__ src = dp + idx::pooled_offset(n, 0, C);
    T* __restrict__ dst = out + idx::nhwc_offset(n, 0, p, C, HW);
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) dst[c] = src[c];
  }
}

void pool_cpu(const at::Tensor& f, at::Tensor& features, int64_t off) {
  const int64_t N = f.size(0), C = f.size(1), HW = hw_of(f), D = features.size(1);
  const bool cl = use_channels_last(f);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, f.scalar_type(), "pool_cpu", [&] {
    using T = scalar_t;
    const T* x = f.const_data_ptr<T>();
    T* out = features.mutable_data_ptr<T>();
    if (cl) {
      const int64_t grain = std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, C * HW));
      at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
        std::vector<acc_t<T>> s(C);
        pool_rows<T>(x, out, s.data(), n0, n1, C, HW, D, off);
      });
    } else {
      const int64_t grain = std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, HW));
      at::parallel_for(0, N * C, grain, [&](int64_t p0, int64_t p1) {
        pool_planes<T>(x, out, p0, p1, C, HW, D, off);
      });
    }
  });
}

void expand_cpu(const at::Tensor& dp, at::Tensor& out) {
  const int64_t N = out.size(0), C = out.size(1), HW = hw_of(out);
  const bool cl = use_channels_last(out);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "expand_cpu", [&] {
    using T = scalar_t;
    const T* d = dp.const_data_ptr<T>();
    T* o = out.mutable_data_ptr<T>();
    if (cl) {
      const int64_t grain = std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, C));
      at::parallel_for(0, N * HW, grain,
                       [&](int64_t r0, int64_t r1) { expand_rows<T>(d, o, r0, r1, C, HW); });
    } else {
      const int64_t grain = std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, HW));
      at::parallel_for(0, N * C, grain,
                       [&](int64_t p0, int64_t p1) { expand_planes<T>(d, o, p0, p1, C, HW); });
    }
  });
}

const HeadKernels kCpuKernels{&pool_cpu, &expand_cpu};

std::tuple<at::Tensor, at::Tensor, at::Tensor> head_cpu(
    at::TensorList feats, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& aux_weight, const std::optional<at::Tensor>& aux_bias) {
  return head_forward(feats, weight, bias, aux_weight, aux_bias, kCpuKernels);
}

std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
head_backward_cpu(const std::optional<at::Tensor>& grad_logits,
                  const std::optional<at::Tensor>& grad_aux,
                  const std::optional<at::Tensor>& grad_features, const at::Tensor& features,
                  const at::Tensor& weight, const std::optional<at::Tensor>& aux_weight,
                  const c10::List<std::optional<at::Tensor>>& feats, at::IntArrayRef widths,
                  std::array<bool, 4> mask) {
  return head_backward(grad_logits, grad_aux, grad_features, features, weight, aux_weight, feats,
                       widths, mask, kCpuKernels);
}

}  // namespace

TORCH_LIBRARY_IMPL(der_fast, CPU, m) {
  m.impl("concat_linear_head", &head_cpu);
  m.impl("concat_linear_head_backward", &head_backward_cpu);
}

}  // namespace der_fast
