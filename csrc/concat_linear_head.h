// der_fast::concat_linear_head: device-independent orchestration, shared by the CPU (.cpp) and
// CUDA (.cu) implementations. Only two small kernels are device specific:
//   pool(f, features, off):  features[n, off + c] = mean_p f[n, c, p]   (f dense NCHW or NHWC)
//   expand(dp, out):         out[n, c, p] = dp[n, c]                     (out dense NCHW or NHWC)
// The GEMMs go to the vendor BLAS (MKL/oneDNN on CPU, cuBLAS on CUDA) through at::addmm / mm.
//
// forward : features = concat_i pool(feats[i]); logits = features @ W^T + b;
//           aux = features[:, D - C_t:] @ W_aux^T + b_aux   (no copy: a strided view)
// backward: grads for W, b, W_aux, b_aux as requested by output_mask, and for feats[i] only when
//           feats[i] is passed (not None): dpool_i = g_logits @ W[:, off_i:off_i+C_i]
//           (+ g_aux @ W_aux for the last one) (+ g_features[:, off_i:...]), then / HW and
//           broadcast over H, W. Frozen extractors (None) cost nothing.
#pragma once
#include <ATen/ATen.h>
#include <ATen/core/List.h>

#include <array>
#include <tuple>
#include <vector>

#include "common.h"

namespace der_fast {

struct HeadKernels {
  void (*pool)(const at::Tensor& f, at::Tensor& features, int64_t off);
  void (*expand)(const at::Tensor& dp, at::Tensor& out);
};

inline bool defined_opt(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

inline std::tuple<at::Tensor, at::Tensor, at::Tensor> head_forward(
    at::TensorList feats, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& aux_weight, const std::optional<at::Tensor>& aux_bias,
    const HeadKernels& k) {
  const std::vector<int64_t> widths = check_head(feats, weight, bias, aux_weight, aux_bias);
  const int64_t N = feats[0].size(0);
  int64_t D = 0;
  for (auto w : widths) D += w;
  at::Tensor features = at::empty({N, D}, feats[0].options());
  int64_t off = 0;
  for (size_t i = 0; i < feats.size(); ++i) {
    const at::Tensor& f = feats[i];
    if (N > 0 && widths[i] > 0) {
      if (f.dim() == 2) {
        features.narrow(1, off, widths[i]).copy_(f);
      } else {
        k.pool(dense_as(f, kernel_format(f)), features, off);
      }
    }
    off += widths[i];
  }
  at::Tensor logits = defined_opt(bias) ? at::addmm(*bias, features, weight.t())
                                        : at::mm(features, weight.t());
  at::Tensor aux;
  if (defined_opt(aux_weight)) {
    const int64_t Ct = widths.back();
    at::Tensor last = features.narrow(1, D - Ct, Ct);
    aux = defined_opt(aux_bias) ? at::addmm(*aux_bias, last, aux_weight->t())
                                : at::mm(last, aux_weight->t());
  } else {
    aux = at::empty({0}, features.options());
  }
  return {logits, aux, features};
}

inline std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
head_backward(const std::optional<at::Tensor>& grad_logits,
              const std::optional<at::Tensor>& grad_aux,
              const std::optional<at::Tensor>& grad_features, const at::Tensor& features,
              const at::Tensor& weight, const std::optional<at::Tensor>& aux_weight,
              const c10::List<std::optional<at::Tensor>>& feats, at::IntArrayRef widths,
              std::array<bool, 4> mask, const HeadKernels& k) {
  const char* op = "der_fast.concat_linear_head_backward";
  const int64_t t = static_cast<int64_t>(widths.size());
  TORCH_CHECK_VALUE(t > 0 && static_cast<int64_t>(feats.size()) == t, op,
                    ": feats and widths must have the same non-zero length");
  TORCH_CHECK_VALUE(features.dim() == 2, op, ": features must be 2-D [N, D], got shape ",
                    features.sizes());
  const int64_t N = features.size(0), D = features.size(1);
  const auto opts = features.options();
  // every tensor argument against features, before any kernel runs
  auto like = [&](const at::Tensor& x, const char* name) {
    TORCH_CHECK_TYPE(x.scalar_type() == features.scalar_type(), op, ": ", name, " has dtype ",
                     x.scalar_type(), " but features has dtype ", features.scalar_type());
    TORCH_CHECK_VALUE(x.device() == features.device(), op, ": ", name, " is on device ",
                      x.device(), " but features is on device ", features.device());
  };
  auto matrix = [&](const at::Tensor& x, const char* name, int64_t rows, int64_t cols) {
    TORCH_CHECK_VALUE(x.dim() == 2 && x.size(0) == rows && x.size(1) == cols, op, ": ", name,
                      " must have shape [", rows, ", ", cols, "], got ", x.sizes());
    like(x, name);
  };
  std::vector<int64_t> offs(t);
  int64_t off = 0;
  for (int64_t i = 0; i < t; ++i) {
    TORCH_CHECK_VALUE(widths[i] >= 0, op, ": widths[", i, "] is negative (", widths[i], ")");
    offs[i] = off;
    off += widths[i];
  }
  TORCH_CHECK_VALUE(off == D, op, ": widths sum to ", off, " but features has ", D, " columns");
  const bool gl = defined_opt(grad_logits), ga = defined_opt(grad_aux),
             gf = defined_opt(grad_features);
  const bool has_aux = defined_opt(aux_weight);
  TORCH_CHECK_VALUE(!ga || has_aux, op, ": grad_aux given but aux_weight is None");
  TORCH_CHECK_VALUE(!(mask[2] || mask[3]) || has_aux, op, ": aux grads requested without aux_weight");
  const int64_t Ct = widths[t - 1];
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(1) == D, op, ": weight must have shape [K, ",
                    D, "], got ", weight.sizes());
  like(weight, "weight");
  if (gl) matrix(*grad_logits, "grad_logits", N, weight.size(0));
  if (has_aux) {
    TORCH_CHECK_VALUE(aux_weight->dim() == 2 && aux_weight->size(1) == Ct, op,
                      ": aux_weight must have shape [K_aux, ", Ct, "], got ", aux_weight->sizes());
    like(*aux_weight, "aux_weight");
  }
  if (ga) matrix(*grad_aux, "grad_aux", N, aux_weight->size(0));
  if (gf) matrix(*grad_features, "grad_features", N, D);
  const at::Tensor last = features.narrow(1, D - Ct, Ct);

  at::Tensor g_w, g_b, g_aw, g_ab;
  if (mask[0]) g_w = gl ? at::mm(grad_logits->t(), features) : at::zeros_like(weight);
  else g_w = at::empty({0}, opts);
  if (mask[1]) g_b = gl ? grad_logits->sum(0) : at::zeros({weight.size(0)}, opts);
  else g_b = at::empty({0}, opts);
  if (mask[2]) g_aw = ga ? at::mm(grad_aux->t(), last) : at::zeros_like(*aux_weight);
  else g_aw = at::empty({0}, opts);
  if (mask[3]) g_ab = ga ? grad_aux->sum(0) : at::zeros({aux_weight->size(0)}, opts);
  else g_ab = at::empty({0}, opts);

  std::vector<at::Tensor> g_feats;
  g_feats.reserve(t);
  for (int64_t i = 0; i < t; ++i) {
    const std::optional<at::Tensor> fo = feats.get(i);
    if (!defined_opt(fo)) {
      g_feats.push_back(at::empty({0}, opts));
      continue;
    }
    const at::Tensor& f = *fo;
    const int64_t Ci = widths[i];
    TORCH_CHECK_VALUE((f.dim() == 2 || f.dim() == 4) && f.size(0) == N && f.size(1) == Ci, op,
                      ": feats[", i, "] has shape ", f.sizes(), ", expected [", N, ", ", Ci,
                      ", ...]");
    like(f, "feats[i]");
    at::Tensor dp;  // [N, Ci], fresh memory
    if (gl) dp = at::mm(*grad_logits, weight.narrow(1, offs[i], Ci));
    if (i == t - 1 && ga) {
      if (dp.defined()) dp.addmm_(*grad_aux, *aux_weight);
      else dp = at::mm(*grad_aux, *aux_weight);
    }
    if (gf) {
      at::Tensor s = grad_features->narrow(1, offs[i], Ci);
      if (dp.defined()) dp.add_(s);
      else dp = s.clone(at::MemoryFormat::Contiguous);
    }
    if (!dp.defined()) dp = at::zeros({N, Ci}, opts);
    if (f.dim() == 2) {
      g_feats.push_back(dp.contiguous());
      continue;
    }
    const int64_t HW = hw_of(f);
    at::Tensor dps = dp.div(static_cast<double>(HW)).contiguous();  // same rounding as mean's backward
    at::Tensor out = at::empty(f.sizes(), opts.memory_format(kernel_format(f)));
    if (out.numel() > 0) k.expand(dps, out);
    g_feats.push_back(out);
  }
  return {g_feats, g_w, g_b, g_aw, g_ab};
}

}  // namespace der_fast
