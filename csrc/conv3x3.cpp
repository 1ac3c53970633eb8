// der_fast::conv3x3_bordered: an inference-only direct 3x3 / stride 1 or 2 / padding 1 convolution
// for narrow layers (the frozen, pruned extractors of DER), CPU, float32:
//
//   y = g[c] * act(conv3x3(x, w) + bias[c] (+ residual))      act = ReLU or identity
//
// on zero-bordered planes (see csrc/conv3x3_body.h): x [N, Cin, H+2, W+2] with zero borders,
// residual and y [N, Cout, H+2, W+2], the output's border written as 0, so layers chain without
// any padding copy. oneDNN's convolution is tuned for wide layers; with a handful of channels per
// layer (5-20 after pruning) it reaches ~25-55 GFLOP/s on one core of the CI Xeon, this kernel
// ~80-95 (benchmarks/bench_conv.py). No autograd: FastDERNet calls it for frozen extractors only.
//
// The kernel is compiled for AVX-512, AVX2+FMA and baseline x86-64 and picked at run time.
// Multiply-adds are contracted (FMA) in this file only: a conv's summation order differs from
// oneDNN's anyway; the tests compare it with a float64 convolution.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "common.h"

namespace der_fast {
namespace {

typedef float v16 __attribute__((vector_size(64), aligned(4)));

#pragma GCC push_options
#pragma GCC optimize("fp-contract=fast")

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define DER_CONV_MULTI 1
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512dq,avx2,fma")
namespace isa_avx512 {
constexpr int kRegs = 32;
#include "conv3x3_body.h"
}
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace isa_avx2 {
constexpr int kRegs = 16;
#include "conv3x3_body.h"
}
#pragma GCC pop_options
#endif
namespace isa_base {
constexpr int kRegs = 16;
#include "conv3x3_body.h"
}
#pragma GCC pop_options

using ConvFn = void (*)(const float*, int64_t, int64_t, int64_t, int64_t, int64_t, const float*,
                        const float*, const float*, const float*, const float*, float*, int64_t,
                        bool, int);
using ConvS2Fn = void (*)(const float*, const float*, int64_t, int64_t, int64_t, int64_t, int64_t,
                          const float*, const float*, const float*, const float*, float*, int64_t,
                          int64_t, int64_t, bool);
struct Kernels {
  ConvFn s1;
  ConvS2Fn s2;
};

// The best instruction set the CPU has; DER_FAST_CONV_ISA=avx2|baseline caps it (the tests
// use it to run the other variants on an AVX-512 machine).
Kernels pick_isa(int64_t* level) {
  const char* cap_env = std::getenv("DER_FAST_CONV_ISA");
  const std::string cap = cap_env ? cap_env : "";
#ifdef DER_CONV_MULTI
  __builtin_cpu_init();
  if (cap != "avx2" && cap != "baseline" && __builtin_cpu_supports("avx512f") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
    *level = 2;
    return {&isa_avx512::conv_images, &isa_avx512::conv_images_s2};
  }
  if (cap != "baseline" && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    *level = 1;
    return {&isa_avx2::conv_images, &isa_avx2::conv_images_s2};
  }
#endif
  *level = 0;
  return {&isa_base::conv_images, &isa_base::conv_images_s2};
}

int64_t g_isa_level = -1;  // 0 baseline, 1 avx2, 2 avx512
const Kernels g_kernels = pick_isa(&g_isa_level);

at::Tensor conv3x3_bordered_cpu(const at::Tensor& x, const at::Tensor& weight,
                                const at::Tensor& bias, const c10::optional<at::Tensor>& residual,
                                const c10::optional<at::Tensor>& gate, bool relu,
                                int64_t stride) {
  TORCH_CHECK(x.dim() == 4, "conv3x3_bordered: x must be [N, C_in, H + 2, W + 2], got ",
              x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat, "conv3x3_bordered: only float32 is supported, got ",
              x.scalar_type());
  TORCH_CHECK(x.size(2) >= 3 && x.size(3) >= 3,
              "conv3x3_bordered: each plane needs a 1-pixel zero border around at least 1x1 "
              "pixels, got planes of ", x.size(2), "x", x.size(3));
  TORCH_CHECK(weight.dim() == 4 && weight.size(1) == x.size(1) && weight.size(2) == 3 &&
                  weight.size(3) == 3,
              "conv3x3_bordered: weight must be [C_out, ", x.size(1), ", 3, 3], got ",
              weight.sizes());
  TORCH_CHECK(weight.size(0) >= 1, "conv3x3_bordered: weight has no output channels");
  TORCH_CHECK(stride == 1 || stride == 2, "conv3x3_bordered: stride must be 1 or 2, got ",
              stride);
  const int64_t N = x.size(0), Cin = x.size(1), Hp = x.size(2), Wp = x.size(3);
  const int64_t Cout = weight.size(0);
  // output planes (bordered): H_out = (H - 1) / stride + 1 for padding 1
  const int64_t Ho = (Hp - 3) / stride + 1, Wo = (Wp - 3) / stride + 1;
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == Cout, "conv3x3_bordered: bias must be [",
              Cout, "], got ", bias.sizes());
  for (const at::Tensor* t : {&weight, &bias}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->device() == x.device(),
                "conv3x3_bordered: weight and bias must be float32 on ", x.device());
  }
  TORCH_CHECK(x.device().is_cpu(), "conv3x3_bordered: CPU tensors only, got ", x.device());
  if (residual.has_value()) {
    TORCH_CHECK(residual->sizes() == at::IntArrayRef({N, Cout, Ho + 2, Wo + 2}),
                "conv3x3_bordered: residual must be [", N, ", ", Cout, ", ", Ho + 2, ", ",
                Wo + 2, "], got ", residual->sizes());
    TORCH_CHECK(residual->scalar_type() == at::kFloat && residual->device() == x.device(),
                "conv3x3_bordered: residual must be float32 on ", x.device());
  }
  if (gate.has_value()) {
    TORCH_CHECK(gate->dim() == 1 && gate->size(0) == Cout &&
                    gate->scalar_type() == at::kFloat && gate->device() == x.device(),
                "conv3x3_bordered: gate must be a float32 [", Cout, "] tensor on ", x.device());
  }
  const at::Tensor xc = x.contiguous();
  const at::Tensor wc = weight.contiguous();
  const at::Tensor bc = bias.contiguous();
  at::Tensor rc, gc;
  if (residual.has_value()) rc = residual->contiguous();
  if (gate.has_value()) gc = gate->contiguous();
  if (stride == 2) {
    at::Tensor y = at::zeros({N, Cout, Ho + 2, Wo + 2}, x.options());
    if (N == 0) return y;
    const float* xp = xc.data_ptr<float>();
    const float* x_end = xp + xc.numel();
    const float* wp = wc.data_ptr<float>();
    const float* bp = bc.data_ptr<float>();
    const float* rp = rc.defined() ? rc.data_ptr<float>() : nullptr;
    const float* gp = gc.defined() ? gc.data_ptr<float>() : nullptr;
    float* yp = y.data_ptr<float>();
    at::parallel_for(0, N, 1, [&](int64_t n0, int64_t n1) {
      g_kernels.s2(xp, x_end, n0, n1, Cin, Hp, Wp, wp, bp, rp, gp, yp, Cout, Ho, Wo, relu);
    });
    return y;
  }
  at::Tensor y = at::empty({N, Cout, Hp, Wp}, x.options());
  if (N == 0) return y;
  const int64_t P = Hp * Wp;
  const int64_t H = Hp - 2, W = Wp - 2;
  // 1 inside the image, 0 on the border columns; 16 floats of slack so that full vector loads
  // near the end of a plane stay inside the buffer
  std::vector<float> colmask(P + 16, 0.f);
  for (int64_t h = 1; h <= H; ++h)
    for (int64_t w = 1; w <= W; ++w) colmask[h * Wp + w] = 1.f;
  const int64_t span = H * Wp - 2;  // interior positions computed per plane
  const int V = (W >= 16 && span >= 32) ? 2 : 1;
  const float* xp = xc.data_ptr<float>();
  const float* wp = wc.data_ptr<float>();
  const float* bp = bc.data_ptr<float>();
  const float* rp = rc.defined() ? rc.data_ptr<float>() : nullptr;
  const float* gp = gc.defined() ? gc.data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  if (span < 16 * V) {
    // planes too small for one vector run (W + 2 < 9 or so): plain scalar loops
    at::parallel_for(0, N * Cout, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t n = i / Cout, c = i % Cout;
        float* yc = yp + i * P;
        const float* xn = xp + n * Cin * P;
        for (int64_t p = 0; p < P; ++p) {
          if (colmask[p] == 0.f) {
            yc[p] = 0.f;
            continue;
          }
          float acc = bp[c];
          for (int64_t ci = 0; ci < Cin; ++ci)
            for (int kh = 0; kh < 3; ++kh)
              for (int kw = 0; kw < 3; ++kw)
                acc += wp[(c * Cin + ci) * 9 + kh * 3 + kw] *
                       xn[ci * P + p + (kh - 1) * Wp + (kw - 1)];
          if (rp) acc += rp[i * P + p];
          if (relu) acc = acc > 0.f ? acc : 0.f;
          if (gp) acc *= gp[c];
          yc[p] = acc;
        }
      }
    });
    return y;
  }
  at::parallel_for(0, N, 1, [&](int64_t n0, int64_t n1) {
    // the first and last border rows (the vector runs cover everything in between)
    for (int64_t n = n0; n < n1; ++n) {
      for (int64_t c = 0; c < Cout; ++c) {
        float* yc = yp + (n * Cout + c) * P;
        std::memset(yc, 0, sizeof(float) * (Wp + 1));
        std::memset(yc + (Hp - 1) * Wp - 1, 0, sizeof(float) * (Wp + 1));
      }
    }
    g_kernels.s1(xp, n0, n1, Cin, Hp, Wp, wp, bp, rp, gp, colmask.data(), yp, Cout, relu, V);
  });
  return y;
}

int64_t conv3x3_isa() { return g_isa_level; }

}  // namespace

TORCH_LIBRARY_IMPL(der_fast, CPU, m) { m.impl("conv3x3_bordered", &conv3x3_bordered_cpu); }

// Which variant of the kernel runs (0 baseline x86-64, 1 AVX2+FMA, 2 AVX-512): for tests and
// der_fast.info. Not in ops.SCHEMAS: it exists only with the compiled extension.
TORCH_LIBRARY_FRAGMENT(der_fast, m) { m.def("conv3x3_isa() -> int", &conv3x3_isa); }

}  // namespace der_fast
