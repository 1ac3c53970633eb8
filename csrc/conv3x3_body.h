// Body of the direct 3x3 convolution kernel (csrc/conv3x3_bordered.cpp includes it once per
// instruction set, inside a namespace and a `#pragma GCC target` region). Not a standalone
// header: it has no include guard on purpose.
//
// Layout: "zero-bordered planes": x [N, C, H + 2, W + 2] contiguous float, whose first and last
// rows and columns are 0 (a padded image). The output has the same layout. An output position p
// (flattened over the bordered plane) reads x at p + (kh - 1) * Wp + (kw - 1); computing every
// interior row in runs of 16 * V consecutive positions (the border columns inside a run are
// computed too and then multiplied by 0) turns the conv into unit-stride vector loads with one
// broadcast weight per FMA: CB output channels x V vectors of accumulators stay in registers.

template <int CB, int V>
static void conv_block(const float* __restrict__ x, int64_t Cin, int64_t Hp, int64_t Wp,
                       const float* __restrict__ w, const float* __restrict__ b,
                       const float* __restrict__ r, const float* __restrict__ g,
                       const float* __restrict__ colmask, float* __restrict__ y, bool relu) {
  constexpr int L = 16 * V;
  const int64_t P = Hp * Wp;
  const int64_t p0 = Wp + 1, p1 = (Hp - 1) * Wp - 1;  // first / one past last interior position
  const v16 zero = {};
  for (int64_t p = p0; p < p1; p += L) {
    // the last run is shifted back to end at p1 (positions computed twice get the same value)
    const int64_t q = (p + L > p1) ? p1 - L : p;
    v16 acc[CB][V];
    for (int c = 0; c < CB; ++c)
      for (int v = 0; v < V; ++v) acc[c][v] = zero + b[c];
    for (int64_t ci = 0; ci < Cin; ++ci) {
      const float* xc = x + ci * P + q;
      const float* wc = w + ci * 9 * CB;
      for (int kh = 0; kh < 3; ++kh) {
        for (int kw = 0; kw < 3; ++kw) {
          const float* xs = xc + (kh - 1) * Wp + (kw - 1);
          v16 a[V];
          for (int v = 0; v < V; ++v) std::memcpy(&a[v], xs + 16 * v, sizeof(v16));
          const int k = kh * 3 + kw;
          for (int c = 0; c < CB; ++c) {
            const float wv = wc[k * CB + c];
            for (int v = 0; v < V; ++v) acc[c][v] += wv * a[v];
          }
        }
      }
    }
    for (int c = 0; c < CB; ++c) {
      for (int v = 0; v < V; ++v) {
        v16 o = acc[c][v], m;
        std::memcpy(&m, colmask + q + 16 * v, sizeof(v16));
        if (r != nullptr) {
          v16 rr;
          std::memcpy(&rr, r + c * P + q + 16 * v, sizeof(v16));
          o += rr;
        }
        if (relu) o = (o < zero) ? zero : o;  // NaN stays NaN, as in torch.relu
        if (g != nullptr) o *= g[c];
        o = (m != zero) ? o : zero;  // border columns: exactly 0 (a select: no inf * 0)
        std::memcpy(y + c * P + q + 16 * v, &o, sizeof(v16));
      }
    }
  }
}

// Calls f(std::integral_constant<int, cb>) for a block of cb (1 .. MAXCB <= 16) output
// channels: the block size is a template argument so the accumulators stay in registers.
template <int MAXCB, typename F>
static void with_block_size(int64_t cb, F&& f) {
  switch (cb) {
#define DER_CB(k) \
  case k:         \
    if constexpr (k <= MAXCB) f(std::integral_constant<int, k>{}); \
    break;
    DER_CB(1) DER_CB(2) DER_CB(3) DER_CB(4) DER_CB(5) DER_CB(6) DER_CB(7) DER_CB(8)
    DER_CB(9) DER_CB(10) DER_CB(11) DER_CB(12) DER_CB(13) DER_CB(14) DER_CB(15) DER_CB(16)
#undef DER_CB
    default:
      break;
  }
}

// Weights [Cout, Cin, 3, 3] repacked per block of output channels (the same split as the
// callers below): block [c0, c0 + cb) at out + c0 * Cin * 9, laid out [Cin][9][cb], so the
// kernel's broadcasts walk one pointer (one block = cb consecutive floats per tap).
static void pack_blocks(const float* w, int64_t Cin, int64_t Cout, int64_t maxcb, float* out) {
  const int64_t nb = (Cout + maxcb - 1) / maxcb;
  int64_t c0 = 0;
  for (int64_t bi = 0; bi < nb; ++bi) {
    const int64_t cb = (Cout - c0) / (nb - bi);
    for (int64_t c = 0; c < cb; ++c)
      for (int64_t j = 0; j < Cin * 9; ++j) out[c0 * Cin * 9 + j * cb + c] = w[(c0 + c) * Cin * 9 + j];
    c0 += cb;
  }
}

// One image: every output channel, in blocks of at most max_cb (sizes as equal as possible).
template <int V>
static void conv_image(const float* x, int64_t Cin, int64_t Hp, int64_t Wp, const float* w,
                       const float* b, const float* r, const float* g, const float* colmask,
                       float* y, int64_t Cout, bool relu) {
  // accumulators: MAXCB x V vectors; kRegs is the register file of the ISA (32 zmm / 16 ymm)
  constexpr int MAXCB = (V == 1) ? kRegs / 2 : kRegs / 4;
  const int64_t P = Hp * Wp;
  const int64_t nb = (Cout + MAXCB - 1) / MAXCB;
  int64_t c0 = 0;
  for (int64_t bi = 0; bi < nb; ++bi) {
    const int64_t cb = (Cout - c0) / (nb - bi);
    const float* wb = w + c0 * Cin * 9;
    const float* bb = b + c0;
    const float* rb = r ? r + c0 * P : nullptr;
    const float* gb = g ? g + c0 : nullptr;
    float* yb = y + c0 * P;
    with_block_size<MAXCB>(cb, [&](auto k) {
      conv_block<decltype(k)::value, V>(x, Cin, Hp, Wp, wb, bb, rb, gb, colmask, yb, relu);
    });
    c0 += cb;
  }
}

static void conv_images(const float* x, int64_t n0, int64_t n1, int64_t Cin, int64_t Hp,
                        int64_t Wp, const float* w, const float* b, const float* r,
                        const float* g, const float* colmask, float* y, int64_t Cout, bool relu,
                        int V) {
  const int64_t P = Hp * Wp;
  std::vector<float> packed(Cout * Cin * 9);
  pack_blocks(w, Cin, Cout, V == 2 ? kRegs / 4 : kRegs / 2, packed.data());
  for (int64_t n = n0; n < n1; ++n) {
    const float* xn = x + n * Cin * P;
    const float* rn = r ? r + n * Cout * P : nullptr;
    float* yn = y + n * Cout * P;
    if (V == 2)
      conv_image<2>(xn, Cin, Hp, Wp, packed.data(), b, rn, g, colmask, yn, Cout, relu);
    else
      conv_image<1>(xn, Cin, Hp, Wp, packed.data(), b, rn, g, colmask, yn, Cout, relu);
  }
}

// ---- stride 2 ----------------------------------------------------------------------------
// Output row i, columns j0 .. j0+15 read bordered input rows 2i + kh and columns 2j + kw: two
// vector loads of 32 consecutive floats and one even-lane shuffle per (ci, kh, kw), shared by
// the CB output channels. Loads that would pass the end of the input tensor go through a
// zero-filled buffer; lanes past the row's end are computed and not stored. The caller
// zero-fills y (its border).
// 16 floats from src; those at or past end (the tensor's end) read as 0.
static inline v16 load16_until(const float* src, const float* end) {
  v16 a;
  if (src + 16 <= end) {
    std::memcpy(&a, src, sizeof(v16));
  } else {
    float tmp[16] = {};
    if (src < end) std::memcpy(tmp, src, sizeof(float) * (end - src));
    std::memcpy(&a, tmp, sizeof(v16));
  }
  return a;
}

template <int CB>
static void conv_block_s2(const float* __restrict__ x, int64_t Cin, int64_t Hpi, int64_t Wpi,
                          const float* x_end, const float* __restrict__ w,
                          const float* __restrict__ b, const float* __restrict__ r,
                          const float* __restrict__ g, float* __restrict__ y, int64_t Ho,
                          int64_t Wo, bool relu) {
  typedef int v16i __attribute__((vector_size(64)));
  const v16i even = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30};
  const int64_t Pi = Hpi * Wpi, Wpo = Wo + 2, Po = (Ho + 2) * Wpo;
  const v16 zero = {};
  if (Wo <= 8) {
    // rows of at most 8 outputs: two output rows per vector (lanes 0-7 row i, 8-15 row i + 1),
    // from one 16-float load per input row: no half-empty vectors
    for (int64_t i = 0; i < Ho; i += 2) {
      const bool two = i + 1 < Ho;
      v16 acc[CB];
      for (int c = 0; c < CB; ++c) acc[c] = zero + b[c];
      for (int64_t ci = 0; ci < Cin; ++ci) {
        for (int kh = 0; kh < 3; ++kh) {
          const float* row0 = x + ci * Pi + (2 * i + kh) * Wpi;
          const float* row1 = row0 + 2 * Wpi;
          for (int kw = 0; kw < 3; ++kw) {
            const v16 a0 = load16_until(row0 + kw, x_end);
            const v16 a1 = load16_until(row1 + kw, x_end);
            const v16 xv = __builtin_shuffle(a0, a1, even);
            const float* wc = w + (ci * 9 + kh * 3 + kw) * CB;
            for (int c = 0; c < CB; ++c) acc[c] += wc[c] * xv;
          }
        }
      }
      const int64_t o = (i + 1) * Wpo + 1;
      for (int c = 0; c < CB; ++c) {
        v16 v = acc[c];
        if (r != nullptr) {
          float tmp[16] = {};
          std::memcpy(tmp, r + c * Po + o, sizeof(float) * Wo);
          if (two) std::memcpy(tmp + 8, r + c * Po + o + Wpo, sizeof(float) * Wo);
          v16 rr;
          std::memcpy(&rr, tmp, sizeof(v16));
          v += rr;
        }
        if (relu) v = (v < zero) ? zero : v;
        if (g != nullptr) v *= g[c];
        float out[16];
        std::memcpy(out, &v, sizeof(v16));
        std::memcpy(y + c * Po + o, out, sizeof(float) * Wo);
        if (two) std::memcpy(y + c * Po + o + Wpo, out + 8, sizeof(float) * Wo);
      }
    }
    return;
  }
  for (int64_t i = 0; i < Ho; ++i) {
    for (int64_t j0 = 0; j0 < Wo; j0 += 16) {
      const int64_t n = (Wo - j0 < 16) ? Wo - j0 : 16;
      v16 acc[CB];
      for (int c = 0; c < CB; ++c) acc[c] = zero + b[c];
      for (int64_t ci = 0; ci < Cin; ++ci) {
        for (int kh = 0; kh < 3; ++kh) {
          const float* row = x + ci * Pi + (2 * i + kh) * Wpi + 2 * j0;
          for (int kw = 0; kw < 3; ++kw) {
            const float* src = row + kw;
            v16 a0, a1;
            if (src + 32 <= x_end) {
              std::memcpy(&a0, src, sizeof(v16));
              std::memcpy(&a1, src + 16, sizeof(v16));
            } else {
              float tmp[32] = {};
              std::memcpy(tmp, src, sizeof(float) * (x_end - src));
              std::memcpy(&a0, tmp, sizeof(v16));
              std::memcpy(&a1, tmp + 16, sizeof(v16));
            }
            const v16 xv = __builtin_shuffle(a0, a1, even);
            const float* wc = w + (ci * 9 + kh * 3 + kw) * CB;
            for (int c = 0; c < CB; ++c) acc[c] += wc[c] * xv;
          }
        }
      }
      const int64_t o = (i + 1) * Wpo + 1 + j0;
      for (int c = 0; c < CB; ++c) {
        v16 v = acc[c];
        if (r != nullptr) {
          float tmp[16] = {};
          std::memcpy(tmp, r + c * Po + o, sizeof(float) * n);
          v16 rr;
          std::memcpy(&rr, tmp, sizeof(v16));
          v += rr;
        }
        if (relu) v = (v < zero) ? zero : v;
        if (g != nullptr) v *= g[c];
        std::memcpy(y + c * Po + o, &v, sizeof(float) * n);
      }
    }
  }
}

static void conv_images_s2(const float* x, const float* x_end, int64_t n0, int64_t n1,
                           int64_t Cin, int64_t Hpi, int64_t Wpi, const float* w, const float* b,
                           const float* r, const float* g, float* y, int64_t Cout, int64_t Ho,
                           int64_t Wo, bool relu) {
  constexpr int MAXCB = kRegs / 2;
  const int64_t Pi = Hpi * Wpi, Po = (Ho + 2) * (Wo + 2);
  std::vector<float> packed(Cout * Cin * 9);
  pack_blocks(w, Cin, Cout, MAXCB, packed.data());
  w = packed.data();
  for (int64_t n = n0; n < n1; ++n) {
    const float* xn = x + n * Cin * Pi;
    const int64_t nb = (Cout + MAXCB - 1) / MAXCB;
    int64_t c0 = 0;
    for (int64_t bi = 0; bi < nb; ++bi) {
      const int64_t cb = (Cout - c0) / (nb - bi);
      const float* wb = w + c0 * Cin * 9;
      const float* rb = r ? r + (n * Cout + c0) * Po : nullptr;
      const float* gb = g ? g + c0 : nullptr;
      float* yb = y + (n * Cout + c0) * Po;
      with_block_size<MAXCB>(cb, [&](auto k) {
        conv_block_s2<decltype(k)::value>(xn, Cin, Hpi, Wpi, x_end, wb, b + c0, rb, gb, yb, Ho,
                                          Wo, relu);
      });
      c0 += cb;
    }
  }
}
