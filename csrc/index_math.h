// Index arithmetic shared by the CPU (C++) and CUDA kernels of der_fast.
//
// Everything here is a tiny pure function on int64 indices. The CUDA kernels call exactly the
// same functions as the CPU kernels, so the CPU tests (which run everywhere) also test the index
// logic of the GPU code, which cannot run on a machine without a GPU.
//
// Activation layouts (dense tensors only; strided inputs are made dense before the kernels):
//   NCHW : element (n, c, p) with p = h*W + w lives at ((n*C + c)*HW + p)   -- "planes" of HW
//   NHWC : element (n, c, p) lives at ((n*HW + p)*C + c)  (channels_last)  -- "rows" of C
//   [N, C] (already pooled / 2-D) is NHWC with HW == 1 (and NCHW with HW == 1).
// Pooled features: [N, D] row-major, extractor i occupies columns [off_i, off_i + C_i).
#pragma once
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define DER_HD __host__ __device__ __forceinline__
#else
#define DER_HD inline
#endif

namespace der_fast {
namespace idx {

// --- NCHW -------------------------------------------------------------------------------
// A "plane" is the HW-long contiguous run of one (n, c) pair: plane = n*C + c.
DER_HD int64_t plane_index(int64_t n, int64_t c, int64_t C) { return n * C + c; }
DER_HD int64_t plane_sample(int64_t plane, int64_t C) { return plane / C; }
DER_HD int64_t plane_channel(int64_t plane, int64_t C) { return plane % C; }
DER_HD int64_t nchw_offset(int64_t n, int64_t c, int64_t p, int64_t C, int64_t HW) {
  return (n * C + c) * HW + p;
}
// flat NCHW element index -> plane it belongs to
DER_HD int64_t nchw_plane_of(int64_t i, int64_t HW) { return i / HW; }

// --- NHWC (channels_last) -----------------------------------------------------------------
// A "pixel row" is the C-long contiguous run of one (n, p) pair: row = n*HW + p.
DER_HD int64_t pixel_row(int64_t n, int64_t p, int64_t HW) { return n * HW + p; }
DER_HD int64_t pixel_row_sample(int64_t row, int64_t HW) { return row / HW; }
DER_HD int64_t nhwc_offset(int64_t n, int64_t c, int64_t p, int64_t C, int64_t HW) {
  return (n * HW + p) * C + c;
}
// flat NHWC element index -> (sample, channel)
DER_HD int64_t nhwc_sample_of(int64_t i, int64_t C, int64_t HW) { return i / (HW * C); }
DER_HD int64_t nhwc_channel_of(int64_t i, int64_t C) { return i % C; }

// --- pooled features [N, D] ----------------------------------------------------------------
DER_HD int64_t feature_offset(int64_t n, int64_t col_offset, int64_t c, int64_t D) {
  return n * D + col_offset + c;
}
// [N, C_i] contiguous per-extractor pooled gradient
DER_HD int64_t pooled_offset(int64_t n, int64_t c, int64_t C) { return n * C + c; }

DER_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace idx
}  // namespace der_fast
