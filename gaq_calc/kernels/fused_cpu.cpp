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

// parameter list layout (kept in step with gaq_calc/kernels/fused.py)
constexpr int kGlobal = 5;   // embedding, frequencies, radial W1, radial b1, radial W2
constexpr int kPerLayer = 11;  // ln g, ln b, Wqk, Wv, bv, log_tau, Win, bin, Wout, bout, Wvm
constexpr int kReadout = 8;  // ln g, ln b, W1, b1, W2, b2, energy_scale, reference energies (float64)

struct LayerCache {
  at::Tensor rad, h, v, x, mean0, rstd0, qkn, qknorm, ex, score, S, alpha, af, val;
  at::Tensor h1, v1, mean1, rstd1, vm, vn, z2, a, dot;
};

template <typename T>
std::tuple<at::Tensor, at::Tensor> energy_forces_impl(
    const at::Tensor& pos, const at::Tensor& species, const at::Tensor& receivers, const at::Tensor& senders,
    const at::Tensor& shifts, const at::Tensor& batch, int64_t n_graphs, const std::vector<at::Tensor>& p,
    const std::vector<double>& c) {
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
  at::Tensor z1, radial_in;  // [E, R], [E, R or K]
  if (hidden) {
    z1 = mm_nt(rbf, p[2], p[3]);
    radial_in = at::silu(z1);
  } else {
    radial_in = rbf;
  }
  auto radial_weight = [&](int64_t l) { return p[4].narrow(0, l * W, W); };  // [W, R] rows of layer l

  // ---- forward through the layers
  std::vector<LayerCache> caches(L);
  at::Tensor h = emb.index_select(0, species).contiguous();  // [n, F]
  at::Tensor v = at::zeros({n, 3, F}, opt);
  for (int64_t l = 0; l < L; ++l) {
    const at::Tensor* q = &p[kGlobal + l * kPerLayer];
    const T *lg = cptr<T>(q[0]), *lb = cptr<T>(q[1]);
    LayerCache& C = caches[l];
    C.rad = mm_nt(radial_in, radial_weight(l)).contiguous();  // [E, W]: filters sv, s, vv and head biases
    const T* RAD = cptr<T>(C.rad);
    C.h = h;
    C.v = v;
    C.x = at::empty({n, F}, opt);
    C.mean0 = at::empty({n}, opt);
    C.rstd0 = at::empty({n}, opt);
    layer_norm(cptr<T>(h), lg, lb, ptr<T>(C.x), ptr<T>(C.mean0), ptr<T>(C.rstd0), n, F, eps);
    // cosine attention: L2-normalised queries (c=0) and keys (c=1) per head
    C.qkn = mm_nt(C.x, q[2]).contiguous();  // [n, 2F]
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
    C.val = mm_nt(C.x, q[3], q[4]).contiguous();  // [n, 2F]: (value_sv, value_s)
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
    C.vm = mm_nt(v1.view({3 * n, F}), q[10]).view({n, 3, 2 * F}).contiguous();  // (v_u, v_w)
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
    C.z2 = mm_nt(cin, q[6], q[7]);
    C.a = mm_nt(at::silu(C.z2), q[8], q[9]).contiguous();  // [n, 3F]: (a_vv, a_sv, a_ss)
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
  at::Tensor t = mm_nt(yr, ro[2], ro[3]).contiguous();  // [n, F]
  at::Tensor o = mm_nt(at::silu(t), ro[4], ro[5]).contiguous();  // [n, 1]
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
    for (int64_t i = 0; i < n; ++i)
      for (int64_t f = 0; f < F; ++f) GT[i * F + f] = scale * W2[f] * dsilu(T_[i * F + f]);
    at::Tensor gy = at::mm(gt, ro[2]).contiguous();
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
    at::Tensor gz2 = at::mm(ga, q[8]);  // [n, F]
    {
      const T* Z = cptr<T>(C.z2);
      T* G = ptr<T>(gz2);
      for (int64_t i = 0; i < n * F; ++i) G[i] *= dsilu(Z[i]);
    }
    at::Tensor gc = at::mm(gz2, q[6]).contiguous();  // [n, 2F]
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
    at::Tensor gv1 = gv + at::mm(gvm.view({3 * n, 2 * F}), q[10]).view({n, 3, F});
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
    at::Tensor gx = at::mm(gqk, q[2]);
    gx.addmm_(gval, q[3]);
    gx = gx.contiguous();
    layer_norm_backward(cptr<T>(C.h), lg, cptr<T>(C.mean0), cptr<T>(C.rstd0), cptr<T>(gx), F, ptr<T>(ghin), n, F);
    grad_radial_in.addmm_(grad_rad, radial_weight(l));
    gh = ghin;
    gv = gvin;
  }

  // ---- radial network and geometry back to positions
  at::Tensor grbf;
  if (hidden) {
    at::Tensor ga1 = grad_radial_in;  // [E, R]
    const T* Z = cptr<T>(z1);
    T* G = ptr<T>(ga1);
    for (int64_t i = 0; i < ga1.numel(); ++i) G[i] *= dsilu(Z[i]);
    grbf = at::mm(ga1, p[2]).contiguous();
  } else {
    grbf = grad_radial_in;
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

std::tuple<at::Tensor, at::Tensor> energy_forces(
    const at::Tensor& positions, const at::Tensor& species, const at::Tensor& receivers, const at::Tensor& senders,
    const at::Tensor& shifts, const at::Tensor& batch, int64_t n_graphs, at::TensorList params,
    at::ArrayRef<double> consts) {
  TORCH_CHECK(positions.device().is_cpu(), "gaq::energy_forces is a CPU kernel");
  TORCH_CHECK(positions.dim() == 2 && positions.size(1) == 3, "positions must be [n_atoms, 3]");
  TORCH_CHECK(consts.size() == 5, "consts: cutoff, envelope p, rbf prefactor, layer-norm eps, heads");
  c10::InferenceMode guard;
  const auto dtype = positions.scalar_type();
  std::vector<at::Tensor> p;
  p.reserve(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    const bool is_ref = i + 1 == params.size();  // reference energies stay float64
    p.push_back(is_ref ? params[i].to(at::kDouble).contiguous() : params[i].to(dtype).contiguous());
  }
  std::vector<double> c(consts.begin(), consts.end());
  auto pos = positions.contiguous();
  auto sp = species.to(at::kLong).contiguous(), rc = receivers.to(at::kLong).contiguous(),
       sd = senders.to(at::kLong).contiguous(), bt = batch.to(at::kLong).contiguous();
  auto sh = shifts.to(dtype).contiguous();
  if (dtype == at::kDouble)
    return energy_forces_impl<double>(pos, sp, rc, sd, sh, bt, n_graphs, p, c);
  TORCH_CHECK(dtype == at::kFloat, "gaq::energy_forces supports float32 and float64");
  return energy_forces_impl<float>(pos, sp, rc, sd, sh, bt, n_graphs, p, c);
}

}  // namespace

TORCH_LIBRARY(gaq, m) {
  m.def("energy_forces(Tensor positions, Tensor species, Tensor receivers, Tensor senders, Tensor shifts, "
        "Tensor batch, int n_graphs, Tensor[] params, float[] consts) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(gaq, CPU, m) { m.impl("energy_forces", energy_forces); }
