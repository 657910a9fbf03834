// The RIM's per-step loop and its backward through time, in C++ against ATen (see rims_rl/rim_fast.py).
//
// This is a transcription of `_run_loop` (with its step helpers `_read_input`, `_select`, `_cell`, `_communicate`)
// and `_RIMSequence.backward` in rims_rl/rim_fast.py for the common case: input attention over one vector per step
// (the "per-step", "folded" and "projected" paths), LSTM or GRU units, communication on or off, attention dropout on
// or off (its masks are drawn before the loop, in rim_fast.py), no dropped units. With ATen operators only (`fused`
// false: other devices, or FUSED_KERNELS=False), the same ops in the same order, so the same numbers; what it saves
// is the Python interpreter between ~30 small ops per step (forward) and ~45 (backward). On the CPU (`fused`), the
// element-wise parts of a step run as fused kernels (below), the same formulas up to rounding. The Python code
// remains the reference: the tests run every RIM test on both. Compiled on first use by torch.utils.cpp_extension
// (rim_fast.py).
//
// Layouts: the state is unit-major (K, B, H). Per-sequence buffers are (K, L, B, .) where a weight gradient is
// formed from all steps at once (h_in, read, h1, rc and their gradients), (L, K, B, .) otherwise.
#include <ATen/Dispatch.h>
#include <ATen/record_function.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <mutex>
#include <optional>
#include <type_traits>
#include <vector>

using at::Tensor;

namespace {

struct Sizes {
  int64_t L, K, B, H, Hi, dk, dv, dq, G;
};

Sizes sizes_of(const Tensor& keys, const Tensor& values, const Tensor& h, const Tensor& wih) {
  Sizes s{};
  s.L = keys.size(0);
  s.K = h.size(0);
  s.B = h.size(1);
  s.H = h.size(2);
  s.Hi = keys.size(2);
  s.dk = keys.size(3);
  s.dv = values.size(3);
  s.dq = s.Hi * s.dk;
  s.G = wih.size(2);
  return s;
}

// ---- Threads ----
// The intra-op threads the loop's ATen operators may use, for the loop's duration, in this thread only: OpenMP's
// thread count is a per-thread setting (torch.set_num_threads would change it for the whole process). At PPO's sizes
// one thread is faster than two (waking the second costs more than it saves on these small operators), and two loops
// run at once (run_together) each want one core. Weak references to torch's own OpenMP runtime, so a torch without
// OpenMP simply ignores it.
#if defined(__GNUC__)
extern "C" {
__attribute__((weak)) int omp_get_max_threads(void);
__attribute__((weak)) void omp_set_num_threads(int);
}
#define RIM_HAS_OMP (omp_get_max_threads != nullptr && omp_set_num_threads != nullptr)
#else
#define RIM_HAS_OMP false
inline int omp_get_max_threads() { return 1; }
inline void omp_set_num_threads(int) {}
#endif

struct LoopThreads {
  int previous = 0;
  bool set = false;
  explicit LoopThreads(int64_t threads) {
    if (threads > 0 && RIM_HAS_OMP) {
      previous = omp_get_max_threads();
      omp_set_num_threads(static_cast<int>(threads));
      set = true;
    }
  }
  ~LoopThreads() {
    if (set) omp_set_num_threads(previous);
  }
  LoopThreads(const LoopThreads&) = delete;
  LoopThreads& operator=(const LoopThreads&) = delete;
};

#if defined(__GNUC__)
extern "C" {
__attribute__((weak)) void GOMP_parallel(void (*)(void*), void*, unsigned, unsigned);
__attribute__((weak)) int omp_get_thread_num(void);
__attribute__((weak)) int omp_get_num_threads(void);
__attribute__((weak)) int omp_in_parallel(void);
}
#define RIM_CAN_FORK \
  (RIM_HAS_OMP && GOMP_parallel != nullptr && omp_get_thread_num != nullptr && omp_get_num_threads != nullptr)
#else
#define RIM_CAN_FORK false
#endif

// f(begin, end) over [0, n), split in contiguous ranges among OpenMP's threads (what `#pragma omp parallel` compiles
// to: this file is built without -fopenmp, so it links to no OpenMP runtime of its own; the same weak references to
// torch's as LoopThreads, serial without one). Each index is handled by one thread as it would be serially, so the
// results do not depend on the thread count.
template <typename F>
void parallel_ranges(int64_t n, bool worth_it, const F& f) {
#if defined(__GNUC__)
  if (worth_it && n > 1 && RIM_CAN_FORK && omp_get_max_threads() > 1 && !(omp_in_parallel && omp_in_parallel())) {
    struct Job {
      const F* f;
      int64_t n;
    } job{&f, n};
    GOMP_parallel(
        [](void* data) {
          const Job& j = *static_cast<const Job*>(data);
          const int64_t threads = omp_get_num_threads(), id = omp_get_thread_num();
          const int64_t chunk = (j.n + threads - 1) / threads, begin = id * chunk;
          if (begin < j.n) (*j.f)(begin, std::min(j.n, begin + chunk));
        },
        &job, 0, 0);
    return;
  }
#endif
  f(0, n);
}

// f(k, b) for each row of a step's (K, B, .) tensors, split among the threads where `work` (about the elements the
// kernel touches) may repay waking them. Measured on 2 cores against the same kernels serial (one process,
// alternated): 16 steps of 53 samples at CartPoleNoVel's sizes 0.87x forward, 0.94x forward and backward; 128 steps
// of 2 samples at the paper's 0.99x and 0.96x; one step of 8 samples within 3% either way.
constexpr int64_t kRowWork = 4096;

template <typename F>
void for_rows(int64_t K, int64_t B, int64_t work, const F& f) {
  parallel_ranges(K * B, work >= kRowWork, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) f(i / B, i % B);
  });
}

// ---- Per-sequence buffers kept between calls ----
// With glibc's default malloc (without rims_rl.allocator's setting), the large blocks a sequence's tape and gradients
// take (~90 MB at benchmark (b)'s sizes: 128 steps, batch 8) go back to the system when freed and are faulted in
// again page by page on the next call: ~25,000 page faults, ~40 ms of a ~166 ms call. The loop takes those buffers
// (1 MB or more, on the CPU) from this pool instead: a buffer whose storage nothing else holds any longer (its
// tensors freed, the autograd graph that saved them released) is handed out again for a request of the same size and
// dtype; one still held (an output a caller keeps, a tape awaiting its backward) never is. The pool keeps at most
// kPoolBytes, dropping the longest-idle free buffers first to make room; release_buffers() empties it. Every buffer
// is written before it is read, as those of at::empty, so reuse changes no value. Calls under inference mode take
// none (tensors made there may not be written, or saved for backward, outside it).
class BufferPool {
 public:
  static constexpr int64_t kMinBytes = 1 << 20;
  static constexpr int64_t kPoolBytes = int64_t(256) << 20;

  Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& opt) {
    const int64_t n = c10::multiply_integers(sizes);
    const int64_t bytes = n * static_cast<int64_t>(c10::elementSize(c10::typeMetaToScalarType(opt.dtype())));
    if (!opt.device().is_cpu() || bytes < kMinBytes || c10::InferenceMode::is_enabled()) return at::empty(sizes, opt);
    std::lock_guard<std::mutex> lock(mutex_);
    for (size_t i = 0; i < held_.size(); ++i) {
      const Tensor& t = held_[i];
      if (t.numel() == n && t.dtype() == opt.dtype() && t.storage().use_count() == 1) {
        Tensor out = t.view(sizes);
        std::rotate(held_.begin() + i, held_.begin() + i + 1, held_.end());  // the most recently used last
        return out;
      }
    }
    Tensor t = at::empty({n}, opt);
    for (size_t i = 0; i < held_.size() && bytes_ + bytes > kPoolBytes;) {  // make room: the longest idle first
      if (held_[i].storage().use_count() == 1) {
        bytes_ -= held_[i].nbytes();
        held_.erase(held_.begin() + i);
      } else {
        ++i;
      }
    }
    if (bytes_ + bytes <= kPoolBytes) {
      held_.push_back(t);
      bytes_ += bytes;
    }
    return t.view(sizes);
  }

  void clear() {
    std::lock_guard<std::mutex> lock(mutex_);
    held_.clear();
    bytes_ = 0;
  }

  int64_t bytes() {
    std::lock_guard<std::mutex> lock(mutex_);
    return bytes_;
  }

 private:
  std::mutex mutex_;
  std::vector<Tensor> held_;
  int64_t bytes_ = 0;
};

BufferPool& buffer_pool() {
  static BufferPool pool;
  return pool;
}

// ---- Fused CPU kernels (used when `fused`: on the CPU) ----
// The small element-wise parts of a step (input attention over one vector, the selection, the cell's arithmetic, the
// communication attention among the K units, the gated residual) and their backward each run as one plain C++ loop
// over the step's rows (split among the intra-op threads where a step is large enough: for_rows, above) instead of a
// dozen ATen operators with their dispatch, views and temporaries; so do the per-step weight products
// with few rows (unit_mm, below); the other matrix products stay ATen calls (and a GRU's sigmoid and tanh). The
// formulas are those of the ATen code they replace (kept below, for other devices), so the values agree up to
// rounding: sums in another order, std::exp for the input attention's sigmoids and exp_simd (below) for the softmax
// among units and the LSTM cell's and the residual's activations, against ATen's vectorised exp. The tests bound the
// difference.
template <typename T>
struct Rows {  // rows of a (K, B, X) tensor whose last axis is contiguous
  T* p;
  int64_t sk, sb;
  explicit Rows(const Tensor& t) : p(nullptr), sk(0), sb(0) {  // an undefined tensor gives null rows
    if (!t.defined()) return;
    TORCH_CHECK(t.dim() == 3 && (t.size(2) <= 1 || t.stride(2) == 1), "rim_loop: expected row-contiguous (K, B, X)");
    p = t.data_ptr<T>();
    sk = t.stride(0);
    sb = t.stride(1);
  }
  T* operator()(int64_t k, int64_t b) const { return p + k * sk + b * sb; }
};

template <typename T>
inline T sigmoid_of(T x) {
  return T(1) / (T(1) + std::exp(-x));
}

// The exp of the softmax among units, and the sigmoid and tanh of the LSTM cell and of the residual, inside the
// fused kernels. In float, exp is Cephes' expf (range reduction by ln 2 in two parts, a degree-5 polynomial, the
// power of two set in the exponent bits; arguments clamped to [-87, 88]), written without calls or branches so that
// the compiler vectorises the `omp simd` loops that use it (with -fno-trapping-math: rim_fast._cflags). In double,
// the standard library's (the float64 tests hold the fused loop to 1e-12 of the Python loop).
inline float exp_simd(float x) {
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest (1.5 * 2^23)
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return y * scale;
}

inline double exp_simd(double x) { return std::exp(x); }

inline float sigmoid_simd(float x) { return 1.0f / (1.0f + exp_simd(-x)); }
inline double sigmoid_simd(double x) { return 1.0 / (1.0 + std::exp(-x)); }

inline float tanh_simd(float x) {
  const float e = exp_simd(-2.0f * std::fabs(x));
  return std::copysign((1.0f - e) / (1.0f + e), x);
}
inline double tanh_simd(double x) { return std::tanh(x); }

// Input attention over one vector: per head p = sigmoid(q . key) (or of `score_in`, the projected path's scores), the
// unit's attention on the input (mean of p over heads), the mean log-odds (the selection's tie-break), and the read
// p * value (`read`), or p after dropout itself (`p_read`, for the projected path's product).
template <typename T>
void attend_cpu(const Tensor& q, const Tensor& score_in, const Tensor& keys_t, const Tensor& values_t,
                const Tensor& drop, const Tensor& p, const Tensor& on_input, const Tensor& odds, const Tensor& read,
                const Tensor& p_read) {
  const int64_t K = p.size(0), B = p.size(1), Hi = p.size(2);
  T* pp = p.data_ptr<T>();
  T* on = on_input.data_ptr<T>();
  T* od = odds.data_ptr<T>();
  const bool has_q = q.defined(), has_read = read.defined();
  const T* qp = has_q ? q.data_ptr<T>() : score_in.data_ptr<T>();
  const int64_t q0 = has_q ? q.stride(0) : score_in.stride(0), q1 = has_q ? q.stride(1) : score_in.stride(1),
                q2 = has_q ? q.stride(2) : score_in.stride(2), q3 = has_q ? q.stride(3) : 0, dk = has_q ? q.size(3) : 0;
  const T* kp = has_q ? keys_t.data_ptr<T>() : nullptr;
  const int64_t k0 = has_q ? keys_t.stride(0) : 0, k1 = has_q ? keys_t.stride(1) : 0, k2 = has_q ? keys_t.stride(2) : 0;
  const T* vp = has_read ? values_t.data_ptr<T>() : nullptr;
  const int64_t v0 = has_read ? values_t.stride(0) : 0, v1 = has_read ? values_t.stride(1) : 0,
                v2 = has_read ? values_t.stride(2) : 0, dv = has_read ? values_t.size(2) : 0;
  const T* dp = drop.defined() ? drop.data_ptr<T>() : nullptr;
  const int64_t d0 = dp ? drop.stride(0) : 0, d1 = dp ? drop.stride(1) : 0, d2 = dp ? drop.stride(2) : 0;
  T* rp = has_read ? read.data_ptr<T>() : nullptr;
  const int64_t r0 = has_read ? read.stride(0) : 0, r1 = has_read ? read.stride(1) : 0;
  T* prp = p_read.defined() ? p_read.data_ptr<T>() : nullptr;
  for_rows(K, B, K * B * Hi * (dk + dv + 4), [&](int64_t k, int64_t b) {
    T sum_p = 0, sum_s = 0;
    for (int64_t i = 0; i < Hi; ++i) {
      const T* qr = qp + k * q0 + b * q1 + i * q2;
      T s;
      if (has_q) {
        const T* kr = kp + b * k0 + i * k1;
        s = 0;
        #pragma omp simd reduction(+ : s)
        for (int64_t d = 0; d < dk; ++d) s += qr[d * q3] * kr[d * k2];
      } else {
        s = *qr;
      }
      const T pi = sigmoid_of(s);
      pp[(k * B + b) * Hi + i] = pi;
      sum_p += pi;
      sum_s += s;
      const T pr = dp ? pi * dp[k * d0 + b * d1 + i * d2] : pi;
      if (prp) prp[(k * B + b) * Hi + i] = pr;
      if (has_read) {
        const T* vr = vp + b * v0 + i * v1;
        T* rr = rp + k * r0 + b * r1 + i * dv;
        #pragma omp simd
        for (int64_t v = 0; v < dv; ++v) rr[v] = pr * vr[v * v2];
      }
    }
    on[k * B + b] = sum_p / T(Hi);
    od[k * B + b] = sum_s / T(Hi);
  });
}

// rim_fast.select_winners for each sample: the order (on_input desc, log-odds desc, index asc), the first k_active
// win. Writes the (K, B) mask and, where given, its (K, B, 1) float copy.
template <typename T>
void select_cpu(const Tensor& on_input, const Tensor& odds, int64_t k_active, const Tensor& mask, const Tensor& mf) {
  const int64_t K = on_input.size(0), B = on_input.size(1);
  const T* on = on_input.data_ptr<T>();
  const T* od = odds.data_ptr<T>();
  bool* mk = mask.data_ptr<bool>();
  T* mfp = mf.defined() ? mf.data_ptr<T>() : nullptr;
  std::vector<int64_t> order(K);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t k = 0; k < K; ++k) order[k] = k;
    if (k_active < K) {
      std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) {
        const T ox = on[x * B + b], oy = on[y * B + b];
        if (ox != oy) return ox > oy;
        return od[x * B + b] > od[y * B + b];
      });
    }
    for (int64_t r = 0; r < K; ++r) {
      const int64_t k = order[r];
      mk[k * B + b] = r < k_active;
      if (mfp) mfp[k * B + b] = r < k_active ? T(1) : T(0);
    }
  }
}

// The whole LSTM cell of a step from its gate pre-activations `gates` [i f o g]: the activations into `a`
// (sigmoid of i, f, o; tanh of g), c_new = f c + i g, tanh(c_new) into `tanh_c`, and h1 = o tanh(c_new) for the
// active units, h for the others; c_new becomes the next cell state (the inactive units' c kept). With a tape, the
// step's incoming h and c into h_in and c_in.
template <typename T>
void lstm_cell_cpu(const Tensor& gates, const Tensor& a, const Tensor& h, const Tensor& c, const Tensor& c_new,
                   const Tensor& tanh_c, const Tensor& mask, const Tensor& h1, const Tensor& h_in,
                   const Tensor& c_in) {
  const int64_t K = h.size(0), B = h.size(1), H = h.size(2);
  const Rows<T> gr(gates), ar(a), hr(h), cr(c), nr(c_new), tr(tanh_c), outr(h1), hir(h_in), cir(c_in);
  const bool* mk = mask.data_ptr<bool>();
  const bool rec = h_in.defined();
  for_rows(K, B, K * B * H * 8, [&](int64_t k, int64_t b) {
    const T *gp = gr(k, b), *cp = cr(k, b);
    T *ap = ar(k, b), *n = nr(k, b), *tc = tr(k, b);
    #pragma omp simd
    for (int64_t j = 0; j < 3 * H; ++j) ap[j] = sigmoid_simd(gp[j]);
    #pragma omp simd
    for (int64_t j = 0; j < H; ++j) ap[3 * H + j] = tanh_simd(gp[3 * H + j]);
    #pragma omp simd
    for (int64_t j = 0; j < H; ++j) {
      n[j] = ap[H + j] * cp[j] + ap[j] * ap[3 * H + j];
      tc[j] = tanh_simd(n[j]);
    }
    if (rec) {
      std::copy(hr(k, b), hr(k, b) + H, hir(k, b));
      std::copy(cp, cp + H, cir(k, b));
    }
    T* out = outr(k, b);
    if (mk[k * B + b]) {
      const T* o = ap + 2 * H;
      #pragma omp simd
      for (int64_t j = 0; j < H; ++j) out[j] = o[j] * tc[j];
    } else {
      std::copy(hr(k, b), hr(k, b) + H, out);
      std::copy(cp, cp + H, n);
    }
  });
}

// GRU, before ATen's sigmoid: a[r, z] = gx[r, z] + gh[r, z]; the tape's aux = gh_n and h_in.
template <typename T>
void gru_rz_cpu(const Tensor& gx, const Tensor& gh, const Tensor& h, const Tensor& a, const Tensor& aux,
                const Tensor& h_in) {
  const int64_t K = h.size(0), B = h.size(1), H = h.size(2);
  const Rows<T> xr(gx), gr(gh), hr(h), ar(a), xar(aux), hir(h_in);
  const bool rec = h_in.defined();
  for_rows(K, B, K * B * H * 4, [&](int64_t k, int64_t b) {
    const T *x = xr(k, b), *g = gr(k, b);
    T* out = ar(k, b);
    #pragma omp simd
    for (int64_t j = 0; j < 2 * H; ++j) out[j] = x[j] + g[j];
    if (rec) {
      std::copy(g + 2 * H, g + 3 * H, xar(k, b));
      std::copy(hr(k, b), hr(k, b) + H, hir(k, b));
    }
  });
}

// GRU, after the sigmoid: a[n] = gx_n + r gh_n (ATen's tanh follows).
template <typename T>
void gru_n_cpu(const Tensor& gx, const Tensor& gh, const Tensor& a) {
  const int64_t K = a.size(0), B = a.size(1), H = gh.size(2) / 3;
  const Rows<T> xr(gx), gr(gh), ar(a);
  for_rows(K, B, K * B * H, [&](int64_t k, int64_t b) {
    const T *x = xr(k, b) + 2 * H, *g = gr(k, b) + 2 * H, *r = ar(k, b);
    T* n = ar(k, b) + 2 * H;
    #pragma omp simd
    for (int64_t j = 0; j < H; ++j) n[j] = x[j] + r[j] * g[j];
  });
}

// GRU, after the tanh: h1 = n + z (h - n) for the active units, h for the others.
template <typename T>
void gru_h_cpu(const Tensor& a, const Tensor& h, const Tensor& mask, const Tensor& h1) {
  const int64_t K = h.size(0), B = h.size(1), H = h.size(2);
  const Rows<T> ar(a), hr(h), outr(h1);
  const bool* mk = mask.data_ptr<bool>();
  for_rows(K, B, K * B * H, [&](int64_t k, int64_t b) {
    const T* hp = hr(k, b);
    T* out = outr(k, b);
    if (mk[k * B + b]) {
      const T *z = ar(k, b) + H, *n = ar(k, b) + 2 * H;
      #pragma omp simd
      for (int64_t j = 0; j < H; ++j) out[j] = n[j] + z[j] * (hp[j] - n[j]);
    } else {
      std::copy(hp, hp + H, out);
    }
  });
}

// Communication attention among the K units of each sample and head: scores k2 . q2 * scale, softmax over the keys
// (into ac (B*Hc, K keys, K queries)), dropout (drop (B*Hc, K queries, K keys)), and the read of the values into rc
// (K, B, Hc*cv). qkv (K, B, Hc*(2ck+cv)) holds [q | k | v] per head.
// CK and CV, when not 0, are ck and cv known at compile time (RIM_COMM_SIZES, below): the loops over a head's 16 or
// 32 numbers then compile to a few vector instructions each instead of a loop with its set-up, which cost more than
// the arithmetic at these sizes (per call in a RIM of CartPoleNoVel's sizes, batch 53, K = 6, 4 heads of 16,
// torch.profiler: forward ~100 -> ~65 us, backward ~270 -> ~185 us).
template <typename T, int CK, int CV>
void comm_attend_impl(const Tensor& qkv, const Tensor& drop, const Tensor& ac, const Tensor& rc, int64_t Hc,
                      int64_t ck_, int64_t cv_, double scale) {
  const int64_t ck = CK ? CK : ck_, cv = CV ? CV : cv_;
  const int64_t K = qkv.size(0), B = qkv.size(1), dqkv = 2 * ck + cv;
  const Rows<T> qr(qkv), rr(rc);
  T* acp = ac.data_ptr<T>();
  const T* dp = drop.defined() ? drop.data_ptr<T>() : nullptr;
  const T sc = static_cast<T>(scale);
  parallel_ranges(B, B * Hc * K * K * (ck + cv) >= kRowWork, [&](int64_t b0, int64_t b1) {
    std::vector<T> s(K * K);  // s[query * K + key]: the scores, then the softmax's exponentials
    for (int64_t b = b0; b < b1; ++b) {
      for (int64_t c = 0; c < Hc; ++c) {
        T* a = acp + (b * Hc + c) * K * K;  // a[key * K + query]
        const T* d = dp ? dp + (b * Hc + c) * K * K : nullptr;  // d[query * K + key]
        for (int64_t q = 0; q < K; ++q) {
          const T* qv = qr(q, b) + c * dqkv;
          T mx = -std::numeric_limits<T>::infinity();
          for (int64_t j = 0; j < K; ++j) {
            const T* kv = qr(j, b) + c * dqkv + ck;
            T acc = 0;
            #pragma omp simd reduction(+ : acc)
            for (int64_t e = 0; e < ck; ++e) acc += kv[e] * qv[e];
            s[q * K + j] = acc * sc;
            mx = std::max(mx, acc * sc);
          }
          for (int64_t j = 0; j < K; ++j) s[q * K + j] -= mx;
        }
        T* sp = s.data();
        #pragma omp simd
        for (int64_t i = 0; i < K * K; ++i) sp[i] = exp_simd(sp[i]);  // all K x K at once (vectorised)
        for (int64_t q = 0; q < K; ++q) {
          T sum = 0;
          for (int64_t j = 0; j < K; ++j) sum += sp[q * K + j];
          T* out = rr(q, b) + c * cv;
          std::fill(out, out + cv, T(0));
          for (int64_t j = 0; j < K; ++j) {
            const T w = sp[q * K + j] / sum;
            a[j * K + q] = w;
            const T wr = d ? w * d[q * K + j] : w;
            const T* vv = qr(j, b) + c * dqkv + 2 * ck;
            #pragma omp simd
            for (int64_t e = 0; e < cv; ++e) out[e] += wr * vv[e];
          }
        }
      }
    }
  });
}

// The gated residual from its pre-activations `pre` [update | gate]: ug = [tanh(update) | sigmoid(gate)] for every
// unit (the tape), out = h1 + gate * update for the active units, h1 for the others.
template <typename T>
void residual_pre_cpu(const Tensor& pre, const Tensor& ug, const Tensor& h1, const Tensor& mask, const Tensor& out) {
  const int64_t K = h1.size(0), B = h1.size(1), H = h1.size(2);
  const Rows<T> pr(pre), ur(ug), hr(h1), outr(out);
  const bool* mk = mask.data_ptr<bool>();
  for_rows(K, B, K * B * H * 4, [&](int64_t k, int64_t b) {
    const T *pp = pr(k, b), *hp = hr(k, b);
    T *u = ur(k, b), *g = ur(k, b) + H, *o = outr(k, b);
    #pragma omp simd
    for (int64_t j = 0; j < H; ++j) {
      u[j] = tanh_simd(pp[j]);
      g[j] = sigmoid_simd(pp[H + j]);
    }
    if (mk[k * B + b]) {
      #pragma omp simd
      for (int64_t j = 0; j < H; ++j) o[j] = hp[j] + g[j] * u[j];
    } else {
      std::copy(hp, hp + H, o);
    }
  });
}

// Backward: dh += d_output (into dh_acc) and, with communication, the gradients of the residual's pre-activations,
// d_pre = [d_update | d_gate] (K, B, 2H) of the active units (zero for the others).
template <typename T>
void residual_backward_cpu(const Tensor& dh, const Tensor& d_out, const Tensor& dh_acc, const Tensor& ug,
                           const Tensor& mf, const Tensor& d_pre) {
  const int64_t K = dh.size(0), B = dh.size(1), H = dh.size(2);
  const Rows<T> dr(dh), ar(dh_acc), outr(d_out), ugr(ug), pr(d_pre);
  const bool has_out = d_out.defined(), comm = d_pre.defined();
  const T* m = mf.data_ptr<T>();
  for_rows(K, B, K * B * H * 4, [&](int64_t k, int64_t b) {
    const T* g0 = dr(k, b);
    T* acc = ar(k, b);
    if (has_out) {
      const T* go = outr(k, b);
      #pragma omp simd
      for (int64_t j = 0; j < H; ++j) acc[j] = g0[j] + go[j];
    } else if (acc != g0) {
      std::copy(g0, g0 + H, acc);
    }
    if (!comm) return;  // (the next row)
    T* dp = pr(k, b);
    const T mk = m[k * B + b];
    const T *u = ugr(k, b), *g = u + H;
    #pragma omp simd
    for (int64_t j = 0; j < H; ++j) {
      const T da = acc[j] * mk;
      dp[j] = da * g[j] * (T(1) - u[j] * u[j]);
      dp[H + j] = da * u[j] * (T(1) - g[j]) * g[j];
    }
  });
}

// Backward of comm_attend_cpu: from d_rc (K, B, Hc*cv), the gradients of [q | k | v] per head into d_qkv.
template <typename T, int CK, int CV>
void comm_attend_backward_impl(const Tensor& d_rc, const Tensor& qkv, const Tensor& ac, const Tensor& drop,
                               const Tensor& d_qkv, int64_t Hc, int64_t ck_, int64_t cv_, double scale) {
  const int64_t ck = CK ? CK : ck_, cv = CV ? CV : cv_;
  const int64_t K = qkv.size(0), B = qkv.size(1), dqkv = 2 * ck + cv;
  const Rows<T> gr(d_rc), qr(qkv), outr(d_qkv);
  const T* acp = ac.data_ptr<T>();
  const T* dp = drop.defined() ? drop.data_ptr<T>() : nullptr;
  const T sc = static_cast<T>(scale);
  parallel_ranges(B, B * Hc * K * K * (2 * ck + cv) >= kRowWork, [&](int64_t b0, int64_t b1) {
    std::vector<T> d_ac(K), d_s(K * K);
    for (int64_t b = b0; b < b1; ++b) {
      for (int64_t c = 0; c < Hc; ++c) {
        const T* a = acp + (b * Hc + c) * K * K;  // a[key * K + query]
        const T* d = dp ? dp + (b * Hc + c) * K * K : nullptr;  // d[query * K + key]
        for (int64_t j = 0; j < K; ++j) std::fill(outr(j, b) + c * dqkv, outr(j, b) + (c + 1) * dqkv, T(0));
        for (int64_t q = 0; q < K; ++q) {
          const T* g = gr(q, b) + c * cv;
          T dot = 0;
          for (int64_t j = 0; j < K; ++j) {
            const T* vv = qr(j, b) + c * dqkv + 2 * ck;
            T acc = 0;
            #pragma omp simd reduction(+ : acc)
            for (int64_t e = 0; e < cv; ++e) acc += g[e] * vv[e];
            const T dr = d ? d[q * K + j] : T(1);
            d_ac[j] = acc * dr;
            const T w = a[j * K + q] * dr;  // d_v[key] += w d_rc[query]
            T* dv = outr(j, b) + c * dqkv + 2 * ck;
            #pragma omp simd
            for (int64_t e = 0; e < cv; ++e) dv[e] += w * g[e];
            dot += d_ac[j] * a[j * K + q];
          }
          for (int64_t j = 0; j < K; ++j) d_s[j * K + q] = a[j * K + q] * (d_ac[j] - dot);
        }
        for (int64_t q = 0; q < K; ++q) {  // d_q[query] = scale sum_key d_s k[key]; d_k[key] = scale sum_query d_s q
          T* dq = outr(q, b) + c * dqkv;
          T* dkey = outr(q, b) + c * dqkv + ck;
          for (int64_t j = 0; j < K; ++j) {
            const T* kv = qr(j, b) + c * dqkv + ck;
            const T* qv = qr(j, b) + c * dqkv;
            const T wq = d_s[j * K + q] * sc, wk = d_s[q * K + j] * sc;
            #pragma omp simd
            for (int64_t e = 0; e < ck; ++e) {
              dq[e] += wq * kv[e];
              dkey[e] += wk * qv[e];
            }
          }
        }
      }
    }
  });
}

// The communication kernels for the head sizes the configs use (16 and 32; the paper's 32) with those sizes fixed
// at compile time, others with run-time sizes: the same arithmetic in the same order, so the same results.
#define RIM_COMM_SIZES(F, ...)                                       \
  if (ck == 16 && cv == 16) return F<T, 16, 16>(__VA_ARGS__);        \
  if (ck == 32 && cv == 32) return F<T, 32, 32>(__VA_ARGS__);        \
  if (ck == 64 && cv == 64) return F<T, 64, 64>(__VA_ARGS__);        \
  return F<T, 0, 0>(__VA_ARGS__);

template <typename T>
void comm_attend_cpu(const Tensor& qkv, const Tensor& drop, const Tensor& ac, const Tensor& rc, int64_t Hc,
                     int64_t ck, int64_t cv, double scale) {
  RIM_COMM_SIZES(comm_attend_impl, qkv, drop, ac, rc, Hc, ck, cv, scale)
}

template <typename T>
void comm_attend_backward_cpu(const Tensor& d_rc, const Tensor& qkv, const Tensor& ac, const Tensor& drop,
                              const Tensor& d_qkv, int64_t Hc, int64_t ck, int64_t cv, double scale) {
  RIM_COMM_SIZES(comm_attend_backward_impl, d_rc, qkv, ac, drop, d_qkv, Hc, ck, cv, scale)
}
#undef RIM_COMM_SIZES

// Backward of the cell: from dh1 (the gradient entering the state after the dynamics) and dc, the gradients of the
// gates into d_gates (LSTM: [i f o g]; GRU: d_gx [r z n] and d_gh [r z n*r]), dc in place, and dh_prev (the part that
// goes back through the kept state and, for a GRU, z h).
template <typename T>
void cell_backward_cpu(bool lstm, const Tensor& dh1, const Tensor& dc, const Tensor& mf, const Tensor& a,
                       const Tensor& aux, const Tensor& c_in, const Tensor& h_in, const Tensor& d_gx,
                       const Tensor& d_gh, const Tensor& dh_prev) {
  const int64_t K = dh1.size(0), B = dh1.size(1), H = dh1.size(2);
  const Rows<T> hr(dh1), ar(a), xr(aux), pr(dh_prev), gr(d_gh), cr(dc), cir(c_in), hir(h_in), dxr(d_gx);
  const T* m = mf.data_ptr<T>();
  for_rows(K, B, K * B * H * 8, [&](int64_t k, int64_t b) {
    const T mk = m[k * B + b];
    const T *g1 = hr(k, b), *ap = ar(k, b), *x = xr(k, b);
    T *dprev = pr(k, b), *dg = gr(k, b);
    if (lstm) {
      T* dcp = cr(k, b);
      const T* cin = cir(k, b);
      const T *i = ap, *f = ap + H, *o = ap + 2 * H, *g = ap + 3 * H;
      #pragma omp simd
      for (int64_t j = 0; j < H; ++j) {
        const T dha = g1[j] * mk, dca = dcp[j] * mk;
        const T dcn = dha * o[j] * (T(1) - x[j] * x[j]) + dca;
        dg[j] = dcn * g[j] * (T(1) - i[j]) * i[j];
        dg[H + j] = dcn * cin[j] * (T(1) - f[j]) * f[j];
        dg[2 * H + j] = dha * x[j] * (T(1) - o[j]) * o[j];
        dg[3 * H + j] = dcn * i[j] * (T(1) - g[j] * g[j]);
        dcp[j] = dcp[j] - dca + dcn * f[j];
        dprev[j] = g1[j] - dha;
      }
    } else {
      T* dx = dxr(k, b);
      const T* hin = hir(k, b);
      const T *r = ap, *z = ap + H, *n = ap + 2 * H;
      #pragma omp simd
      for (int64_t j = 0; j < H; ++j) {
        const T dha = g1[j] * mk;
        const T dn = (dha - dha * z[j]) * (T(1) - n[j] * n[j]);
        const T dr = dn * x[j] * (T(1) - r[j]) * r[j];
        const T dz = dha * (hin[j] - n[j]) * (T(1) - z[j]) * z[j];
        dx[j] = dr;
        dx[H + j] = dz;
        dx[2 * H + j] = dn;
        dg[j] = dr;
        dg[H + j] = dz;
        dg[2 * H + j] = dn * r[j];
        dprev[j] = g1[j] - dha + dha * z[j];
      }
    }
  });
}

// Backward of attend_cpu (the read path): d_p = d_read . value per head, through the dropout and the sigmoid into
// d_s, and d_q = d_s key.
template <typename T>
void attend_backward_cpu(const Tensor& d_read, const Tensor& values_t, const Tensor& keys_t, const Tensor& drop,
                         const Tensor& p, const Tensor& d_s, const Tensor& d_q) {
  const int64_t K = p.size(0), B = p.size(1), Hi = p.size(2), dv = values_t.size(2), dk = keys_t.size(2);
  const Rows<T> rr(d_read), sr(d_s), qr(d_q);
  const T* pp = p.data_ptr<T>();
  const T* vp = values_t.data_ptr<T>();
  const T* kp = keys_t.data_ptr<T>();
  const T* dp = drop.defined() ? drop.data_ptr<T>() : nullptr;
  const int64_t v0 = values_t.stride(0), v1 = values_t.stride(1), v2 = values_t.stride(2);
  const int64_t k0 = keys_t.stride(0), k1 = keys_t.stride(1), k2 = keys_t.stride(2);
  const int64_t d0 = dp ? drop.stride(0) : 0, d1 = dp ? drop.stride(1) : 0, d2 = dp ? drop.stride(2) : 0;
  const int64_t p0 = p.stride(0), p1 = p.stride(1), p2 = p.stride(2);
  for_rows(K, B, K * B * Hi * (dk + dv + 2), [&](int64_t k, int64_t b) {
    const T* g = rr(k, b);
    T* ds = sr(k, b);
    T* dq = qr(k, b);
    for (int64_t i = 0; i < Hi; ++i) {
      const T* vr = vp + b * v0 + i * v1;
      T acc = 0;
      #pragma omp simd reduction(+ : acc)
      for (int64_t v = 0; v < dv; ++v) acc += g[i * dv + v] * vr[v * v2];
      if (dp) acc *= dp[k * d0 + b * d1 + i * d2];
      const T pi = pp[k * p0 + b * p1 + i * p2];
      const T s = acc * (T(1) - pi) * pi;
      ds[i] = s;
      const T* kr = kp + b * k0 + i * k1;
      #pragma omp simd
      for (int64_t d = 0; d < dk; ++d) dq[i * dk + d] = s * kr[d * k2];
    }
  });
}

// One fused kernel: dispatched on the dtype (float or double), and named for the profiler (benchmark_core.py
// counts it as one kernel).
#define RIM_FUSED(name, ...)                                                  \
  do {                                                                        \
    RECORD_FUNCTION("rims_rl::" name, std::vector<c10::IValue>());            \
    AT_DISPATCH_FLOATING_TYPES(dtype, name, [&] { __VA_ARGS__; });            \
  } while (0)

// ---- The per-step weight products, fused path ----
// Each step multiplies a few rows per unit (the batch: 2 to 5 packed rows of an Atari PPO minibatch, 8 environments in
// a rollout) by that unit's weights, (K, M, N) x (K, N, P) with M small. ATen's bmm is then bound by reading the
// weights, and reads them at about half the rate a plain loop can: unit_mm streams each weight row once per block of
// rows of the batch (8 rows, or 4 without AVX-512's registers: kRowBlock, below; one or two rows read wider strips
// of each weight row: kFewRowVectors), with the sums in registers (32-byte vectors of the compiler's vector
// extension: AVX where the build has it, two SSE halves otherwise), over the intra-op threads (parallel_ranges,
// above). Each output is bias + sum over n in order n = 0, 1, ... (a fused multiply-add each, where the build has
// FMA): not ATen's (MKL's) order, so its values differ from bmm's by rounding (the tests bound the difference, and
// compare unit_mm with bmm directly).
#if defined(__GNUC__)
#define RIM_UNIT_MM 1
#else
#define RIM_UNIT_MM 0
#endif

#if RIM_UNIT_MM
template <typename T>
struct Lanes {
  typedef T wide __attribute__((vector_size(32)));
  typedef T half __attribute__((vector_size(16)));
};

template <typename V, typename T>
inline V load_v(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

template <typename V, typename T>
inline void store_v(T* p, const V& v) {
  std::memcpy(p, &v, sizeof(V));
}

// MB rows of out = bias + a w by NV vectors V (or scalars), from column p0: the sums stay in registers while the
// weight rows stream past. The rows are m0, m0 + 1, ..., or with Listed the rows rows[0..MB). Each row's sums are
// the same whatever block it is in.
template <typename T, typename V, int MB, int NV, bool Listed>
inline void unit_mm_block(const T* a, const int64_t* rows, int64_t m0, int64_t sam, int64_t san, const T* w, int64_t N,
                          int64_t P, T* out, const T* bias, int64_t sbm, int64_t p0) {
  constexpr int lanes = sizeof(V) / sizeof(T);
  const auto row = [&](int m) -> int64_t {
    if constexpr (Listed) {
      return rows[m];
    } else {
      return m0 + m;
    }
  };
  V acc[MB][NV];
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < NV; ++j) acc[m][j] = bias ? load_v<V>(bias + row(m) * sbm + p0 + lanes * j) : V{};
  for (int64_t n = 0; n < N; ++n) {
    V wv[NV];
    for (int j = 0; j < NV; ++j) wv[j] = load_v<V>(w + n * P + p0 + lanes * j);
    for (int m = 0; m < MB; ++m) {
      const T x = a[row(m) * sam + n * san];
      for (int j = 0; j < NV; ++j) acc[m][j] += x * wv[j];
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < NV; ++j) store_v(out + row(m) * P + p0 + lanes * j, acc[m][j]);
}

// Rows in blocks of kRowBlock (8 where AVX-512's 32 vector registers hold the 8 x 3 sums, else 4), then of 4, 2, 1.
// The weights stream past once per block, and a block costs about as much as the weights' stream, whatever its
// rows: so a last block of 3 rows, or of 5 to 7, is filled up with its last row again (the same sums, computed and
// stored twice) rather than split into blocks of 4, 2 and 1. The rows are 0 .. M-1, or rows[0 .. M) where given
// (the marked rows of unit_mm_cpu).
#if defined(__AVX512VL__)
constexpr int kRowBlock = 8;
#else
constexpr int kRowBlock = 4;
#endif

template <typename T, typename V, int NV>
inline void unit_mm_rows(const T* a, const int64_t* rows, int64_t M, int64_t sam, int64_t san, const T* w, int64_t N,
                         int64_t P, T* out, const T* bias, int64_t sbm, int64_t p0) {
  int64_t m = 0;
  for (; m + kRowBlock <= M; m += kRowBlock) {
    if (rows) {
      unit_mm_block<T, V, kRowBlock, NV, true>(a, rows + m, 0, sam, san, w, N, P, out, bias, sbm, p0);
    } else {
      unit_mm_block<T, V, kRowBlock, NV, false>(a, nullptr, m, sam, san, w, N, P, out, bias, sbm, p0);
    }
  }
  const int64_t r = M - m;
  if (r == 0) return;
  if (r == 1 || r == 2 || r == 4) {  // a block of its own size
    const auto block = [&](auto size) {
      constexpr int MB = decltype(size)::value;
      if (rows) {
        unit_mm_block<T, V, MB, NV, true>(a, rows + m, 0, sam, san, w, N, P, out, bias, sbm, p0);
      } else {
        unit_mm_block<T, V, MB, NV, false>(a, nullptr, m, sam, san, w, N, P, out, bias, sbm, p0);
      }
    };
    if (r == 1) block(std::integral_constant<int, 1>{});
    if (r == 2) block(std::integral_constant<int, 2>{});
    if (r == 4) block(std::integral_constant<int, 4>{});
    return;
  }
  int64_t padded[kRowBlock];  // 3, or 5 to 7: filled up with the last row
  for (int i = 0; i < kRowBlock; ++i) {
    const int64_t k = m + std::min<int64_t>(i, r - 1);
    padded[i] = rows ? rows[k] : k;
  }
  if (r > 4) {  // (kRowBlock 8 only)
    unit_mm_block<T, V, kRowBlock, NV, true>(a, padded, 0, sam, san, w, N, P, out, bias, sbm, p0);
  } else {
    unit_mm_block<T, V, 4, NV, true>(a, padded, 0, sam, san, w, N, P, out, bias, sbm, p0);
  }
}

// One or two rows (M, or the rows given, up to 2): their 1 or 2 x NV sums, whatever the rows.
template <typename T, typename V, int NV>
inline void unit_mm_few(const T* a, const int64_t* rows, int64_t M, int64_t sam, int64_t san, const T* w, int64_t N,
                        int64_t P, T* out, const T* bias, int64_t sbm, int64_t p0) {
  const auto block = [&](auto size) {
    constexpr int MB = decltype(size)::value;
    if (rows) {
      unit_mm_block<T, V, MB, NV, true>(a, rows, 0, sam, san, w, N, P, out, bias, sbm, p0);
    } else {
      unit_mm_block<T, V, MB, NV, false>(a, nullptr, 0, sam, san, w, N, P, out, bias, sbm, p0);
    }
  };
  if (M == 1) block(std::integral_constant<int, 1>{});
  if (M == 2) block(std::integral_constant<int, 2>{});
}

// Columns per work item of unit_mm_cpu, in vectors: with one or two rows, 8 (4 without AVX-512's 32 registers), so
// that each weight row is read as 256 (128) contiguous bytes; with more, 3 next to kRowBlock rows (8 x 3 sums and 3
// weight vectors in AVX-512's 32 registers, 4 x 3 and 3 in AVX2's 16). Wider strips of a weight row than the 2
// vectors (64 bytes) of the first version: measured on 2 cores, one process, alternated, bit for bit the same
// results: 0.67-0.85x the time with 1 or 2 rows of the paper's weights, 0.9-0.97x with 3 to 53 rows.
#if defined(__AVX512VL__)
constexpr int kFewRowVectors = 8;
#else
constexpr int kFewRowVectors = 4;
#endif
constexpr int kRowVectors = 3;

// `rows` (K, M) bool or T, where given: the rows to compute (true or non-zero; the active units' samples); the
// others are the bias (or zero) without the product
template <typename T>
void unit_mm_cpu(const Tensor& bias, const Tensor& a, const Tensor& w, const Tensor& out, const Tensor& rows) {
  using wide = typename Lanes<T>::wide;
  using half = typename Lanes<T>::half;
  constexpr int64_t lanes = sizeof(wide) / sizeof(T), block = 2 * lanes;
  const int64_t K = a.size(0), M = a.size(1), N = a.size(2), P = w.size(2);
  const T* A = a.data_ptr<T>();
  const T* W = w.data_ptr<T>();
  T* O = out.data_ptr<T>();
  const T* Bs = bias.defined() ? bias.data_ptr<T>() : nullptr;
  const int64_t sak = a.stride(0), sam = a.stride(1), san = a.stride(2);
  const int64_t sbk = Bs && bias.size(0) > 1 ? bias.stride(0) : 0, sbm = Bs && bias.size(1) > 1 ? bias.stride(1) : 0;
  const bool* rb = rows.defined() && rows.scalar_type() == at::kBool ? rows.data_ptr<bool>() : nullptr;
  const T* rt = rows.defined() && !rb ? rows.data_ptr<T>() : nullptr;
  // with `rows`: unit k's rows to compute, on[k * M ...] (n_on[k] of them), and the others, off[k * M ...]
  std::vector<int64_t> on, off, n_on;
  if (rows.defined()) {
    on.resize(K * M);
    off.resize(K * M);
    n_on.resize(K);
    for (int64_t k = 0; k < K; ++k) {
      int64_t i = 0, j = 0;
      for (int64_t m = 0; m < M; ++m) {
        const bool use = rb ? rb[k * M + m] : rt[k * M + m] != T(0);
        (use ? on[k * M + i++] : off[k * M + j++]) = m;
      }
      n_on[k] = i;
    }
  }
  const bool few = M <= 2;
  const int64_t width = (few ? kFewRowVectors : kRowVectors) * lanes;  // columns per work item
  const int64_t blocks = (P + width - 1) / width;  // work items: (unit, block of columns)
  parallel_ranges(K * blocks, K * M * N * P >= 32768, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t k = item / blocks, p0 = item % blocks * width, p1 = std::min(P, p0 + width);
      const T* ak = A + k * sak;
      const T* wk = W + k * N * P;
      T* ok = O + k * M * P;
      const T* bk = Bs ? Bs + k * sbk : nullptr;
      const int64_t Mk = rows.defined() ? n_on[k] : M;
      const int64_t* rk = Mk < M ? on.data() + k * M : nullptr;  // (all rows: 0 .. M-1)
      int64_t p = p0;
      const int64_t halfl = lanes / 2;
      if (p + width <= p1) {  // then the last item's remaining columns in narrower blocks
        if (few) {
          unit_mm_few<T, wide, kFewRowVectors>(ak, rk, Mk, sam, san, wk, N, P, ok, bk, sbm, p);
        } else {
          unit_mm_rows<T, wide, kRowVectors>(ak, rk, Mk, sam, san, wk, N, P, ok, bk, sbm, p);
        }
        p += width;
      }
      for (; p + block <= p1; p += block) unit_mm_rows<T, wide, 2>(ak, rk, Mk, sam, san, wk, N, P, ok, bk, sbm, p);
      if (p + lanes <= p1) unit_mm_rows<T, wide, 1>(ak, rk, Mk, sam, san, wk, N, P, ok, bk, sbm, p), p += lanes;
      if (p + halfl <= p1) unit_mm_rows<T, half, 1>(ak, rk, Mk, sam, san, wk, N, P, ok, bk, sbm, p), p += halfl;
      for (; p < p1; ++p) unit_mm_rows<T, T, 1>(ak, rk, Mk, sam, san, wk, N, P, ok, bk, sbm, p);
      for (int64_t i = 0; i < M - Mk; ++i) {  // the rows left out: the bias
        const int64_t m = off[k * M + i];
        T* o = ok + m * P;
        if (bk) {
          std::copy(bk + m * sbm + p0, bk + m * sbm + p1, o + p0);
        } else {
          std::fill(o + p0, o + p1, T(0));
        }
      }
    }
  });
}
#endif

// bias + a w, or a w without a bias, per unit: (K, M, N) x (K, N, P) (+ (K or 1, M or 1, P)), into `out` where given.
// With `fused` (the CPU, float or double), unit_mm_cpu where the weights' rows and the output are contiguous and the
// product is one it does faster: up to 256 rows, or small weights (measured on 2 cores with blocks of 4 rows:
// 0.45-0.65x bmm's time with 2 rows, 0.7-0.8x with 8 and 16, and CartPoleNoVel's small weights 0.9x with 53 rows;
// with 32 to 64 rows and the paper's weights 0.9-1.1x, then left to bmm; blocks of 8 then took 0.84-0.93x the time of
// blocks of 4 at 8 to 16 rows of the paper's input-to-gate weights, 0.82-0.92x at 53 rows of CartPoleNoVel's; with
// the wider column strips of kRowVectors, 0.79-0.85x bmm's time at 64 rows of the paper's weights, 0.95x at 256, and
// 0.6-0.7x where a third of the rows are left out); otherwise ATen's baddbmm / bmm.
// `rows` (K, M) (bool, or the dtype's 1.0 / 0.0), where given, marks the rows whose products are used: the active
// units' samples. The loop passes it for the gates and the residual's pre-activations, which the inactive units
// (their state kept) do not read, and for the gradients through them, whose inactive rows are zero, so that the
// product there is zero too. unit_mm_cpu computes only the marked rows and gives the others the bias (or zero): the
// same outputs and gradients, bit for bit (tested), and less work where that leaves fewer or smaller blocks of rows
// (kRowBlock, above). bmm computes them all.
Tensor unit_mm(bool fused, const Tensor& bias, const Tensor& a, const Tensor& w, Tensor out = Tensor(),
               const Tensor& rows = Tensor()) {
  const int64_t M = a.size(1), NP = w.size(1) * w.size(2);
  TORCH_CHECK(!rows.defined() || (rows.dim() == 2 && rows.size(0) == a.size(0) && rows.size(1) == M &&
                                  (rows.scalar_type() == at::kBool || rows.scalar_type() == a.scalar_type())),
              "unit_mm: rows must be (K, M), bool or the operands' dtype");
  const bool own = RIM_UNIT_MM && fused && (M <= 256 || NP <= 16384) && w.is_contiguous() &&
                   (!out.defined() || out.is_contiguous()) &&
                   (!bias.defined() || (bias.dim() == 3 && bias.stride(2) == 1));
  if (!own) {
    if (!out.defined()) return bias.defined() ? at::baddbmm(bias, a, w) : at::bmm(a, w);
    return bias.defined() ? at::baddbmm_out(out, bias, a, w) : at::bmm_out(out, a, w);
  }
  if (!out.defined()) out = at::empty({a.size(0), a.size(1), w.size(2)}, a.options());
#if RIM_UNIT_MM
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "unit_mm", [&] {
    RECORD_FUNCTION("rims_rl::unit_mm", std::vector<c10::IValue>({a, w}));  // (shapes for the profiler)
    unit_mm_cpu<scalar_t>(bias, a, w, out, rows.defined() ? rows.contiguous() : rows);
  });
#endif
  return out;
}

// ---- The projected path's per-step products, on the projections as their batched products write them ----
// For the fused loop, rim_fast._vector_projections leaves the score weights (Hi, L, B, K, H) and the projected gates
// (Hi, L, B, K, G) in the layouts their einsums produce; the (L, K*B, ., .) layouts that bmm reads cost a copy of
// the whole sequence's projections (39 MB at batch 8 in benchmark (b), ~15 ms). At step t, unit k and sample b use
// the Hi rows proj[h, t, b, k, :]. (ATen operators on this layout: by_head_rows, below.)

// Both kernels walk step t's projection in its memory order: head by head, and within a head its B*K rows of X
// numbers, one contiguous block (38 KB at Atari's sizes with batch 4), split among the intra-op threads where a step
// reads kStreamWork numbers or more (the projected gates from batch 4 on at Atari's sizes; against the same kernels
// on one thread, the threads' gain or loss at batches 2 to 8 was within this machine's noise, 3%). Each output
// element still sums its terms in the same order (the heads in turn), so the results are those of the unit-by-unit
// loops they replace bit for bit. Those jumped between the Hi blocks, and by K*X within each: at Atari's sizes (128
// steps, batch 4, forward and backward) the two kernels took 7.3% of the profiled time, now 5-6% (three runs).
constexpr int64_t kStreamWork = 32768;

// out[k, b, h] = bias[k, b, h] (or 0) + sum_x v[k, b, x] proj[h, t, b, k, x]: the scores (v the state), and the
// gradient of the read's weights (v the gates' gradient)
template <typename T>
void proj_dot_cpu(const Tensor& proj, int64_t t, const Tensor& v, const Tensor& bias, const Tensor& out) {
  const int64_t Hi = proj.size(0), L = proj.size(1), B = proj.size(2), K = proj.size(3), X = proj.size(4);
  const T* P = proj.data_ptr<T>();
  const Rows<T> vr(v), br(bias), o(out);
  parallel_ranges(B * K, B * K * Hi * X >= kStreamWork, [&](int64_t begin, int64_t end) {
    for (int64_t h = 0; h < Hi; ++h) {
      const T* block = P + (h * L + t) * B * K * X;
      for (int64_t i = begin; i < end; ++i) {  // i = b * K + k
        const int64_t b = i / K, k = i % K;
        const T* x = vr(k, b);
        const T* row = block + i * X;
        T s = 0;
        #pragma omp simd reduction(+ : s)
        for (int64_t j = 0; j < X; ++j) s += x[j] * row[j];
        o(k, b)[h] = (br.p ? br(k, b)[h] : T(0)) + s;
      }
    }
  });
}

// out[k, b, :] = base[k, b, :] + sum_h c[k, b, h] proj[h, t, b, k, :] (out may be base): the gates' input part (c
// the read's weights, base the bias), and the state's gradient through the scores (c their gradient)
template <typename T>
void proj_combine_cpu(const Tensor& proj, int64_t t, const Tensor& c, const Tensor& base, const Tensor& out) {
  const int64_t Hi = proj.size(0), L = proj.size(1), B = proj.size(2), K = proj.size(3), X = proj.size(4);
  const T* P = proj.data_ptr<T>();
  const Rows<T> cr(c), br(base), o(out);
  parallel_ranges(B * K, B * K * Hi * X >= kStreamWork, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / K, k = i % K;
      const T* in = br(k, b);
      T* ob = o(k, b);
      if (ob != in) {
        #pragma omp simd
        for (int64_t j = 0; j < X; ++j) ob[j] = in[j];
      }
    }
    for (int64_t h = 0; h < Hi; ++h) {
      const T* block = P + (h * L + t) * B * K * X;
      for (int64_t i = begin; i < end; ++i) {
        const int64_t b = i / K, k = i % K;
        const T* row = block + i * X;
        const T w = cr(k, b)[h];
        T* ob = o(k, b);
        #pragma omp simd
        for (int64_t j = 0; j < X; ++j) ob[j] += w * row[j];
      }
    }
  });
}

// Step t of a by-head projection (Hi, L, B, K, X) as the (K*B, Hi, X) rows the ATen operators take (a copy of one
// step's slice)
Tensor by_head_rows(const Tensor& proj, int64_t t) {
  const int64_t Hi = proj.size(0), B = proj.size(2), K = proj.size(3), X = proj.size(4);
  return proj.select(1, t).permute({2, 1, 0, 3}).reshape({K * B, Hi, X});
}

}  // namespace

// Forward over a sequence. Returns [outputs (L,K,B,H), h_n, c_n (empty for a GRU), masks (L,K,B) bool,
// attention on the input (L,K,B)] and, with `record`, the tape the backward reads:
// [h_in (K,L,B,H), read (K,L,B,Hi*dv), h1 (K,L,B,H), rc (K,L,B,Hc*cv), c_in (L,K,B,H), mf (L,K,B,1),
//  act (L,K,B,G): LSTM [sigmoid(i,f,o) | tanh(g)], GRU [sigmoid(r,z) | n],
//  aux (L,K,B,H): LSTM tanh(c), GRU W_hn h + b_hn, p (L,K,B,Hi), qkv (L,K,B,Hc*(2ck+cv)), ac_t (L,B*Hc,K,K),
//  ug (L,K,B,2H) [update | gate]].
// drop_in (L,K,B,Hi) and drop_c (L,B*Hc,K queries,K keys), where given, are the attention dropout masks.
// start_h and start_c (L,K,B,H), where given, are the states the samples reset at a step take (zero where they do
// not reset: rim_fast._start_states); the backward takes no gradient into them.
std::vector<Tensor> rim_forward(const Tensor& keys, const Tensor& values, Tensor h, std::optional<Tensor> c_opt,
                                const std::optional<Tensor>& keep, const std::vector<bool>& reset_steps,
                                const std::optional<Tensor>& start_h, const std::optional<Tensor>& start_c,
                                const Tensor& wq, const Tensor& bq, const Tensor& wih, const Tensor& bih,
                                const Tensor& whh, const std::optional<Tensor>& bhh,
                                const std::optional<Tensor>& wqkv, const std::optional<Tensor>& wout,
                                const std::optional<Tensor>& bout, const std::optional<Tensor>& score_weight,
                                const std::optional<Tensor>& score_bias, const std::optional<Tensor>& proj_gates,
                                const std::optional<Tensor>& gate_bias, const std::optional<Tensor>& drop_in,
                                const std::optional<Tensor>& drop_c, int64_t k_active, int64_t Hc, int64_t ck,
                                int64_t cv, bool lstm, bool communication, bool record, bool merged, bool fused,
                                int64_t threads) {
  at::NoGradGuard no_grad;  // also when called from a thread of its own (grad mode is per thread)
  const LoopThreads loop_threads(threads);
  const Sizes s = sizes_of(keys, values, h, wih);
  const int64_t L = s.L, K = s.K, B = s.B, H = s.H, Hi = s.Hi, dk = s.dk, dv = s.dv, dq = s.dq, G = s.G;
  const int64_t dqkv = 2 * ck + cv;
  const auto opt = h.options();
  Tensor c = lstm ? *c_opt : Tensor();
  const bool projected = score_weight.has_value();  // through _VectorProjections (rim_fast.py)
  const bool by_head = projected && score_weight->dim() == 5;  // its layouts (proj_dot_cpu, above)
  TORCH_CHECK(!by_head || (score_weight->is_contiguous() && proj_gates->is_contiguous() && proj_gates->dim() == 5),
              "rim_loop: projections by head must be contiguous (Hi, L, B, K, X)");
  merged = !projected && (merged || record);
  Tensor w_h, b_h;
  if (merged) {  // [W_q | W_hh]: a unit's queries and its recurrent gate inputs from one product of its state
    w_h = at::cat({wq, whh}, -1);
    b_h = at::cat({bq, lstm ? bih : *bhh}, -1);
  }
  const double scale = 1.0 / std::sqrt(static_cast<double>(ck));
  const Tensor zero = at::zeros({}, opt);
  const Tensor no_winner = at::zeros({K, B}, opt.dtype(at::kBool));
  const Tensor all_active = at::ones({K, B}, opt.dtype(at::kBool));

  Tensor outputs = buffer_pool().empty({L, K, B, H}, opt);
  Tensor masks = at::empty({L, K, B}, opt.dtype(at::kBool));
  Tensor attention = buffer_pool().empty({L, K, B}, opt);
  Tensor h_in, read_all, h1_all, rc_all, c_in, mf_all, act, aux, p_all, qkv_all, ac_all, ug_all;
  if (record) {
    h_in = buffer_pool().empty({K, L, B, H}, opt);
    if (!projected) read_all = buffer_pool().empty({K, L, B, Hi * dv}, opt);
    p_all = buffer_pool().empty({L, K, B, Hi}, opt);
    mf_all = buffer_pool().empty({L, K, B, 1}, opt);
    act = buffer_pool().empty({L, K, B, G}, opt);
    aux = buffer_pool().empty({L, K, B, H}, opt);
    if (lstm) c_in = buffer_pool().empty({L, K, B, H}, opt);
    if (communication) {
      h1_all = buffer_pool().empty({K, L, B, H}, opt);
      rc_all = buffer_pool().empty({K, L, B, Hc * cv}, opt);
      qkv_all = buffer_pool().empty({L, K, B, Hc * dqkv}, opt);
      ac_all = buffer_pool().empty({L, B * Hc, K, K}, opt);
      ug_all = buffer_pool().empty({L, K, B, 2 * H}, opt);
    }
  }

  // fused: the CPU kernels above for the element-wise parts (float and double); elsewhere ATen operators only
  fused = fused && h.is_cpu() && (h.scalar_type() == at::kFloat || h.scalar_type() == at::kDouble);
  const auto dtype = h.scalar_type();
  Tensor odds, read_buf, p_buf, p_read_buf, a_buf, tanh_buf, h1_buf, qkv_buf, ac_buf, rc_buf, ug_buf, c_buf[2];
  Tensor drop_c_all;
  if (fused) {  // the fused kernels index rows directly: a contiguous state, and buffers reused at every step
    h = h.contiguous();
    if (lstm) c = c.contiguous();
    if (drop_c) drop_c_all = drop_c->contiguous();
    odds = at::empty({K, B}, opt);
    if (!record) {
      p_buf = at::empty({K, B, Hi}, opt);
      if (!projected) read_buf = at::empty({K, B, Hi * dv}, opt);
      a_buf = at::empty({K, B, G}, opt);
      if (lstm) tanh_buf = at::empty({K, B, H}, opt);
      if (communication) {
        h1_buf = at::empty({K, B, H}, opt);
        qkv_buf = at::empty({K, B, Hc * dqkv}, opt);
        ac_buf = at::empty({B * Hc, K, K}, opt);
        rc_buf = at::empty({K, B, Hc * cv}, opt);
        ug_buf = at::empty({K, B, 2 * H}, opt);
      }
    }
    if (projected) p_read_buf = at::empty({K, B, Hi}, opt);
    if (lstm) c_buf[0] = at::empty({K, B, H}, opt), c_buf[1] = at::empty({K, B, H}, opt);
  }

  for (int64_t t = 0; t < L; ++t) {
    if (reset_steps[t]) {  // sb3-contrib's convention: the state is zeroed before the first step of an episode
      const Tensor k = (*keep)[t];
      // with start states (L, K, B, H), a reset sample takes its row of start_h[t] instead of zeros
      h = start_h ? at::addcmul((*start_h)[t], h, k) : h * k;
      if (lstm) c = start_c ? at::addcmul((*start_c)[t], c, k) : c * k;
    }
    if (record && !fused) {  // (the fused cell kernels copy them)
      h_in.select(1, t).copy_(h);
      if (lstm) c_in[t].copy_(c);
    }

    // ---- 1-2. Input attention over one vector and selection (§2.3) ----
    // softmax over {null, x} with the null score exactly 0: the weight on x is sigmoid(score)
    Tensor q, gh, score;
    if (projected && by_head && fused) {
      score = at::empty({K, B, Hi}, opt);
      RIM_FUSED("proj_dot", proj_dot_cpu<scalar_t>(*score_weight, t, h, (*score_bias)[t].view({K, B, Hi}), score));
    } else if (projected) {
      const Tensor w = by_head ? by_head_rows(*score_weight, t).transpose(1, 2) : (*score_weight)[t];
      score = unit_mm(fused, (*score_bias)[t], h.reshape({K * B, 1, H}), w).view({K, B, Hi});
    } else if (merged) {
      Tensor hz = unit_mm(fused, b_h, h, w_h);
      q = hz.narrow(2, 0, dq).view({K, B, Hi, dk});
      gh = hz.narrow(2, dq, G);
    } else {
      q = unit_mm(fused, bq, h, wq).view({K, B, Hi, dk});
    }
    Tensor p = record ? p_all[t] : (fused ? p_buf : at::empty({K, B, Hi}, opt));
    Tensor on_input = attention[t];  // (K, B) = 1 - null attention
    Tensor read, gates, gx, p_read;
    const Tensor drop_in_t = drop_in ? (*drop_in)[t] : Tensor();
    if (fused) {
      if (!projected) read = record ? read_all.select(1, t) : read_buf;
      if (projected) p_read = p_read_buf;
      RIM_FUSED("attend", attend_cpu<scalar_t>(projected ? Tensor() : q, projected ? score : Tensor(),
                                               projected ? Tensor() : keys[t], projected ? Tensor() : values[t],
                                               drop_in_t, p, on_input, odds, read, p_read));
    } else {
      if (!projected) score = (q * keys[t]).sum(-1);  // (K, B, Hi)
      at::sigmoid_out(p, score);
      at::mean_out(on_input, p, at::IntArrayRef{-1}, false);
      p_read = drop_in ? p * drop_in_t : p;  // the winners are chosen before dropout
      if (!projected && record) {
        read = read_all.select(1, t);
        Tensor read4 = read.view({K, B, Hi, dv});
        at::mul_out(read4, p_read.unsqueeze(-1), values[t]);
      } else if (!projected) {
        read = (p_read.unsqueeze(-1) * values[t]).view({K, B, Hi * dv});
      }
    }
    Tensor active = masks[t];  // (K, B) bool: the k_A units with the least attention on the null element
    if (fused) {
      RIM_FUSED("select", select_cpu<scalar_t>(on_input, odds, k_active, active,
                                               record ? mf_all[t].view({K, B}) : Tensor()));
    } else {
      Tensor chosen = all_active;
      if (k_active < K) {
        // rim_fast.select_winners: (on_input desc, log-odds desc, index asc); the log-odds break a saturated
        // softmax's exact ties (std::get<1> of a stable sort keeps equal elements in their order)
        Tensor by_odds = std::get<1>(at::sort(score.mean(-1), /*stable=*/true, 0, /*descending=*/true));
        Tensor order = std::get<1>(at::sort(on_input.gather(0, by_odds), /*stable=*/true, 0, /*descending=*/true));
        Tensor winners = by_odds.gather(0, order.narrow(0, 0, k_active));
        chosen = no_winner.scatter(0, winners, true);
      }
      active.copy_(chosen);
      if (record) mf_all[t].copy_(active.unsqueeze(-1));
    }

    // The gates' products: with the fused kernels, for the active units' rows only (unit_mm's `rows`)
    if (projected) {
      if (by_head && fused) {
        gx = at::empty({K, B, G}, opt);
        RIM_FUSED("proj_combine",
                  proj_combine_cpu<scalar_t>(*proj_gates, t, p_read, gate_bias->view({K, B, G}), gx));
      } else {
        const Tensor w = by_head ? by_head_rows(*proj_gates, t) : (*proj_gates)[t];
        gx = unit_mm(fused, *gate_bias, p_read.view({K * B, 1, Hi}), w).view({K, B, G});
      }
      if (lstm) {
        gates = unit_mm(fused, gx, h, whh, Tensor(), active);
      } else {
        gh = unit_mm(fused, *bhh, h, whh, Tensor(), active);
      }
    } else if (lstm) {
      gates = merged ? unit_mm(fused, gh, read, wih, Tensor(), active)
                     : unit_mm(fused, unit_mm(fused, bih, read, wih, Tensor(), active), h, whh, Tensor(), active);
    } else {
      gx = unit_mm(fused, bih, read, wih, Tensor(), active);
      if (!merged) gh = unit_mm(fused, *bhh, h, whh, Tensor(), active);
    }
    const Tensor m = active.unsqueeze(-1);

    // ---- 3. Independent dynamics (§2.1): all units computed, the losers' state kept exactly ----
    // the state entering communication; without communication, the step's output itself
    Tensor h1 = !communication ? outputs[t]
                               : (record ? h1_all.select(1, t) : (fused ? h1_buf : at::empty({K, B, H}, opt)));
    Tensor a = record ? act[t] : (fused ? a_buf : at::empty({K, B, G}, opt));
    if (lstm) {
      Tensor tanh_c = record ? aux[t] : (fused ? tanh_buf : at::empty({K, B, H}, opt));
      if (fused) {
        Tensor c_new = c_buf[t % 2];
        RIM_FUSED("lstm_cell", lstm_cell_cpu<scalar_t>(gates, a, h, c, c_new, tanh_c, active, h1,
                                                       record ? h_in.select(1, t) : Tensor(),
                                                       record ? c_in[t] : Tensor()));
        c = c_new;
      } else {
        Tensor ifo = a.narrow(2, 0, 3 * H), g = a.narrow(2, 3 * H, H);
        at::sigmoid_out(ifo, gates.narrow(2, 0, 3 * H));
        at::tanh_out(g, gates.narrow(2, 3 * H, H));
        Tensor i = ifo.narrow(2, 0, H), f = ifo.narrow(2, H, H), o = ifo.narrow(2, 2 * H, H);
        Tensor c_new = at::addcmul(f * c, i, g);
        at::tanh_out(tanh_c, c_new);
        at::where_out(h1, m, o * tanh_c, h);
        c = at::where(m, c_new, c);
      }
    } else if (fused) {
      RIM_FUSED("gru_rz", gru_rz_cpu<scalar_t>(gx, gh, h, a, record ? aux[t] : Tensor(),
                                               record ? h_in.select(1, t) : Tensor()));
      a.narrow(2, 0, 2 * H).sigmoid_();
      RIM_FUSED("gru_n", gru_n_cpu<scalar_t>(gx, gh, a));
      a.narrow(2, 2 * H, H).tanh_();
      RIM_FUSED("gru_h", gru_h_cpu<scalar_t>(a, h, active, h1));
    } else {
      Tensor rz = a.narrow(2, 0, 2 * H), n = a.narrow(2, 2 * H, H);
      at::sigmoid_out(rz, gx.narrow(2, 0, 2 * H) + gh.narrow(2, 0, 2 * H));
      Tensor r = rz.narrow(2, 0, H), z = rz.narrow(2, H, H);
      Tensor gh_n = gh.narrow(2, 2 * H, H);
      if (record) aux[t].copy_(gh_n);
      at::tanh_out(n, at::addcmul(gx.narrow(2, 2 * H, H), r, gh_n));
      at::where_out(h1, m, at::addcmul(n, z, h - n), h);  // (1 - z) * n + z * h
    }

    // ---- 4. Communication (§2.4): active units read all units; gated, squashed residual ----
    if (communication) {
      Tensor qkv = record ? qkv_all[t] : (fused ? qkv_buf : at::empty({K, B, Hc * dqkv}, opt));
      unit_mm(fused, Tensor(), h1, *wqkv, qkv);
      Tensor ac_t = record ? ac_all[t] : (fused ? ac_buf : at::empty({B * Hc, K, K}, opt));
      Tensor rc = record ? rc_all.select(1, t) : (fused ? rc_buf : at::empty({K, B, Hc * cv}, opt));
      if (fused) {
        RIM_FUSED("comm_attend", comm_attend_cpu<scalar_t>(qkv, drop_c ? drop_c_all[t] : Tensor(), ac_t, rc, Hc,
                                                           ck, cv, scale));
      } else {
        Tensor qkv_t = qkv.view({K, B * Hc, dqkv}).transpose(0, 1);  // (B*Hc, K, 2ck+cv)
        Tensor q2 = qkv_t.narrow(2, 0, ck), k2 = qkv_t.narrow(2, ck, ck), v2 = qkv_t.narrow(2, 2 * ck, cv);
        // scores key-major (B*Hc, K keys, K queries), normalised over dim 1
        Tensor scores = at::baddbmm(zero, k2, q2.transpose(1, 2), 0.0, scale);
        at::_softmax_out(ac_t, scores, 1, false);
        Tensor ac_read = ac_t.transpose(1, 2);  // (B*Hc, K queries, K keys)
        if (drop_c) ac_read = ac_read * (*drop_c)[t];
        Tensor rc4 = at::bmm(ac_read, v2).view({B, Hc, K, cv}).permute({2, 0, 1, 3});
        rc.view({K, B, Hc, cv}).copy_(rc4);
      }
      Tensor pre = unit_mm(fused, *bout, rc, *wout, Tensor(), active);  // (used by the active units only)
      Tensor ug = record ? ug_all[t] : (fused ? ug_buf : at::empty({K, B, 2 * H}, opt));
      Tensor out_t = outputs[t];
      if (fused) {
        RIM_FUSED("residual", residual_pre_cpu<scalar_t>(pre, ug, h1, active, out_t));
      } else {
        Tensor update = ug.narrow(2, 0, H), gate = ug.narrow(2, H, H);
        at::tanh_out(update, pre.narrow(2, 0, H));
        at::sigmoid_out(gate, pre.narrow(2, H, H));
        at::where_out(out_t, m, at::addcmul(h1, gate, update), h1);
      }
    }
    h = outputs[t];
  }
  std::vector<Tensor> result{outputs, h, lstm ? c : at::empty({0}, opt), masks, attention};
  if (record) {
    for (const Tensor& x : {h_in, read_all, h1_all, rc_all, c_in, mf_all, act, aux, p_all, qkv_all, ac_all,
                            ug_all}) {
      result.push_back(x.defined() ? x : at::empty({0}, opt));
    }
  }
  return result;
}

// Backward through time for rim_forward's tape. Returns [dh_0, dc_0 (empty for a GRU; both empty without
// `state_grad`, where the first step skips its products through the entering state), d_hz (K,L,B,dq+G): the
// gradients of [queries | recurrent gate inputs], d_gx (K,L,B,G): of the GRU's input-side gates (empty for an
// LSTM, whose d_gx is d_hz's gate part), d_s (K,L,B,Hi): of the input-attention scores, d_pre (K,L,B,2H) and
// d_qkv (K,L,B,Hc*(2ck+cv)): of the communication's products (empty without communication), d_read (L,K,B,Hi*dv): of
// what each unit read (empty on the projected path)].
std::vector<Tensor> rim_backward(const std::optional<Tensor>& d_outputs, const std::optional<Tensor>& d_hn,
                                 const std::optional<Tensor>& d_cn, const Tensor& keys, const Tensor& values,
                                 const std::optional<Tensor>& keep, const std::vector<bool>& reset_steps,
                                 const Tensor& h_in, const Tensor& c_in, const Tensor& mf_all, const Tensor& act,
                                 const Tensor& aux, const Tensor& p_all, const Tensor& qkv_all, const Tensor& ac_all,
                                 const Tensor& ug_all, const Tensor& wq, const Tensor& wih, const Tensor& whh,
                                 const std::optional<Tensor>& wqkv, const std::optional<Tensor>& wout,
                                 const std::optional<Tensor>& score_weight, const std::optional<Tensor>& proj_gates,
                                 const std::optional<Tensor>& drop_in, const std::optional<Tensor>& drop_c,
                                 int64_t Hc, int64_t ck, int64_t cv, bool lstm, bool communication,
                                 bool fused, bool state_grad, int64_t threads) {
  at::NoGradGuard no_grad;
  const LoopThreads loop_threads(threads);
  const bool projected = score_weight.has_value();
  const bool by_head = projected && score_weight->dim() == 5;  // as in rim_forward
  TORCH_CHECK(!by_head || (score_weight->is_contiguous() && proj_gates->is_contiguous() && proj_gates->dim() == 5),
              "rim_loop: projections by head must be contiguous (Hi, L, B, K, X)");
  const int64_t K = h_in.size(0), L = h_in.size(1), B = h_in.size(2), H = h_in.size(3);
  const int64_t Hi = keys.size(2), dk = keys.size(3), dv = values.size(3), G = wih.size(2);
  const int64_t dq = projected ? 0 : Hi * dk;  // d_hz holds [queries | recurrent gate inputs], or only the latter
  const int64_t dqkv = 2 * ck + cv;
  const auto opt = h_in.options();
  const double scale = 1.0 / std::sqrt(static_cast<double>(ck));
  const Tensor zero = at::zeros({}, opt);
  Tensor dh = d_hn ? *d_hn : at::zeros({K, B, H}, opt);
  Tensor dc;
  if (lstm) dc = d_cn ? *d_cn : at::zeros({K, B, H}, opt);
  Tensor d_hz = buffer_pool().empty({K, L, B, dq + G}, opt);
  Tensor d_gh = d_hz.narrow(3, dq, G);
  Tensor d_gx = lstm ? d_gh : buffer_pool().empty({K, L, B, G}, opt);
  Tensor d_s_all = buffer_pool().empty({K, L, B, Hi}, opt);
  Tensor d_pre_all, d_qkv_all, wout_t, wqkv_t;
  const Tensor d_read_all = projected ? Tensor() : buffer_pool().empty({L, K, B, Hi * dv}, opt);
  // fused: as in rim_forward; the transposed weights then contiguous for unit_mm, copied once per sequence where
  // the sequence is long enough to repay the copy (shorter: the views, which unit_mm leaves to ATen's bmm)
  fused = fused && h_in.is_cpu() && (h_in.scalar_type() == at::kFloat || h_in.scalar_type() == at::kDouble);
  const auto transposed = [copy = fused && L >= 8](const Tensor& w) {
    return copy ? w.transpose(1, 2).contiguous() : w.transpose(1, 2);
  };
  if (communication) {
    d_pre_all = buffer_pool().empty({K, L, B, 2 * H}, opt);
    d_qkv_all = buffer_pool().empty({K, L, B, Hc * dqkv}, opt);
    wout_t = transposed(*wout);
    wqkv_t = transposed(*wqkv);
  }
  const Tensor w_h_t = transposed(projected ? whh : at::cat({wq, whh}, -1));
  const Tensor wih_t = projected ? Tensor() : transposed(wih);  // (the projected path does not read it)

  const auto dtype = h_in.scalar_type();
  Tensor d_out_all, drop_c_all, dh_acc_buf, dh_prev_buf;
  if (fused) {  // row-contiguous inputs for the kernels, and a cell-state gradient of our own to update in place
    if (d_outputs) d_out_all = d_outputs->contiguous();
    if (drop_c) drop_c_all = drop_c->contiguous();
    dh = dh.contiguous();
    if (lstm) dc = d_cn ? d_cn->clone(at::MemoryFormat::Contiguous) : dc;
    dh_acc_buf = at::empty({K, B, H}, opt);
    dh_prev_buf = at::empty({K, B, H}, opt);
  }

  for (int64_t t = L - 1; t >= 0; --t) {
    const Tensor mf = mf_all[t];  // (K, B, 1), 1.0 for the active units
    // the rows of the gradients through the gates and the residual that are not zero (unit_mm's `rows`)
    const Tensor active = fused ? mf.view({K, B}) : Tensor();
    Tensor dh1;
    if (fused) {
      // ---- 4. communication ----
      Tensor dh_acc = (d_outputs || communication) ? dh_acc_buf : dh;
      if (d_outputs || communication) {
        RIM_FUSED("residual_backward",
                  residual_backward_cpu<scalar_t>(dh, d_outputs ? d_out_all[t] : Tensor(), dh_acc,
                                                  communication ? ug_all[t] : Tensor(), mf,
                                                  communication ? d_pre_all.select(1, t) : Tensor()));
      }
      dh1 = dh_acc;
      if (communication) {
        const Tensor d_rc = unit_mm(fused, Tensor(), d_pre_all.select(1, t), wout_t, Tensor(), active);
        Tensor d_qkv = d_qkv_all.select(1, t);
        RIM_FUSED("comm_attend_backward",
                  comm_attend_backward_cpu<scalar_t>(d_rc, qkv_all[t], ac_all[t], drop_c ? drop_c_all[t] : Tensor(),
                                                     d_qkv, Hc, ck, cv, scale));
        dh1 = unit_mm(fused, dh_acc, d_qkv, wqkv_t);  // residual + through q, k, v
      }
      // ---- 3. dynamics ----
      RIM_FUSED("cell_backward",
                cell_backward_cpu<scalar_t>(lstm, dh1, lstm ? dc : Tensor(), mf, act[t], aux[t],
                                            lstm ? c_in[t] : Tensor(), lstm ? Tensor() : h_in.select(1, t),
                                            lstm ? Tensor() : d_gx.select(1, t), d_gh.select(1, t), dh_prev_buf));
    } else {
      if (d_outputs) dh = dh + (*d_outputs)[t];

      // ---- 4. communication ----
      dh1 = dh;
      if (communication) {
        const Tensor ug = ug_all[t];
        const Tensor update = ug.narrow(2, 0, H), gate = ug.narrow(2, H, H);
        const Tensor dh_active = dh * mf;
        Tensor d_pre = d_pre_all.select(1, t);
        Tensor d_update = d_pre.narrow(2, 0, H), d_gate = d_pre.narrow(2, H, H);
        at::tanh_backward_out(d_update, dh_active * gate, update);
        at::sigmoid_backward_out(d_gate, dh_active * update, gate);
        const Tensor d_rc = at::bmm(d_pre, wout_t).view({K, B * Hc, cv}).transpose(0, 1);  // (B*Hc, K, cv)
        const Tensor qkv_t = qkv_all[t].view({K, B * Hc, dqkv}).transpose(0, 1);
        const Tensor q2 = qkv_t.narrow(2, 0, ck), k2 = qkv_t.narrow(2, ck, ck), v2 = qkv_t.narrow(2, 2 * ck, cv);
        const Tensor ac_t = ac_all[t];  // (B*Hc, K keys, K queries)
        Tensor d_ac = at::bmm(d_rc, v2.transpose(1, 2));  // (B*Hc, K queries, K keys)
        Tensor d_v2;
        if (drop_c) {  // through the dropped read, as the forward formed it
          const Tensor drop = (*drop_c)[t];
          d_v2 = at::bmm((ac_t.transpose(1, 2) * drop).transpose(1, 2), d_rc);
          d_ac = d_ac * drop;
        } else {
          d_v2 = at::bmm(ac_t, d_rc);
        }
        const Tensor d_scores_t = at::_softmax_backward_data(d_ac.transpose(1, 2), ac_t, 1, ac_t.scalar_type());
        const Tensor d_q2 = at::baddbmm(zero, d_scores_t.transpose(1, 2), k2, 0.0, scale);
        const Tensor d_k2 = at::baddbmm(zero, d_scores_t, q2, 0.0, scale);
        Tensor d_qkv = d_qkv_all.select(1, t);
        d_qkv.view({K, B, Hc, dqkv})
            .copy_(at::cat({d_q2, d_k2, d_v2}, -1).view({B, Hc, K, dqkv}).permute({2, 0, 1, 3}));
        dh1 = at::baddbmm(dh, d_qkv, wqkv_t);  // residual + through q, k, v
      }
    }

    // ---- 3. dynamics ----
    Tensor dh_prev;
    if (fused) {
      dh_prev = dh_prev_buf;  // (the fused kernel above)
    } else if (lstm) {
      const Tensor dh1_active = dh1 * mf;
      const Tensor a = act[t];
      const Tensor i = a.narrow(2, 0, H), f = a.narrow(2, H, H), o = a.narrow(2, 2 * H, H), g = a.narrow(2, 3 * H, H);
      const Tensor tanh_c = aux[t];
      const Tensor dc_active = dc * mf;
      const Tensor dc_new = at::tanh_backward(dh1_active * o, tanh_c).add_(dc_active);
      Tensor d_gates = d_gh.select(1, t);
      Tensor d_i = d_gates.narrow(2, 0, H), d_f = d_gates.narrow(2, H, H), d_o = d_gates.narrow(2, 2 * H, H),
             d_g = d_gates.narrow(2, 3 * H, H);
      at::sigmoid_backward_out(d_i, dc_new * g, i);
      at::sigmoid_backward_out(d_f, dc_new * c_in[t], f);
      at::sigmoid_backward_out(d_o, dh1_active * tanh_c, o);
      at::tanh_backward_out(d_g, dc_new * i, g);
      dc = at::addcmul(dc - dc_active, dc_new, f);
      dh_prev = dh1 - dh1_active;
    } else {
      const Tensor dh1_active = dh1 * mf;
      const Tensor a = act[t];
      const Tensor r = a.narrow(2, 0, H), z = a.narrow(2, H, H), n = a.narrow(2, 2 * H, H);
      const Tensor gh_n = aux[t];
      Tensor dgx = d_gx.select(1, t), dgh = d_gh.select(1, t);
      Tensor d_n = dgx.narrow(2, 2 * H, H), d_r = dgx.narrow(2, 0, H), d_z = dgx.narrow(2, H, H);
      at::tanh_backward_out(d_n, at::addcmul(dh1_active, dh1_active, z, -1.0), n);
      at::sigmoid_backward_out(d_r, d_n * gh_n, r);
      at::sigmoid_backward_out(d_z, dh1_active * (h_in.select(1, t) - n), z);
      dgh.narrow(2, 0, 2 * H).copy_(dgx.narrow(2, 0, 2 * H));
      Tensor dgh_n = dgh.narrow(2, 2 * H, H);
      at::mul_out(dgh_n, d_n, r);
      dh_prev = at::addcmul(dh1 - dh1_active, dh1_active, z);
    }

    // ---- 1. input attention over one vector ----
    // the step's gradients through its state's uses (dh_prev), not needed at the first step where nothing asks
    // for the gradient of the state entering the sequence
    const bool through_state = t > 0 || state_grad;
    if (projected) {  // through the step-independent projections; their own gradients are formed after the loop
      if (through_state) dh_prev = unit_mm(fused, dh_prev, d_gh.select(1, t), w_h_t, Tensor(), active);
      Tensor d_p;
      if (by_head && fused) {
        d_p = at::empty({K, B, Hi}, opt);
        RIM_FUSED("proj_dot", proj_dot_cpu<scalar_t>(*proj_gates, t, d_gx.select(1, t), Tensor(), d_p));
      } else {
        const Tensor w = by_head ? by_head_rows(*proj_gates, t) : (*proj_gates)[t];
        d_p = at::bmm(d_gx.select(1, t).reshape({K * B, 1, G}), w.transpose(1, 2)).view({K, B, Hi});
      }
      if (drop_in) d_p = d_p * (*drop_in)[t];
      Tensor d_s = d_s_all.select(1, t);
      at::sigmoid_backward_out(d_s, d_p, p_all[t]);
      if (through_state && by_head && fused) {  // (dh_prev: a tensor of this step's, above)
        RIM_FUSED("proj_combine", proj_combine_cpu<scalar_t>(*score_weight, t, d_s, dh_prev, dh_prev));
      } else if (through_state) {
        const Tensor w = by_head ? by_head_rows(*score_weight, t) : (*score_weight)[t].transpose(1, 2);
        dh_prev = at::baddbmm(dh_prev.view({K * B, 1, H}), d_s.reshape({K * B, 1, Hi}), w).view({K, B, H});
      }
      if (reset_steps[t]) {
        const Tensor k = (*keep)[t];
        dh_prev = dh_prev * k;
        if (lstm) dc = fused ? dc.mul_(k) : dc * k;
      }
      dh = dh_prev;
      continue;
    }
    Tensor d_read = d_read_all[t];  // (K, B, Hi*dv)
    unit_mm(fused, Tensor(), d_gx.select(1, t), wih_t, d_read, active);
    Tensor d_s = d_s_all.select(1, t);
    if (fused) {
      RIM_FUSED("attend_backward",
                attend_backward_cpu<scalar_t>(d_read, values[t], keys[t], drop_in ? (*drop_in)[t] : Tensor(), p_all[t],
                                              d_s, d_hz.select(1, t).narrow(2, 0, dq)));
    } else {
      Tensor d_q = d_hz.select(1, t).narrow(2, 0, dq).view({K, B, Hi, dk});
      Tensor d_p = (d_read.view({K, B, Hi, dv}) * values[t]).sum(-1);  // (K, B, Hi)
      if (drop_in) d_p = d_p * (*drop_in)[t];
      at::sigmoid_backward_out(d_s, d_p, p_all[t]);
      at::mul_out(d_q, d_s.unsqueeze(-1), keys[t]);
    }
    if (through_state) dh_prev = unit_mm(fused, dh_prev, d_hz.select(1, t), w_h_t);  // via the queries and gates

    if (reset_steps[t]) {
      const Tensor k = (*keep)[t];
      dh_prev = dh_prev * k;
      if (lstm) dc = fused ? dc.mul_(k) : dc * k;
    }
    dh = dh_prev;
  }
  const Tensor none = at::empty({0}, opt);
  return {state_grad ? dh : none,
          lstm && state_grad ? dc : none,
          d_hz,
          lstm ? none : d_gx,
          d_s_all,
          communication ? d_pre_all : none,
          communication ? d_qkv_all : none,
          projected ? none : d_read_all};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // Without the GIL: two loops (an actor's and a critic's RIM) can run at once from two Python threads.
  m.def("forward", &rim_forward, "RIM loop over a sequence (input attention over one vector per step)",
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("backward", &rim_backward, "Backward through time of the RIM loop",
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def(
      "unit_mm",
      [](const std::optional<Tensor>& bias, const Tensor& a, const Tensor& w, const std::optional<Tensor>& rows) {
        return unit_mm(true, bias ? *bias : Tensor(), a, w, Tensor(), rows ? *rows : Tensor());
      },
      "bias + a @ w per unit as the fused loop computes it, on the CPU, for the rows marked in `rows` (K, M) where "
      "given (for the tests)",
      pybind11::arg("bias"), pybind11::arg("a"), pybind11::arg("w"), pybind11::arg("rows") = pybind11::none(),
      pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def(
      "buffer_bytes", [] { return buffer_pool().bytes(); }, "bytes of the per-sequence buffers the pool keeps");
  m.def(
      "release_buffers", [] { buffer_pool().clear(); },
      "drop the pool's per-sequence buffers (those still in use stay with their users)");
}
