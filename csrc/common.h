// Host-side helpers shared by the CPU (.cpp) and CUDA (.cu) implementations: layout choice,
// argument checks with messages that name the offending argument, and the scaffolding of the
// ops' host functions (optional arguments, outputs, per-channel values, template dispatch).
// Keep the checks in sync with the Python checks in der_fast/ops/<op>.py (_check_masked_gate /
// _check_bn_gate / _check_head), which the fake (meta) kernels and the pure-PyTorch fallback use,
// so every backend raises the same error.
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace der_fast {

// The kernels work on dense NCHW or dense NHWC (channels_last) memory. A 4-D tensor that is
// channels_last-contiguous but not NCHW-contiguous is processed (and its outputs are produced)
// in channels_last; everything else in NCHW/row-major. Same rule in Python: ops._kernel_format.
inline bool use_channels_last(const at::Tensor& x) {
  return x.dim() == 4 && !x.is_contiguous() &&
         x.is_contiguous(at::MemoryFormat::ChannelsLast);
}
inline at::MemoryFormat kernel_format(const at::Tensor& x) {
  return use_channels_last(x) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}
// Dense in the given format (no copy when it already is).
inline at::Tensor dense_as(const at::Tensor& t, at::MemoryFormat fmt) {
  if (t.dim() != 4) return t.contiguous();
  return t.is_contiguous(fmt) ? t : t.contiguous(fmt);
}

// dtype spelled as Python prints it ("torch.float32"), so C++ and Python errors read the same
inline std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kInt: return "torch.int32";
    case at::kLong: return "torch.int64";
    case at::kShort: return "torch.int16";
    case at::kChar: return "torch.int8";
    case at::kByte: return "torch.uint8";
    case at::kBool: return "torch.bool";
    default: return std::string("torch.") + c10::toString(t);
  }
}

inline bool has(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* op,
                              const char* name, const char* ref_name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), op, ": ", name, " is on device ", t.device(),
                    " but ", ref_name, " is on device ", ref.device());
}

inline void check_like(const at::Tensor& t, const at::Tensor& ref, const char* op,
                       const char* name, const char* ref_name) {
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ",
                   dtype_name(t.scalar_type()), " but ", ref_name, " has dtype ",
                   dtype_name(ref.scalar_type()),
                   " (all tensor arguments must have the same dtype)");
  check_same_device(t, ref, op, name, ref_name);
}

// t is a per-channel argument [C] of x ([N, C, ...]), with x's dtype (unless !same_dtype) and
// device.
inline void check_per_channel(const at::Tensor& t, const at::Tensor& x, const char* op,
                              const char* name, const char* x_name, bool same_dtype = true) {
  const int64_t C = x.size(1);
  TORCH_CHECK_VALUE(t.dim() == 1, op, ": ", name, " must be 1-D [C] with C=", C,
                    ", got shape ", t.sizes());
  if (same_dtype) check_like(t, x, op, name, x_name);
  else check_same_device(t, x, op, name, x_name);
  TORCH_CHECK_VALUE(t.size(0) == C, op, ": ", name, " has ", t.size(0), " channels but ",
                    x_name, " has C=", C, " (", x_name, ".shape=", x.sizes(), ")");
}

// t (e.g. the residual) is like x: same shape, dtype and device
inline void check_same_shape(const at::Tensor& t, const at::Tensor& x, const char* op,
                             const char* name, const char* x_name) {
  check_like(t, x, op, name, x_name);
  TORCH_CHECK_VALUE(t.sizes() == x.sizes(), op, ": ", name, " has shape ", t.sizes(), " but ",
                    x_name, " has shape ", x.sizes(), " (they must be equal)");
}

inline void check_masked_gate(const at::Tensor& x, const at::Tensor& scale,
                              const at::Tensor& shift, const std::optional<at::Tensor>& e,
                              const std::optional<at::Tensor>& residual) {
  const char* op = "der_fast.masked_gate";
  TORCH_CHECK_VALUE(x.dim() == 2 || x.dim() == 4, op,
                    ": x must be 2-D [N, C] or 4-D [N, C, H, W], got a ", x.dim(),
                    "-D tensor of shape ", x.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()), op,
                   ": x must be a floating point tensor, got dtype ", dtype_name(x.scalar_type()));
  check_per_channel(scale, x, op, "scale", "x");
  check_per_channel(shift, x, op, "shift", "x");
  if (has(e)) check_per_channel(*e, x, op, "e", "x");
  if (has(residual)) check_same_shape(*residual, x, op, "residual", "x");
}

// Returns the widths C_i of the features.
inline std::vector<int64_t> check_head(at::TensorList feats, const at::Tensor& weight,
                                       const std::optional<at::Tensor>& bias,
                                       const std::optional<at::Tensor>& aux_weight,
                                       const std::optional<at::Tensor>& aux_bias) {
  const char* op = "der_fast.concat_linear_head";
  TORCH_CHECK_VALUE(!feats.empty(), op, ": feats must be a non-empty list of tensors");
  const at::Tensor& f0 = feats[0];
  TORCH_CHECK_TYPE(at::isFloatingType(f0.scalar_type()), op,
                   ": feats[0] must be a floating point tensor, got dtype ",
                   dtype_name(f0.scalar_type()));
  std::vector<int64_t> widths;
  int64_t D = 0;
  for (size_t i = 0; i < feats.size(); ++i) {
    const at::Tensor& f = feats[i];
    const std::string name = "feats[" + std::to_string(i) + "]";
    TORCH_CHECK_VALUE(f.dim() == 2 || f.dim() == 4, op, ": ", name,
                      " must be 4-D [N, C_i, H, W] or pooled 2-D [N, C_i], got shape ",
                      f.sizes());
    if (i > 0) check_like(f, f0, op, name.c_str(), "feats[0]");
    TORCH_CHECK_VALUE(f.size(0) == f0.size(0), op, ": ", name, " has batch size ", f.size(0),
                      " but feats[0] has ", f0.size(0));
    widths.push_back(f.size(1));
    D += f.size(1);
  }
  TORCH_CHECK_VALUE(weight.dim() == 2, op, ": weight must be 2-D [K, sum C_i], got shape ",
                    weight.sizes());
  check_like(weight, f0, op, "weight", "feats[0]");
  TORCH_CHECK_VALUE(weight.size(1) == D, op, ": weight has ", weight.size(1),
                    " input columns but the features have sum C_i = ", D, " (C_i = ", widths,
                    ")");
  if (bias.has_value() && bias->defined()) {
    check_like(*bias, f0, op, "bias", "feats[0]");
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == weight.size(0), op,
                      ": bias must have shape [K] = [", weight.size(0), "], got ",
                      bias->sizes());
  }
  const bool has_aux = aux_weight.has_value() && aux_weight->defined();
  if (has_aux) {
    const at::Tensor& aw = *aux_weight;
    TORCH_CHECK_VALUE(aw.dim() == 2, op, ": aux_weight must be 2-D [K_aux, C_t], got shape ",
                      aw.sizes());
    check_like(aw, f0, op, "aux_weight", "feats[0]");
    TORCH_CHECK_VALUE(aw.size(1) == widths.back(), op, ": aux_weight has ", aw.size(1),
                      " input columns but the last feature map feats[-1] has C_t = ",
                      widths.back());
  }
  if (aux_bias.has_value() && aux_bias->defined()) {
    TORCH_CHECK_VALUE(has_aux, op, ": aux_bias given without aux_weight");
    check_like(*aux_bias, f0, op, "aux_bias", "feats[0]");
    TORCH_CHECK_VALUE(aux_bias->dim() == 1 && aux_bias->size(0) == aux_weight->size(0), op,
                      ": aux_bias must have shape [K_aux] = [", aux_weight->size(0), "], got ",
                      aux_bias->sizes());
  }
  return widths;
}

inline int64_t hw_of(const at::Tensor& f) { return f.dim() == 4 ? f.size(2) * f.size(3) : 1; }

// --- host functions of the CPU ops --------------------------------------------------------

// t in float32 (the kernels of float16 / bfloat16 inputs compute in float32)
inline std::optional<at::Tensor> to_float(const std::optional<at::Tensor>& t) {
  if (!has(t)) return std::nullopt;
  return t->to(at::kFloat);
}

// each tensor of a tuple of results converted to dtype dt
template <typename... Ts>
std::tuple<Ts...> to_dtype(const std::tuple<Ts...>& res, at::ScalarType dt) {
  return std::apply([dt](const auto&... t) { return std::make_tuple(t.to(dt)...); }, res);
}

// An output that output_mask may leave out: allocated (in memory format fmt) when wanted, else
// an empty [0].
inline at::Tensor output_if(bool wanted, at::IntArrayRef sizes, const at::TensorOptions& opts,
                            at::MemoryFormat fmt = at::MemoryFormat::Contiguous) {
  return wanted ? at::empty(sizes, opts.memory_format(fmt)) : at::empty({0}, opts);
}

// out[c] = f(c) for every c of the per-channel output out [C], when it was wanted.
template <typename T, typename F>
void fill_channels(const at::Tensor& out, bool wanted, F&& f) {
  if (!wanted) return;
  T* p = out.mutable_data_ptr<T>();
  for (int64_t c = 0; c < out.numel(); ++c) p[c] = f(c);
}

// t's values as a std::vector<A> (A = float or double; converted by ATen)
template <typename A>
std::vector<A> to_vec(const at::Tensor& t) {
  auto td = t.to(std::is_same_v<A, double> ? at::kDouble : at::kFloat).contiguous();
  const A* p = td.template const_data_ptr<A>();
  return std::vector<A>(p, p + td.numel());
}

// The gate g = sigmoid(s * e) per channel (1 without e), computed by ATen exactly as the
// reference writes it (`torch.sigmoid(s * e)`, in e's dtype), so that the CPU kernels' gate is
// the reference's to the bit.
template <typename A>
std::vector<A> gate_values(const std::optional<at::Tensor>& e, double s, int64_t C) {
  if (!has(e)) return std::vector<A>(C, A(1));
  return to_vec<A>(at::sigmoid(e->mul(s)));
}

// f(std::bool_constant<b>{}...) with the run-time flags b as compile-time constants, in order:
// one call for the kernels templated on them, instantiated for every combination.
template <typename F>
void with_flags(F&& f) {
  f();
}
template <typename F, typename... Bs>
void with_flags(F&& f, bool b, Bs... rest) {
  if (b) with_flags([&](auto... cs) { f(std::true_type{}, cs...); }, rest...);
  else with_flags([&](auto... cs) { f(std::false_type{}, cs...); }, rest...);
}

}  // namespace der_fast
