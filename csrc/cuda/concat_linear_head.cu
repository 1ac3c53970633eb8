// der_fast._C_cuda: CUDA implementation of der_fast::concat_linear_head (+ backward).
//
// The orchestration (argument checks, GEMMs through cuBLAS via at::addmm / at::mm, which
// feature maps get a gradient) is shared with the CPU build (../concat_linear_head.h); only
// the pooling and broadcast kernels are here. Their index arithmetic is in ../index_math.h,
// the same functions the CPU kernels use (and the CPU tests exercise).
//
// Deliberately lean includes to keep nvcc compile time low and the toolkit requirements small:
// no torch/extension.h (pybind11 + all of torch: minutes per file), and no
// ATen/cuda/CUDAContext.h either (it pulls in cuBLAS/cuSPARSE/cuSOLVER headers, which a
// minimal toolkit such as nvcc + cudart from pip does not have); the stream comes from
// c10/cuda/CUDAStream.h and the GEMMs go through at::addmm / at::mm (cuBLAS inside torch).
#include <Python.h>
#include <ATen/ATen.h>
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../concat_linear_head.h"
#include "../index_math.h"

extern "C" {
PyObject* PyInit__C_cuda(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C_cuda",
      "der_fast CUDA ops; registers CUDA kernels for the der_fast:: operators", -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace der_fast {
namespace {

constexpr int kThreads = 256;
constexpr int kWarp = 32;

inline unsigned int grid_for(int64_t work, int64_t per_block) {
  int64_t b = idx::ceil_div(work, per_block);
  const int64_t cap = 65535LL * 32;  // grid-stride loops cover the rest
  return static_cast<unsigned int>(b < 1 ? 1 : (b > cap ? cap : b));
}

// NCHW, large planes: one warp per (n, c) plane, warp-shuffle reduction.
template <typename T, typename A>
__global__ void pool_planes_warp_kernel(const T* __restrict__ x, T* __restrict__ feat,
                                        int64_t planes, int64_t C, int64_t HW, int64_t D,
                                        int64_t off) {
  const int lane = threadIdx.x % kWarp;
  const int64_t warps_per_grid = (int64_t)gridDim.x * (blockDim.x / kWarp);
  for (int64_t pl = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) / kWarp; pl < planes;
       pl += warps_per_grid) {
    const int64_t n = idx::plane_sample(pl, C), c = idx::plane_channel(pl, C);
    const T* src = x + idx::nchw_offset(n, c, 0, C, HW);
    A s = A(0);
    for (int64_t p = lane; p < HW; p += kWarp) s += static_cast<A>(src[p]);
#pragma unroll
    for (int o = kWarp / 2; o > 0; o >>= 1) s += __shfl_down_sync(0xffffffffu, s, o);
    if (lane == 0) feat[idx::feature_offset(n, off, c, D)] = static_cast<T>(s / static_cast<A>(HW));
  }
}

// NHWC (channels_last) or small planes: one thread per (n, c) output.
template <typename T, typename A, bool CL>
__global__ void pool_thread_kernel(const T* __restrict__ x, T* __restrict__ feat, int64_t N,
                                   int64_t C, int64_t HW, int64_t D, int64_t off) {
  const int64_t total = N * C;
  for (int64_t o = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; o < total;
       o += (int64_t)gridDim.x * blockDim.x) {
    const int64_t n = idx::plane_sample(o, C), c = idx::plane_channel(o, C);
    A s = A(0);
    for (int64_t p = 0; p < HW; ++p)
      s += static_cast<A>(x[CL ? idx::nhwc_offset(n, c, p, C, HW) : idx::nchw_offset(n, c, p, C, HW)]);
    feat[idx::feature_offset(n, off, c, D)] = static_cast<T>(s / static_cast<A>(HW));
  }
}

// out[n, c, p] = dp[n, c], one thread per output element (grid-stride)
template <typename T, bool CL>
__global__ void expand_kernel(const T* __restrict__ dp, T* __restrict__ out, int64_t total,
                              int64_t C, int64_t HW) {
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total;
       i += (int64_t)gridDim.x * blockDim.x) {
    int64_t src;
    if (CL) {
      src = idx::pooled_offset(idx::nhwc_sample_of(i, C, HW), idx::nhwc_channel_of(i, C), C);
    } else {
      const int64_t pl = idx::nchw_plane_of(i, HW);
      src = idx::pooled_offset(idx::plane_sample(pl, C), idx::plane_channel(pl, C), C);
    }
    out[i] = dp[src];
  }
}

void pool_cuda(const at::Tensor& f, at::Tensor& features, int64_t off) {
  const int64_t N = f.size(0), C = f.size(1), HW = hw_of(f), D = features.size(1);
  const bool cl = use_channels_last(f);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, f.scalar_type(), "pool_cuda", [&] {
    using T = scalar_t;
    using A = at::acc_type<T, /*is_cuda=*/true>;
    const T* x = f.const_data_ptr<T>();
    T* out = features.mutable_data_ptr<T>();
    if (cl) {
      pool_thread_kernel<T, A, true><<<grid_for(N * C, kThreads), kThreads, 0, stream>>>(
          x, out, N, C, HW, D, off);
    } else if (HW < kWarp) {
      pool_thread_kernel<T, A, false><<<grid_for(N * C, kThreads), kThreads, 0, stream>>>(
          x, out, N, C, HW, D, off);
    } else {
      pool_planes_warp_kernel<T, A><<<grid_for(N * C, kThreads / kWarp), kThreads, 0, stream>>>(
          x, out, N * C, C, HW, D, off);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void expand_cuda(const at::Tensor& dp, at::Tensor& out) {
  const int64_t C = out.size(1), HW = hw_of(out), total = out.numel();
  const bool cl = use_channels_last(out);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, out.scalar_type(), "expand_cuda", [&] {
    using T = scalar_t;
    const T* d = dp.const_data_ptr<T>();
    T* o = out.mutable_data_ptr<T>();
    if (cl)
      expand_kernel<T, true><<<grid_for(total, kThreads), kThreads, 0, stream>>>(d, o, total, C, HW);
    else
      expand_kernel<T, false><<<grid_for(total, kThreads), kThreads, 0, stream>>>(d, o, total, C, HW);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

const HeadKernels kCudaKernels{&pool_cuda, &expand_cuda};

std::tuple<at::Tensor, at::Tensor, at::Tensor> head_cuda(
    at::TensorList feats, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& aux_weight, const std::optional<at::Tensor>& aux_bias) {
  check_head(feats, weight, bias, aux_weight, aux_bias);  // before the guard: clear device errors
  const c10::cuda::CUDAGuard guard(feats[0].device());
  return head_forward(feats, weight, bias, aux_weight, aux_bias, kCudaKernels);
}

std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
head_backward_cuda(const std::optional<at::Tensor>& grad_logits,
                   const std::optional<at::Tensor>& grad_aux,
                   const std::optional<at::Tensor>& grad_features, const at::Tensor& features,
                   const at::Tensor& weight, const std::optional<at::Tensor>& aux_weight,
                   const c10::List<std::optional<at::Tensor>>& feats, at::IntArrayRef widths,
                   std::array<bool, 4> mask) {
  const c10::cuda::CUDAGuard guard(features.device());
  return head_backward(grad_logits, grad_aux, grad_features, features, weight, aux_weight, feats,
                       widths, mask, kCudaKernels);
}

}  // namespace

TORCH_LIBRARY_IMPL(der_fast, CUDA, m) {
  m.impl("concat_linear_head", &head_cuda);
  m.impl("concat_linear_head_backward", &head_backward_cuda);
}

}  // namespace der_fast
