// Few-row products straight from MLX's packed affine format (w = scale * q + bias, groups of
// 32 or 64, 4 or 8 bits), as an MLX primitive so they stay in the lazy graph.
//
// Each activation row is quantized to int8 per block of 32 (scale max|x|/127, llama.cpp's q8
// idea), the integer dot with the weight block is exact, and every output element is the same
// float accumulation over blocks whatever the number of rows or threads: a sequence decodes to
// the same bits alone or in a batch. Prefill (many rows a sequence) goes through dequantized
// tiles and BLAS instead; the caller says which, so that the choice never depends on the batch.
// Paths: AVX2 (vpmaddubsw), portable scalar. Built with -march=native on the machine that runs it.
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include <dlfcn.h>
#include <pthread.h>
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#if defined(__x86_64__)
#include <immintrin.h>
#include <x86intrin.h>
#endif

#include <variant>

#include <nanobind/nanobind.h>
#include <nanobind/stl/variant.h>

#include "mlx/backend/common/utils.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace mx = mlx::core;
namespace nb = nanobind;

namespace qk {

enum Path { SCALAR = 0, AVX2 = 1 };

static int best_path() {
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
  return AVX2;
#else
  return SCALAR;
#endif
}

// ---- activation rows, quantized ---------------------------------------------------------------

struct Acts {
  int M = 0, K = 0, nblocks = 0, ngroups = 0;
  std::vector<int8_t> q;   // M * K, 4-bit: each block of 32 stored evens first, then odds
  std::vector<float> d;    // M * nblocks
  // M * ngroups: sum of the quantized x per weight group, so that the bias term and the integer
  // dot see the same x (their errors cancel; the exact sum doubles the error at 4 bits)
  std::vector<float> sum;
};

static void quantize_rows(const float* x, int M, int K, int gs, int bits, Acts& a) {
  a.M = M; a.K = K; a.nblocks = K / 32; a.ngroups = K / gs;
  a.q.resize((size_t)M * K);
  a.d.resize((size_t)M * a.nblocks);
  a.sum.resize((size_t)M * a.ngroups);
  for (int m = 0; m < M; m++) {
    const float* row = x + (size_t)m * K;
    std::fill_n(a.sum.data() + (size_t)m * a.ngroups, a.ngroups, 0.f);
    for (int b = 0; b < a.nblocks; b++) {
      const float* v = row + b * 32;
      float amax = 0.f;
      for (int k = 0; k < 32; k++) amax = std::fmax(amax, std::fabs(v[k]));
      float d = amax / 127.f;
      float id = d > 0.f ? 1.f / d : 0.f;
      a.d[(size_t)m * a.nblocks + b] = d;
      int8_t* q = a.q.data() + (size_t)m * K + b * 32;
      int isum = 0;
      for (int k = 0; k < 32; k++) {
        int pos = bits == 4 ? (k & 1) * 16 + (k >> 1) : k;
        q[pos] = (int8_t)std::nearbyint(v[k] * id);
        isum += q[pos];
      }
      a.sum[(size_t)m * a.ngroups + b * 32 / gs] += d * (float)isum;
    }
  }
}

template <typename S> static inline float tof(S v);
template <> inline float tof<float>(float v) { return v; }
#if defined(__F16C__)
// mx::float16_t converts in software, with a branch: a third of a decode product's time
template <> inline float tof<mx::float16_t>(mx::float16_t v) { return _cvtsh_ss(v.bits_); }
#else
template <> inline float tof<mx::float16_t>(mx::float16_t v) { return static_cast<float>(v); }
#endif
template <> inline float tof<mx::bfloat16_t>(mx::bfloat16_t v) { return static_cast<float>(v); }

// sum_g bias'[g] * sum_x[g], where 8-bit weights are used as q - 128 (bias' = bias + 128 scale)
template <int BITS, typename S>
static inline float bias_term(const S* sc, const S* bi, const float* sums, int ngroups) {
  float t = 0.f;
  for (int g = 0; g < ngroups; g++) {
    float b = tof(bi[g]);
    if (BITS == 8) b += 128.f * tof(sc[g]);
    t += b * sums[g];
  }
  return t;
}

// ---- portable path -----------------------------------------------------------------------------

template <int BITS, typename S>
static void cols_scalar(const uint8_t* W, const S* SC, const S* BI, int n0, int n1, int gs,
                        const Acts& a, int m0, int m1, float* Y, int N) {
  const int K = a.K, rowbytes = K * BITS / 8, bpg = gs / 32;
  for (int n = n0; n < n1; n++) {
    const uint8_t* w = W + (size_t)n * rowbytes;
    const S* sc = SC + (size_t)n * a.ngroups;
    const S* bi = BI + (size_t)n * a.ngroups;
    for (int m = m0; m < m1; m++) {
      const int8_t* xq = a.q.data() + (size_t)m * K;
      const float* dx = a.d.data() + (size_t)m * a.nblocks;
      float acc = 0.f;
      for (int b = 0; b < a.nblocks; b++) {
        int dot = 0;
        if (BITS == 4) {
          const uint8_t* wb = w + b * 16;
          for (int j = 0; j < 16; j++)
            dot += (wb[j] & 15) * xq[b * 32 + j] + (wb[j] >> 4) * xq[b * 32 + 16 + j];
        } else {
          const uint8_t* wb = w + b * 32;
          for (int j = 0; j < 32; j++) dot += ((int)wb[j] - 128) * xq[b * 32 + j];
        }
        acc += tof(sc[b / bpg]) * dx[b] * (float)dot;
      }
      Y[(size_t)m * N + n] = acc + bias_term<BITS>(sc, bi, a.sum.data() + (size_t)m * a.ngroups, a.ngroups);
    }
  }
}

// ---- AVX2 path ---------------------------------------------------------------------------------

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
static inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <int BITS>
static inline __m256i load_block(const uint8_t* w, int b) {
  if (BITS == 4) {
    const __m128i raw = _mm_loadu_si128((const __m128i*)(w + b * 16));
    const __m128i m4 = _mm_set1_epi8(15);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(raw, 4), m4), _mm_and_si128(raw, m4));
  }
  return _mm256_xor_si256(_mm256_loadu_si256((const __m256i*)(w + b * 32)), _mm256_set1_epi8((char)0x80));
}

// 8 int32 partial sums of a 32-wide u8 (4-bit) or s8 (8-bit, q - 128) by s8 dot product.
// wabs: |w| for 8 bits (taken once a block, shared by the rows), w itself for 4.
template <int BITS>
static inline __m256i dot_block(__m256i w, __m256i wabs, __m256i x) {
  __m256i p;
  if (BITS == 4) p = _mm256_maddubs_epi16(w, x);
  else p = _mm256_maddubs_epi16(wabs, _mm256_sign_epi8(x, w));
  return _mm256_madd_epi16(p, _mm256_set1_epi16(1));
}
template <int BITS>
static inline __m256i abs_block(__m256i w) { return BITS == 4 ? w : _mm256_sign_epi8(w, w); }

template <typename S> static inline __m256 load8(const S* p);
template <> inline __m256 load8<float>(const float* p) { return _mm256_loadu_ps(p); }
template <> inline __m256 load8<mx::float16_t>(const mx::float16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p));
}
template <> inline __m256 load8<mx::bfloat16_t>(const mx::bfloat16_t* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}

// bias_term eight groups at a time: the scalar sum is one chain of dependent adds per output,
// which held each output for longer than its integer dots
template <int BITS, typename S>
static inline float bias_term_avx2(const S* sc, const S* bi, const float* sums, int ngroups) {
  __m256 t = _mm256_setzero_ps();
  int g = 0;
  for (; g + 8 <= ngroups; g += 8) {
    __m256 b = load8(bi + g);
    if (BITS == 8) b = _mm256_fmadd_ps(_mm256_set1_ps(128.f), load8(sc + g), b);
    t = _mm256_fmadd_ps(b, _mm256_loadu_ps(sums + g), t);
  }
  return hsum(t) + bias_term<BITS>(sc + g, bi + g, sums + g, ngroups - g);
}

// R activation rows by two weight rows. The two rows' int32 block sums share one vector
// (hadd: lanes 0,1,4,5 the first, 2,3,6,7 the second), so one conversion and one FMA a row.
template <int BITS, typename S, int R>
static inline void tile_avx2(const uint8_t* W, const S* SC, const S* BI, int n, int two, int gs,
                             const Acts& a, int m0, float* Y, int N) {
  const int K = a.K, rowbytes = K * BITS / 8, bpg = gs / 32, nb = a.nblocks;
  const uint8_t* w0 = W + (size_t)n * rowbytes;
  const uint8_t* w1 = two ? w0 + rowbytes : w0;
  const S* sc0 = SC + (size_t)n * a.ngroups;
  const S* sc1 = two ? sc0 + a.ngroups : sc0;
  __m256 acc[R];
  for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
  for (int b = 0; b < nb; b++) {
    const __m256i wa = load_block<BITS>(w0, b);
    const __m256i wb = load_block<BITS>(w1, b);
    const __m256i wa_abs = abs_block<BITS>(wa), wb_abs = abs_block<BITS>(wb);
    const float s0 = tof(sc0[b / bpg]), s1 = tof(sc1[b / bpg]);
    const __m256 sv = _mm256_setr_ps(s0, s0, s1, s1, s0, s0, s1, s1);
    for (int r = 0; r < R; r++) {
      const size_t row = (size_t)(m0 + r);
      const __m256i x = _mm256_loadu_si256((const __m256i*)(a.q.data() + row * K + b * 32));
      const __m256i d = _mm256_hadd_epi32(dot_block<BITS>(wa, wa_abs, x), dot_block<BITS>(wb, wb_abs, x));
      acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(sv, _mm256_set1_ps(a.d[row * nb + b])), _mm256_cvtepi32_ps(d), acc[r]);
    }
  }
  for (int r = 0; r < R; r++) {
    const size_t row = (size_t)(m0 + r);
    const float* sums = a.sum.data() + row * a.ngroups;
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc[r]), _mm256_extractf128_ps(acc[r], 1));
    h = _mm_hadd_ps(h, h);  // [first row, second row, ...]
    Y[row * N + n] = _mm_cvtss_f32(h) + bias_term_avx2<BITS>(sc0, BI + (size_t)n * a.ngroups, sums, a.ngroups);
    if (two)
      Y[row * N + n + 1] = _mm_cvtss_f32(_mm_movehdup_ps(h)) +
                           bias_term_avx2<BITS>(sc1, BI + (size_t)(n + 1) * a.ngroups, sums, a.ngroups);
  }
}

template <int BITS, typename S>
static void cols_avx2(const uint8_t* W, const S* SC, const S* BI, int n0, int n1, int gs,
                      const Acts& a, int m0, int m1, float* Y, int N) {
  for (int n = n0; n < n1; n += 2) {
    const int two = n + 1 < n1;
    int m = m0;
    for (; m + 4 <= m1; m += 4) tile_avx2<BITS, S, 4>(W, SC, BI, n, two, gs, a, m, Y, N);
    switch (m1 - m) {
      case 3: tile_avx2<BITS, S, 3>(W, SC, BI, n, two, gs, a, m, Y, N); break;
      case 2: tile_avx2<BITS, S, 2>(W, SC, BI, n, two, gs, a, m, Y, N); break;
      case 1: tile_avx2<BITS, S, 1>(W, SC, BI, n, two, gs, a, m, Y, N); break;
    }
  }
}
#endif

// ---- helper threads ----------------------------------------------------------------------------
// The caller and the helpers claim chunks of output columns from one counter, so a helper the OS
// has not scheduled costs nothing. A helper spins a while after each job (a decode step calls in
// bursts), then sleeps on a futex.

struct Pool {
  std::function<void(int)> fn;
  int nchunks = 0;
  std::atomic<uint64_t> ticket{0};  // (sequence << 32) | next chunk
  std::atomic<uint32_t> finished{0}, wake{0}, sleeping{0};
  std::atomic<int> busy{0};
  uint32_t seq = 0;
  int helpers = 0;
  uint64_t spin_cycles = 0;

  void work(uint32_t s) {
    for (;;) {
      uint64_t t = ticket.load(std::memory_order_acquire);
      if ((uint32_t)(t >> 32) != s || (int)(uint32_t)t >= nchunks) return;
      if (!ticket.compare_exchange_weak(t, t + 1, std::memory_order_acq_rel)) continue;
      fn((int)(uint32_t)t);
      finished.fetch_add(1, std::memory_order_release);
    }
  }
  void helper() {
    uint32_t seen = 0;
    for (;;) {
      uint64_t start = __rdtsc();
      uint32_t s;
      while ((s = (uint32_t)(ticket.load(std::memory_order_acquire) >> 32)) == seen) {
        if (__rdtsc() - start < spin_cycles) { _mm_pause(); continue; }
        uint32_t w = wake.load();
        sleeping.fetch_add(1);
        if ((uint32_t)(ticket.load() >> 32) == seen)
          syscall(SYS_futex, (uint32_t*)&wake, FUTEX_WAIT_PRIVATE, w, nullptr, nullptr, 0);
        sleeping.fetch_sub(1);
        start = __rdtsc();
      }
      seen = s;
      work(s);
    }
  }
  void start(int threads, int spin_us) {
    if (helpers || threads < 2) return;
    uint64_t t0 = __rdtsc();
    usleep(2000);
    spin_cycles = (__rdtsc() - t0) / 2000 * (uint64_t)spin_us;
    for (int i = 1; i < threads; i++) {
      std::thread t([this] { helper(); });
      pthread_setname_np(t.native_handle(), "mlxserve-qmm");  // so /proc and profilers can tell it
      t.detach();
      helpers++;
    }
  }
  // Runs fn(0..n-1), shared with the helpers when there are any and no other job is running.
  void run(int n, const std::function<void(int)>& f) {
    int expected = 0;
    if (!helpers || n < 2 || !busy.compare_exchange_strong(expected, 1)) {
      for (int c = 0; c < n; c++) f(c);
      return;
    }
    fn = f;
    nchunks = n;
    finished.store(0, std::memory_order_relaxed);
    uint32_t s = ++seq;
    ticket.store((uint64_t)s << 32);
    if (sleeping.load()) {
      wake.fetch_add(1);
      syscall(SYS_futex, (uint32_t*)&wake, FUTEX_WAKE_PRIVATE, helpers, nullptr, nullptr, 0);
    }
    work(s);
    while (finished.load(std::memory_order_acquire) < (uint32_t)n) _mm_pause();
    busy.store(0);
  }
};

static Pool pool;

// ---- many rows (prefill): dequantize a tile of weight rows, then BLAS ---------------------------
// With many rows the integer kernel is compute-bound while sgemm is not: each tile of
// weight rows is dequantized to float32 once (in L2) and multiplied with every row by the BLAS
// libmlx uses. Found at run time: no BLAS, no tiles.
typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float*, int, const float*, int,
                         float, float*, int);
static sgemm_fn blas_sgemm() {
  static sgemm_fn fn = (sgemm_fn)dlsym(RTLD_DEFAULT, "cblas_sgemm");
  return fn;
}
// With tiles=-1, from this many rows on, tiles and BLAS. AMD EPYC (Zen 1, AVX2), one thread, us: 576->1536
// 4-bit at 8 rows int8 2137 / tiles 2126 / f32 sgemm 1930, at 16 rows 4211 / 3913 / 5022; the
// 8-bit output head at 8 rows 99.5 / 63.2 / 70.4 ms.
static int BLAS_ROWS = 8;

template <typename S>
static void dequantize_rows(const uint8_t* W, const S* SC, const S* BI, int n0, int n1, int K, int gs,
                            int bits, float* out) {
  const int rowbytes = K * bits / 8, ng = K / gs;
  for (int n = n0; n < n1; n++) {
    const uint8_t* w = W + (size_t)n * rowbytes;
    float* o = out + (size_t)(n - n0) * K;
    for (int g = 0; g < ng; g++) {
      const float s = tof(SC[(size_t)n * ng + g]), b = tof(BI[(size_t)n * ng + g]);
      int k = g * gs;
#if defined(__AVX2__) && defined(__FMA__)
      const __m256 vs = _mm256_set1_ps(s), vb = _mm256_set1_ps(b);
      for (; k + 16 <= (g + 1) * gs; k += 16) {
        __m128i q;  // 16 weights as bytes, in order
        if (bits == 4) {
          const __m128i raw = _mm_loadl_epi64((const __m128i*)(w + k / 2));
          const __m128i m4 = _mm_set1_epi8(15);
          q = _mm_unpacklo_epi8(_mm_and_si128(raw, m4), _mm_and_si128(_mm_srli_epi16(raw, 4), m4));
        } else {
          q = _mm_loadu_si128((const __m128i*)(w + k));
        }
        const __m256 lo = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(q));
        const __m256 hi = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(q, 8)));
        _mm256_storeu_ps(o + k, _mm256_fmadd_ps(vs, lo, vb));
        _mm256_storeu_ps(o + k + 8, _mm256_fmadd_ps(vs, hi, vb));
      }
#endif
      for (; k < (g + 1) * gs; k++) {
        const int q = bits == 4 ? (w[k >> 1] >> ((k & 1) * 4)) & 15 : w[k];
        o[k] = s * (float)q + b;
      }
    }
  }
}
static std::atomic<uint64_t> calls{0}, cycles{0};
static const long CHUNK_BYTES = 32 * 1024;  // of weights per claimed chunk

template <typename S>
static void product(int path, bool tiles, const float* x, const uint8_t* W, const S* SC, const S* BI, int M,
                    int N, int K, int gs, int bits, float* Y) {
  uint64_t t0 = __rdtsc();
  if (tiles && blas_sgemm()) {
    // Wide tiles, the whole weight up to 8 MB: sgemm packs all of x again for every call, and
    // 300 rows by 576->1536 took 52 ms in tiles of 256 rows against 18 in one float32 sgemm.
    const int chunk = (long)N * K <= (2L << 20) ? N : 256, nchunks = (N + chunk - 1) / chunk;
    pool.run(nchunks, [&](int c) {
      const int n0 = c * chunk, n1 = std::min(N, n0 + chunk);
      thread_local std::vector<float> tile;
      tile.resize((size_t)chunk * K);
      dequantize_rows(W, SC, BI, n0, n1, K, gs, bits, tile.data());
      blas_sgemm()(101, 111, 112, M, n1 - n0, K, 1.f, x, K, tile.data(), K, 0.f, Y + n0, N);
    });
    calls.fetch_add(1, std::memory_order_relaxed);
    cycles.fetch_add(__rdtsc() - t0, std::memory_order_relaxed);
    return;
  }
  thread_local Acts acts;  // the caller's; helpers read it through `a`
  quantize_rows(x, M, K, gs, bits, acts);
  const Acts& a = acts;
  long rowbytes = (long)K * bits / 8;
  int chunk = (int)std::max(2L, (CHUNK_BYTES / rowbytes) & ~1L);
  int nchunks = (N + chunk - 1) / chunk;
  auto cols = [&](int c) {
    int n0 = c * chunk, n1 = std::min(N, n0 + chunk);
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
    if (path == AVX2) {
      if (bits == 4) cols_avx2<4, S>(W, SC, BI, n0, n1, gs, a, 0, M, Y, N);
      else cols_avx2<8, S>(W, SC, BI, n0, n1, gs, a, 0, M, Y, N);
      return;
    }
#endif
    if (bits == 4) cols_scalar<4, S>(W, SC, BI, n0, n1, gs, a, 0, M, Y, N);
    else cols_scalar<8, S>(W, SC, BI, n0, n1, gs, a, 0, M, Y, N);
  };
  pool.run(nchunks, cols);
  calls.fetch_add(1, std::memory_order_relaxed);
  cycles.fetch_add(__rdtsc() - t0, std::memory_order_relaxed);
}

// ---- the primitives ----------------------------------------------------------------------------
// Tasks capture pointers, shapes and strides, never an mx::array: an array's graph belongs to the
// thread that builds it, and a copy released on the stream thread races with it.

struct View {
  const float* p;
  bool contiguous;
  size_t size;
  mx::Shape shape;
  mx::Strides strides;
  explicit View(const mx::array& a)
      : p(a.data<float>()), contiguous(a.flags().row_contiguous), size(a.size()), shape(a.shape()),
        strides(a.strides()) {}
  // the elements in row-major order: in place, or gathered into buf
  const float* gather(std::vector<float>& buf) const {
    if (contiguous) return p;
    buf.resize(size);
    for (size_t i = 0; i < size; i++) buf[i] = p[mx::elem_to_loc((int)i, shape, strides)];
    return buf.data();
  }
};

class QuantizedRows : public mx::UnaryPrimitive {
 public:
  QuantizedRows(mx::Stream s, int group_size, int bits, int path, int tiles)
      : mx::UnaryPrimitive(s), gs_(group_size), bits_(bits), path_(path), tiles_(tiles) {}

  void eval_cpu(const std::vector<mx::array>& in, mx::array& out) override {
    const mx::array &x = in[0], &w = in[1], &sc = in[2], &bi = in[3];
    for (const auto* a : {&w, &sc, &bi})
      if (!a->flags().row_contiguous) throw std::invalid_argument("[qmm_rows] weights must be row contiguous");
    out.set_data(mx::allocator::malloc(out.nbytes()));
    const int K = x.shape(-1), N = w.shape(0), M = (int)(x.size() / K);
    auto& enc = mx::cpu::get_command_encoder(stream());
    enc.set_input_array(x); enc.set_input_array(w); enc.set_input_array(sc); enc.set_input_array(bi);
    enc.set_output_array(out);
    // A strided x (rare: a transposed view) is gathered when the task runs, not as a graph op
    // per product (a Contiguous node for every product would be 211 more ops per SmolLM2 step).
    const View xv(x);
    const uint8_t* wp = (const uint8_t*)w.data<uint32_t>();
    float* yp = out.data<float>();
    const int gs = gs_, bits = bits_, path = path_;
    const bool tiles = tiles_ > 0 || (tiles_ < 0 && M >= BLAS_ROWS);
    if (sc.dtype() == mx::float16) {
      enc.dispatch([=, s = sc.data<mx::float16_t>(), b = bi.data<mx::float16_t>()] {
        std::vector<float> buf; product(path, tiles, xv.gather(buf), wp, s, b, M, N, K, gs, bits, yp); });
    } else if (sc.dtype() == mx::bfloat16) {
      enc.dispatch([=, s = sc.data<mx::bfloat16_t>(), b = bi.data<mx::bfloat16_t>()] {
        std::vector<float> buf; product(path, tiles, xv.gather(buf), wp, s, b, M, N, K, gs, bits, yp); });
    } else {
      enc.dispatch([=, s = sc.data<float>(), b = bi.data<float>()] {
        std::vector<float> buf; product(path, tiles, xv.gather(buf), wp, s, b, M, N, K, gs, bits, yp); });
    }
  }
  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("[qmm_rows] CPU only");
  }
  const char* name() const override { return "QuantizedRows"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const QuantizedRows&>(other);
    return gs_ == o.gs_ && bits_ == o.bits_ && path_ == o.path_ && tiles_ == o.tiles_;
  }

 private:
  int gs_, bits_, path_, tiles_;
};

// x (..., K) float32 @ dequantize(w, scales, biases).T -> (..., N) float32
static mx::array qmm_rows(const mx::array& x, const mx::array& w, const mx::array& scales,
                          const mx::array& biases, int group_size, int bits, int path, int tiles) {
  if (bits != 4 && bits != 8) throw std::invalid_argument("[qmm_rows] bits must be 4 or 8");
  if (group_size != 32 && group_size != 64) throw std::invalid_argument("[qmm_rows] group_size must be 32 or 64");
  if (x.dtype() != mx::float32) throw std::invalid_argument("[qmm_rows] x must be float32");
  if (w.ndim() != 2 || w.dtype() != mx::uint32) throw std::invalid_argument("[qmm_rows] w must be 2-D uint32");
  const int K = x.shape(-1), N = w.shape(0);
  if ((long)w.shape(1) * 32 / bits != K || K % group_size)
    throw std::invalid_argument("[qmm_rows] x's last dimension does not match w");
  if (scales.shape() != mx::Shape{N, K / group_size} || biases.shape() != scales.shape() ||
      biases.dtype() != scales.dtype())
    throw std::invalid_argument("[qmm_rows] scales/biases do not match w");
  if (path < 0) path = best_path();
  if (path > best_path()) throw std::invalid_argument("[qmm_rows] path not built for this CPU");
  auto shape = x.shape();
  shape.back() = N;
  auto s = mx::to_stream({});
  return mx::array(shape, mx::float32, std::make_shared<QuantizedRows>(s, group_size, bits, path, tiles),
                   {x, w, scales, biases});
}


// ---- the decode step's other ops -----------------------------------------------------------------
// On the CPU, mx.fast.rms_norm and mx.fast.rope run as their fallbacks: 7 and about 20 graph ops
// a call (SmolLM2: 61 norms and 60 ropes, 1600 of a decode step's 3900 ops). One primitive each.

static void rms_rows(const float* x, const float* w, float* y, long rows, int D, float eps) {
  for (long r = 0; r < rows; r++) {
    const float* xr = x + r * D;
    float* yr = y + r * D;
    float ss = 0.f;
    for (int i = 0; i < D; i++) ss += xr[i] * xr[i];
    const float inv = 1.f / std::sqrt(ss / (float)D + eps);
    for (int i = 0; i < D; i++) yr[i] = xr[i] * inv * w[i];
  }
}

class RowNorm : public mx::UnaryPrimitive {
 public:
  RowNorm(mx::Stream s, float eps) : mx::UnaryPrimitive(s), eps_(eps) {}
  void eval_cpu(const std::vector<mx::array>& in, mx::array& out) override {
    const mx::array &x = in[0], &w = in[1];
    out.set_data(mx::allocator::malloc(out.nbytes()));
    const int D = x.shape(-1);
    const long rows = (long)(x.size() / D);
    auto& enc = mx::cpu::get_command_encoder(stream());
    enc.set_input_array(x); enc.set_input_array(w); enc.set_output_array(out);
    enc.dispatch([v = View(x), wp = w.data<float>(), yp = out.data<float>(), rows, D, eps = eps_] {
      std::vector<float> buf;
      rms_rows(v.gather(buf), wp, yp, rows, D, eps);
    });
  }
  void eval_gpu(const std::vector<mx::array>&, mx::array&) override { throw std::runtime_error("CPU only"); }
  const char* name() const override { return "RowNorm"; }
  bool is_equivalent(const mx::Primitive& o) const override { return eps_ == static_cast<const RowNorm&>(o).eps_; }

 private:
  float eps_;
};

// mx.fast.rms_norm(x, w, eps) for float32 x (..., D) and w (D,)
static mx::array rms_norm(const mx::array& x, const mx::array& w, float eps) {
  if (x.dtype() != mx::float32 || w.dtype() != mx::float32 || w.ndim() != 1 || x.ndim() < 1 ||
      w.shape(0) != x.shape(-1))
    throw std::invalid_argument("[rms_norm] float32 x (..., D) and w (D,)");
  return mx::array(x.shape(), mx::float32, std::make_shared<RowNorm>(mx::to_stream({}), eps), {x, w});
}

class Rotary : public mx::UnaryPrimitive {
 public:
  Rotary(mx::Stream s, int dims, bool traditional, float base, float scale, int offset)
      : mx::UnaryPrimitive(s), dims_(dims), trad_(traditional), base_(base), scale_(scale), offset_(offset) {}
  void eval_cpu(const std::vector<mx::array>& in, mx::array& out) override {
    const mx::array& x = in[0];
    out.set_data(mx::allocator::malloc(out.nbytes()));
    auto& enc = mx::cpu::get_command_encoder(stream());
    enc.set_input_array(x);
    if (in.size() > 1) enc.set_input_array(in[1]);
    enc.set_output_array(out);
    const int32_t* offs = in.size() > 1 ? in[1].data<int32_t>() : nullptr;
    const bool one_offset = in.size() > 1 && in[1].size() == 1;
    // x viewed as (B, N, T, D) whatever its strides (attention hands over a transposed view)
    const int nd = x.ndim();
    const int B = x.shape(0), N = nd == 4 ? x.shape(1) : 1, T = x.shape(nd - 2), D = x.shape(nd - 1);
    const int64_t sb = x.strides()[0], sn = nd == 4 ? x.strides()[1] : 0, st = x.strides()[nd - 2],
                  sd = x.strides()[nd - 1];
    // members by value: the primitive may be gone (graph detached) before the task runs
    enc.dispatch([=, dims = dims_, trad = trad_, base = base_, scale = scale_, offset = offset_,
                  xp = x.data<float>(), yp = out.data<float>()] {
      const int half = dims / 2;
      std::vector<float> inv(half), c(half), s(half);
      for (int i = 0; i < half; i++) inv[i] = std::exp((float)(-i) * (std::log(base) / (float)half));
      for (int b = 0; b < B; b++) {
        const int off = offs ? offs[one_offset ? 0 : b] : offset;
        for (int t = 0; t < T; t++) {
          const float pos = (float)(t + off) * scale;
          for (int i = 0; i < half; i++) { float th = pos * inv[i]; c[i] = std::cos(th); s[i] = std::sin(th); }
          for (int n = 0; n < N; n++) {
            const float* xr = xp + b * sb + n * sn + t * st;
            float* yr = yp + (((size_t)b * N + n) * T + t) * D;
            for (int i = 0; i < half; i++) {
              const int i1 = trad ? 2 * i : i, i2 = trad ? 2 * i + 1 : i + half;
              const float x1 = xr[i1 * sd], x2 = xr[i2 * sd];
              yr[i1] = x1 * c[i] - x2 * s[i];
              yr[i2] = x1 * s[i] + x2 * c[i];
            }
            for (int i = dims; i < D; i++) yr[i] = xr[i * sd];
          }
        }
      }
    });
  }
  void eval_gpu(const std::vector<mx::array>&, mx::array&) override { throw std::runtime_error("CPU only"); }
  const char* name() const override { return "Rotary"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const Rotary&>(other);
    return dims_ == o.dims_ && trad_ == o.trad_ && base_ == o.base_ && scale_ == o.scale_ && offset_ == o.offset_;
  }

 private:
  int dims_;
  bool trad_;
  float base_, scale_;
  int offset_;
};

// mx.fast.rope(x, dims, traditional, base, scale, offset) for float32 x of 3 or 4 dimensions;
// offset an int, or an int32 array: a scalar or one per batch row.
static mx::array rope(const mx::array& x, int dims, bool traditional, float base, float scale,
                      std::variant<int, mx::array> offset) {
  if (x.dtype() != mx::float32 || (x.ndim() != 3 && x.ndim() != 4) || dims % 2 || dims <= 0 ||
      dims > x.shape(-1))
    throw std::invalid_argument("[rope] float32 x of 3 or 4 dimensions, even dims <= its last");
  auto s = mx::to_stream({});
  if (auto* o = std::get_if<int>(&offset))
    return mx::array(x.shape(), mx::float32, std::make_shared<Rotary>(s, dims, traditional, base, scale, *o), {x});
  auto o = std::get<mx::array>(offset);
  if (o.ndim() > 1 || (o.size() != 1 && (int)o.size() != x.shape(0)))
    throw std::invalid_argument("[rope] offset: a scalar or one per batch row");
  if (o.dtype() != mx::int32) o = mx::astype(o, mx::int32, s);
  return mx::array(x.shape(), mx::float32, std::make_shared<Rotary>(s, dims, traditional, base, scale, 0), {x, o});
}

}  // namespace qk

NB_MODULE(_qmm, m) {
  m.def("qmm_rows", &qk::qmm_rows, nb::arg("x"), nb::arg("w"), nb::arg("scales"), nb::arg("biases"),
        nb::arg("group_size"), nb::arg("bits"), nb::arg("path") = -1, nb::arg("tiles") = -1,
        "x (..., K) float32 times the affine-quantized w (N, K) transposed: (..., N) float32.\n"
        "tiles: 1 dequantized tiles and BLAS, 0 the int8 kernels, -1 tiles from blas_rows() rows on");
  m.def("rms_norm", &qk::rms_norm, nb::arg("x"), nb::arg("weight"), nb::arg("eps"),
        "mx.fast.rms_norm as one CPU op (float32)");
  m.def("rope", &qk::rope, nb::arg("x"), nb::arg("dims"), nb::arg("traditional"), nb::arg("base"),
        nb::arg("scale"), nb::arg("offset"), "mx.fast.rope as one CPU op (float32, default frequencies)");
  m.def("blas_rows", [] { return qk::BLAS_ROWS; }, "products of this many rows or more use tiles and BLAS");
  m.def("set_blas_rows", [](int rows) { qk::BLAS_ROWS = rows; }, "for measurements: the tile threshold");
  m.def("has_blas", [] { return qk::blas_sgemm() != nullptr; },
        "whether products of blas_rows rows or more go through dequantized tiles and cblas_sgemm");
  m.def("best_path", &qk::best_path, "0 scalar, 1 AVX2: the fastest path built for this CPU");
  m.def("start_threads", [](int threads, int spin_us) { qk::pool.start(threads, spin_us); },
        "helper threads for large products (once; later calls do nothing)");
  m.def("stats", [] { return nb::make_tuple(qk::calls.load(), qk::cycles.load()); },
        "(products run, TSC cycles inside them)");
  m.def("tsc", [] { return (uint64_t)__rdtsc(); }, "the time-stamp counter, to scale stats()");
}
