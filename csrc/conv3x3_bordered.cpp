// der_fast::conv3x3_bordered: an inference-only direct 3x3 / stride 1 or 2 / padding 1 convolution
// for narrow layers (the frozen, pruned extractors of DER), CPU, float32:
//
//   y = g[c] * act(conv3x3(x, w) + bias[c] (+ residual))      act = ReLU or identity
//
// on zero-bordered planes (see csrc/conv3x3_body.h): x [N, Cin, H+2, W+2] with zero borders,
// residual and y [N, Cout, H+2, W+2], the output's border written as 0, so layers chain without
// any padding copy. oneDNN's convolution is tuned for wide layers; with a handful of channels per
// layer (5-20 after pruning) it reaches ~25-55 GFLOP/s on one core of the CI Xeon, this kernel
// ~80-95 (benchmarks/bench_conv3x3_bordered.py). No autograd: FastDERNet calls it for frozen
// extractors only.
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

// One conv on raw bordered planes, images [0, N) (single-threaded: callers split the batch).
// x [N, Cin, Hp, Wp] with zero borders; r (may be null) and y [N, Cout, Ho + 2, Wo + 2].
void conv_raw(const float* xp, int64_t N, int64_t Cin, int64_t Hp, int64_t Wp, const float* wp,
              const float* bp, const float* rp, const float* gp, float* yp, int64_t Cout,
              bool relu, int64_t stride) {
  if (N == 0) return;
  if (stride == 2) {
    const int64_t Ho = (Hp - 3) / 2 + 1, Wo = (Wp - 3) / 2 + 1;
    std::memset(yp, 0, sizeof(float) * N * Cout * (Ho + 2) * (Wo + 2));
    g_kernels.s2(xp, xp + N * Cin * Hp * Wp, 0, N, Cin, Hp, Wp, wp, bp, rp, gp, yp, Cout, Ho,
                 Wo, relu);
    return;
  }
  const int64_t P = Hp * Wp;
  const int64_t H = Hp - 2, W = Wp - 2;
  // 1 inside the image, 0 on the border columns; 16 floats of slack so that full vector loads
  // near the end of a plane stay inside the buffer
  std::vector<float> colmask(P + 16, 0.f);
  for (int64_t h = 1; h <= H; ++h)
    for (int64_t w = 1; w <= W; ++w) colmask[h * Wp + w] = 1.f;
  const int64_t span = H * Wp - 2;  // interior positions computed per plane
  const int V = (W >= 16 && span >= 32) ? 2 : 1;
  if (span < 16 * V) {
    // planes too small for one vector run (W + 2 < 9 or so): plain scalar loops
    for (int64_t i = 0; i < N * Cout; ++i) {
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
    return;
  }
  // the first and last border rows (the vector runs cover everything in between)
  for (int64_t i = 0; i < N * Cout; ++i) {
    float* yc = yp + i * P;
    std::memset(yc, 0, sizeof(float) * (Wp + 1));
    std::memset(yc + (Hp - 1) * Wp - 1, 0, sizeof(float) * (Wp + 1));
  }
  g_kernels.s1(xp, 0, N, Cin, Hp, Wp, wp, bp, rp, gp, colmask.data(), yp, Cout, relu, V);
}

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
  const float* xp = xc.data_ptr<float>();
  const float* wp = wc.data_ptr<float>();
  const float* bp = bc.data_ptr<float>();
  const float* rp = rc.defined() ? rc.data_ptr<float>() : nullptr;
  const float* gp = gc.defined() ? gc.data_ptr<float>() : nullptr;
  at::Tensor y = at::empty({N, Cout, Ho + 2, Wo + 2}, x.options());
  float* yp = y.data_ptr<float>();
  const int64_t xs = Cin * Hp * Wp, ys = Cout * (Ho + 2) * (Wo + 2);
  at::parallel_for(0, N, 1, [&](int64_t n0, int64_t n1) {
    conv_raw(xp + n0 * xs, n1 - n0, Cin, Hp, Wp, wp, bp, rp ? rp + n0 * ys : nullptr, gp,
             yp + n0 * ys, Cout, relu, stride);
  });
  return y;
}

// ---- bordered_resnet: a whole folded extractor in one call -------------------------------
// The frozen path's network (stem [+ max-pool], residual blocks, global average pool) run
// chunk by chunk: each chunk's activations live in four reused buffers that stay in the L2
// cache, and no per-layer tensors, padding copies or dispatcher calls are made. The same
// kernels as conv3x3_bordered (so the same numbers); convs flagged "not direct" run
// at::conv2d on the bordered buffers, exactly as der_fast/fast/run_bordered.py's Python executor does.
struct ConvSpec {
  const float* w;  // NCHW contiguous (direct) ...
  at::Tensor wt;   // ... or the tensor for at::conv2d
  const float* b;
  at::Tensor bt;
  int64_t cout, cin, k, stride, pad, groups;
  bool direct;
};

// y (bordered, [n, cout, Ho+2, Wo+2]) = gate * act(z + r) from an unbordered z [n, cout, Ho, Wo]
void bordered_epilogue(const at::Tensor& zin, const float* rp, const float* gp, bool relu,
                       float* yp) {
  const at::Tensor z = zin.contiguous();
  const int64_t n = z.size(0), C = z.size(1), Ho = z.size(2), Wo = z.size(3);
  const int64_t Wpo = Wo + 2, Po = (Ho + 2) * Wpo;
  const float* zp = z.data_ptr<float>();
  std::memset(yp, 0, sizeof(float) * n * C * Po);
  for (int64_t i = 0; i < n * C; ++i) {
    const float g = gp ? gp[i % C] : 1.f;
    for (int64_t h = 0; h < Ho; ++h) {
      const float* zr = zp + (i * Ho + h) * Wo;
      const int64_t o = i * Po + (h + 1) * Wpo + 1;
      for (int64_t w = 0; w < Wo; ++w) {
        float v = zr[w];
        if (rp) v += rp[o + w];
        if (relu) v = (v < 0.f) ? 0.f : v;  // NaN stays NaN, as in torch.relu
        if (gp) v *= g;
        yp[o + w] = v;
      }
    }
  }
}

// Output size of a conv on an H x W image.
inline int64_t conv_out(int64_t h, const ConvSpec& c) { return (h + 2 * c.pad - c.k) / c.stride + 1; }

void run_conv(const ConvSpec& c, const float* x, int64_t n, int64_t Hp, int64_t Wp,
              const float* r, const float* g, bool relu, float* y) {
  if (c.direct) {
    conv_raw(x, n, c.cin, Hp, Wp, c.w, c.b, r, g, y, c.cout, relu, c.stride);
    return;
  }
  const at::Tensor xb = at::from_blob(const_cast<float*>(x), {n, c.cin, Hp, Wp},
                                      at::TensorOptions().dtype(at::kFloat));
  const std::vector<int64_t> st{c.stride, c.stride}, one{1, 1};
  at::Tensor z;
  if (c.pad >= 1) {
    const std::vector<int64_t> pd{c.pad - 1, c.pad - 1};
    z = at::conv2d(xb, c.wt, c.bt, st, pd, one, c.groups);
  } else {
    const std::vector<int64_t> pd{0, 0};
    z = at::conv2d(xb.slice(2, 1, Hp - 1).slice(3, 1, Wp - 1), c.wt, c.bt, st, pd, one,
                   c.groups);
  }
  bordered_epilogue(z, r, g, relu, y);
}

at::Tensor bordered_resnet_cpu(const at::Tensor& x, at::TensorList weights,
                               at::TensorList biases, at::IntArrayRef conv_meta,
                               at::IntArrayRef block_meta, at::TensorList sc_index,
                               at::TensorList gates, const c10::optional<at::Tensor>& out_index,
                               int64_t out_dim, bool maxpool, int64_t chunk) {
  const char* op = "bordered_resnet";
  TORCH_CHECK(x.dim() == 4 && x.scalar_type() == at::kFloat && x.device().is_cpu(), op,
              ": x must be a float32 CPU tensor [N, C, H, W], got ", x.sizes(), " ",
              x.scalar_type(), " on ", x.device());
  const int64_t nconv = static_cast<int64_t>(weights.size());
  const int64_t nblock = static_cast<int64_t>(block_meta.size()) / 2;
  TORCH_CHECK(nconv >= 1 && static_cast<int64_t>(biases.size()) == nconv &&
                  static_cast<int64_t>(conv_meta.size()) == 4 * nconv &&
                  static_cast<int64_t>(block_meta.size()) == 2 * nblock &&
                  static_cast<int64_t>(sc_index.size()) == nblock &&
                  static_cast<int64_t>(gates.size()) == nblock,
              op, ": inconsistent program (", nconv, " weights, ", biases.size(), " biases, ",
              conv_meta.size(), " conv ints, ", block_meta.size(), " block ints)");
  std::vector<ConvSpec> convs(nconv);
  for (int64_t i = 0; i < nconv; ++i) {
    const at::Tensor& w = weights[i];
    const at::Tensor& b = biases[i];
    ConvSpec& c = convs[i];
    TORCH_CHECK(w.dim() == 4 && w.scalar_type() == at::kFloat && w.device().is_cpu() &&
                    b.dim() == 1 && b.size(0) == w.size(0) && b.scalar_type() == at::kFloat,
                op, ": conv ", i, ": bad weight ", w.sizes(), " / bias ", b.sizes());
    c.stride = conv_meta[4 * i];
    c.pad = conv_meta[4 * i + 1];
    c.groups = conv_meta[4 * i + 2];
    c.direct = conv_meta[4 * i + 3] != 0;
    c.cout = w.size(0);
    c.cin = w.size(1) * c.groups;
    c.k = w.size(2);
    TORCH_CHECK(c.stride >= 1 && c.pad >= 0 && c.groups >= 1 && w.size(3) == c.k, op,
                ": conv ", i, ": bad meta");
    if (c.direct) {
      TORCH_CHECK(c.k == 3 && c.pad == 1 && c.groups == 1 && (c.stride == 1 || c.stride == 2),
                  op, ": conv ", i, " is not a 3x3 / padding 1 / stride 1 or 2 conv");
      c.wt = w.contiguous();
      c.w = c.wt.data_ptr<float>();
    } else {
      c.wt = w;
    }
    c.bt = b.contiguous();
    c.b = c.bt.data_ptr<float>();
  }
  // walk the program once: shapes and buffer sizes per image
  int64_t ci = x.size(1), h = x.size(2), w = x.size(3);
  TORCH_CHECK(convs[0].cin == ci, op, ": the stem expects ", convs[0].cin, " channels, x has ",
              ci);
  int64_t widest = (h + 2) * (w + 2) * ci;
  auto step = [&](const ConvSpec& c, int64_t cin) {
    TORCH_CHECK(c.cin == cin, op, ": a conv expects ", c.cin, " input channels, gets ", cin);
    h = conv_out(h, c);
    w = conv_out(w, c);
    TORCH_CHECK(h >= 1 && w >= 1, op, ": the input is too small for this network");
    widest = std::max(widest, (h + 2) * (w + 2) * c.cout);
  };
  step(convs[0], ci);
  ci = convs[0].cout;
  if (maxpool) {
    h = (h - 1) / 2 + 1;
    w = (w - 1) / 2 + 1;
  }
  std::vector<int64_t> first(nblock);
  std::vector<const float*> gate_p(nblock, nullptr);
  std::vector<at::Tensor> gate_c(nblock), idx_c(nblock);
  int64_t k = 1;
  for (int64_t bi = 0; bi < nblock; ++bi) {
    first[bi] = k;
    const int64_t kind = block_meta[2 * bi];
    TORCH_CHECK(kind >= 0 && kind <= 2, op, ": block ", bi, ": bad shortcut kind ", kind);
    TORCH_CHECK(k + 2 + (kind == 2) <= nconv, op, ": the program has too few convs");
    const int64_t h0 = h, w0 = w, c0 = ci;
    step(convs[k], c0);
    const int64_t hh = h, ww = w;
    step(convs[k + 1], convs[k].cout);
    TORCH_CHECK(h == hh && w == ww, op, ": block ", bi, ": conv2 must keep the size");
    const int64_t co = convs[k + 1].cout;
    if (kind == 0) {
      TORCH_CHECK(co == c0 && h == h0 && w == w0, op, ": block ", bi,
                  ": an identity shortcut needs equal shapes");
    } else if (kind == 1) {
      const at::Tensor& idx = sc_index[bi];
      const int64_t s = block_meta[2 * bi + 1];
      TORCH_CHECK(s >= 1 && (h0 - 1) / s + 1 == h && (w0 - 1) / s + 1 == w, op, ": block ", bi,
                  ": bad option-A stride");
      TORCH_CHECK(idx.dim() == 1 && idx.size(0) == co && idx.scalar_type() == at::kLong, op,
                  ": block ", bi, ": sc_index must be int64 [", co, "]");
      idx_c[bi] = idx.contiguous();
      const int64_t* ip = idx_c[bi].data_ptr<int64_t>();
      for (int64_t j = 0; j < co; ++j)
        TORCH_CHECK(ip[j] >= 0 && ip[j] <= c0, op, ": block ", bi, ": sc_index out of range");
    } else {
      const int64_t hs = h, ws = w;
      h = h0;
      w = w0;
      step(convs[k + 2], c0);
      TORCH_CHECK(h == hs && w == ws && convs[k + 2].cout == co, op, ": block ", bi,
                  ": the shortcut conv's output does not match the block's");
    }
    if (gates[bi].numel() > 0) {
      TORCH_CHECK(gates[bi].dim() == 1 && gates[bi].size(0) == co &&
                      gates[bi].scalar_type() == at::kFloat, op, ": block ", bi, ": bad gate");
      gate_c[bi] = gates[bi].contiguous();
      gate_p[bi] = gate_c[bi].data_ptr<float>();
    }
    ci = co;
    k += 2 + (kind == 2);
  }
  TORCH_CHECK(k == nconv, op, ": the program has ", nconv - k, " unused convs");
  const int64_t C_last = ci, hw_last = h * w;
  at::Tensor oi;
  if (out_index.has_value()) {
    oi = out_index->contiguous();
    TORCH_CHECK(oi.dim() == 1 && oi.size(0) == out_dim && oi.scalar_type() == at::kLong, op,
                ": out_index must be int64 [", out_dim, "]");
    const int64_t* op_ = oi.data_ptr<int64_t>();
    for (int64_t j = 0; j < out_dim; ++j)
      TORCH_CHECK(op_[j] >= 0 && op_[j] <= C_last, op, ": out_index out of range");
  } else {
    TORCH_CHECK(out_dim == C_last, op, ": out_dim ", out_dim, " != the last width ", C_last);
  }
  const int64_t N = x.size(0);
  at::Tensor out = at::empty({N, out_dim}, x.options());
  if (N == 0) return out;
  const at::Tensor xc = x.contiguous();
  const float* xp = xc.data_ptr<float>();
  float* outp = out.data_ptr<float>();
  const int64_t* oip = oi.defined() ? oi.data_ptr<int64_t>() : nullptr;
  const int64_t C0 = x.size(1), H0 = x.size(2), W0 = x.size(3);
  chunk = (chunk <= 0 || chunk > N) ? N : chunk;
  const int64_t nchunks = (N + chunk - 1) / chunk;
  at::parallel_for(0, nchunks, 1, [&](int64_t q0, int64_t q1) {
    // four activation buffers, reused for every layer of every chunk of this thread (a tensor,
    // so that PyTorch's memory accounting and profiler see it)
    const int64_t cap = widest * chunk;
    at::Tensor bufs = at::empty({4 * cap}, at::TensorOptions().dtype(at::kFloat));
    float* B[4] = {bufs.data_ptr<float>(), bufs.data_ptr<float>() + cap,
                   bufs.data_ptr<float>() + 2 * cap, bufs.data_ptr<float>() + 3 * cap};
    std::vector<double> pooled(C_last);
    for (int64_t q = q0; q < q1; ++q) {
      const int64_t n0 = q * chunk, n = std::min(chunk, N - n0);
      // the input, bordered
      int64_t Hp = H0 + 2, Wp = W0 + 2;
      float* cur = B[0];
      std::memset(cur, 0, sizeof(float) * n * C0 * Hp * Wp);
      for (int64_t i = 0; i < n * C0; ++i)
        for (int64_t r = 0; r < H0; ++r)
          std::memcpy(cur + i * Hp * Wp + (r + 1) * Wp + 1, xp + (n0 * C0 + i) * H0 * W0 + r * W0,
                      sizeof(float) * W0);
      float* nxt = B[1];
      run_conv(convs[0], cur, n, Hp, Wp, nullptr, nullptr, true, nxt);
      std::swap(cur, nxt);
      int64_t C = convs[0].cout;
      Hp = conv_out(Hp - 2, convs[0]) + 2;
      Wp = conv_out(Wp - 2, convs[0]) + 2;
      if (maxpool) {
        const at::Tensor yb = at::from_blob(cur, {n, C, Hp, Wp}, at::TensorOptions().dtype(at::kFloat));
        const std::vector<int64_t> k3{3, 3}, s2{2, 2}, p1{1, 1}, d1{1, 1};
        const at::Tensor m =
            at::max_pool2d(yb.slice(2, 1, Hp - 1).slice(3, 1, Wp - 1), k3, s2, p1, d1)
                .contiguous();
        bordered_epilogue(m, nullptr, nullptr, false, nxt);
        std::swap(cur, nxt);
        Hp = m.size(2) + 2;
        Wp = m.size(3) + 2;
      }
      for (int64_t bi = 0; bi < nblock; ++bi) {
        const ConvSpec& c1 = convs[first[bi]];
        const ConvSpec& c2 = convs[first[bi] + 1];
        const int64_t kind = block_meta[2 * bi];
        const int64_t Ho = conv_out(Hp - 2, c1), Wo = conv_out(Wp - 2, c1);
        const int64_t Hpo = Ho + 2, Wpo = Wo + 2, Po = Hpo * Wpo;
        float* hb = B[2];
        float* rb = B[3];
        run_conv(c1, cur, n, Hp, Wp, nullptr, nullptr, true, hb);
        const float* r = cur;
        if (kind == 2) {
          run_conv(convs[first[bi] + 2], cur, n, Hp, Wp, nullptr, nullptr, false, rb);
          r = rb;
        } else if (kind == 1) {  // option A: strided subsample + channel map (index C = 0)
          const int64_t s = block_meta[2 * bi + 1];
          const int64_t* ip = idx_c[bi].data_ptr<int64_t>();
          const int64_t P = Hp * Wp;
          std::memset(rb, 0, sizeof(float) * n * c2.cout * Po);
          for (int64_t m = 0; m < n; ++m)
            for (int64_t co = 0; co < c2.cout; ++co) {
              if (ip[co] >= C) continue;
              const float* src = cur + (m * C + ip[co]) * P;
              float* dst = rb + (m * c2.cout + co) * Po;
              for (int64_t i = 0; i < Ho; ++i)
                for (int64_t j = 0; j < Wo; ++j)
                  dst[(i + 1) * Wpo + j + 1] = src[(s * i + 1) * Wp + s * j + 1];
            }
          r = rb;
        }
        run_conv(c2, hb, n, Hpo, Wpo, r, gate_p[bi], true, nxt);
        std::swap(cur, nxt);
        C = c2.cout;
        Hp = Hpo;
        Wp = Wpo;
      }
      // global average pool (float64 sums; the border is 0) and the feature index
      const int64_t P = Hp * Wp;
      for (int64_t m = 0; m < n; ++m) {
        for (int64_t c = 0; c < C; ++c) {
          const float* src = cur + (m * C + c) * P;
          double acc = 0.0;
          for (int64_t p = 0; p < P; ++p) acc += src[p];
          pooled[c] = acc / static_cast<double>(hw_last);
        }
        float* o = outp + (n0 + m) * out_dim;
        for (int64_t j = 0; j < out_dim; ++j) {
          const int64_t src = oip ? oip[j] : j;
          o[j] = src < C ? static_cast<float>(pooled[src]) : 0.f;
        }
      }
    }
  });
  return out;
}

// Which variant of the kernel runs (0 baseline x86-64, 1 AVX2+FMA, 2 AVX-512): for tests and
// der_fast.info.
int64_t conv3x3_isa() { return g_isa_level; }

}  // namespace

// The schemas are defined in Python (der_fast/ops/_library.py:SCHEMAS).
TORCH_LIBRARY_IMPL(der_fast, CPU, m) {
  m.impl("conv3x3_bordered", &conv3x3_bordered_cpu);
  m.impl("bordered_resnet", &bordered_resnet_cpu);
}

// conv3x3_isa takes no tensor, so no backend key selects a kernel for it: one kernel for all.
TORCH_LIBRARY_IMPL(der_fast, CompositeExplicitAutograd, m) {
  m.impl("conv3x3_isa", &conv3x3_isa);
}

}  // namespace der_fast
