// Fused CPU kernel: energy and forces of GAQPotential in one call, with a hand-written backward.
//
// Same function as gaq_calc.model.network.GAQPotential (+ EnergyForces): the reference path runs it
// as ~1,000 small ATen ops forward and backward; here every pair x feature loop is one fused pass over
// the edges and only the matmuls go to ATen (BLAS). Forces are the exact gradient of the returned
// energy (reverse mode written out below; tests compare it with autograd in float64).
// Quantized models run here in "conservative" mode only (dequantized weights, unrounded activations).
//
// Layouts (row-major): h [n, F]; v [n, 3, F]; per-edge filters [E, L, 3F + H] as in the network.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

template <typename T> inline T sigmoid(T x) { return T(1) / (T(1) + std::exp(-x)); }
template <typename T> inline T silu(T x) { return x * sigmoid(x); }
template <typename T> inline T dsilu(T x) { const T s = sigmoid(x); return s * (T(1) + x * (T(1) - s)); }
template <typename T> inline T softplus(T x) { return x > T(20) ? x : std::log1p(std::exp(x)); }
template <typename T> inline T dsoftplus(T x) { return x > T(20) ? T(1) : sigmoid(x); }

template <typename T> inline T* ptr(at::Tensor& t) { return t.data_ptr<T>(); }
template <typename T> inline const T* cptr(const at::Tensor& t) { return t.data_ptr<T>(); }

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

inline at::Tensor mm_nt(const at::Tensor& x, const at::Tensor& w) { return at::mm(x, w.t()); }
inline at::Tensor mm_nt(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b) {
  return at::addmm(b, x, w.t());
}


// ---- the artifact's "quantized" mode: inputs of Linear layers rounded to integer codes, integer GEMM
// (int8 activation codes x int8/int4 weight codes, int32 accumulation, one rescale per output), and
// the straight-through backward of QAT (identity inside the clipping range, zero outside).
struct ActQuant {
  int kind = 0;  // 0 none (float GEMM on dequantized weights), 1 linear per tensor, 2 linear in the local frame
  double step = 1.0;
  int qmax = 127;
  at::Tensor codes;  // int8 [out, in] weight codes
  at::Tensor wstep;  // [out] weight steps
  // the codes as floats [out, in] when the integer GEMM runs in floating-point units (engine 1): exact,
  // because every product and partial sum is an integer below 2^24 (float) or 2^53 (double)
  at::Tensor codes_fp;
};

template <typename T>
void quantize_codes(const T* x, int64_t numel, const ActQuant& q, int8_t* codes, T* mask) {
  const T s = T(q.step), lo = T(-q.qmax), hi = T(q.qmax);
  for (int64_t i = 0; i < numel; ++i) {
    const T t = x[i] / s;  // as torch: x / step, clamp, round half to even
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
template <typename T>
at::Tensor int_linear(const int8_t* xc, int64_t m, int64_t in, const ActQuant& q, const at::Tensor& bias,
                      int64_t row0, int64_t rows, const at::TensorOptions& opt) {
  at::Tensor y;
  if (q.codes_fp.defined()) {
    at::Tensor xf = at::empty({m, in}, opt);
    T* X = xf.data_ptr<T>();
    for (int64_t i = 0; i < m * in; ++i) X[i] = static_cast<T>(xc[i]);
    y = at::mm(xf, q.codes_fp.narrow(0, row0, rows).t());  // [m, rows] integer-valued
  } else {
    y = at::empty({m, rows}, opt);
    const int8_t* wc = q.codes.data_ptr<int8_t>() + row0 * in;
    T* Y = y.data_ptr<T>();
    for (int64_t i = 0; i < m; ++i) {
      const int8_t* __restrict__ xr = xc + i * in;
      for (int64_t o = 0; o < rows; ++o) {
        const int8_t* __restrict__ wr = wc + o * in;
        int32_t acc = 0;
        for (int64_t k = 0; k < in; ++k) acc += static_cast<int32_t>(xr[k]) * static_cast<int32_t>(wr[k]);
        Y[i * rows + o] = static_cast<T>(acc);
      }
    }
  }
  rescale_codes<T>(y.data_ptr<T>(), m, rows, T(q.step), q.wstep.data_ptr<T>() + row0,
                   bias.numel() ? bias.data_ptr<T>() : nullptr);
  return y;
}

// y = Q(x) W^T + b with Q per `q` (kind 0 or no q: no rounding); the straight-through mask goes to *mask
template <typename T>
at::Tensor qlinear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& b, const ActQuant* q, at::Tensor* mask) {
  if (q == nullptr || q->kind == 0) return b.numel() ? mm_nt(x, w, b) : mm_nt(x, w);
  TORCH_CHECK(q->kind == 1, "frame quantization is applied by the vector-branch code path");
  at::Tensor xc = x.contiguous();
  const int64_t m = xc.size(0), in = xc.size(1);
  std::vector<int8_t> codes(m * in);
  *mask = at::empty_like(xc);
  quantize_codes(xc.data_ptr<T>(), m * in, *q, codes.data(), mask->data_ptr<T>());
  return int_linear<T>(codes.data(), m, in, *q, b, 0, w.size(0), xc.options());
}

// gx = (gy W) * mask: backward of qlinear with respect to its input
inline at::Tensor qlinear_backward(const at::Tensor& gy, const at::Tensor& w, const at::Tensor& mask) {
  at::Tensor gx = at::mm(gy, w);
  if (mask.defined()) gx.mul_(mask);
  return gx;
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

// parameter list layout (kept in step with gaq_calc/kernels/fused.py)
constexpr int kGlobal = 5;   // embedding, frequencies, radial W1, radial b1, radial W2
constexpr int kPerLayer = 11;  // ln g, ln b, Wqk, Wv, bv, log_tau, Win, bin, Wout, bout, Wvm
constexpr int kReadout = 8;  // ln g, ln b, W1, b1, W2, b2, energy_scale, reference energies (float64)

struct LayerCache {
  at::Tensor rad, h, v, x, mean0, rstd0, qkn, qknorm, ex, score, S, alpha, af, val;
  at::Tensor h1, v1, mean1, rstd1, vm, vn, z2, a, dot;
  at::Tensor m_qk, m_v, m_ein, m_eout, m_vm, frames;  // quantized mode: straight-through masks, frames
};

template <typename T>
std::tuple<at::Tensor, at::Tensor> energy_forces_impl(
    const at::Tensor& pos, const at::Tensor& species, const at::Tensor& receivers, const at::Tensor& senders,
    const at::Tensor& shifts, const at::Tensor& batch, int64_t n_graphs, const std::vector<at::Tensor>& p,
    const std::vector<double>& c, const std::vector<ActQuant>& Q) {
  const double cutoff = c[0], env_p = c[1], rbf_pref = c[2], eps = c[3];
  const int64_t num_heads = static_cast<int64_t>(c[4]);
  const int64_t n = pos.size(0), E = receivers.size(0);
  const at::Tensor& emb = p[0];
  const int64_t F = emb.size(1), H = num_heads, D = F / H, K = p[1].size(0);
  const int64_t L = (static_cast<int64_t>(p.size()) - kGlobal - kReadout) / kPerLayer;
  const int64_t W = 3 * F + H;  // filter block per layer
  const bool hidden = p[2].numel() > 0;
  auto opt = pos.options();
  const int64_t* rcv = cptr<int64_t>(receivers);
  const int64_t* snd = cptr<int64_t>(senders);
  const T sqrt3 = std::sqrt(T(3));
  const at::Tensor none = at::empty({0}, opt);
  // activation quantizers, one per Linear: radial (1 or 2), per layer (qk, value, exchange in/out,
  // vector mix), readout (2); an empty list: no rounding
  const int64_t nrad = hidden ? 2 : 1;
  auto qp = [&](int64_t i) -> const ActQuant* { return Q.empty() ? nullptr : &Q[i]; };

  // ---- geometry: unit vectors, l=1 harmonics sqrt(3) u (e3nn "component", order x, y, z), basis, envelope
  at::Tensor u = at::empty({E, 3}, opt), dist = at::empty({E}, opt), env = at::empty({E}, opt),
             denv = at::empty({E}, opt), rbf = at::empty({E, K}, opt), drbf = at::empty({E, K}, opt);
  {
    const T* P = cptr<T>(pos);
    const T* S = cptr<T>(shifts);
    const T* fr = cptr<T>(p[1]);
    T *U = ptr<T>(u), *Dd = ptr<T>(dist), *En = ptr<T>(env), *dEn = ptr<T>(denv), *B = ptr<T>(rbf),
      *dB = ptr<T>(drbf);
    const T pp = T(env_p), rc = T(cutoff), pref = T(rbf_pref);
    const T c0 = (pp + 1) * (pp + 2) / 2, c1 = pp * (pp + 2), c2 = pp * (pp + 1) / 2;
    for (int64_t e = 0; e < E; ++e) {
      T d2 = 0, vec[3];
      for (int a = 0; a < 3; ++a) {
        vec[a] = P[snd[e] * 3 + a] - P[rcv[e] * 3 + a] + S[e * 3 + a];
        d2 += vec[a] * vec[a];
      }
      const T d = std::sqrt(d2);
      Dd[e] = d;
      for (int a = 0; a < 3; ++a) U[e * 3 + a] = vec[a] / d;
      const T x = d / rc;
      if (x < T(1)) {
        const T xp1 = std::pow(x, pp - 1), xp = xp1 * x;
        En[e] = T(1) - c0 * xp + c1 * xp * x - c2 * xp * x * x;
        dEn[e] = (-c0 * pp * xp1 + c1 * (pp + 1) * xp - c2 * (pp + 2) * xp * x) / rc;
      } else {
        En[e] = 0;
        dEn[e] = 0;
      }
      for (int64_t k = 0; k < K; ++k) {
        const T s = std::sin(fr[k] * d), co = std::cos(fr[k] * d);
        B[e * K + k] = pref * s / d;
        dB[e * K + k] = pref * (fr[k] * co * d - s) / (d * d);
      }
    }
  }
  // radial filters: the hidden features once, then each layer's [E, W] block right before its use
  // (one block stays in cache; the full [E, L * W] output would not)
  at::Tensor z1, radial_in, m_r1, m_r2;  // [E, R], [E, R or K]
  if (hidden) {
    z1 = qlinear<T>(rbf, p[2], p[3], qp(0), &m_r1);
    radial_in = at::silu(z1);
  } else {
    radial_in = rbf;
  }
  const ActQuant* qr2 = qp(nrad - 1);
  std::vector<int8_t> radial_codes;  // the rounded input of the filter layer, shared by all layers
  if (qr2 && qr2->kind == 1) {
    radial_in = radial_in.contiguous();
    radial_codes.resize(radial_in.numel());
    m_r2 = at::empty_like(radial_in);
    quantize_codes(cptr<T>(radial_in), radial_in.numel(), *qr2, radial_codes.data(), ptr<T>(m_r2));
  }
  const int64_t radial_width = radial_in.size(1);
  auto radial_weight = [&](int64_t l) { return p[4].narrow(0, l * W, W); };  // [W, R] rows of layer l

  // ---- forward through the layers
  std::vector<LayerCache> caches(L);
  at::Tensor h = emb.index_select(0, species).contiguous();  // [n, F]
  at::Tensor v = at::zeros({n, 3, F}, opt);
  for (int64_t l = 0; l < L; ++l) {
    const at::Tensor* q = &p[kGlobal + l * kPerLayer];
    const T *lg = cptr<T>(q[0]), *lb = cptr<T>(q[1]);
    LayerCache& C = caches[l];
    const int64_t qb = nrad + l * 5;  // this layer's quantizers
    C.rad = radial_codes.empty()  // [E, W]: filters sv, s, vv and head biases
                ? mm_nt(radial_in, radial_weight(l)).contiguous()
                : int_linear<T>(radial_codes.data(), E, radial_width, *qr2, none, l * W, W, opt);
    const T* RAD = cptr<T>(C.rad);
    C.h = h;
    C.v = v;
    C.x = at::empty({n, F}, opt);
    C.mean0 = at::empty({n}, opt);
    C.rstd0 = at::empty({n}, opt);
    layer_norm(cptr<T>(h), lg, lb, ptr<T>(C.x), ptr<T>(C.mean0), ptr<T>(C.rstd0), n, F, eps);
    // cosine attention: L2-normalised queries (c=0) and keys (c=1) per head
    C.qkn = qlinear<T>(C.x, q[2], none, qp(qb), &C.m_qk).contiguous();  // [n, 2F]
    C.qknorm = at::empty({n, 2 * H}, opt);
    {
      T *QK = ptr<T>(C.qkn), *NR = ptr<T>(C.qknorm);
      for (int64_t i = 0; i < n * 2 * H; ++i) {
        T* row = QK + i * D;
        T s = 0;
        for (int64_t d = 0; d < D; ++d) s += row[d] * row[d];
        const T nrm = std::sqrt(s);
        NR[i] = nrm;
        const T inv = T(1) / std::max(nrm, T(1e-12));
        for (int64_t d = 0; d < D; ++d) row[d] *= inv;
      }
    }
    std::vector<T> tau(H);
    for (int64_t hh = 0; hh < H; ++hh) tau[hh] = std::exp(cptr<T>(q[5])[hh]);
    C.ex = at::empty({E, H}, opt);
    C.score = at::empty({E, H}, opt);
    C.S = at::ones({n, H}, opt);
    C.alpha = at::empty({E, H}, opt);
    {
      const T* QK = cptr<T>(C.qkn);
      T *EX = ptr<T>(C.ex), *SC = ptr<T>(C.score), *SS = ptr<T>(C.S), *AL = ptr<T>(C.alpha);
      const T* En = cptr<T>(env);
      for (int64_t e = 0; e < E; ++e) {
        const T* qr = QK + rcv[e] * 2 * F;
        const T* ks = QK + snd[e] * 2 * F + F;
        const T* bias = RAD + e * W + 3 * F;
        for (int64_t hh = 0; hh < H; ++hh) {
          T cs = 0;
          for (int64_t d = 0; d < D; ++d) cs += qr[hh * D + d] * ks[hh * D + d];
          const T x = std::exp(tau[hh] * (cs - T(1)) - softplus(bias[hh]));
          EX[e * H + hh] = x;
          SC[e * H + hh] = En[e] * x;
          SS[rcv[e] * H + hh] += En[e] * x;
        }
      }
      for (int64_t e = 0; e < E; ++e)
        for (int64_t hh = 0; hh < H; ++hh) AL[e * H + hh] = SC[e * H + hh] / SS[rcv[e] * H + hh];
      C.af = at::empty({E, F}, opt);  // alpha per feature channel (head of the channel)
      T* AF = ptr<T>(C.af);
      for (int64_t e = 0; e < E; ++e)
        for (int64_t hh = 0; hh < H; ++hh)
          for (int64_t d = 0; d < D; ++d) AF[e * F + hh * D + d] = AL[e * H + hh];
    }
    C.val = qlinear<T>(C.x, q[3], q[4], qp(qb + 1), &C.m_v).contiguous();  // [n, 2F]: (value_sv, value_s)
    at::Tensor h1 = h.clone(), v1 = v.clone();
    {
      const T *VAL = cptr<T>(C.val), *V = cptr<T>(v), *AF = cptr<T>(C.af), *U = cptr<T>(u);
      T *H1 = ptr<T>(h1), *V1 = ptr<T>(v1);
      for (int64_t e = 0; e < E; ++e) {
        const int64_t r = rcv[e], s = snd[e];
        const T* __restrict__ f0 = RAD + e * W;  // filters: sv, s, vv
        const T* __restrict__ f1 = f0 + F;
        const T* __restrict__ f2 = f0 + 2 * F;
        const T* __restrict__ af = AF + e * F;
        const T* __restrict__ vsv = VAL + s * 2 * F;
        const T* __restrict__ vs = vsv + F;
        T* __restrict__ hr = H1 + r * F;
        for (int64_t f = 0; f < F; ++f) hr[f] += f1[f] * af[f] * vs[f];
        for (int a = 0; a < 3; ++a) {
          const T y = sqrt3 * U[e * 3 + a];
          const T* __restrict__ vsa = V + (s * 3 + a) * F;
          T* __restrict__ vra = V1 + (r * 3 + a) * F;
          for (int64_t f = 0; f < F; ++f) vra[f] += af[f] * (f2[f] * vsa[f] + f0[f] * vsv[f] * y);
        }
      }
    }
    C.h1 = h1;
    C.v1 = v1;
    // exchange between the branches through invariants
    const ActQuant* qv = qp(qb + 4);
    if (qv && qv->kind == 2) {  // components in the local frame rounded; the mix runs in frame coordinates
      C.frames = at::empty({n, 3, 3}, opt);
      local_frames(cptr<T>(v1), n, F, ptr<T>(C.frames), 1e-7);
      at::Tensor comp = at::matmul(C.frames, v1).contiguous();  // [n, 3, F]
      std::vector<int8_t> codes(comp.numel());
      C.m_vm = at::empty_like(comp);
      quantize_codes(cptr<T>(comp), comp.numel(), *qv, codes.data(), ptr<T>(C.m_vm));
      at::Tensor yf = int_linear<T>(codes.data(), 3 * n, F, *qv, none, 0, 2 * F, opt).view({n, 3, 2 * F});
      C.vm = at::matmul(C.frames.transpose(1, 2), yf).contiguous();  // back to Cartesian: (v_u, v_w)
    } else {
      C.vm = qlinear<T>(v1.view({3 * n, F}), q[10], none, qv, &C.m_vm).view({n, 3, 2 * F}).contiguous();
    }
    C.vn = at::empty({n, F}, opt);
    C.dot = at::empty({n, F}, opt);
    at::Tensor cin = at::empty({n, 2 * F}, opt);  // (LN(h1), |v_w|-ish)
    C.mean1 = at::empty({n}, opt);
    C.rstd1 = at::empty({n}, opt);
    {
      const T* VM = cptr<T>(C.vm);
      T *VN = ptr<T>(C.vn), *DT = ptr<T>(C.dot), *CI = ptr<T>(cin);
      std::vector<T> y(F);
      for (int64_t i = 0; i < n; ++i) {
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
      at::Tensor yn = at::empty({n, F}, opt);
      layer_norm(cptr<T>(h1), lg, lb, ptr<T>(yn), ptr<T>(C.mean1), ptr<T>(C.rstd1), n, F, eps);
      const T* YN = cptr<T>(yn);
      for (int64_t i = 0; i < n; ++i)
        for (int64_t f = 0; f < F; ++f) CI[i * 2 * F + f] = YN[i * F + f];
    }
    C.z2 = qlinear<T>(cin, q[6], q[7], qp(qb + 2), &C.m_ein);
    C.a = qlinear<T>(at::silu(C.z2), q[8], q[9], qp(qb + 3), &C.m_eout).contiguous();  // [n, 3F]: a_vv, a_sv, a_ss
    at::Tensor h2 = h1.clone(), v2 = v1.clone();
    {
      const T *A = cptr<T>(C.a), *DT = cptr<T>(C.dot), *VM = cptr<T>(C.vm);
      T *H2 = ptr<T>(h2), *V2 = ptr<T>(v2);
      for (int64_t i = 0; i < n; ++i) {
        const T* ai = A + i * 3 * F;
        for (int64_t f = 0; f < F; ++f) H2[i * F + f] += ai[2 * F + f] + ai[F + f] * DT[i * F + f];
        for (int a = 0; a < 3; ++a)
          for (int64_t f = 0; f < F; ++f) V2[(i * 3 + a) * F + f] += ai[f] * VM[(i * 3 + a) * 2 * F + f];
      }
    }
    h = h2;
    v = v2;
  }

  // ---- readout and energy (float64 accumulation)
  const at::Tensor* ro = &p[kGlobal + L * kPerLayer];
  at::Tensor yr = at::empty({n, F}, opt), mr = at::empty({n}, opt), sr = at::empty({n}, opt);
  layer_norm(cptr<T>(h), cptr<T>(ro[0]), cptr<T>(ro[1]), ptr<T>(yr), ptr<T>(mr), ptr<T>(sr), n, F, eps);
  at::Tensor m_ro1, m_ro2;
  at::Tensor t = qlinear<T>(yr, ro[2], ro[3], qp(nrad + 5 * L), &m_ro1).contiguous();  // [n, F]
  at::Tensor o = qlinear<T>(at::silu(t), ro[4], ro[5], qp(nrad + 5 * L + 1), &m_ro2).contiguous();  // [n, 1]
  const T scale = cptr<T>(ro[6])[0];
  at::Tensor energy = at::zeros({n_graphs}, opt.dtype(at::kDouble));
  {
    const double* ref = cptr<double>(ro[7]);
    const int64_t *spc = cptr<int64_t>(species), *bat = cptr<int64_t>(batch);
    double* en = ptr<double>(energy);
    const T* O = cptr<T>(o);
    for (int64_t i = 0; i < n; ++i)
      en[bat[i]] += static_cast<double>(O[i] * scale) + ref[spc[i]];
  }

  // ---- backward: gradient of sum(energy) with respect to positions
  at::Tensor gh = at::zeros({n, F}, opt);
  {
    at::Tensor gt = at::empty({n, F}, opt);
    const T *T_ = cptr<T>(t), *W2 = cptr<T>(ro[4]);
    T* GT = ptr<T>(gt);
    const T* M2 = m_ro2.defined() ? cptr<T>(m_ro2) : nullptr;
    for (int64_t i = 0; i < n; ++i)
      for (int64_t f = 0; f < F; ++f)
        GT[i * F + f] = scale * W2[f] * (M2 ? M2[i * F + f] : T(1)) * dsilu(T_[i * F + f]);
    at::Tensor gy = qlinear_backward(gt, ro[2], m_ro1).contiguous();
    layer_norm_backward(cptr<T>(h), cptr<T>(ro[0]), cptr<T>(mr), cptr<T>(sr), cptr<T>(gy), F, ptr<T>(gh), n, F);
  }
  at::Tensor gv = at::zeros({n, 3, F}, opt);
  at::Tensor grad_radial_in = at::zeros_like(radial_in), genv = at::zeros({E}, opt), gY = at::zeros({E, 3}, opt);
  at::Tensor grad_rad = at::empty({E, W}, opt);  // one layer's block, every element written each layer
  T *GR = ptr<T>(grad_rad), *GEN = ptr<T>(genv), *GYp = ptr<T>(gY);
    for (int64_t l = L - 1; l >= 0; --l) {
    const at::Tensor* q = &p[kGlobal + l * kPerLayer];
    const T *lg = cptr<T>(q[0]);
    LayerCache& C = caches[l];
    const T* RAD = cptr<T>(C.rad);
    // h2 = h1 + a_ss + a_sv * dot;  v2 = v1 + a_vv * v_u
    at::Tensor ga = at::empty({n, 3 * F}, opt), gvm = at::empty({n, 3, 2 * F}, opt);
    {
      const T *GH = cptr<T>(gh), *GV = cptr<T>(gv), *A = cptr<T>(C.a), *DT = cptr<T>(C.dot), *VM = cptr<T>(C.vm);
      T *GA = ptr<T>(ga), *GVM = ptr<T>(gvm);
      for (int64_t i = 0; i < n; ++i) {
        const T* ai = A + i * 3 * F;
        T* gai = GA + i * 3 * F;
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
    at::Tensor gz2 = qlinear_backward(ga, q[8], C.m_eout).contiguous();  // [n, F]
    {
      const T* Z = cptr<T>(C.z2);
      T* G = ptr<T>(gz2);
      for (int64_t i = 0; i < n * F; ++i) G[i] *= dsilu(Z[i]);
    }
    at::Tensor gc = qlinear_backward(gz2, q[6], C.m_ein).contiguous();  // [n, 2F]
    {
      const T *GC = cptr<T>(gc), *VM = cptr<T>(C.vm), *VN = cptr<T>(C.vn);
      T* GVM = ptr<T>(gvm);
      for (int64_t i = 0; i < n; ++i)
        for (int64_t f = 0; f < F; ++f) {
          const T k = GC[i * 2 * F + F + f] / (VN[i * F + f] + T(1));
          for (int a = 0; a < 3; ++a) GVM[(i * 3 + a) * 2 * F + F + f] += k * VM[(i * 3 + a) * 2 * F + F + f];
        }
    }
    at::Tensor gh1 = gh.clone();
    layer_norm_backward(cptr<T>(C.h1), lg, cptr<T>(C.mean1), cptr<T>(C.rstd1), cptr<T>(gc), 2 * F, ptr<T>(gh1), n, F);
    at::Tensor gxq = at::mm(gvm.view({3 * n, 2 * F}), q[10]).view({n, 3, F});  // d/d(rounded input)
    at::Tensor gv1;
    if (C.frames.defined()) {  // x_q = Fr^T Q(Fr x): straight-through gradient Fr^T M Fr
      gv1 = gv + at::matmul(C.frames.transpose(1, 2), at::matmul(C.frames, gxq).mul_(C.m_vm));
    } else {
      if (C.m_vm.defined()) gxq.mul_(C.m_vm.view({n, 3, F}));
      gv1 = gv + gxq;
    }
    // messages: h1 = h + sum_e msg_s, v1 = v + sum_e msg_v
    at::Tensor ghin = gh1.clone(), gvin = gv1.clone();
    at::Tensor gval = at::zeros({n, 2 * F}, opt), galpha = at::empty({E, H}, opt);
    {
      const T *GH1 = cptr<T>(gh1), *GV1 = cptr<T>(gv1), *VAL = cptr<T>(C.val), *V = cptr<T>(C.v),
              *AF = cptr<T>(C.af), *U = cptr<T>(u);
      T *GVIN = ptr<T>(gvin), *GVAL = ptr<T>(gval), *GAL = ptr<T>(galpha);
      std::vector<T> buf(3 * F);
      T* __restrict__ gmy = buf.data();   // sum_a dE/dmsg_a * Y_a
      T* __restrict__ gg2 = gmy + F;      // dE/dg_vv
      T* __restrict__ pr = gmy + 2 * F;   // dE/dalpha per channel
      for (int64_t e = 0; e < E; ++e) {
        const int64_t r = rcv[e], s = snd[e];
        const T* __restrict__ f0 = RAD + e * W;
        const T* __restrict__ f1 = f0 + F;
        const T* __restrict__ f2 = f0 + 2 * F;
        T* __restrict__ gf0 = GR + e * W;
        T* __restrict__ gf1 = gf0 + F;
        T* __restrict__ gf2 = gf0 + 2 * F;
        const T* __restrict__ af = AF + e * F;
        const T* __restrict__ vsv = VAL + s * 2 * F;
        const T* __restrict__ vs = vsv + F;
        T* __restrict__ gvsv = GVAL + s * 2 * F;
        T* __restrict__ gvs = gvsv + F;
        const T* __restrict__ ghr = GH1 + r * F;
        for (int64_t f = 0; f < F; ++f) { gmy[f] = 0; gg2[f] = 0; }
        for (int a = 0; a < 3; ++a) {
          const T y = sqrt3 * U[e * 3 + a];
          const T* __restrict__ gm = GV1 + (r * 3 + a) * F;
          const T* __restrict__ vsa = V + (s * 3 + a) * F;
          T* __restrict__ gvin = GVIN + (s * 3 + a) * F;
          T su = 0;
#pragma omp simd reduction(+ : su)
          for (int64_t f = 0; f < F; ++f) {
            gmy[f] += gm[f] * y;
            gg2[f] += gm[f] * vsa[f];
            gvin[f] += gm[f] * f2[f] * af[f];
            su += gm[f] * f0[f] * af[f] * vsv[f];
          }
          GYp[e * 3 + a] += sqrt3 * su;  // dE/du_a of the sv message (Y = sqrt3 u)
        }
        for (int64_t f = 0; f < F; ++f) {
          const T gsv = vsv[f] * gmy[f], gg1 = ghr[f] * vs[f];
          gvsv[f] += f0[f] * af[f] * gmy[f];
          gvs[f] += ghr[f] * f1[f] * af[f];
          gf0[f] = gsv * af[f];
          gf1[f] = gg1 * af[f];
          gf2[f] = gg2[f] * af[f];
          pr[f] = gsv * f0[f] + gg1 * f1[f] + gg2[f] * f2[f];
        }
        for (int64_t hh = 0; hh < H; ++hh) {
          T su = 0;
          for (int64_t d = 0; d < D; ++d) su += pr[hh * D + d];
          GAL[e * H + hh] = su;
        }
      }
    }
    // alpha = score / S[r], score = env * exp(tau (cos - 1) - softplus(b))
    at::Tensor gqk = at::zeros({n, 2 * F}, opt);
    {
      const T *GAL = cptr<T>(galpha), *AL = cptr<T>(C.alpha), *SS = cptr<T>(C.S), *SC = cptr<T>(C.score),
              *EX = cptr<T>(C.ex), *QK = cptr<T>(C.qkn);
      T* GQK = ptr<T>(gqk);
      std::vector<T> gS(n * H, T(0));
      for (int64_t e = 0; e < E; ++e)
        for (int64_t hh = 0; hh < H; ++hh)
          gS[rcv[e] * H + hh] -= GAL[e * H + hh] * AL[e * H + hh] / SS[rcv[e] * H + hh];
      for (int64_t e = 0; e < E; ++e) {
        const int64_t r = rcv[e], s = snd[e];
        const T* bias = RAD + e * W + 3 * F;
        T* gbias = GR + e * W + 3 * F;
        for (int64_t hh = 0; hh < H; ++hh) {
          const T gsc = GAL[e * H + hh] / SS[r * H + hh] + gS[r * H + hh];
          GEN[e] += gsc * EX[e * H + hh];
          const T gpre = gsc * SC[e * H + hh];
          gbias[hh] = -gpre * dsoftplus(bias[hh]);  // written once per layer
          const T gcos = gpre * std::exp(cptr<T>(q[5])[hh]);
          const T* qr = QK + r * 2 * F + hh * D;
          const T* ks = QK + s * 2 * F + F + hh * D;
          T* gqr = GQK + r * 2 * F + hh * D;
          T* gks = GQK + s * 2 * F + F + hh * D;
          for (int64_t d = 0; d < D; ++d) {
            gqr[d] += gcos * ks[d];
            gks[d] += gcos * qr[d];
          }
        }
      }
      // through the L2 normalisation (F.normalize: p / max(|p|, 1e-12))
      const T* NR = cptr<T>(C.qknorm);
      for (int64_t i = 0; i < n * 2 * H; ++i) {
        T* g = GQK + i * D;
        const T* qn = QK + i * D;
        const T nrm = NR[i];
        if (nrm > T(1e-12)) {
          T dotp = 0;
          for (int64_t d = 0; d < D; ++d) dotp += g[d] * qn[d];
          for (int64_t d = 0; d < D; ++d) g[d] = (g[d] - qn[d] * dotp) / nrm;
        } else {
          for (int64_t d = 0; d < D; ++d) g[d] /= T(1e-12);
        }
      }
    }
    at::Tensor gx = (qlinear_backward(gqk, q[2], C.m_qk) + qlinear_backward(gval, q[3], C.m_v)).contiguous();
    layer_norm_backward(cptr<T>(C.h), lg, cptr<T>(C.mean0), cptr<T>(C.rstd0), cptr<T>(gx), F, ptr<T>(ghin), n, F);
    grad_radial_in.addmm_(grad_rad, radial_weight(l));
    gh = ghin;
    gv = gvin;
  }

  // ---- radial network and geometry back to positions
  at::Tensor grbf;
  if (hidden) {
    at::Tensor ga1 = grad_radial_in;  // [E, R]
    if (m_r2.defined()) ga1.mul_(m_r2);
    const T* Z = cptr<T>(z1);
    T* G = ptr<T>(ga1);
    for (int64_t i = 0; i < ga1.numel(); ++i) G[i] *= dsilu(Z[i]);
    grbf = qlinear_backward(ga1, p[2], m_r1).contiguous();
  } else {
    grbf = m_r2.defined() ? grad_radial_in.mul(m_r2) : grad_radial_in;
  }
  at::Tensor forces = at::zeros({n, 3}, opt);
  {
    const T *GB = cptr<T>(grbf), *dB = cptr<T>(drbf), *dEn = cptr<T>(denv), *U = cptr<T>(u), *Dd = cptr<T>(dist);
    T* Fo = ptr<T>(forces);
    for (int64_t e = 0; e < E; ++e) {
      T gd = GEN[e] * dEn[e];
      for (int64_t k = 0; k < K; ++k) gd += GB[e * K + k] * dB[e * K + k];
      const T* ue = U + e * 3;
      const T* gy = GYp + e * 3;
      const T ug = ue[0] * gy[0] + ue[1] * gy[1] + ue[2] * gy[2];
      for (int a = 0; a < 3; ++a) {
        const T gvec = gd * ue[a] + (gy[a] - ue[a] * ug) / Dd[e];  // d/dvec of (|vec|, vec/|vec|)
        Fo[snd[e] * 3 + a] -= gvec;  // vec = r_s - r_r: force = -dE/dr
        Fo[rcv[e] * 3 + a] += gvec;
      }
    }
  }
  return {energy, forces};
}

// ---- input checks. The op is reachable from Python and TorchScript with any arguments, and the loops
// above index raw pointers with receivers, senders, species and batch, so every shape, dtype and index
// range is checked first: bad input raises ValueError (TORCH_CHECK_VALUE) with a one-line message, never
// reads or writes out of bounds. Integer passes over n + E entries; valid input is not copied.
#define GAQ_CHECK(cond, ...) TORCH_CHECK_VALUE(cond, "gaq::energy_forces: ", __VA_ARGS__)

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

// params[i] has exactly `shape`; an optional bias may also be empty
void check_param(const at::TensorList& params, int64_t i, at::IntArrayRef shape, const char* what,
                 bool optional = false) {
  const at::Tensor& t = params[i];
  GAQ_CHECK(t.is_floating_point(), "params[", i, "] (", what, ") must be floating point, not ", t.scalar_type());
  if (optional && t.numel() == 0) return;
  GAQ_CHECK(t.sizes() == shape, "params[", i, "] (", what, ") has shape ", t.sizes(), ", expected ", shape,
            optional ? " or empty" : "", ": the parameter list does not match the model layout");
}

void check_inputs(const at::Tensor& positions, const at::Tensor& species, const at::Tensor& receivers,
                  const at::Tensor& senders, const at::Tensor& shifts, const at::Tensor& batch, int64_t n_graphs,
                  at::TensorList params, at::ArrayRef<double> consts, at::TensorList quant) {
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
  // constants and the parameter layout (kept in step with gaq_calc/kernels/fused.py)
  GAQ_CHECK(consts.size() == 5, "consts must be [cutoff, envelope p, rbf prefactor, layer-norm eps, heads], got ",
            consts.size(), " values");
  for (double c : consts) GAQ_CHECK(std::isfinite(c), "consts must be finite, got ", consts);
  GAQ_CHECK(consts[0] > 0, "the cutoff (consts[0]) must be > 0, not ", consts[0]);
  const int64_t np = static_cast<int64_t>(params.size());
  GAQ_CHECK(np >= kGlobal + kReadout && (np - kGlobal - kReadout) % kPerLayer == 0, "params has ", np,
            " tensors, expected ", kGlobal, " + ", kPerLayer, " per layer + ", kReadout,
            ": the parameter list does not match the model layout");
  const int64_t L = (np - kGlobal - kReadout) / kPerLayer;
  GAQ_CHECK(params[0].dim() == 2 && params[0].size(0) >= 1 && params[0].size(1) >= 1,
            "params[0] (embedding) must be [n_species, features], not ", params[0].sizes());
  const int64_t S = params[0].size(0), F = params[0].size(1);
  const double heads = consts[4];
  GAQ_CHECK(heads >= 1 && heads == std::floor(heads) && heads <= static_cast<double>(F) &&
                F % static_cast<int64_t>(heads) == 0,
            "the number of heads (consts[4] = ", heads, ") must be a positive divisor of the feature count ", F);
  const int64_t H = static_cast<int64_t>(heads), W = 3 * F + H;
  check_param(params, 0, {S, F}, "embedding");
  GAQ_CHECK(params[1].dim() == 1, "params[1] (radial frequencies) must be 1-D, not ", params[1].sizes());
  const int64_t K = params[1].size(0);
  check_param(params, 1, {K}, "radial frequencies");
  const bool hidden = params[2].numel() > 0;
  int64_t R = K;
  if (hidden) {
    GAQ_CHECK(params[2].dim() == 2, "params[2] (radial hidden weight) must be 2-D, not ", params[2].sizes());
    R = params[2].size(0);
    check_param(params, 2, {R, K}, "radial hidden weight");
    check_param(params, 3, {R}, "radial hidden bias", true);
  } else {
    GAQ_CHECK(params[3].numel() == 0, "params[3] (radial hidden bias) must be empty without a hidden layer");
  }
  check_param(params, 4, {L * W, R}, "radial filter weight");
  for (int64_t l = 0; l < L; ++l) {
    const int64_t b = kGlobal + l * kPerLayer;
    check_param(params, b + 0, {F}, "layer norm gain");
    check_param(params, b + 1, {F}, "layer norm bias");
    check_param(params, b + 2, {2 * F, F}, "query-key weight");
    check_param(params, b + 3, {2 * F, F}, "value weight");
    check_param(params, b + 4, {2 * F}, "value bias", true);
    check_param(params, b + 5, {H}, "log tau");
    check_param(params, b + 6, {F, 2 * F}, "exchange-in weight");
    check_param(params, b + 7, {F}, "exchange-in bias", true);
    check_param(params, b + 8, {3 * F, F}, "exchange-out weight");
    check_param(params, b + 9, {3 * F}, "exchange-out bias", true);
    check_param(params, b + 10, {2 * F, F}, "vector-mix weight");
  }
  const int64_t r = kGlobal + L * kPerLayer;
  check_param(params, r + 0, {F}, "readout norm gain");
  check_param(params, r + 1, {F}, "readout norm bias");
  check_param(params, r + 2, {F, F}, "readout hidden weight");
  check_param(params, r + 3, {F}, "readout hidden bias", true);
  check_param(params, r + 4, {1, F}, "readout output weight");
  check_param(params, r + 5, {1}, "readout output bias", true);
  GAQ_CHECK(params[r + 6].is_floating_point() && params[r + 6].numel() == 1, "params[", r + 6,
            "] (energy scale) must be one floating-point number, not of shape ", params[r + 6].sizes());
  check_param(params, r + 7, {S}, "reference energies");
  // activation quantizers: none, or one (meta, weight codes, weight steps) triple per Linear, in order
  std::vector<int64_t> linear;  // the param index of each Linear's weight
  if (hidden) linear.push_back(2);
  linear.push_back(4);
  for (int64_t l = 0; l < L; ++l)
    for (int64_t k : {2, 3, 6, 8, 10}) linear.push_back(kGlobal + l * kPerLayer + k);
  linear.push_back(r + 2);
  linear.push_back(r + 4);
  const int64_t nq = static_cast<int64_t>(quant.size());
  GAQ_CHECK(nq == 0 || nq == 3 * static_cast<int64_t>(linear.size()), "quant has ", nq, " tensors, expected 0 or ",
            3 * linear.size(), " (meta, weight codes, weight steps per Linear)");
  for (int64_t i = 0; i < nq / 3; ++i) {
    const at::Tensor &meta = quant[3 * i], &codes = quant[3 * i + 1], &steps = quant[3 * i + 2];
    GAQ_CHECK(meta.is_floating_point() && meta.numel() == 3, "quant[", 3 * i,
              "] (meta) must be 3 floats [kind, act step, qmax], not ", meta.scalar_type(), " ", meta.sizes());
    const at::Tensor m = meta.to(at::kDouble).contiguous();
    const double kind = m.data_ptr<double>()[0], step = m.data_ptr<double>()[1], qmax = m.data_ptr<double>()[2];
    GAQ_CHECK(kind == 0 || kind == 1 || kind == 2, "quantizer ", i, ": kind must be 0 (none), 1 (linear) or ",
              "2 (frame), not ", kind);
    if (kind == 0) continue;
    const bool vector_mix = i >= static_cast<int64_t>(linear.size()) - 2 - 5 * L &&
                            i < static_cast<int64_t>(linear.size()) - 2 &&
                            (i - (static_cast<int64_t>(linear.size()) - 2 - 5 * L)) % 5 == 4;
    GAQ_CHECK(kind == 1 || vector_mix, "quantizer ", i, ": frame rounding (kind 2) applies to the vector mix only");
    GAQ_CHECK(std::isfinite(step) && step > 0, "quantizer ", i, ": the activation step must be > 0, not ", step);
    GAQ_CHECK(qmax >= 1 && qmax <= 127 && qmax == std::floor(qmax), "quantizer ", i,
              ": qmax must be an integer in [1, 127] (int8 codes), not ", qmax);
    const at::Tensor& w = params[linear[i]];
    GAQ_CHECK(codes.scalar_type() == at::kChar || codes.is_floating_point(), "quantizer ", i,
              ": weight codes must be int8 or floating point, not ", codes.scalar_type());
    GAQ_CHECK(codes.sizes() == w.sizes(), "quantizer ", i, ": weight codes of shape ", codes.sizes(),
              " do not match the weight params[", linear[i], "] of shape ", w.sizes());
    GAQ_CHECK(steps.is_floating_point() && steps.numel() == w.size(0), "quantizer ", i, ": ", w.size(0),
              " floating-point weight steps expected, got ", steps.scalar_type(), " ", steps.sizes());
  }
}

std::tuple<at::Tensor, at::Tensor> energy_forces(
    const at::Tensor& positions, const at::Tensor& species, const at::Tensor& receivers, const at::Tensor& senders,
    const at::Tensor& shifts, const at::Tensor& batch, int64_t n_graphs, at::TensorList params,
    at::ArrayRef<double> consts, at::TensorList quant) {
  TORCH_CHECK(positions.device().is_cpu(), "gaq::energy_forces is a CPU kernel");
  check_inputs(positions, species, receivers, senders, shifts, batch, n_graphs, params, consts, quant);
  c10::InferenceMode guard;
  const auto dtype = positions.scalar_type();
  std::vector<at::Tensor> p;
  p.reserve(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    const bool is_ref = i + 1 == params.size();  // reference energies stay float64
    p.push_back(is_ref ? params[i].to(at::kDouble).contiguous() : params[i].to(dtype).contiguous());
  }
  std::vector<ActQuant> Q(quant.size() / 3);
  for (size_t i = 0; i < Q.size(); ++i) {
    at::Tensor meta = quant[3 * i].to(at::kDouble).contiguous();
    Q[i].kind = static_cast<int>(meta.data_ptr<double>()[0]);
    Q[i].step = meta.data_ptr<double>()[1];
    Q[i].qmax = static_cast<int>(meta.data_ptr<double>()[2]);
    // weight codes given as floats select engine 1 (the caller checked exactness: in * qmax * max|code|
    // below 2^24 for float32); int8 codes select the int32 loop. (No copies when dtypes already match.)
    const at::Tensor& codes = quant[3 * i + 1];
    if (codes.is_floating_point()) {
      Q[i].codes_fp = codes.to(dtype).contiguous();
    } else {
      Q[i].codes = codes.to(at::kChar).contiguous();
    }
    Q[i].wstep = quant[3 * i + 2].to(dtype).reshape({-1}).contiguous();
  }
  std::vector<double> c(consts.begin(), consts.end());
  auto pos = positions.contiguous();
  auto sp = species.to(at::kLong).contiguous(), rc = receivers.to(at::kLong).contiguous(),
       sd = senders.to(at::kLong).contiguous(), bt = batch.to(at::kLong).contiguous();
  auto sh = shifts.to(dtype).contiguous();
  check_range(sp, "species", p[0].size(0), "n_species, from the embedding");
  check_range(rc, "receivers", pos.size(0), "n_atoms");
  check_range(sd, "senders", pos.size(0), "n_atoms");
  check_range(bt, "batch", n_graphs, "n_graphs");
  if (dtype == at::kDouble)
    return energy_forces_impl<double>(pos, sp, rc, sd, sh, bt, n_graphs, p, c, Q);
  return energy_forces_impl<float>(pos, sp, rc, sd, sh, bt, n_graphs, p, c, Q);
}

}  // namespace

TORCH_LIBRARY(gaq, m) {
  m.def("energy_forces(Tensor positions, Tensor species, Tensor receivers, Tensor senders, Tensor shifts, "
        "Tensor batch, int n_graphs, Tensor[] params, float[] consts, Tensor[] quant) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(gaq, CPU, m) { m.impl("energy_forces", energy_forces); }
