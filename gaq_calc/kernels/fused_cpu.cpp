// Fused CPU kernel: energy and forces of GAQPotential in one call, with a hand-written backward.
//
// Same function as gaq_calc.model.network.GAQPotential (+ EnergyForces): the reference path runs it
// as ~1,000 small ATen ops forward and backward; here every pair x feature loop is one fused pass over
// the edges and the matmuls go straight to the BLAS (MKL's sgemm_/dgemm_, the routine ATen's matmul
// calls, with the same arguments, so results are the bits at::mm gives). Forces are the exact gradient
// of the returned energy when activations are not rounded (reverse mode written out below; tests compare
// it with autograd in float64). In an artifact's "quantized" mode the input of every Linear is rounded
// to int8 codes and the forces are QAT's straight-through gradient.
//
// Weights come as named tensors with a layout version (kLayoutVersion; the names are listed at
// `Weights::from_named`, and gaq_calc/kernels/fused.py emits them). `gaq::Model` (a TorchScript class)
// checks and casts them once, and keeps one workspace per graph size: a call allocates only its two
// outputs. `gaq::energy_forces` is the same computation for one call (it builds a Model each time).
//
// Layouts (row-major): h [n, F]; v [n, 3, F]; filters [L, P, W] per unordered pair (an edge and its
// reverse have the same length, so the same filters), W = 3F + H: (sv, s, vv filters, head biases).
// Threads: edge loops are split over atoms (at::parallel_for, torch's thread count), each atom summing
// its incoming or outgoing edges in edge order. Small graphs (per-pair GEMMs in fixed row blocks, ATen's
// elementwise SiLU below its 32,768-element grain) give the same bits at any thread count; large ones
// leave GEMM and SiLU splitting to MKL/ATen, whose rounding may depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <cmath>
#include <map>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#include <immintrin.h>
#define GAQ_INT8_SIMD 1  // built with -march=native on a CPU with AVX512-VNNI (vpdpbusd)
#endif

extern "C" {
// MKL's Fortran BLAS as exported by libtorch_cpu (ATen's cpublas::gemm calls these)
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc);
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc);
int MKL_Set_Num_Threads_Local(int n);  // this thread's MKL thread count (0: back to the global one)
}

namespace {

constexpr int64_t kLayoutVersion = 2;

template <typename T> inline T sigmoid(T x) { return T(1) / (T(1) + std::exp(-x)); }
template <typename T> inline T silu(T x) { return x * sigmoid(x); }
template <typename T> inline T dsilu(T x) { const T s = sigmoid(x); return s * (T(1) + x * (T(1) - s)); }
template <typename T> inline T softplus(T x) { return x > T(20) ? x : std::log1p(std::exp(x)); }
template <typename T> inline T dsoftplus(T x) { return x > T(20) ? T(1) : sigmoid(x); }

// ---- BLAS: column-major gemm as ATen's cpublas::gemm calls it (normalize_last_dims included)
template <typename T>
void blas_gemm(char ta, char tb, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda, const T* b,
               int64_t ldb, T beta, T* c, int64_t ldc) {
  if (n == 1) ldc = m;
  if (ta != 'N') {
    if (m == 1) lda = k;
  } else if (k == 1) {
    lda = m;
  }
  if (tb != 'N') {
    if (k == 1) ldb = n;
  } else if (n == 1) {
    ldb = k;
  }
  const int im = int(m), in = int(n), ik = int(k), ilda = int(lda), ildb = int(ldb), ildc = int(ldc);
  if constexpr (std::is_same_v<T, float>) {
    sgemm_(&ta, &tb, &im, &in, &ik, &alpha, a, &ilda, b, &ildb, &beta, c, &ildc);
  } else {
    dgemm_(&ta, &tb, &im, &in, &ik, &alpha, a, &ilda, b, &ildb, &beta, c, &ildc);
  }
}

// y [m, out] = x [m, in] w[out, in]^T (+ b): at::mm(x, w.t()) / at::addmm(b, x, w.t()) into y
template <typename T>
void linear_nt(const T* x, int64_t m, int64_t in, const T* w, int64_t out, const T* b, T* y) {
  if (m == 0 || out == 0) return;
  if (b)
    for (int64_t i = 0; i < m; ++i) std::copy(b, b + out, y + i * out);
  if (in == 0) {
    if (!b) std::fill(y, y + m * out, T(0));
    return;
  }
  const T beta = b ? T(1) : T(0);
  if (out == 1)  // ATen treats an [m, 1] result as column-major
    blas_gemm<T>('T', 'N', m, 1, in, T(1), x, in, w, in, beta, y, 1);
  else
    blas_gemm<T>('T', 'N', out, m, in, T(1), w, in, x, in, beta, y, out);
}

// y [m, in] (=, or += with accumulate) gy [m, out] w [out, in]: at::mm(gy, w) / y.addmm_(gy, w)
template <typename T>
void linear_nn(const T* gy, int64_t m, int64_t out, const T* w, int64_t in, T* y, bool accumulate = false) {
  if (m == 0 || in == 0) return;
  if (out == 0) {
    if (!accumulate) std::fill(y, y + m * in, T(0));
    return;
  }
  blas_gemm<T>('N', 'N', in, m, out, T(1), w, in, gy, out, accumulate ? T(1) : T(0), y, in);
}

// y = LN(x) * g + b over rows of width F; saves mean and 1/std for the backward
template <typename T>
void layer_norm(const T* x, const T* g, const T* b, T* y, T* mean, T* rstd, int64_t n, int64_t F, double eps) {
  for (int64_t i = 0; i < n; ++i) {
    const T* xi = x + i * F;
    T m = 0;
    for (int64_t f = 0; f < F; ++f) m += xi[f];
    m /= T(F);
    T var = 0;
    for (int64_t f = 0; f < F; ++f) { const T d = xi[f] - m; var += d * d; }
    var /= T(F);
    const T r = T(1) / std::sqrt(var + T(eps));
    mean[i] = m;
    rstd[i] = r;
    T* yi = y + i * F;
    for (int64_t f = 0; f < F; ++f) yi[f] = (xi[f] - m) * r * g[f] + b[f];
  }
}

// gx += dLN/dx^T gy; gy rows have stride ld
template <typename T>
void layer_norm_backward(const T* x, const T* g, const T* mean, const T* rstd, const T* gy, int64_t ld, T* gx,
                         int64_t n, int64_t F) {
  for (int64_t i = 0; i < n; ++i) {
    const T* xi = x + i * F;
    const T* gyi = gy + i * ld;
    const T m = mean[i], r = rstd[i];
    T s1 = 0, s2 = 0;
    for (int64_t f = 0; f < F; ++f) {
      const T gg = gyi[f] * g[f];
      s1 += gg;
      s2 += gg * (xi[f] - m) * r;
    }
    s1 /= T(F);
    s2 /= T(F);
    T* gxi = gx + i * F;
    for (int64_t f = 0; f < F; ++f) gxi[f] += r * (gyi[f] * g[f] - s1 - (xi[f] - m) * r * s2);
  }
}

// at::silu (ATen's vectorised kernel, so the bits match the reference path) on raw buffers
template <typename T>
void silu_into(const T* x, int64_t numel, T* y) {
  if (numel == 0) return;
  const auto opt = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  at::Tensor out = at::from_blob(y, {numel}, opt);
  at::silu_out(out, at::from_blob(const_cast<T*>(x), {numel}, opt));
}

// g *= silu'(z) over m values, the sigmoid by ATen's vectorised kernel (into `scratch`, m values)
template <typename T>
void dsilu_mul(const T* z, int64_t m, T* g, T* scratch) {
  if (m == 0) return;
  const auto opt = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  at::Tensor s = at::from_blob(scratch, {m}, opt);
  at::sigmoid_out(s, at::from_blob(const_cast<T*>(z), {m}, opt));
#pragma omp simd
  for (int64_t i = 0; i < m; ++i) g[i] *= scratch[i] * (T(1) + z[i] * (T(1) - scratch[i]));
}

// ---- the artifact's "quantized" mode: inputs of Linear layers rounded to integer codes, integer GEMM
// (int8 activation codes x int8/int4 weight codes, exact integer sums, one rescale per output), and
// the straight-through backward of QAT (identity inside the clipping range, zero outside).
struct ActQuant {
  int kind = 0;  // 0 none (float GEMM on dequantized weights), 1 linear per tensor, 2 linear in the local frame
  double step = 1.0;
  int qmax = 127;
  at::Tensor codes;  // int8 [out, in] weight codes (engine 0)
  at::Tensor wstep;  // [out] weight steps
  // the codes as floats [out, in] when the integer GEMM runs in floating-point units (engine 1): exact,
  // because every product and partial sum is an integer below 2^24 (float) or 2^53 (double)
  at::Tensor codes_fp;
  // engine 0 on AVX512-VNNI CPUs: `codes` repacked for vpdpbusd (pack_int8_simd), with 128 x the sum of each
  // output's codes (the activation codes enter as unsigned bytes, code + 128); `seg` rows per packed segment
  at::Tensor simd_w, simd_corr;
  int64_t seg = 0;
};

#ifdef GAQ_INT8_SIMD
// Repack int8 weight codes [out, in] (in % 4 == 0) for vpdpbusd, one segment of `seg` rows at a time (the
// radial filter's layers are sliced by segment): per segment, blocks of 16 rows, padded with zero rows; per
// block [in / 4][16 rows][4 codes]. simd_corr holds 128 x the sum of each (padded) row's codes.
void pack_int8_simd(ActQuant& q, int64_t out, int64_t in, int64_t seg) {
  if (!q.codes.defined() || in % 4 != 0 || seg <= 0 || out % seg != 0) return;  // the portable loop instead
  const int64_t K4 = in / 4, nb = (seg + 15) / 16, nseg = out / seg;
  q.simd_w = at::zeros({nseg * nb * K4 * 64}, at::kChar);
  q.simd_corr = at::zeros({nseg * nb * 16}, at::kInt);
  const int8_t* src = q.codes.data_ptr<int8_t>();
  int8_t* dst = q.simd_w.data_ptr<int8_t>();
  int32_t* corr = q.simd_corr.data_ptr<int32_t>();
  for (int64_t g = 0; g < nseg; ++g)
    for (int64_t r = 0; r < seg; ++r) {
      const int64_t b = g * nb + r / 16, lane = r % 16;
      const int8_t* row = src + (g * seg + r) * in;
      int32_t sum = 0;
      for (int64_t k = 0; k < in; ++k) {
        dst[((b * K4 + k / 4) * 16 + lane) * 4 + k % 4] = row[k];
        sum += row[k];
      }
      corr[b * 16 + lane] = 128 * sum;
    }
  q.seg = seg;
}

// y [m, rows] = x_codes [m, in] . (segment `g` of the weight codes)^T as exact integers: the int32 sums of the
// portable loop, 64 products per vpdpbusd (unsigned activation byte x signed weight code, hence the +128
// shift and its correction), converted to T exactly
template <typename T>
void int8_simd_linear(const int8_t* xc, int64_t m, int64_t in, const ActQuant& q, int64_t g, int64_t rows, T* y) {
  const int64_t K4 = in / 4, nb = (rows + 15) / 16;
  const int8_t* wp = q.simd_w.data_ptr<int8_t>() + g * nb * K4 * 64;
  const int32_t* corr = q.simd_corr.data_ptr<int32_t>() + g * nb * 16;
  // rows split over torch's threads (each row's sums in one order: the same bits at any thread count)
  at::parallel_for(0, m, 16, [&](int64_t i0, int64_t i1) {
  alignas(64) int32_t lanes[16];
  for (int64_t i = i0; i < i1; ++i) {
    const int8_t* xr = xc + i * in;
    for (int64_t b = 0; b < nb; ++b) {
      __m512i acc = _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_loadu_si512(corr + b * 16));
      const int8_t* wb = wp + b * K4 * 64;
      for (int64_t k = 0; k < K4; ++k) {
        uint32_t four;
        std::memcpy(&four, xr + 4 * k, 4);
        acc = _mm512_dpbusd_epi32(acc, _mm512_set1_epi32(static_cast<int>(four ^ 0x80808080u)),
                                  _mm512_loadu_si512(wb + k * 64));
      }
      const int64_t n = std::min<int64_t>(16, rows - b * 16);
      T* yo = y + i * rows + b * 16;
      if constexpr (std::is_same<T, float>::value) {
        _mm512_mask_storeu_ps(yo, static_cast<__mmask16>((1u << n) - 1), _mm512_cvtepi32_ps(acc));
      } else {
        _mm512_store_si512(lanes, acc);
        for (int64_t o = 0; o < n; ++o) yo[o] = static_cast<T>(lanes[o]);
      }
    }
  }
  });
}
#endif

bool int8_simd() {
#ifdef GAQ_INT8_SIMD
  return true;
#else
  return false;
#endif
}

// activation codes of x and the straight-through mask, in one pass: as int8 (engine 0: `codes`) or, where
// the GEMM runs in floating-point units (engine 1, q.codes_fp set), straight as floats into `fcodes`
template <typename T>
void quantize_codes(const T* x, int64_t numel, const ActQuant& q, int8_t* codes, T* fcodes, T* mask) {
  const T s = T(q.step), lo = T(-q.qmax), hi = T(q.qmax);
  if (q.codes_fp.defined()) {
#pragma omp simd
    for (int64_t i = 0; i < numel; ++i) {
      const T t = x[i] / s;  // as torch: x / step, clamp, round half to even
      mask[i] = (t >= lo && t <= hi) ? T(1) : T(0);
      fcodes[i] = std::nearbyint(std::min(std::max(t, lo), hi));
    }
    return;
  }
#pragma omp simd
  for (int64_t i = 0; i < numel; ++i) {
    const T t = x[i] / s;
    mask[i] = (t >= lo && t <= hi) ? T(1) : T(0);
    codes[i] = static_cast<int8_t>(std::nearbyint(std::min(std::max(t, lo), hi)));
  }
}

// Y [m, rows] = Y * (sa * ws) + b: one copy of this loop (not inlined) so that both engines round alike
template <typename T>
__attribute__((noinline)) void rescale_codes(T* Y, int64_t m, int64_t rows, T sa, const T* ws, const T* b) {
  for (int64_t i = 0; i < m; ++i)
    for (int64_t o = 0; o < rows; ++o) Y[i * rows + o] = Y[i * rows + o] * (sa * ws[o]) + (b ? b[o] : T(0));
}

// y [m, rows] = (x_codes [m, in] . w_codes[row0:row0+rows]^T) * step_x * step_w + bias
// Engine 0: int32 accumulation in a loop. Engine 1 (q.codes_fp set): the same integer products and sums
// through the BLAS GEMM in floating-point units, exact below 2^24 / 2^53, so both engines give identical
// bits; at these shapes this int8 loop (and torch._int_mm) is slower than MKL's sgemm.
// Engine 1 reads the codes as floats from `xf` (quantize_codes wrote them there).
template <typename T>
void int_linear(const int8_t* xc, const T* xf, int64_t m, int64_t in, const ActQuant& q, const T* bias, int64_t row0,
                int64_t rows, T* y) {
  if (q.codes_fp.defined()) {
    linear_nt<T>(xf, m, in, q.codes_fp.template data_ptr<T>() + row0 * in, rows, nullptr, y);  // integer-valued
#ifdef GAQ_INT8_SIMD
  } else if (q.simd_w.defined() && row0 % q.seg == 0 && rows == q.seg) {
    int8_simd_linear<T>(xc, m, in, q, row0 / q.seg, rows, y);
#endif
  } else {
    const int8_t* wc = q.codes.data_ptr<int8_t>() + row0 * in;
    for (int64_t i = 0; i < m; ++i) {
      const int8_t* __restrict__ xr = xc + i * in;
      for (int64_t o = 0; o < rows; ++o) {
        const int8_t* __restrict__ wr = wc + o * in;
        int32_t acc = 0;
        for (int64_t k = 0; k < in; ++k) acc += static_cast<int32_t>(xr[k]) * static_cast<int32_t>(wr[k]);
        y[i * rows + o] = static_cast<T>(acc);
      }
    }
  }
  rescale_codes<T>(y, m, rows, T(q.step), q.wstep.template data_ptr<T>() + row0, bias);
}

// local frames of l=1 features v [n, 3, C] as gaq_calc.quant.primitives.local_frame: rows e1 (largest
// channel), e2 (largest remainder orthogonal to e1, Gram-Schmidt; a fixed perpendicular when collinear
// within rel_tol), e3 = e1 x e2
template <typename T>
void local_frames(const T* v, int64_t n, int64_t C, T* frames, double rel_tol) {
  for (int64_t i = 0; i < n; ++i) {
    const T* x = v + i * 3 * C;
    auto norm3 = [](T a, T b, T c) { return std::sqrt(a * a + b * b + c * c); };
    int64_t k1 = 0;
    T best = T(-1);
    for (int64_t c = 0; c < C; ++c) {
      const T nr = norm3(x[c], x[C + c], x[2 * C + c]);
      if (nr > best) { best = nr; k1 = c; }
    }
    T e1[3] = {x[k1], x[C + k1], x[2 * C + k1]};
    const T fn = norm3(e1[0], e1[1], e1[2]);
    if (fn > T(0)) {
      for (int a = 0; a < 3; ++a) e1[a] /= std::max(fn, T(1e-30));
    } else {
      e1[0] = 1; e1[1] = 0; e1[2] = 0;
    }
    best = T(-1);
    T second[3] = {0, 0, 0};
    for (int64_t c = 0; c < C; ++c) {
      const T d = e1[0] * x[c] + e1[1] * x[C + c] + e1[2] * x[2 * C + c];
      const T p0 = x[c] - e1[0] * d, p1 = x[C + c] - e1[1] * d, p2 = x[2 * C + c] - e1[2] * d;
      const T nr = norm3(p0, p1, p2);
      if (nr > best) { best = nr; second[0] = p0; second[1] = p1; second[2] = p2; }
    }
    const T sn = norm3(second[0], second[1], second[2]);
    T e2[3];
    if (sn > T(rel_tol) * fn) {
      for (int a = 0; a < 3; ++a) e2[a] = second[a] / std::max(sn, T(1e-30));
    } else {  // perpendicular to e1 and to the Cartesian axis least aligned with it
      int ax = 0;
      for (int a = 1; a < 3; ++a)
        if (std::abs(e1[a]) < std::abs(e1[ax])) ax = a;
      T u[3] = {0, 0, 0};
      u[ax] = 1;
      T f[3] = {e1[1] * u[2] - e1[2] * u[1], e1[2] * u[0] - e1[0] * u[2], e1[0] * u[1] - e1[1] * u[0]};
      const T fnr = norm3(f[0], f[1], f[2]);
      for (int a = 0; a < 3; ++a) e2[a] = f[a] / fnr;
    }
    const T e3[3] = {e1[1] * e2[2] - e1[2] * e2[1], e1[2] * e2[0] - e1[0] * e2[2], e1[0] * e2[1] - e1[1] * e2[0]};
    T* fr = frames + i * 9;
    for (int a = 0; a < 3; ++a) { fr[a] = e1[a]; fr[3 + a] = e2[a]; fr[6 + a] = e3[a]; }
  }
}

// y [n, 3, C] = M x [n, 3, C] per atom with M = its frame [3, 3] (rows e1, e2, e3) or, with `transpose`,
// M^T: the l=1 features in frame coordinates and back (a 3 x 3 matrix per atom, no ATen bmm call)
template <typename T>
void frame_apply(const T* frames, int64_t n, const T* x, int64_t C, T* y, bool transpose) {
  for (int64_t i = 0; i < n; ++i) {
    const T* fr = frames + i * 9;
    const T* xi = x + i * 3 * C;
    T* yi = y + i * 3 * C;
    for (int a = 0; a < 3; ++a) {
      const T m0 = transpose ? fr[a] : fr[3 * a], m1 = transpose ? fr[3 + a] : fr[3 * a + 1],
              m2 = transpose ? fr[6 + a] : fr[3 * a + 2];
      T* __restrict__ ya = yi + a * C;
#pragma omp simd
      for (int64_t c = 0; c < C; ++c) ya[c] = m0 * xi[c] + m1 * xi[C + c] + m2 * xi[2 * C + c];
    }
  }
}

// ---- input checks. The op is reachable from Python and TorchScript with any arguments, and the loops
// below index raw pointers with receivers, senders, species and batch, so every shape, dtype and index
// range is checked first: bad input raises ValueError (TORCH_CHECK_VALUE) with a one-line message, never
// reads or writes out of bounds. Integer passes over n + E entries; valid input is not copied.
#define GAQ_CHECK(cond, ...) TORCH_CHECK_VALUE(cond, "gaq::energy_forces: ", __VA_ARGS__)

// ---- the named, versioned weight layout (kLayoutVersion = 2; gaq_calc/kernels/fused.py emits it)
//   embedding.weight [S, F]; rbf.frequencies [K];
//   radial.hidden.weight [R, K], radial.hidden.bias [R] (both absent without a hidden layer: R = K);
//   radial.filter.weight [L W, R], W = 3F + H: rows l W .. (l + 1) W - 1 are layer l's (sv, s, vv, bias);
//   layers.{l}.norm.{weight,bias} [F]; layers.{l}.qk.weight [2F, F]; layers.{l}.value.{weight [2F, F], bias [2F]};
//   layers.{l}.log_tau [H]; layers.{l}.exchange_in.{weight [F, 2F], bias [F]};
//   layers.{l}.exchange_out.{weight [3F, F], bias [3F]}; layers.{l}.vector_mix.weight [2F, F];
//   readout.norm.{weight,bias} [F]; readout.hidden.{weight [F, F], bias [F]}; readout.out.{weight [1, F], bias [1]};
//   energy_scale (one number); reference_energies [S] (float64).
// Biases may be absent or empty. Activation quantizers (optional, per Linear named above without its
// ".weight"): {name}.act = [kind, act step, qmax] (kind 0 none, 1 linear, 2 local frame: vector mix only),
// {name}.codes [out, in] weight codes (int8: int32 loop; floating point: exact BLAS GEMM) and
// {name}.wstep [out] weight steps. consts = [cutoff, envelope p, rbf prefactor, layer-norm eps, heads].
using Named = c10::Dict<std::string, at::Tensor>;

template <typename T>
struct LinearW {
  std::string name;
  at::Tensor w, b;  // b undefined: no bias
  int64_t out = 0, in = 0;
  ActQuant q;
  const T* W() const { return w.data_ptr<T>(); }
  const T* B() const { return b.defined() ? b.data_ptr<T>() : nullptr; }
};

template <typename T>
struct Weights {
  int64_t S = 0, F = 0, H = 0, D = 0, K = 0, R = 0, L = 0, W = 0;
  bool hidden = false, quantized = false;
  double cutoff = 0, env_p = 0, rbf_pref = 0, eps = 0;
  at::Tensor emb, freq, log_tau_all, ln_all, scale, ref;
  LinearW<T> r1, r2, ro1, ro2;
  struct Layer {
    at::Tensor ln_g, ln_b, log_tau;
    LinearW<T> qk, value, ex_in, ex_out, vmix;
  };
  std::vector<Layer> layers;
  at::Tensor ro_g, ro_b;

  // f(lin) for every Linear: radial network, readout, then each layer's (r1 stays empty without a hidden layer)
  template <typename Fn>
  void each_linear(Fn f) {
    for (LinearW<T>* lin : {&r1, &r2, &ro1, &ro2}) f(*lin);
    for (auto& Ly : layers)
      for (LinearW<T>* lin : {&Ly.qk, &Ly.value, &Ly.ex_in, &Ly.ex_out, &Ly.vmix}) f(*lin);
  }
};

const at::Tensor& need(const Named& d, const std::string& key) {
  auto it = d.find(key);
  GAQ_CHECK(it != d.end(), "weights: '", key, "' is missing (layout version ", kLayoutVersion, ")");
  return it->value();
}

// a floating-point tensor of exactly `shape`, cast to the compute dtype
at::Tensor take(const Named& d, const std::string& key, at::IntArrayRef shape, at::ScalarType dtype) {
  const at::Tensor& t = need(d, key);
  GAQ_CHECK(t.is_floating_point(), "weights['", key, "'] must be floating point, not ", t.scalar_type());
  GAQ_CHECK(t.sizes() == shape, "weights['", key, "'] has shape ", t.sizes(), ", expected ", shape,
            ": the weights do not match the model layout");
  return t.to(dtype).contiguous();
}

// optional bias: absent, empty, or exactly [n]
at::Tensor take_bias(const Named& d, const std::string& key, int64_t n, at::ScalarType dtype) {
  auto it = d.find(key);
  if (it == d.end()) return at::Tensor();
  const at::Tensor& t = it->value();
  GAQ_CHECK(t.is_floating_point(), "weights['", key, "'] must be floating point, not ", t.scalar_type());
  if (t.numel() == 0) return at::Tensor();
  GAQ_CHECK(t.dim() == 1 && t.size(0) == n, "weights['", key, "'] has shape ", t.sizes(), ", expected [", n,
            "] or empty: the weights do not match the model layout");
  return t.to(dtype).contiguous();
}

template <typename T>
void take_linear(const Named& d, LinearW<T>& lin, const std::string& name, int64_t out, int64_t in, bool bias,
                 bool frame_ok, at::ScalarType dtype, std::set<std::string>& used) {
  lin.name = name;
  lin.out = out;
  lin.in = in;
  lin.w = take(d, name + ".weight", {out, in}, dtype);
  used.insert(name + ".weight");
  if (bias) {
    lin.b = take_bias(d, name + ".bias", out, dtype);
    used.insert(name + ".bias");
  }
  auto it = d.find(name + ".act");
  if (it == d.end()) return;
  for (const char* s : {".act", ".codes", ".wstep"}) used.insert(name + s);
  const at::Tensor& meta = it->value();
  GAQ_CHECK(meta.is_floating_point() && meta.numel() == 3, "weights['", name,
            ".act'] must be 3 floats [kind, act step, qmax], not ", meta.scalar_type(), " ", meta.sizes());
  const at::Tensor m = meta.to(at::kDouble).contiguous();
  const double kind = m.data_ptr<double>()[0], step = m.data_ptr<double>()[1], qmax = m.data_ptr<double>()[2];
  GAQ_CHECK(kind == 0 || kind == 1 || kind == 2, "quantizer ", name, ": kind must be 0 (none), 1 (linear) or ",
            "2 (frame), not ", kind);
  if (kind == 0) return;
  GAQ_CHECK(kind == 1 || frame_ok, "quantizer ", name, ": frame rounding (kind 2) applies to the vector mix only");
  GAQ_CHECK(std::isfinite(step) && step > 0, "quantizer ", name, ": the activation step must be > 0, not ", step);
  const at::Tensor& codes = need(d, name + ".codes");
  // int8 activation codes for the integer engines; wider codes (finer steps, for studies) only in engine 1
  const double qmax_limit = codes.is_floating_point() ? double(1 << 23) : 127.0;
  GAQ_CHECK(qmax >= 1 && qmax <= qmax_limit && qmax == std::floor(qmax), "quantizer ", name,
            ": qmax must be an integer in [1, ", qmax_limit, "] (", codes.is_floating_point() ? "float" : "int8",
            " weight codes), not ", qmax);
  const at::Tensor& steps = need(d, name + ".wstep");
  GAQ_CHECK(codes.scalar_type() == at::kChar || codes.is_floating_point(), "quantizer ", name,
            ": weight codes must be int8 or floating point, not ", codes.scalar_type());
  GAQ_CHECK(codes.dim() == 2 && codes.size(0) == out && codes.size(1) == in, "quantizer ", name,
            ": weight codes of shape ", codes.sizes(), " do not match the weight [", out, ", ", in, "]");
  if (codes.is_floating_point()) {  // engine 1 is an integer GEMM only if its sums are exact in the dtype
    const at::Tensor c = codes.to(at::kDouble);
    GAQ_CHECK(at::equal(c, c.round()), "quantizer ", name, ": floating-point weight codes must be integers");
    const double cmax = c.numel() ? c.abs().max().item<double>() : 0.0;
    const bool single = dtype == at::kFloat;
    GAQ_CHECK(double(in) * qmax * cmax < (single ? 16777216.0 : 9007199254740992.0), "quantizer ", name, ": ", in,
              " inputs x qmax ", qmax, " x max |weight code| ", cmax, " is not below 2^", single ? 24 : 53,
              ", so the integer sums would not be exact in ", dtype);
  }
  GAQ_CHECK(steps.is_floating_point() && steps.numel() == out, "quantizer ", name, ": ", out,
            " floating-point weight steps expected, got ", steps.scalar_type(), " ", steps.sizes());
  lin.q.kind = static_cast<int>(kind);
  lin.q.step = step;
  lin.q.qmax = static_cast<int>(qmax);
  // weight codes given as floats select engine 1 (the caller checked exactness: in * qmax * max|code|
  // below 2^24 for float32); int8 codes select the int32 loop. (No copies when dtypes already match.)
  if (codes.is_floating_point())
    lin.q.codes_fp = codes.to(dtype).contiguous();
  else
    lin.q.codes = codes.contiguous();
  lin.q.wstep = steps.to(dtype).reshape({-1}).contiguous();
}

template <typename T>
Weights<T> weights_from_named(int64_t version, const Named& d, at::ArrayRef<double> consts) {
  const auto dtype = c10::CppTypeToScalarType<T>::value;
  GAQ_CHECK(version == kLayoutVersion, "weight layout version ", version, " is not supported: this kernel reads ",
            "version ", kLayoutVersion, " (rebuild the kernel's weights with gaq_calc.kernels.gather_parameters)");
  GAQ_CHECK(consts.size() == 5, "consts must be [cutoff, envelope p, rbf prefactor, layer-norm eps, heads], got ",
            consts.size(), " values");
  for (double c : consts) GAQ_CHECK(std::isfinite(c), "consts must be finite, got ", consts);
  GAQ_CHECK(consts[0] > 0, "the cutoff (consts[0]) must be > 0, not ", consts[0]);
  Weights<T> w;
  std::set<std::string> used;
  w.cutoff = consts[0];
  w.env_p = consts[1];
  w.rbf_pref = consts[2];
  w.eps = consts[3];
  const at::Tensor& emb = need(d, "embedding.weight");
  GAQ_CHECK(emb.dim() == 2 && emb.size(0) >= 1 && emb.size(1) >= 1,
            "weights['embedding.weight'] must be [n_species, features], not ", emb.sizes());
  w.S = emb.size(0);
  w.F = emb.size(1);
  const double heads = consts[4];
  GAQ_CHECK(heads >= 1 && heads == std::floor(heads) && heads <= static_cast<double>(w.F) &&
                w.F % static_cast<int64_t>(heads) == 0,
            "the number of heads (consts[4] = ", heads, ") must be a positive divisor of the feature count ", w.F);
  w.H = static_cast<int64_t>(heads);
  w.D = w.F / w.H;
  w.W = 3 * w.F + w.H;
  const int64_t F = w.F, H = w.H;
  w.emb = take(d, "embedding.weight", {w.S, F}, dtype);
  used.insert("embedding.weight");
  const at::Tensor& fr = need(d, "rbf.frequencies");
  GAQ_CHECK(fr.dim() == 1, "weights['rbf.frequencies'] must be 1-D, not ", fr.sizes());
  w.K = fr.size(0);
  w.freq = take(d, "rbf.frequencies", {w.K}, dtype);
  used.insert("rbf.frequencies");
  while (d.contains("layers." + std::to_string(w.L) + ".norm.weight")) ++w.L;
  const int64_t L = w.L;
  w.hidden = d.contains("radial.hidden.weight");
  w.R = w.K;
  if (w.hidden) {
    const at::Tensor& t = need(d, "radial.hidden.weight");
    GAQ_CHECK(t.dim() == 2, "weights['radial.hidden.weight'] must be 2-D, not ", t.sizes());
    w.R = t.size(0);
    take_linear<T>(d, w.r1, "radial.hidden", w.R, w.K, true, false, dtype, used);
  } else {
    GAQ_CHECK(!d.contains("radial.hidden.bias"), "weights: 'radial.hidden.bias' without 'radial.hidden.weight'");
  }
  take_linear<T>(d, w.r2, "radial.filter", L * w.W, w.R, false, false, dtype, used);
  w.layers.resize(L);
  for (int64_t l = 0; l < L; ++l) {
    auto& Ly = w.layers[l];
    const std::string p = "layers." + std::to_string(l) + ".";
    Ly.ln_g = take(d, p + "norm.weight", {F}, dtype);
    Ly.ln_b = take(d, p + "norm.bias", {F}, dtype);
    Ly.log_tau = take(d, p + "log_tau", {H}, dtype);
    for (const char* s : {"norm.weight", "norm.bias", "log_tau"}) used.insert(p + s);
    take_linear<T>(d, Ly.qk, p + "qk", 2 * F, F, false, false, dtype, used);
    take_linear<T>(d, Ly.value, p + "value", 2 * F, F, true, false, dtype, used);
    take_linear<T>(d, Ly.ex_in, p + "exchange_in", F, 2 * F, true, false, dtype, used);
    take_linear<T>(d, Ly.ex_out, p + "exchange_out", 3 * F, F, true, false, dtype, used);
    take_linear<T>(d, Ly.vmix, p + "vector_mix", 2 * F, F, false, true, dtype, used);
  }
  w.ro_g = take(d, "readout.norm.weight", {F}, dtype);
  w.ro_b = take(d, "readout.norm.bias", {F}, dtype);
  used.insert("readout.norm.weight");
  used.insert("readout.norm.bias");
  take_linear<T>(d, w.ro1, "readout.hidden", F, F, true, false, dtype, used);
  take_linear<T>(d, w.ro2, "readout.out", 1, F, true, false, dtype, used);
  const at::Tensor& sc = need(d, "energy_scale");
  GAQ_CHECK(sc.is_floating_point() && sc.numel() == 1,
            "weights['energy_scale'] must be one floating-point number, not of shape ", sc.sizes());
  w.scale = sc.to(dtype).reshape({1}).contiguous();
  used.insert("energy_scale");
  const at::Tensor& ref = need(d, "reference_energies");
  GAQ_CHECK(ref.is_floating_point(), "weights['reference_energies'] must be floating point, not ", ref.scalar_type());
  GAQ_CHECK(ref.sizes() == at::IntArrayRef({w.S}), "weights['reference_energies'] has shape ", ref.sizes(),
            ", expected [", w.S, "]: the weights do not match the model layout");
  w.ref = ref.to(at::kDouble).contiguous();  // reference energies stay float64
  used.insert("reference_energies");
  for (const auto& item : d) {
    GAQ_CHECK(used.count(item.key()), "weights: unknown name '", item.key(), "' in layout version ", kLayoutVersion,
              " (", L, " layers)");
  }
#ifdef GAQ_INT8_SIMD
  // engine 0's weight codes repacked for the AVX512-VNNI loop; the radial filter is used a layer (W rows) at a time
  w.each_linear([&](LinearW<T>& lin) { pack_int8_simd(lin.q, lin.out, lin.in, &lin == &w.r2 ? w.W : lin.out); });
#endif
  // (an empty r1, without a hidden radial layer, has kind 0)
  w.each_linear([&](LinearW<T>& lin) { w.quantized = w.quantized || lin.q.kind != 0; });
  return w;
}

void check_index_tensor(const at::Tensor& t, const char* name, int64_t len, const char* len_name) {
  GAQ_CHECK(at::isIntegralType(t.scalar_type(), /*includeBool=*/false), name, " must be an integer tensor, not ",
            t.scalar_type());
  GAQ_CHECK(t.dim() == 1, name, " must be 1-D, not of shape ", t.sizes());
  GAQ_CHECK(t.size(0) == len, name, " has ", t.size(0), " entries, expected ", len, " (", len_name, ")");
}

// every entry of x (int64, contiguous) in [0, hi)
void check_range(const at::Tensor& x, const char* name, int64_t hi, const char* hi_name) {
  const int64_t* v = x.data_ptr<int64_t>();
  const int64_t m = x.numel();
  int64_t lo_seen = 0, hi_seen = 0;
  for (int64_t i = 0; i < m; ++i) {
    lo_seen = std::min(lo_seen, v[i]);
    hi_seen = std::max(hi_seen, v[i]);
  }
  if (lo_seen >= 0 && (m == 0 || hi_seen < hi)) return;
  int64_t i = 0;
  while (v[i] >= 0 && v[i] < hi) ++i;
  GAQ_CHECK(false, name, "[", i, "] = ", v[i], " is out of range: ", name, " must lie in [0, ", hi, ") (", hi_name,
            " = ", hi, ")");
}

// one pass over the values, no temporaries (it runs on every call)
bool all_finite(const at::Tensor& t) {
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "all_finite", [&] {
    const at::Tensor c = t.contiguous();
    const scalar_t* p = c.data_ptr<scalar_t>();
    for (int64_t i = 0, n = c.numel(); i < n; ++i)
      if (!std::isfinite(static_cast<double>(p[i]))) return false;
    return true;
  });
}

void check_graph(const at::Tensor& positions, const at::Tensor& species, const at::Tensor& receivers,
                 const at::Tensor& senders, const at::Tensor& shifts, const at::Tensor& batch, int64_t n_graphs) {
  GAQ_CHECK(positions.device().is_cpu(), "gaq::energy_forces is a CPU kernel");
  GAQ_CHECK(positions.scalar_type() == at::kFloat || positions.scalar_type() == at::kDouble,
            "positions must be float32 or float64, not ", positions.scalar_type());
  GAQ_CHECK(positions.dim() == 2 && positions.size(1) == 3, "positions must be [n_atoms, 3], not ",
            positions.sizes());
  const int64_t n = positions.size(0), E = receivers.dim() >= 1 ? receivers.size(0) : -1;
  check_index_tensor(species, "species", n, "n_atoms, from positions");
  check_index_tensor(receivers, "receivers", E, "n_edges");
  check_index_tensor(senders, "senders", E, "n_edges, from receivers");
  check_index_tensor(batch, "batch", n, "n_atoms, from positions");
  GAQ_CHECK(shifts.is_floating_point(), "shifts must be floating point, not ", shifts.scalar_type());
  GAQ_CHECK(shifts.dim() == 2 && shifts.size(0) == E && shifts.size(1) == 3, "shifts must be [n_edges, 3] = [", E,
            ", 3], not ", shifts.sizes());
  GAQ_CHECK(n_graphs >= 1, "n_graphs must be >= 1, not ", n_graphs);
  // a NaN would round to activation code 0 in the int8 engine and give a finite energy
  GAQ_CHECK(all_finite(positions) && all_finite(shifts), "positions and shifts must be finite");
}

// ---- the graph's edge structure, built once per edge list and reused while it stays the same (MD steps
// between neighbour-list changes): edges grouped by receiver and by sender (counting sort, stable, so an
// atom's edges keep their order and every per-atom sum runs in the order a serial scatter would), and
// unordered pairs. An edge (r, s, shift) and its reverse (s, r, -shift) have the same length to the bit
// (the vector is negated exactly), so the distance, envelope, Bessel basis, radial network and filters are
// computed once per pair and their gradients summed over the pair's edges.
struct Topology {
  int64_t n = -1, E = -1, P = 0;
  std::vector<int64_t> key_r, key_s;  // the edge list it was built for
  std::vector<double> key_sh;
  std::vector<int64_t> rptr, by_rcv;  // edges of receiver i: by_rcv[rptr[i] .. rptr[i + 1]]
  std::vector<int64_t> sptr, by_snd;  // edges of sender i: by_snd[sptr[i] .. sptr[i + 1]]
  std::vector<int64_t> pair_of;       // [E] the pair of an edge
  std::vector<int64_t> pair_e, pair_r;  // [P] the pair's first edge, its reverse (-1: none)

  template <typename T>
  bool same(int64_t n_, int64_t E_, const int64_t* r, const int64_t* s, const T* sh) const {
    if (n_ != n || E_ != E) return false;
    if (!std::equal(r, r + E, key_r.begin()) || !std::equal(s, s + E, key_s.begin())) return false;
    for (int64_t i = 0; i < 3 * E; ++i)
      if (static_cast<double>(sh[i]) != key_sh[i]) return false;
    return true;
  }

  static void group(const int64_t* key, int64_t n, int64_t E, std::vector<int64_t>& ptr, std::vector<int64_t>& order) {
    ptr.assign(n + 1, 0);
    for (int64_t e = 0; e < E; ++e) ++ptr[key[e] + 1];
    for (int64_t i = 0; i < n; ++i) ptr[i + 1] += ptr[i];
    std::vector<int64_t> next(ptr.begin(), ptr.end() - 1);
    order.resize(E);
    for (int64_t e = 0; e < E; ++e) order[next[key[e]]++] = e;
  }

  template <typename T>
  void build(int64_t n_, int64_t E_, const int64_t* r, const int64_t* s, const T* sh) {
    if (same(n_, E_, r, s, sh)) return;
    n = n_;
    E = E_;
    key_r.assign(r, r + E);
    key_s.assign(s, s + E);
    key_sh.assign(sh, sh + 3 * E);
    group(r, n, E, rptr, by_rcv);
    group(s, n, E, sptr, by_snd);
    pair_of.assign(E, -1);
    pair_e.clear();
    pair_r.clear();
    for (int64_t e = 0; e < E; ++e) {
      if (pair_of[e] >= 0) continue;
      const int64_t p = static_cast<int64_t>(pair_e.size());
      pair_of[e] = p;
      pair_e.push_back(e);
      int64_t back = -1;  // the reverse edge: receiver s[e], sender r[e], shift -shift[e], not yet paired
      for (int64_t j = rptr[s[e]]; j < rptr[s[e] + 1] && back < 0; ++j) {
        const int64_t c = by_rcv[j];
        if (c != e && pair_of[c] < 0 && s[c] == r[e] && sh[3 * c] == -sh[3 * e] && sh[3 * c + 1] == -sh[3 * e + 1] &&
            sh[3 * c + 2] == -sh[3 * e + 2])
          back = c;
      }
      if (back >= 0) pair_of[back] = p;
      pair_r.push_back(back);
    }
    P = static_cast<int64_t>(pair_e.size());
  }
};

// f(begin, end) over [0, m) split among torch's threads (at::parallel_for: inline at 1 thread, below the
// grain, or inside another parallel region). Every item (atom, edge, pair) is computed by one thread with
// its sums in a fixed order, so results do not depend on the thread count or the split.
template <typename Fn>
inline void parallel(int64_t m, int64_t grain, const Fn& f) {
  if (m > 0) at::parallel_for(0, m, grain, f);
}

// ---- one workspace per graph size: every buffer of a call, carved from one arena (64-byte aligned
// pieces, like ATen's allocations), grown when a larger graph comes and otherwise reused as is.
// Per-pair buffers (distance-only quantities: Bessel basis, radial network, filters) have P rows.
template <typename T>
struct LayerBuf {
  T *h, *v, *x, *mean0, *rstd0, *qkn, *qknorm, *ex, *score, *S, *alpha, *val;
  T *h1, *v1, *mean1, *rstd1, *vm, *vn, *dot, *z2, *a;
  T *m_qk, *m_v, *m_ein, *m_eout, *m_vm, *frames;  // quantized mode: straight-through masks, frames
  bool has_m_qk, has_m_v, has_m_ein, has_m_eout, has_m_vm, has_frames;
};

template <typename T>
struct Workspace {
  at::Tensor arena;
  std::vector<int8_t> codes, radial_codes;
  int64_t n = -1, E = -1, P = -1;
  // geometry (u, dist per edge) and radial network (per pair)
  T *u, *dist, *env, *denv, *rbf, *drbf, *z1, *radial_in, *m_r1, *m_r2, *radial_f, *scratch;
  bool has_m_r1 = false, has_m_r2 = false;
  T *rad;       // [L, P, W]: every layer's filters (sv, s, vv, head bias) per pair
  T *sp, *dsp;  // [L, P, H]: softplus of the head-bias filters and its derivative
  std::vector<LayerBuf<T>> layer;
  T *hL, *vL;  // the features after the last layer
  // forward temporaries
  T *cin, *yn, *sz, *comp, *yf;
  // readout
  T *yr, *mr, *sr, *t, *st, *o, *m_ro1, *m_ro2;
  bool has_m_ro1 = false, has_m_ro2 = false;
  // backward
  T *gt, *gy, *gh, *gv, *ga, *gvm, *gz2, *gc, *gh1, *gxq, *gv1, *ghin, *gvin, *gval, *galpha, *gqk, *gS, *gx, *gx2;
  T *grad_rad;   // [E, W] one layer's filter gradients per edge
  T *grad_pair;  // [P, W] one layer's filter gradients, summed over each pair's edges
  T *grad_radial_in, *grbf, *genv, *gY, *tmp3;
  T *gmy, *gcos, *gvec, *gd;
  T *af;  // [E, F] alpha per feature channel of the layer at hand (one buffer for all layers: a smaller working set)  // per edge: sum_a dE/dmsg_a Y_a [E, F], dE/dcos [E, H], dE/dvec [E, 3]; per pair dE/dd

  // Carve the arena for a graph of n atoms, E edges, P pairs: with base == nullptr only count.
  int64_t carve(const Weights<T>& w, int64_t n_, int64_t E_, int64_t P_, T* base) {
    const int64_t F = w.F, H = w.H, K = w.K, R = w.R, W = w.W, L = w.L;
    int64_t off = 0;
    auto take = [&](T*& p, int64_t numel) {
      p = base ? base + off : nullptr;
      off += (std::max<int64_t>(numel, 1) + 15) / 16 * 16;  // 64 bytes for float, 128 for double
    };
    auto maybe = [&](T*& p, bool& has, bool cond, int64_t numel) {
      has = cond;
      if (cond) take(p, numel); else p = nullptr;
    };
    const int64_t n = n_, E = E_, P = P_;
    take(u, E * 3); take(dist, E); take(env, P); take(denv, P); take(rbf, P * K); take(drbf, P * K);
    if (w.hidden) { take(z1, P * R); take(radial_in, P * R); } else { z1 = nullptr; radial_in = nullptr; }
    maybe(m_r1, has_m_r1, w.hidden && w.r1.q.kind == 1, P * K);
    maybe(m_r2, has_m_r2, w.r2.q.kind == 1, P * R);
    bool has_radial_f;  // the filter layer's input codes as floats (engine 1), shared by all layers
    maybe(radial_f, has_radial_f, w.r2.q.kind == 1, P * R);
    take(scratch, std::max({P * K, P * R, 3 * n * F, 2 * n * F}));
    take(rad, P * L * W); take(sp, P * L * H); take(dsp, P * L * H);
    layer.resize(L);
    for (int64_t l = 0; l < L; ++l) {
      auto& B = layer[l];
      const auto& Ly = w.layers[l];
      take(B.h, n * F); take(B.v, n * 3 * F); take(B.x, n * F); take(B.mean0, n);
      take(B.rstd0, n); take(B.qkn, n * 2 * F); take(B.qknorm, n * 2 * H); take(B.ex, E * H);
      take(B.score, E * H); take(B.S, n * H); take(B.alpha, E * H); take(B.val, n * 2 * F);
      take(B.h1, n * F); take(B.v1, n * 3 * F); take(B.mean1, n); take(B.rstd1, n); take(B.vm, n * 6 * F);
      take(B.vn, n * F); take(B.dot, n * F); take(B.z2, n * F); take(B.a, n * 3 * F);
      maybe(B.m_qk, B.has_m_qk, Ly.qk.q.kind == 1, n * F);
      maybe(B.m_v, B.has_m_v, Ly.value.q.kind == 1, n * F);
      maybe(B.m_ein, B.has_m_ein, Ly.ex_in.q.kind == 1, n * 2 * F);
      maybe(B.m_eout, B.has_m_eout, Ly.ex_out.q.kind == 1, n * F);
      maybe(B.m_vm, B.has_m_vm, Ly.vmix.q.kind != 0, n * 3 * F);
      maybe(B.frames, B.has_frames, Ly.vmix.q.kind == 2, n * 9);
    }
    take(hL, n * F); take(vL, n * 3 * F);
    take(cin, n * 2 * F); take(yn, n * F); take(sz, n * F); take(comp, n * 3 * F); take(yf, n * 6 * F);
    take(yr, n * F); take(mr, n); take(sr, n); take(t, n * F); take(st, n * F); take(o, n);
    maybe(m_ro1, has_m_ro1, w.ro1.q.kind == 1, n * F);
    maybe(m_ro2, has_m_ro2, w.ro2.q.kind == 1, n * F);
    take(gt, n * F); take(gy, n * F); take(gh, n * F); take(gv, n * 3 * F); take(ga, n * 3 * F);
    take(gvm, n * 6 * F); take(gz2, n * F); take(gc, n * 2 * F); take(gh1, n * F); take(gxq, n * 3 * F);
    take(gv1, n * 3 * F); take(ghin, n * F); take(gvin, n * 3 * F); take(gval, n * 2 * F); take(galpha, E * H);
    take(gqk, n * 2 * F); take(gS, n * H); take(gx, n * F); take(gx2, n * F); take(grad_rad, E * W);
    take(grad_pair, P * W); take(grad_radial_in, P * R); take(grbf, P * K); take(genv, E); take(gY, E * 3);
    take(tmp3, n * 3 * F); take(gmy, E * F); take(gcos, E * H); take(gvec, E * 3); take(gd, P); take(af, E * F);
    return off;
  }

  void prepare(const Weights<T>& w, int64_t n_, int64_t E_, int64_t P_) {
    if (n_ == n && E_ == E && P_ == P) return;
    const int64_t need = carve(w, n_, E_, P_, nullptr);
    if (!arena.defined() || arena.numel() < need)  // grow with room, so that MD's changing edge count fits
      arena = at::empty({need + need / 4}, at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
    carve(w, n_, E_, P_, arena.data_ptr<T>());
    codes.resize(std::max({P_ * w.K, P_ * w.R, 3 * n_ * w.F, 2 * n_ * w.F, int64_t(1)}));
    radial_codes.resize(std::max<int64_t>(P_ * w.R, 1));
    n = n_;
    E = E_;
    P = P_;
  }
};

// per-stage wall time (the `profile` flag of gaq::Model): where a call's time goes, without perf
enum Stage { kGeometry, kRadial, kAttention, kMessages, kExchange, kReadout, kReadoutBw, kExchangeBw, kMessagesBw,
             kAttentionBw, kRadialBw, kGeometryBw, kStages };
const char* const kStageNames[kStages] = {
    "geometry", "radial filters", "attention", "messages", "exchange", "readout", "readout backward",
    "exchange backward", "messages backward", "attention backward", "radial backward", "geometry backward"};

struct StageClock {
  bool on = false;
  double* acc = nullptr;
  std::chrono::steady_clock::time_point t0;
  void start() { if (on) t0 = std::chrono::steady_clock::now(); }
  void stop(Stage s) {
    if (on) acc[s] += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }
};

// ---- one energy + forces evaluation, stage by stage: forward (geometry, radial filters of all layers,
// then per layer attention, messages, exchange; readout) keeps in the workspace what the reverse pass
// needs; the reverse pass (readout, then per layer from the last: exchange, messages, attention, each with
// its filter gradient; radial network; geometry) ends at the forces.
// Edge loops run over atoms: receiver-side sums over an atom's incoming edges, sender-side sums over its
// outgoing ones (Topology), each atom owned by one thread: no atomics, the same bits at any thread count.
constexpr int64_t kAtomGrain = 4;    // atoms per task in edge loops (an azobenzene atom has ~14 edges)
constexpr int64_t kEdgeGrain = 64;   // edges or pairs per task in per-edge loops
template <typename T>
struct Pass {
  const Weights<T>& w;
  Workspace<T>& ws;
  const Topology& tp;
  StageClock& clock;
  const T* P;        // positions [n, 3]
  const T* SH;       // shifts [E, 3]
  const int64_t* spc;
  const int64_t* rcv;
  const int64_t* snd;
  const int64_t* bat;
  int64_t n, E, G;
  bool split_gemms;  // small graph (MKL on one thread): the per-pair GEMMs run as row blocks on torch's threads
  const T sqrt3 = std::sqrt(T(3));

  // Per-pair GEMMs of a small graph in fixed blocks of kGemmRows rows, the blocks spread over torch's
  // threads (a large graph's GEMMs are one call, threaded by MKL itself). The blocks do not depend on the
  // thread count, so neither do the bits (one sgemm over all rows can round a row differently from one
  // over a block: measured). At 1 thread the extra calls cost ~1% of a call.
  static constexpr int64_t kGemmRows = 96;
  template <typename Fn>
  void row_blocks(int64_t m, const Fn& gemm) {
    if (!split_gemms) {
      gemm(0, m);
      return;
    }
    const int64_t blocks = (m + kGemmRows - 1) / kGemmRows;
    at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
      const int previous = MKL_Set_Num_Threads_Local(1);  // each block on its own thread alone; put back after
      for (int64_t b = b0; b < b1; ++b) gemm(b * kGemmRows, std::min(m - b * kGemmRows, kGemmRows));
      MKL_Set_Num_Threads_Local(previous);
    });
  }

  int64_t pairs() const { return tp.P; }

  // ws.af [E, F] = layer l's alpha [E, H] per feature channel (the channel's head), written right before
  // the messages and their backward use it: one [E, F] buffer instead of one per layer kept from the
  // forward to the backward (at E = 332, 0.4 MB less to stream through the caches every call)
  void alpha_channels(int64_t l) {
    const int64_t F = w.F, H = w.H, D = w.D;
    const T* AL = ws.layer[l].alpha;
    T* AF = ws.af;
    parallel(E, kEdgeGrain, [&](int64_t e0, int64_t e1) {
      for (int64_t e = e0; e < e1; ++e)
        for (int64_t hh = 0; hh < H; ++hh) std::fill(AF + e * F + hh * D, AF + e * F + (hh + 1) * D, AL[e * H + hh]);
    });
  }
  // layer l's filters of pair p: W values (sv [F], s [F], vv [F], head bias [H]); layer-major [L, P, W], so a
  // layer's edge loops read one compact block
  const T* filters(int64_t p, int64_t l) const { return ws.rad + (l * tp.P + p) * w.W; }

  // y [m, out] = Q(x) W^T + b, the Linear `lin` with its activation quantizer (kind 1) or none (kind 0);
  // the straight-through mask goes to `mask` (m * in values) when rounding
  void qlinear(const LinearW<T>& lin, const T* x, int64_t m, T* y, T* mask) {
    if (lin.q.kind == 0) {
      linear_nt<T>(x, m, lin.in, lin.W(), lin.out, lin.B(), y);
      return;
    }
    TORCH_CHECK(lin.q.kind == 1, "frame quantization is applied by the vector-branch code path");
    quantize_codes(x, m * lin.in, lin.q, ws.codes.data(), ws.scratch, mask);
    int_linear<T>(ws.codes.data(), ws.scratch, m, lin.in, lin.q, lin.B(), 0, lin.out, y);
  }

  // gx [m, in] = (gy [m, out] W) * mask: backward of qlinear with respect to its input
  void qlinear_backward(const LinearW<T>& lin, const T* gy, int64_t m, const T* mask, T* gx) {
    linear_nn<T>(gy, m, lin.out, lin.W(), lin.in, gx);
    if (mask)
      for (int64_t i = 0; i < m * lin.in; ++i) gx[i] *= mask[i];
  }

  // ---- forward
  // unit vectors and lengths per edge; envelope and Bessel basis with their r-derivatives per pair
  void geometry() {
    const int64_t K = w.K;
    const T* fr = w.freq.template data_ptr<T>();
    T *U = ws.u, *Dd = ws.dist, *En = ws.env, *dEn = ws.denv, *B = ws.rbf, *dB = ws.drbf;
    const T pp = T(w.env_p), rc = T(w.cutoff), pref = T(w.rbf_pref);
    const T c0 = (pp + 1) * (pp + 2) / 2, c1 = pp * (pp + 2), c2 = pp * (pp + 1) / 2;
    parallel(E, kEdgeGrain, [&](int64_t e0, int64_t e1) {
      for (int64_t e = e0; e < e1; ++e) {
        T d2 = 0, vec[3];
        for (int a = 0; a < 3; ++a) {
          vec[a] = P[snd[e] * 3 + a] - P[rcv[e] * 3 + a] + SH[e * 3 + a];
          d2 += vec[a] * vec[a];
        }
        const T d = std::sqrt(d2);
        Dd[e] = d;
        for (int a = 0; a < 3; ++a) U[e * 3 + a] = vec[a] / d;
      }
    });
    parallel(pairs(), kEdgeGrain, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        const T d = Dd[tp.pair_e[p]];  // the reverse edge's length is the same to the bit
        const T x = d / rc;
        if (x < T(1)) {
          const T xp1 = std::pow(x, pp - 1), xp = xp1 * x;
          En[p] = T(1) - c0 * xp + c1 * xp * x - c2 * xp * x * x;
          dEn[p] = (-c0 * pp * xp1 + c1 * (pp + 1) * xp - c2 * (pp + 2) * xp * x) / rc;
        } else {
          En[p] = 0;
          dEn[p] = 0;
        }
        for (int64_t k = 0; k < K; ++k) {
          const T s = std::sin(fr[k] * d), co = std::cos(fr[k] * d);
          B[p * K + k] = pref * s / d;
          dB[p * K + k] = pref * (fr[k] * co * d - s) / (d * d);
        }
      }
    });
  }

  // the radial network's hidden features (shared by all layers), and their codes in quantized mode
  const T* radial_in = nullptr;
  void radial_hidden() {
    const int64_t Pn = pairs();
    if (w.hidden) {
      qlinear(w.r1, ws.rbf, Pn, ws.z1, ws.m_r1);
      silu_into(ws.z1, Pn * w.R, ws.radial_in);
      radial_in = ws.radial_in;
    } else {
      radial_in = ws.rbf;
    }
    if (w.r2.q.kind == 1)  // the rounded input of the filter layer, shared by all layers
      quantize_codes(radial_in, Pn * w.R, w.r2.q, ws.radial_codes.data(), ws.radial_f, ws.m_r2);
  }

  // every layer's filters [L, P, W] (per pair: half the rows of a per-edge GEMM), and softplus of the
  // head biases with its derivative [L, P, H] (once per pair, not per edge and head)
  void radial_filters() {
    const int64_t Pn = pairs(), L = w.L, W = w.W, R = w.R, F = w.F, H = w.H;
    for (int64_t l = 0; l < L; ++l) {
      T* out = ws.rad + l * Pn * W;
      if (w.r2.q.kind == 1)
        int_linear<T>(ws.radial_codes.data(), ws.radial_f, Pn, R, w.r2.q, nullptr, l * W, W, out);
      else
        row_blocks(Pn, [&](int64_t r0, int64_t m) {
          linear_nt<T>(radial_in + r0 * R, m, R, w.r2.W() + l * W * R, W, nullptr, out + r0 * W);
        });
    }
    parallel(L * Pn, kEdgeGrain, [&](int64_t q0, int64_t q1) {
      for (int64_t q = q0; q < q1; ++q) {  // q = l P + p
        const T* bias = ws.rad + q * W + 3 * F;
        for (int64_t hh = 0; hh < H; ++hh) {
          ws.sp[q * H + hh] = softplus(bias[hh]);
          ws.dsp[q * H + hh] = dsoftplus(bias[hh]);
        }
      }
    });
  }

  // pre-norm, cosine attention weights alpha [E, H] (queries c=0 and keys c=1 L2-normalised per head,
  // temperature tau, head bias from the filters, envelope, normalised over each receiver's edges + 1)
  void attention(int64_t l) {
    const auto& Ly = w.layers[l];
    LayerBuf<T>& C = ws.layer[l];
    const int64_t F = w.F, H = w.H, D = w.D, L = w.L;
    layer_norm(C.h, Ly.ln_g.template data_ptr<T>(), Ly.ln_b.template data_ptr<T>(), C.x, C.mean0, C.rstd0, n, F,
               w.eps);
    qlinear(Ly.qk, C.x, n, C.qkn, C.m_qk);  // [n, 2F]
    {
      T *QK = C.qkn, *NR = C.qknorm;
      for (int64_t i = 0; i < n * 2 * H; ++i) {
        T* row = QK + i * D;
        T s = 0;
#pragma omp simd reduction(+ : s)
        for (int64_t d = 0; d < D; ++d) s += row[d] * row[d];
        const T nrm = std::sqrt(s);
        NR[i] = nrm;
        const T inv = T(1) / std::max(nrm, T(1e-12));
        for (int64_t d = 0; d < D; ++d) row[d] *= inv;
      }
    }
    T tau[64];
    std::vector<T> tau_big;
    T* tpp = tau;
    if (H > 64) { tau_big.resize(H); tpp = tau_big.data(); }
    for (int64_t hh = 0; hh < H; ++hh) tpp[hh] = std::exp(Ly.log_tau.template data_ptr<T>()[hh]);
    const T* QK = C.qkn;
    T *EX = C.ex, *SC = C.score, *SS = C.S, *AL = C.alpha;
    const T *En = ws.env, *SP = ws.sp;
    parallel(n, kAtomGrain, [&](int64_t i0, int64_t i1) {
      for (int64_t r = i0; r < i1; ++r) {
        T* Sr = SS + r * H;
        std::fill(Sr, Sr + H, T(1));
        const T* qr = QK + r * 2 * F;
        for (int64_t j = tp.rptr[r]; j < tp.rptr[r + 1]; ++j) {
          const int64_t e = tp.by_rcv[j], p = tp.pair_of[e];
          const T* ks = QK + snd[e] * 2 * F + F;
          const T* sp = SP + (l * tp.P + p) * H;
          for (int64_t hh = 0; hh < H; ++hh) {
            T cs = 0;
#pragma omp simd reduction(+ : cs)
            for (int64_t d = 0; d < D; ++d) cs += qr[hh * D + d] * ks[hh * D + d];
            const T x = std::exp(tpp[hh] * (cs - T(1)) - sp[hh]);
            EX[e * H + hh] = x;
            SC[e * H + hh] = En[p] * x;
            Sr[hh] += En[p] * x;
          }
        }
        for (int64_t j = tp.rptr[r]; j < tp.rptr[r + 1]; ++j) {
          const int64_t e = tp.by_rcv[j];
          for (int64_t hh = 0; hh < H; ++hh) AL[e * H + hh] = SC[e * H + hh] / Sr[hh];
        }
      }
    });
  }

  // value projection and messages: h1 = h + sum_e alpha f_s value_s, v1 = v + sum_e alpha (f_vv v_s + f_sv value_sv Y)
  void messages(int64_t l) {
    const auto& Ly = w.layers[l];
    LayerBuf<T>& C = ws.layer[l];
    const int64_t F = w.F;
    qlinear(Ly.value, C.x, n, C.val, C.m_v);  // [n, 2F]: (value_sv, value_s)
    alpha_channels(l);
    const T *VAL = C.val, *V = C.v, *AF = ws.af, *U = ws.u;
    T *H1 = C.h1, *V1 = C.v1;
    parallel(n, kAtomGrain, [&](int64_t i0, int64_t i1) {
      for (int64_t r = i0; r < i1; ++r) {
        T* __restrict__ hr = H1 + r * F;
        std::copy(C.h + r * F, C.h + (r + 1) * F, hr);
        std::copy(C.v + r * 3 * F, C.v + (r + 1) * 3 * F, V1 + r * 3 * F);
        for (int64_t j = tp.rptr[r]; j < tp.rptr[r + 1]; ++j) {
          const int64_t e = tp.by_rcv[j], s = snd[e];
          const T* __restrict__ f0 = filters(tp.pair_of[e], l);  // filters: sv, s, vv
          const T* __restrict__ f1 = f0 + F;
          const T* __restrict__ f2 = f0 + 2 * F;
          const T* __restrict__ af = AF + e * F;
          const T* __restrict__ vsv = VAL + s * 2 * F;
          const T* __restrict__ vs = vsv + F;
#pragma omp simd
          for (int64_t f = 0; f < F; ++f) hr[f] += f1[f] * af[f] * vs[f];
          for (int a = 0; a < 3; ++a) {
            const T y = sqrt3 * U[e * 3 + a];
            const T* __restrict__ vsa = V + (s * 3 + a) * F;
            T* __restrict__ vra = V1 + (r * 3 + a) * F;
#pragma omp simd
            for (int64_t f = 0; f < F; ++f) vra[f] += af[f] * (f2[f] * vsa[f] + f0[f] * vsv[f] * y);
          }
        }
      }
    });
  }
  // exchange between the branches through invariants: vector mix (v_u, v_w), |v_w|, <v_u, v_w>, the
  // exchange MLP, then h2 = h1 + a_ss + a_sv <v_u, v_w>, v2 = v1 + a_vv v_u into the next layer's input
  void exchange(int64_t l, T* h_next, T* v_next) {
    const auto& Ly = w.layers[l];
    LayerBuf<T>& C = ws.layer[l];
    const int64_t F = w.F;
    const T *lg = Ly.ln_g.template data_ptr<T>(), *lb = Ly.ln_b.template data_ptr<T>();
    if (Ly.vmix.q.kind == 2) {  // components in the local frame rounded; the mix runs in frame coordinates
      local_frames(C.v1, n, F, C.frames, 1e-7);
      frame_apply(C.frames, n, C.v1, F, ws.comp, false);  // [n, 3, F] components in the frame
      quantize_codes(ws.comp, n * 3 * F, Ly.vmix.q, ws.codes.data(), ws.scratch, C.m_vm);
      int_linear<T>(ws.codes.data(), ws.scratch, 3 * n, F, Ly.vmix.q, nullptr, 0, 2 * F, ws.yf);
      frame_apply(C.frames, n, ws.yf, 2 * F, C.vm, true);  // back to Cartesian: (v_u, v_w)
    } else {
      qlinear(Ly.vmix, C.v1, 3 * n, C.vm, C.m_vm);
    }
    const T* VM = C.vm;
    T *VN = C.vn, *DT = C.dot, *CI = ws.cin;  // cin = (LN(h1), sqrt(|v_w|^2 + 1) - 1)
    for (int64_t i = 0; i < n; ++i) {
#pragma omp simd
      for (int64_t f = 0; f < F; ++f) {
        T sw = 0, sd = 0;
        for (int a = 0; a < 3; ++a) {
          const T vu = VM[(i * 3 + a) * 2 * F + f], vw = VM[(i * 3 + a) * 2 * F + F + f];
          sw += vw * vw;
          sd += vu * vw;
        }
        VN[i * F + f] = std::sqrt(sw + T(1)) - T(1);
        DT[i * F + f] = sd;
        CI[i * 2 * F + F + f] = VN[i * F + f];
      }
    }
    layer_norm(C.h1, lg, lb, ws.yn, C.mean1, C.rstd1, n, F, w.eps);
    for (int64_t i = 0; i < n; ++i)
      for (int64_t f = 0; f < F; ++f) CI[i * 2 * F + f] = ws.yn[i * F + f];
    qlinear(Ly.ex_in, ws.cin, n, C.z2, C.m_ein);
    silu_into(C.z2, n * F, ws.sz);
    qlinear(Ly.ex_out, ws.sz, n, C.a, C.m_eout);  // [n, 3F]: a_vv, a_sv, a_ss
    std::copy(C.h1, C.h1 + n * F, h_next);
    std::copy(C.v1, C.v1 + n * 3 * F, v_next);
    const T *A = C.a;
    for (int64_t i = 0; i < n; ++i) {
      const T* ai = A + i * 3 * F;
#pragma omp simd
      for (int64_t f = 0; f < F; ++f) h_next[i * F + f] += ai[2 * F + f] + ai[F + f] * DT[i * F + f];
      for (int a = 0; a < 3; ++a)
#pragma omp simd
        for (int64_t f = 0; f < F; ++f) v_next[(i * 3 + a) * F + f] += ai[f] * VM[(i * 3 + a) * 2 * F + f];
    }
  }

  // LN, MLP, scale and per-species reference energies, summed per graph in float64
  void readout(double* en) {
    const int64_t F = w.F;
    layer_norm(ws.hL, w.ro_g.template data_ptr<T>(), w.ro_b.template data_ptr<T>(), ws.yr, ws.mr, ws.sr, n, F, w.eps);
    qlinear(w.ro1, ws.yr, n, ws.t, ws.m_ro1);  // [n, F]
    silu_into(ws.t, n * F, ws.st);
    qlinear(w.ro2, ws.st, n, ws.o, ws.m_ro2);  // [n, 1]
    const T scale = w.scale.template data_ptr<T>()[0];
    const double* ref = w.ref.template data_ptr<double>();
    for (int64_t i = 0; i < n; ++i) en[bat[i]] += static_cast<double>(ws.o[i] * scale) + ref[spc[i]];
  }

  // ---- reverse pass: gradient of sum(energy)
  void readout_backward() {
    const int64_t F = w.F;
    const T scale = w.scale.template data_ptr<T>()[0];
    const T *T_ = ws.t, *W2 = w.ro2.W();
    T* GT = ws.gt;
    const T* M2 = ws.m_ro2;
    for (int64_t i = 0; i < n; ++i)
      for (int64_t f = 0; f < F; ++f)
        GT[i * F + f] = scale * W2[f] * (M2 ? M2[i * F + f] : T(1)) * dsilu(T_[i * F + f]);
    qlinear_backward(w.ro1, ws.gt, n, ws.m_ro1, ws.gy);
    std::fill(ws.gh, ws.gh + n * F, T(0));
    layer_norm_backward(ws.hL, w.ro_g.template data_ptr<T>(), ws.mr, ws.sr, ws.gy, F, ws.gh, n, F);
    std::fill(ws.gv, ws.gv + n * 3 * F, T(0));
  }

  // from (gh, gv) of the layer's output to (gh1, gv1) of the messages' output
  void exchange_backward(int64_t l) {
    const auto& Ly = w.layers[l];
    LayerBuf<T>& C = ws.layer[l];
    const int64_t F = w.F;
    {  // h2 = h1 + a_ss + a_sv * dot;  v2 = v1 + a_vv * v_u
      const T *GH = ws.gh, *GV = ws.gv, *A = C.a, *DT = C.dot, *VM = C.vm;
      T *GA = ws.ga, *GVM = ws.gvm;
      for (int64_t i = 0; i < n; ++i) {
        const T* ai = A + i * 3 * F;
        T* gai = GA + i * 3 * F;
#pragma omp simd
        for (int64_t f = 0; f < F; ++f) {
          const T g = GH[i * F + f];
          T s = 0;
          for (int a = 0; a < 3; ++a) s += GV[(i * 3 + a) * F + f] * VM[(i * 3 + a) * 2 * F + f];
          gai[f] = s;
          gai[F + f] = g * DT[i * F + f];
          gai[2 * F + f] = g;
          const T gdot = g * ai[F + f];
          for (int a = 0; a < 3; ++a) {
            const T* vmr = VM + (i * 3 + a) * 2 * F;
            T* gvmr = GVM + (i * 3 + a) * 2 * F;
            gvmr[f] = GV[(i * 3 + a) * F + f] * ai[f] + gdot * vmr[F + f];
            gvmr[F + f] = gdot * vmr[f];
          }
        }
      }
    }
    qlinear_backward(Ly.ex_out, ws.ga, n, C.m_eout, ws.gz2);  // [n, F]
    dsilu_mul(C.z2, n * F, ws.gz2, ws.scratch);
    qlinear_backward(Ly.ex_in, ws.gz2, n, C.m_ein, ws.gc);  // [n, 2F]
    {
      const T *GC = ws.gc, *VM = C.vm, *VN = C.vn;
      T* GVM = ws.gvm;
      for (int64_t i = 0; i < n; ++i)
#pragma omp simd
        for (int64_t f = 0; f < F; ++f) {
          const T k = GC[i * 2 * F + F + f] / (VN[i * F + f] + T(1));
          for (int a = 0; a < 3; ++a) GVM[(i * 3 + a) * 2 * F + F + f] += k * VM[(i * 3 + a) * 2 * F + F + f];
        }
    }
    std::copy(ws.gh, ws.gh + n * F, ws.gh1);
    layer_norm_backward(C.h1, Ly.ln_g.template data_ptr<T>(), C.mean1, C.rstd1, ws.gc, 2 * F, ws.gh1, n, F);
    linear_nn<T>(ws.gvm, 3 * n, 2 * F, Ly.vmix.W(), F, ws.gxq);  // d/d(rounded input) [n, 3, F]
    if (C.has_frames) {  // x_q = Fr^T Q(Fr x): straight-through gradient Fr^T M Fr
      frame_apply(C.frames, n, ws.gxq, F, ws.comp, false);
      for (int64_t i = 0; i < n * 3 * F; ++i) ws.comp[i] *= C.m_vm[i];
      frame_apply(C.frames, n, ws.comp, F, ws.tmp3, true);
      for (int64_t i = 0; i < n * 3 * F; ++i) ws.gv1[i] = ws.gv[i] + ws.tmp3[i];
    } else {
      if (C.has_m_vm)
        for (int64_t i = 0; i < n * 3 * F; ++i) ws.gxq[i] *= C.m_vm[i];
      for (int64_t i = 0; i < n * 3 * F; ++i) ws.gv1[i] = ws.gv[i] + ws.gxq[i];
    }
  }

  // messages: h1 = h + sum_e msg_s, v1 = v + sum_e msg_v; fills the filter gradients (sv, s, vv) of the
  // layer per edge, dE/dalpha, dE/dvalue, dE/dY and gvin = dE/dv. Receiver side first (per edge: what
  // needs the receiver's output gradient), then sender side (sums into the sender's value and v gradients).
  void messages_backward(int64_t l) {
    LayerBuf<T>& C = ws.layer[l];
    const int64_t F = w.F, H = w.H, D = w.D, W = w.W;
    std::copy(ws.gh1, ws.gh1 + n * F, ws.ghin);
    alpha_channels(l);
    const T *GH1 = ws.gh1, *GV1 = ws.gv1, *VAL = C.val, *V = C.v, *AF = ws.af, *U = ws.u;
    T *GVIN = ws.gvin, *GVAL = ws.gval, *GAL = ws.galpha, *GR = ws.grad_rad, *GYp = ws.gY, *GMY = ws.gmy;
    parallel(n, kAtomGrain, [&](int64_t i0, int64_t i1) {
      T buf[2 * 256];
      std::vector<T> big;
      T* gg2 = buf;  // dE/dg_vv
      if (F > 256) { big.resize(2 * F); gg2 = big.data(); }
      T* __restrict__ pr = gg2 + F;  // dE/dalpha per channel
      for (int64_t r = i0; r < i1; ++r) {
        const T* __restrict__ ghr = GH1 + r * F;
        for (int64_t j = tp.rptr[r]; j < tp.rptr[r + 1]; ++j) {
          const int64_t e = tp.by_rcv[j], s = snd[e];
          const T* __restrict__ f0 = filters(tp.pair_of[e], l);
          const T* __restrict__ f1 = f0 + F;
          const T* __restrict__ f2 = f0 + 2 * F;
          T* __restrict__ gf0 = GR + e * W;
          T* __restrict__ gf1 = gf0 + F;
          T* __restrict__ gf2 = gf0 + 2 * F;
          const T* __restrict__ af = AF + e * F;
          const T* __restrict__ vsv = VAL + s * 2 * F;
          const T* __restrict__ vs = vsv + F;
          T* __restrict__ gmy = GMY + e * F;  // sum_a dE/dmsg_a * Y_a
#pragma omp simd
          for (int64_t f = 0; f < F; ++f) { gmy[f] = 0; gg2[f] = 0; }
          for (int a = 0; a < 3; ++a) {
            const T y = sqrt3 * U[e * 3 + a];
            const T* __restrict__ gm = GV1 + (r * 3 + a) * F;
            const T* __restrict__ vsa = V + (s * 3 + a) * F;
            T su = 0;
#pragma omp simd reduction(+ : su)
            for (int64_t f = 0; f < F; ++f) {
              gmy[f] += gm[f] * y;
              gg2[f] += gm[f] * vsa[f];
              su += gm[f] * f0[f] * af[f] * vsv[f];
            }
            GYp[e * 3 + a] += sqrt3 * su;  // dE/du_a of the sv message (Y = sqrt3 u)
          }
#pragma omp simd
          for (int64_t f = 0; f < F; ++f) {
            const T gsv = vsv[f] * gmy[f], gg1 = ghr[f] * vs[f];
            gf0[f] = gsv * af[f];
            gf1[f] = gg1 * af[f];
            gf2[f] = gg2[f] * af[f];
            pr[f] = gsv * f0[f] + gg1 * f1[f] + gg2[f] * f2[f];
          }
          for (int64_t hh = 0; hh < H; ++hh) {
            T su = 0;
#pragma omp simd reduction(+ : su)
            for (int64_t d = 0; d < D; ++d) su += pr[hh * D + d];
            GAL[e * H + hh] = su;
          }
        }
      }
    });
    parallel(n, kAtomGrain, [&](int64_t i0, int64_t i1) {
      for (int64_t s = i0; s < i1; ++s) {
        T* __restrict__ gvsv = GVAL + s * 2 * F;
        T* __restrict__ gvs = gvsv + F;
        std::fill(gvsv, gvsv + 2 * F, T(0));
        std::copy(GV1 + s * 3 * F, GV1 + (s + 1) * 3 * F, GVIN + s * 3 * F);
        for (int64_t j = tp.sptr[s]; j < tp.sptr[s + 1]; ++j) {
          const int64_t e = tp.by_snd[j], r = rcv[e];
          const T* __restrict__ f0 = filters(tp.pair_of[e], l);
          const T* __restrict__ f1 = f0 + F;
          const T* __restrict__ f2 = f0 + 2 * F;
          const T* __restrict__ af = AF + e * F;
          const T* __restrict__ gmy = GMY + e * F;
          const T* __restrict__ ghr = GH1 + r * F;
          for (int a = 0; a < 3; ++a) {
            const T* __restrict__ gm = GV1 + (r * 3 + a) * F;
            T* __restrict__ gvin = GVIN + (s * 3 + a) * F;
#pragma omp simd
            for (int64_t f = 0; f < F; ++f) gvin[f] += gm[f] * f2[f] * af[f];
          }
#pragma omp simd
          for (int64_t f = 0; f < F; ++f) {
            gvsv[f] += f0[f] * af[f] * gmy[f];
            gvs[f] += ghr[f] * f1[f] * af[f];
          }
        }
      }
    });
  }

  // alpha = score / S[r], score = env * exp(tau (cos - 1) - softplus(b)): head-bias filter gradients,
  // dE/denv, then through the L2 normalisation, both projections and the pre-norm into ghin
  void attention_backward(int64_t l) {
    const auto& Ly = w.layers[l];
    LayerBuf<T>& C = ws.layer[l];
    const int64_t F = w.F, H = w.H, D = w.D, W = w.W, L = w.L;
    const T *GAL = ws.galpha, *AL = C.alpha, *SS = C.S, *SC = C.score, *EX = C.ex, *QK = C.qkn, *DSP = ws.dsp;
    T *GQK = ws.gqk, *gS = ws.gS, *GEN = ws.genv, *GR = ws.grad_rad, *GCOS = ws.gcos;
    const T* log_tau = Ly.log_tau.template data_ptr<T>();
    parallel(n, kAtomGrain, [&](int64_t i0, int64_t i1) {  // receiver side: gS, dE/denv, head biases, queries
      for (int64_t r = i0; r < i1; ++r) {
        T* gSr = gS + r * H;
        std::fill(gSr, gSr + H, T(0));
        for (int64_t j = tp.rptr[r]; j < tp.rptr[r + 1]; ++j) {
          const int64_t e = tp.by_rcv[j];
          for (int64_t hh = 0; hh < H; ++hh) gSr[hh] -= GAL[e * H + hh] * AL[e * H + hh] / SS[r * H + hh];
        }
        T* gqr = GQK + r * 2 * F;
        std::fill(gqr, gqr + F, T(0));
        for (int64_t j = tp.rptr[r]; j < tp.rptr[r + 1]; ++j) {
          const int64_t e = tp.by_rcv[j], s = snd[e], p = tp.pair_of[e];
          const T* dsp = DSP + (l * tp.P + p) * H;
          T* gbias = GR + e * W + 3 * F;
          for (int64_t hh = 0; hh < H; ++hh) {
            const T gsc = GAL[e * H + hh] / SS[r * H + hh] + gSr[hh];
            GEN[e] += gsc * EX[e * H + hh];
            const T gpre = gsc * SC[e * H + hh];
            gbias[hh] = -gpre * dsp[hh];  // written once per layer
            const T gcos = gpre * std::exp(log_tau[hh]);
            GCOS[e * H + hh] = gcos;
            const T* ks = QK + s * 2 * F + F + hh * D;
#pragma omp simd
            for (int64_t d = 0; d < D; ++d) gqr[hh * D + d] += gcos * ks[d];
          }
        }
      }
    });
    parallel(n, kAtomGrain, [&](int64_t i0, int64_t i1) {  // sender side: keys
      for (int64_t s = i0; s < i1; ++s) {
        T* gks = GQK + s * 2 * F + F;
        std::fill(gks, gks + F, T(0));
        for (int64_t j = tp.sptr[s]; j < tp.sptr[s + 1]; ++j) {
          const int64_t e = tp.by_snd[j], r = rcv[e];
          for (int64_t hh = 0; hh < H; ++hh) {
            const T gcos = GCOS[e * H + hh];
            const T* qr = QK + r * 2 * F + hh * D;
#pragma omp simd
            for (int64_t d = 0; d < D; ++d) gks[hh * D + d] += gcos * qr[d];
          }
        }
      }
    });
    // through the L2 normalisation (F.normalize: p / max(|p|, 1e-12))
    const T* NR = C.qknorm;
    for (int64_t i = 0; i < n * 2 * H; ++i) {
      T* g = GQK + i * D;
      const T* qn = QK + i * D;
      const T nrm = NR[i];
      if (nrm > T(1e-12)) {
        T dotp = 0;
#pragma omp simd reduction(+ : dotp)
        for (int64_t d = 0; d < D; ++d) dotp += g[d] * qn[d];
        for (int64_t d = 0; d < D; ++d) g[d] = (g[d] - qn[d] * dotp) / nrm;
      } else {
        for (int64_t d = 0; d < D; ++d) g[d] /= T(1e-12);
      }
    }
    qlinear_backward(Ly.qk, ws.gqk, n, C.m_qk, ws.gx);
    qlinear_backward(Ly.value, ws.gval, n, C.m_v, ws.gx2);
    for (int64_t i = 0; i < n * F; ++i) ws.gx[i] = ws.gx[i] + ws.gx2[i];
    layer_norm_backward(C.h, Ly.ln_g.template data_ptr<T>(), C.mean0, C.rstd0, ws.gx, F, ws.ghin, n, F);
  }

  // the layer's filter gradients per edge [E, W], summed over each pair's edges [P, W], into the gradient
  // of the radial network's output [P, R]
  void radial_backward_layer(int64_t l) {
    const int64_t W = w.W;
    const T* GR = ws.grad_rad;
    parallel(pairs(), kEdgeGrain, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        T* __restrict__ dst = ws.grad_pair + p * W;
        const T* __restrict__ g0 = GR + tp.pair_e[p] * W;
        const int64_t back = tp.pair_r[p];
        if (back >= 0) {
          const T* __restrict__ g1 = GR + back * W;
          for (int64_t k = 0; k < W; ++k) dst[k] = g0[k] + g1[k];
        } else {
          std::copy(g0, g0 + W, dst);
        }
      }
    });
    const int64_t R = w.R;
    row_blocks(pairs(), [&](int64_t r0, int64_t m) {
      linear_nn<T>(ws.grad_pair + r0 * W, m, W, w.r2.W() + l * W * R, R, ws.grad_radial_in + r0 * R, /*accumulate=*/true);
    });
  }

  // radial network and geometry back to positions: dE/dd per pair, dE/dvec per edge (the pair's length
  // term on its first edge), then per atom: + its incoming edges, - its outgoing ones
  void geometry_backward(T* Fo) {
    const int64_t K = w.K, Pn = pairs();
    const T* GB;
    T* ga1 = ws.grad_radial_in;  // [P, R]
    if (w.hidden) {
      if (ws.has_m_r2)
        for (int64_t i = 0; i < Pn * w.R; ++i) ga1[i] *= ws.m_r2[i];
      dsilu_mul(ws.z1, Pn * w.R, ga1, ws.scratch);
      qlinear_backward(w.r1, ga1, Pn, ws.m_r1, ws.grbf);
      GB = ws.grbf;
    } else {
      if (ws.has_m_r2)
        for (int64_t i = 0; i < Pn * K; ++i) ga1[i] *= ws.m_r2[i];
      GB = ga1;
    }
    const T *dB = ws.drbf, *dEn = ws.denv, *U = ws.u, *Dd = ws.dist, *GEN = ws.genv, *GYp = ws.gY;
    T *GD = ws.gd, *GVEC = ws.gvec;
    parallel(Pn, kEdgeGrain, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t back = tp.pair_r[p];
        const T genv = back >= 0 ? GEN[tp.pair_e[p]] + GEN[back] : GEN[tp.pair_e[p]];
        T gd = genv * dEn[p];
        for (int64_t k = 0; k < K; ++k) gd += GB[p * K + k] * dB[p * K + k];
        GD[p] = gd;
      }
    });
    parallel(E, kEdgeGrain, [&](int64_t e0, int64_t e1) {
      for (int64_t e = e0; e < e1; ++e) {
        const int64_t p = tp.pair_of[e];
        const T gd = tp.pair_e[p] == e ? GD[p] : T(0);  // d = |vec| of the pair's first edge
        const T* ue = U + e * 3;
        const T* gy = GYp + e * 3;
        const T ug = ue[0] * gy[0] + ue[1] * gy[1] + ue[2] * gy[2];
        for (int a = 0; a < 3; ++a) GVEC[e * 3 + a] = gd * ue[a] + (gy[a] - ue[a] * ug) / Dd[e];
      }
    });
    parallel(n, kAtomGrain, [&](int64_t i0, int64_t i1) {  // vec = r_s - r_r: force = -dE/dr
      for (int64_t i = i0; i < i1; ++i) {
        T f[3] = {0, 0, 0};
        for (int64_t j = tp.rptr[i]; j < tp.rptr[i + 1]; ++j)
          for (int a = 0; a < 3; ++a) f[a] += GVEC[tp.by_rcv[j] * 3 + a];
        for (int64_t j = tp.sptr[i]; j < tp.sptr[i + 1]; ++j)
          for (int a = 0; a < 3; ++a) f[a] -= GVEC[tp.by_snd[j] * 3 + a];
        for (int a = 0; a < 3; ++a) Fo[i * 3 + a] = f[a];
      }
    });
  }

  void run(double* energy, T* forces) {
    const int64_t L = w.L, F = w.F;
    clock.start();
    geometry();
    clock.stop(kGeometry);
    clock.start();
    radial_hidden();
    radial_filters();
    clock.stop(kRadial);
    // embedding, zero l=1 features
    {
      const T* emb = w.emb.template data_ptr<T>();
      T* h0 = L ? ws.layer[0].h : ws.hL;
      T* v0 = L ? ws.layer[0].v : ws.vL;
      for (int64_t i = 0; i < n; ++i) std::copy(emb + spc[i] * F, emb + (spc[i] + 1) * F, h0 + i * F);
      std::fill(v0, v0 + n * 3 * F, T(0));
    }
    for (int64_t l = 0; l < L; ++l) {
      clock.start();
      attention(l);
      clock.stop(kAttention);
      clock.start();
      messages(l);
      clock.stop(kMessages);
      clock.start();
      const bool last = l + 1 == L;
      exchange(l, last ? ws.hL : ws.layer[l + 1].h, last ? ws.vL : ws.layer[l + 1].v);
      clock.stop(kExchange);
    }
    clock.start();
    readout(energy);
    clock.stop(kReadout);
    clock.start();
    readout_backward();
    clock.stop(kReadoutBw);
    std::fill(ws.grad_radial_in, ws.grad_radial_in + tp.P * w.R, T(0));
    std::fill(ws.genv, ws.genv + E, T(0));
    std::fill(ws.gY, ws.gY + E * 3, T(0));
    for (int64_t l = L - 1; l >= 0; --l) {
      clock.start();
      exchange_backward(l);
      clock.stop(kExchangeBw);
      clock.start();
      messages_backward(l);
      clock.stop(kMessagesBw);
      clock.start();
      attention_backward(l);
      clock.stop(kAttentionBw);
      clock.start();
      radial_backward_layer(l);
      clock.stop(kRadialBw);
      std::swap(ws.gh, ws.ghin);  // the gradients of this layer's input are the next (lower) layer's output's
      std::swap(ws.gv, ws.gvin);
    }
    clock.start();
    geometry_backward(forces);
    clock.stop(kGeometryBw);
  }
};

// ---- gaq::Model: the weights checked and cast once, a workspace reused across calls
struct Model : torch::CustomClassHolder {
  at::ScalarType dtype;
  Weights<float> wf;
  Weights<double> wd;
  Workspace<float> sf;
  Workspace<double> sd;
  Topology topo;  // of the last edge list (both dtypes)
  std::mutex mu;  // one call at a time per model (the workspace is shared)
  bool profile = false;
  double acc[kStages] = {0};
  int64_t profiled_calls = 0;

  Model(int64_t version, const Named& weights, const std::vector<double>& consts, bool float64)
      : dtype(float64 ? at::kDouble : at::kFloat) {
    if (float64)
      wd = weights_from_named<double>(version, weights, consts);
    else
      wf = weights_from_named<float>(version, weights, consts);
  }

  std::tuple<at::Tensor, at::Tensor> energy_forces(const at::Tensor& positions, const at::Tensor& species,
                                                   const at::Tensor& receivers, const at::Tensor& senders,
                                                   const at::Tensor& shifts, const at::Tensor& batch,
                                                   int64_t n_graphs) {
    RECORD_FUNCTION("gaq::energy_forces", std::vector<c10::IValue>());  // as torch.profiler names it
    check_graph(positions, species, receivers, senders, shifts, batch, n_graphs);
    c10::InferenceMode inference;
    std::lock_guard<std::mutex> lock(mu);
    return dtype == at::kDouble ? run<double>(wd, sd, positions, species, receivers, senders, shifts, batch, n_graphs)
                                : run<float>(wf, sf, positions, species, receivers, senders, shifts, batch, n_graphs);
  }

  template <typename T>
  std::tuple<at::Tensor, at::Tensor> run(const Weights<T>& w, Workspace<T>& ws, const at::Tensor& positions,
                                         const at::Tensor& species, const at::Tensor& receivers,
                                         const at::Tensor& senders, const at::Tensor& shifts, const at::Tensor& batch,
                                         int64_t n_graphs) {
    const auto pos = positions.to(dtype).contiguous();
    const auto sh = shifts.to(dtype).contiguous();
    const auto sp = species.to(at::kLong).contiguous(), rc = receivers.to(at::kLong).contiguous(),
               sd_ = senders.to(at::kLong).contiguous(), bt = batch.to(at::kLong).contiguous();
    const int64_t n = pos.size(0), E = rc.size(0);
    check_range(sp, "species", w.S, "n_species, from the embedding");
    check_range(rc, "receivers", n, "n_atoms");
    check_range(sd_, "senders", n, "n_atoms");
    check_range(bt, "batch", n_graphs, "n_graphs");
    topo.build<T>(n, E, rc.data_ptr<int64_t>(), sd_.data_ptr<int64_t>(), sh.data_ptr<T>());
    ws.prepare(w, n, E, topo.P);
    // Small graphs run their GEMMs on this thread alone: a molecule's matmuls take microseconds, and a
    // second MKL thread only adds a barrier per call, which costs a scheduler time slice whenever the
    // other core is busy (at 2 threads on the shared machine, azobenzene took 0.4-1.2 s per call instead
    // of 4 ms). Large graphs keep torch's thread count. At 1 thread nothing changes.
    const bool serial_blas = E * w.W * w.R < (int64_t(1) << 26);
    const int previous = serial_blas ? MKL_Set_Num_Threads_Local(1) : 0;
    struct Restore {
      bool on;
      int previous;
      ~Restore() { if (on) MKL_Set_Num_Threads_Local(previous); }
    } restore{serial_blas, previous};
    at::Tensor energy = at::zeros({n_graphs}, pos.options().dtype(at::kDouble));
    at::Tensor forces = at::zeros({n, 3}, pos.options());
    StageClock clock{profile, acc};
    Pass<T> pass{w, ws, topo, clock, pos.data_ptr<T>(), sh.data_ptr<T>(), sp.data_ptr<int64_t>(), rc.data_ptr<int64_t>(),
                 sd_.data_ptr<int64_t>(), bt.data_ptr<int64_t>(), n, E, n_graphs, serial_blas};
    pass.run(energy.data_ptr<double>(), forces.data_ptr<T>());
    profiled_calls += profile;
    return {energy, forces};
  }

  void set_profile(bool on) { profile = on; }

  // seconds per stage summed over the calls since the last read (and "calls"), then reset
  c10::Dict<std::string, double> stage_seconds() {
    std::lock_guard<std::mutex> lock(mu);
    c10::Dict<std::string, double> out;
    for (int s = 0; s < kStages; ++s) {
      out.insert(kStageNames[s], acc[s]);
      acc[s] = 0;
    }
    out.insert("calls", static_cast<double>(profiled_calls));
    profiled_calls = 0;
    return out;
  }

  bool quantized() const { return dtype == at::kDouble ? wd.quantized : wf.quantized; }

  // int_gemm "int32-portable": drop the VNNI repacking, so the int32 engine runs its portable loop (the same
  // bits; tests compare the two on machines that have VNNI)
  void drop_int8_simd() {
    std::lock_guard<std::mutex> lock(mu);
    drop_simd(wf);
    drop_simd(wd);
  }
  template <typename T>
  static void drop_simd(Weights<T>& w) {
    w.each_linear([](LinearW<T>& lin) {
      lin.q.simd_w = at::Tensor();
      lin.q.simd_corr = at::Tensor();
      lin.q.seg = 0;
    });
  }
  int64_t num_layers() const { return dtype == at::kDouble ? wd.L : wf.L; }
};

// one call without a kept Model: the weights are checked and cast, and a workspace made, every time
std::tuple<at::Tensor, at::Tensor> energy_forces(
    const at::Tensor& positions, const at::Tensor& species, const at::Tensor& receivers, const at::Tensor& senders,
    const at::Tensor& shifts, const at::Tensor& batch, int64_t n_graphs, int64_t layout_version,
    const Named& weights, at::ArrayRef<double> consts) {
  check_graph(positions, species, receivers, senders, shifts, batch, n_graphs);
  Model model(layout_version, weights, consts.vec(), positions.scalar_type() == at::kDouble);
  return model.energy_forces(positions, species, receivers, senders, shifts, batch, n_graphs);
}

int64_t layout_version() { return kLayoutVersion; }

}  // namespace

TORCH_LIBRARY(gaq, m) {
  m.class_<Model>("Model")
      .def(torch::init<int64_t, Named, std::vector<double>, bool>())
      .def("energy_forces", &Model::energy_forces)
      .def("set_profile", &Model::set_profile)
      .def("stage_seconds", &Model::stage_seconds)
      .def("quantized", &Model::quantized)
      .def("drop_int8_simd", &Model::drop_int8_simd)
      .def("num_layers", &Model::num_layers);
  m.def("energy_forces(Tensor positions, Tensor species, Tensor receivers, Tensor senders, Tensor shifts, "
        "Tensor batch, int n_graphs, int layout_version, Dict(str, Tensor) weights, float[] consts) "
        "-> (Tensor, Tensor)");
  m.def("layout_version() -> int", layout_version);
  m.def("int8_simd() -> bool", int8_simd);
}

TORCH_LIBRARY_IMPL(gaq, CPU, m) { m.impl("energy_forces", energy_forces); }
