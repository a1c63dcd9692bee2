// Few-row products straight from MLX's affine quantization (w = scale * q + bias, groups of 32
// or 64, 4 or 8 bits), as an MLX primitive so they stay in the lazy graph.
//
// The weights are repacked once at load (pack() in Python) into tiles of 8 output rows: for
// each block of 32 inputs, one 32-byte vector holds 4 consecutive weights of each of the 8 rows.
// An activation row is quantized to int8 per block of 32 (scale max|x|/127, llama.cpp's q8
// idea); four of its bytes broadcast against such a vector (vpmaddubsw) land in 8 lanes that are
// 8 different outputs, so a block needs no horizontal sums, and at 4 bits the 16-bit partial sums
// of a whole block add up without overflow before one widening (vpmaddwd). Every output element
// is the same float accumulation over blocks whatever the number of rows or threads: a sequence
// decodes to the same bits alone or in a batch. Prefill uses the same kernels (they beat
// dequantizing the weight for BLAS, which stays as tiles=1 to compare against). Paths: AVX-512 VNNI (vpdpbusd, where the CPU has it), AVX2 (vpmaddubsw), portable
// scalar. Built with -march=native on the machine that runs it.
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

#include <optional>
#include <variant>

#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/variant.h>

#include "mlx/backend/common/utils.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/ops.h"
#include "mlx/primitives.h"

namespace mx = mlx::core;
namespace nb = nanobind;

namespace qk {

enum Path { SCALAR = 0, AVX2 = 1, VNNI = 2 };

static int best_path();  // below: the VNNI path is checked against AVX2's bits first

// ---- the packed layout ---------------------------------------------------------------------------
// Tile t = output rows 8t..8t+7, block b = inputs 32b..32b+31; a tile's blocks are consecutive.
// 4 bits, 128 bytes a block: byte v*32 + i*4 + c holds row i's weight 32b + 4v + c in its low
// nibble and 32b + 16 + 4v + c in its high one (v < 4). 8 bits, 256 bytes a block: byte
// j*32 + i*4 + c is row i's weight 32b + 4j + c, stored as q - 128 (signed).
// Scales and biases: (tiles, groups, 8), row i of the tile last.
// MXFP4 (gpt-oss's experts) packs like 4 bits: codes e2m1 (sign, 3 magnitude bits) with one
// E8M0 scale (a power of two) per 32 weights and no bias; bits = FP4 selects it.
static constexpr int FP4 = 1;
static inline constexpr int tile_block_bytes(int bits) { return (bits == FP4 ? 4 : bits) * 32; }
// e2m1 code -> twice its value, so that every weight is an integer (the scale takes the half)
static constexpr int8_t FP4_TWICE[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};
struct E8M0 {  // an MXFP4 scale byte; as a float, 2^(v - 127) / 2 (see FP4_TWICE)
  uint8_t v;
};

// ---- activation rows, quantized ---------------------------------------------------------------

struct Acts {
  int M = 0, K = 0, nblocks = 0, ngroups = 0;
  std::vector<int8_t> q;   // M * K, in order, |q| <= 127
  std::vector<float> d;    // M * nblocks
  // M * ngroups: sum of the quantized x per weight group, so that the bias term and the integer
  // dot see the same x (their errors cancel; the exact sum doubles the error at 4 bits)
  std::vector<float> sum;
};

static void quantize_rows(const float* x, int M, int K, int gs, Acts& a) {
  a.M = M; a.K = K; a.nblocks = K / 32; a.ngroups = K / gs;
  a.q.resize((size_t)M * K);
  a.d.resize((size_t)M * a.nblocks);
  a.sum.resize((size_t)M * a.ngroups);
  for (int m = 0; m < M; m++) {
    const float* row = x + (size_t)m * K;
    std::fill_n(a.sum.data() + (size_t)m * a.ngroups, a.ngroups, 0.f);
    for (int b = 0; b < a.nblocks; b++) {
      const float* v = row + b * 32;
      int8_t* q = a.q.data() + (size_t)m * K + b * 32;
      int isum = 0;
      float d;
#if defined(__AVX2__)
      // the scalar loop's arithmetic, 8 at a time (cvtps rounds to nearest even, as nearbyint)
      const __m256 sign = _mm256_set1_ps(-0.f);
      __m256 vx[4], m8 = _mm256_setzero_ps();
      for (int j = 0; j < 4; j++) {
        vx[j] = _mm256_loadu_ps(v + 8 * j);
        m8 = _mm256_max_ps(m8, _mm256_andnot_ps(sign, vx[j]));
      }
      __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m8), _mm256_extractf128_ps(m8, 1));
      m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
      m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
      d = _mm_cvtss_f32(m4) / 127.f;
      const __m256 id = _mm256_set1_ps(d > 0.f ? 1.f / d : 0.f);
      __m256i qi[4];
      for (int j = 0; j < 4; j++) qi[j] = _mm256_cvtps_epi32(_mm256_mul_ps(vx[j], id));
      const __m256i s16 = _mm256_add_epi32(_mm256_add_epi32(qi[0], qi[1]), _mm256_add_epi32(qi[2], qi[3]));
      __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s16), _mm256_extracti128_si256(s16, 1));
      s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
      s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xb1));
      isum = _mm_cvtsi128_si32(s4);
      // int32 -> int8 in order: packs interleave 128-bit lanes, the permute puts them back
      const __m256i p16a = _mm256_packs_epi32(qi[0], qi[1]), p16b = _mm256_packs_epi32(qi[2], qi[3]);
      const __m256i p8 = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(p16a, p16b),
                                                     _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
      _mm256_storeu_si256((__m256i*)q, p8);
#else
      float amax = 0.f;
      for (int k = 0; k < 32; k++) amax = std::fmax(amax, std::fabs(v[k]));
      d = amax / 127.f;
      const float id = d > 0.f ? 1.f / d : 0.f;
      for (int k = 0; k < 32; k++) {
        q[k] = (int8_t)std::nearbyint(v[k] * id);
        isum += q[k];
      }
#endif
      a.d[(size_t)m * a.nblocks + b] = d;
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
template <> inline float tof<E8M0>(E8M0 s) {  // 2^(v - 128), built as load8 builds it (0 for v <= 1)
  const uint32_t b = (uint32_t)std::max((int)s.v - 1, 0) << 23;
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

// weight q (0..15 or 0..255; the code at FP4) of row i, input k of the tile starting at wt
template <int BITS>
static inline int packed_q(const uint8_t* wt, int i, int k) {
  const uint8_t* blk = wt + (size_t)(k / 32) * tile_block_bytes(BITS);
  const int kk = k % 32;
  if (BITS == 4 || BITS == FP4) {
    const int h = kk / 16, v = (kk % 16) / 4, c = kk % 4;
    return (blk[v * 32 + i * 4 + c] >> (4 * h)) & 15;
  }
  return (int)(uint8_t)(blk[(kk / 4) * 32 + i * 4 + kk % 4] ^ 0x80);
}

// ---- portable path -----------------------------------------------------------------------------
// The same arithmetic as the AVX2 path, one output at a time: per block acc += (s*d) * dot, and
// at the end of each group acc += bias' * sum (bias' = bias + 128 s at 8 bits, used as q - 128).

template <int BITS, typename S>
static void tiles_scalar(const uint8_t* W, const S* SC, const S* BI, int t0, int t1, int gs, const Acts& a,
                         float* Y, int N) {
  const int K = a.K, nb = a.nblocks, ng = a.ngroups, bpg = gs / 32;
  for (int t = t0; t < t1; t++) {
    const uint8_t* wt = W + (size_t)t * nb * tile_block_bytes(BITS);
    const S* sc = SC + (size_t)t * ng * 8;
    const S* bi = BI + (size_t)t * ng * 8;
    for (int i = 0; i < 8 && 8 * t + i < N; i++) {
      for (int m = 0; m < a.M; m++) {
        const int8_t* xq = a.q.data() + (size_t)m * K;
        float acc = 0.f;
        for (int b = 0; b < nb; b++) {
          int dot = 0;
          for (int k = 32 * b; k < 32 * b + 32; k++) {
            const int q = packed_q<BITS>(wt, i, k);
            dot += (BITS == FP4 ? FP4_TWICE[q] : q - (BITS == 8 ? 128 : 0)) * xq[k];
          }
          const int g = b / bpg;
          acc = std::fma(tof(sc[g * 8 + i]) * a.d[(size_t)m * nb + b], (float)dot, acc);
          if (BITS != FP4 && b % bpg == bpg - 1) {
            const float bias = BITS == 8 ? std::fma(128.f, tof(sc[g * 8 + i]), tof(bi[g * 8 + i]))
                                         : tof(bi[g * 8 + i]);
            acc = std::fma(bias, a.sum[(size_t)m * ng + g], acc);
          }
        }
        Y[(size_t)m * N + 8 * t + i] = acc;
      }
    }
  }
}

// ---- AVX2 path ---------------------------------------------------------------------------------

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
template <typename S> static inline __m256 load8(const S* p);
template <> inline __m256 load8<float>(const float* p) { return _mm256_loadu_ps(p); }
template <> inline __m256 load8<mx::float16_t>(const mx::float16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p));
}
template <> inline __m256 load8<mx::bfloat16_t>(const mx::bfloat16_t* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}
template <> inline __m256 load8<E8M0>(const E8M0* p) {  // as tof<E8M0>
  const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p));
  const __m256i e = _mm256_max_epi32(_mm256_sub_epi32(v, _mm256_set1_epi32(1)), _mm256_setzero_si256());
  return _mm256_castsi256_ps(_mm256_slli_epi32(e, 23));
}

static inline __m256i bcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

#define QK_CAT2(a, b) a##_##b
#define QK_CAT(a, b) QK_CAT2(a, b)

// AVX2: 16-bit pair sums (vpmaddubsw) added up over the block, widened once (vpmaddwd).
#define QK_ISA avx2
#define QK_ACC4(sum, w, x) _mm256_add_epi16(sum, _mm256_maddubs_epi16(w, x))
#define QK_FINISH4(sum) _mm256_madd_epi16(sum, _mm256_set1_epi16(1))
#define QK_ACC8(sum, w, x) _mm256_add_epi32(sum, _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1)))
#include "qmm_tile.h"
#undef QK_ISA
#undef QK_ACC4
#undef QK_FINISH4
#undef QK_ACC8

// AVX-512 VNNI (on 256-bit vectors): vpdpbusd does the four products and the sum into int32 in
// one instruction. Compiled whatever this CPU has, used only where it has the instructions
// (best_path) and only if it gives the AVX2 path's bits at load (vnni_agrees).
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")
#define QK_ISA vnni
#define QK_ACC4(sum, w, x) _mm256_dpbusd_epi32(sum, w, x)
#define QK_FINISH4(sum) (sum)
#define QK_ACC8(sum, w, x) _mm256_dpbusd_epi32(sum, w, x)
#include "qmm_tile.h"
#undef QK_ISA
#undef QK_ACC4
#undef QK_FINISH4
#undef QK_ACC8
#pragma GCC pop_options
#endif

// ---- helper threads ----------------------------------------------------------------------------
// The caller and the helpers claim chunks of output tiles from one counter, so a helper the OS
// has not scheduled costs nothing. A helper spins a while after each job (a decode step calls in
// bursts), then sleeps on a futex. The caller waits for the last chunks spinning briefly, then on
// a futex: with more runnable threads than cores, a helper holding a chunk may be descheduled,
// and a spinning caller would keep it off the core.

struct Pool {
  std::function<void(int)> fn;
  int nchunks = 0;
  std::atomic<uint64_t> ticket{0};  // (sequence << 32) | next chunk
  std::atomic<uint32_t> finished{0}, wake{0}, sleeping{0}, waiting{0};
  std::atomic<int> busy{0};
  uint32_t seq = 0;
  int helpers = 0;
  uint64_t spin_cycles = 0, wait_cycles = 0;

  void work(uint32_t s) {
    for (;;) {
      uint64_t t = ticket.load(std::memory_order_acquire);
      if ((uint32_t)(t >> 32) != s || (int)(uint32_t)t >= nchunks) return;
      if (!ticket.compare_exchange_weak(t, t + 1, std::memory_order_acq_rel)) continue;
      fn((int)(uint32_t)t);
      if (finished.fetch_add(1) + 1 == (uint32_t)nchunks && waiting.load())
        syscall(SYS_futex, (uint32_t*)&finished, FUTEX_WAKE_PRIVATE, 1, nullptr, nullptr, 0);
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
    const uint64_t per_us = (__rdtsc() - t0) / 2000;
    spin_cycles = per_us * (uint64_t)spin_us;
    wait_cycles = per_us * 20;
    for (int i = 1; i < threads; i++) {
      std::thread t([this] { helper(); });
      pthread_setname_np(t.native_handle(), "mlxserve-qmm");  // so /proc and profilers can tell it
      t.detach();
      helpers++;
    }
  }
  // When the caller keeps waiting for helpers longer than it worked itself (the helpers do not
  // get a core: a busy machine), products run alone for a while, then sharing is tried again.
  std::atomic<int> alone{0};
  int strikes = 0;
  static constexpr int STRIKES = 3, ALONE = 500;

  // Runs fn(0..n-1), shared with the helpers when there are any and no other job is running.
  void run(int n, const std::function<void(int)>& f) {
    int expected = 0;
    if (!helpers || n < 2 || alone.load(std::memory_order_relaxed) > 0 ||
        !busy.compare_exchange_strong(expected, 1)) {
      if (alone.load(std::memory_order_relaxed) > 0) alone.fetch_sub(1, std::memory_order_relaxed);
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
    const uint64_t begin = __rdtsc();
    work(s);
    const uint64_t start = __rdtsc();
    uint32_t done;
    while ((done = finished.load(std::memory_order_acquire)) < (uint32_t)n) {
      if (__rdtsc() - start < wait_cycles) { _mm_pause(); continue; }
      waiting.store(1);
      if ((done = finished.load()) < (uint32_t)n)
        syscall(SYS_futex, (uint32_t*)&finished, FUTEX_WAIT_PRIVATE, done, nullptr, nullptr, 0);
      waiting.store(0);
    }
    const uint64_t end = __rdtsc();
    if (end - start > (start - begin) / 2 + wait_cycles) {
      if (++strikes >= STRIKES) { alone.store(ALONE); strikes = 0; }
    } else if (strikes > 0) {
      strikes--;
    }
    busy.store(0);
  }
};

static Pool pool;
// Products smaller than this (multiply-adds) stay on the calling thread: handing one over costs
// more than it saves.
static long THREAD_MACS = 1L << 21;
// Products of fewer rows stay on the calling thread too: on a machine without a spare core a
// helper pays for prefill (many rows) but costs decode steps (a few rows, every step) more.
static long THREAD_ROWS = 1;

// ---- dequantize the weight, then BLAS (tiles=1) ------------------------------------------------
// The way prefill went before the packed int8 kernels overtook it, kept to compare against: the
// weight is dequantized to float32 once and multiplied with every row by the BLAS libmlx uses.
// Found at run time: no BLAS, no tiles.
typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float*, int, const float*, int,
                         float, float*, int);
static sgemm_fn blas_sgemm() {
  static sgemm_fn fn = (sgemm_fn)dlsym(RTLD_DEFAULT, "cblas_sgemm");
  return fn;
}
// With tiles=-1, from this many rows on, tiles and BLAS.
static int BLAS_ROWS = 8;

// Weight row n (0 .. 8 * tiles - 1) as K floats.
template <int BITS, typename S>
static void dequantize_row(const uint8_t* W, const S* SC, const S* BI, long n, int K, int gs, float* out) {
  const int nb = K / 32, ng = K / gs, bpg = gs / 32, i = (int)(n % 8);
  const uint8_t* wt = W + (size_t)(n / 8) * nb * tile_block_bytes(BITS);
  const S* sc = SC + (size_t)(n / 8) * ng * 8;
  const S* bi = BI + (size_t)(n / 8) * ng * 8;
  for (int b = 0; b < nb; b++) {
    const uint8_t* wb = wt + (size_t)b * tile_block_bytes(BITS);
    const float s = tof(sc[b / bpg * 8 + i]), bias = tof(bi[b / bpg * 8 + i]);
    for (int j = 0; j < 8; j++) {  // 4 consecutive weights of row i
      const uint8_t* src = wb + (BITS == 4 ? (j % 4) * 32 : j * 32) + i * 4;
      for (int c = 0; c < 4; c++) {
        const int q = BITS == 4 ? (src[c] >> (4 * (j / 4))) & 15 : (int)(uint8_t)(src[c] ^ 0x80);
        out[b * 32 + 4 * j + c] = s * (float)q + bias;
      }
    }
  }
}

// Weight rows of tiles t0..t1 (all 8 rows of each, padding included) as float32 rows of K.
template <int BITS, typename S>
static void dequantize_tiles(const uint8_t* W, const S* SC, const S* BI, int t0, int t1, int K, int gs,
                             float* out) {
  for (long n = 8L * t0; n < 8L * t1; n++)
    dequantize_row<BITS, S>(W, SC, BI, n, K, gs, out + (size_t)(n - 8L * t0) * K);
}
static std::atomic<uint64_t> calls{0}, cycles{0};

// Output tiles t0..t1 of one weight for the quantized rows a, on the given path.
template <typename S>
static void run_tiles(int path, int bits, const uint8_t* W, const S* SC, const S* BI, int t0, int t1, int gs,
                      const Acts& a, float* Y, int N) {
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
  if (path == VNNI) {
    if (bits == 4) tiles_vnni<4, S>(W, SC, BI, t0, t1, gs, a, Y, N);
    else if (bits == FP4) tiles_vnni<FP4, S>(W, SC, BI, t0, t1, gs, a, Y, N);
    else tiles_vnni<8, S>(W, SC, BI, t0, t1, gs, a, Y, N);
    return;
  }
  if (path == AVX2) {
    if (bits == 4) tiles_avx2<4, S>(W, SC, BI, t0, t1, gs, a, Y, N);
    else if (bits == FP4) tiles_avx2<FP4, S>(W, SC, BI, t0, t1, gs, a, Y, N);
    else tiles_avx2<8, S>(W, SC, BI, t0, t1, gs, a, Y, N);
    return;
  }
#endif
  if (bits == 4) tiles_scalar<4, S>(W, SC, BI, t0, t1, gs, a, Y, N);
  else if (bits == FP4) tiles_scalar<FP4, S>(W, SC, BI, t0, t1, gs, a, Y, N);
  else tiles_scalar<8, S>(W, SC, BI, t0, t1, gs, a, Y, N);
}
static const long CHUNK_BYTES = 16 * 1024;  // of weights per claimed chunk

template <typename S>
static void product(int path, bool tiles, const float* x, const uint8_t* W, const S* SC, const S* BI, int M,
                    int N, int K, int gs, int bits, float* Y) {
  uint64_t t0 = __rdtsc();
  const int T = (N + 7) / 8;
  const long tile_bytes = (long)K * bits;  // 8 rows
  if (tiles && blas_sgemm()) {
    // Wide tiles, the whole weight up to 8 MB: sgemm packs all of x again for every call, and
    // 300 rows by 576->1536 took 52 ms in tiles of 256 rows against 18 in one float32 sgemm.
    const int chunk = (long)N * K <= (2L << 20) ? T : 32, nchunks = (T + chunk - 1) / chunk;
    auto run = [&](int c) {
      const int c0 = c * chunk, c1 = std::min(T, c0 + chunk);
      thread_local std::vector<float> tile;
      tile.resize((size_t)chunk * 8 * K);
      if (bits == 4) dequantize_tiles<4, S>(W, SC, BI, c0, c1, K, gs, tile.data());
      else dequantize_tiles<8, S>(W, SC, BI, c0, c1, K, gs, tile.data());
      blas_sgemm()(101, 111, 112, M, std::min(N, 8 * c1) - 8 * c0, K, 1.f, x, K, tile.data(), K, 0.f,
                   Y + 8 * c0, N);
    };
    if ((long)M * N * K >= THREAD_MACS && M >= THREAD_ROWS) pool.run(nchunks, run);
    else for (int c = 0; c < nchunks; c++) run(c);
    calls.fetch_add(1, std::memory_order_relaxed);
    cycles.fetch_add(__rdtsc() - t0, std::memory_order_relaxed);
    return;
  }
  thread_local Acts acts;  // the caller's; helpers read it through `a`
  quantize_rows(x, M, K, gs, acts);
  const Acts& a = acts;
  const int chunk = (int)std::max(1L, CHUNK_BYTES / tile_bytes), nchunks = (T + chunk - 1) / chunk;
  auto cols = [&](int c) {
    const int c0 = c * chunk, c1 = std::min(T, c0 + chunk);
    run_tiles<S>(path, bits, W, SC, BI, c0, c1, gs, a, Y, N);
  };
  if ((long)M * N * K >= THREAD_MACS && M >= THREAD_ROWS) pool.run(nchunks, cols);
  else for (int c = 0; c < nchunks; c++) cols(c);
  calls.fetch_add(1, std::memory_order_relaxed);
  cycles.fetch_add(__rdtsc() - t0, std::memory_order_relaxed);
}

// ---- choosing the path ---------------------------------------------------------------------------
// The VNNI path cannot run where this is developed (AVX2-only CPUs), so on a CPU that has it,
// it is used only after giving the AVX2 path's bits on a product of every kind at load.
static std::string vnni_note = "not checked";

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
static bool vnni_agrees() {
  uint32_t state = 12345;
  auto next = [&] { state = state * 1664525u + 1013904223u; return state >> 8; };
  const int M = 7, N = 24, K = 192, gs = 64;
  std::vector<float> x((size_t)M * K), sc((size_t)N * K / gs), bi(sc.size()), ya((size_t)M * N), yb(ya.size());
  for (auto& v : x) v = (float)((int)(next() % 2001) - 1000) / 100.f;
  for (auto& v : sc) v = (float)(next() % 1000 + 1) / 5000.f;
  for (auto& v : bi) v = -(float)(next() % 1000) / 300.f;
  for (int bits : {4, 8, FP4}) {
    std::vector<uint8_t> w((size_t)N * K * (bits == FP4 ? 4 : bits) / 8);
    for (auto& v : w) v = (uint8_t)next();
    Acts a;
    quantize_rows(x.data(), M, K, gs, a);
    if (bits == 4) {
      tiles_avx2<4, float>(w.data(), sc.data(), bi.data(), 0, N / 8, gs, a, ya.data(), N);
      tiles_vnni<4, float>(w.data(), sc.data(), bi.data(), 0, N / 8, gs, a, yb.data(), N);
    } else if (bits == FP4) {
      tiles_avx2<FP4, float>(w.data(), sc.data(), bi.data(), 0, N / 8, gs, a, ya.data(), N);
      tiles_vnni<FP4, float>(w.data(), sc.data(), bi.data(), 0, N / 8, gs, a, yb.data(), N);
    } else {
      tiles_avx2<8, float>(w.data(), sc.data(), bi.data(), 0, N / 8, gs, a, ya.data(), N);
      tiles_vnni<8, float>(w.data(), sc.data(), bi.data(), 0, N / 8, gs, a, yb.data(), N);
    }
    if (std::memcmp(ya.data(), yb.data(), ya.size() * sizeof(float)) != 0) return false;
  }
  return true;
}
#endif

static int choose_path() {
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
  __builtin_cpu_init();
  if (!(__builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512bw"))) {
    vnni_note = "no AVX-512 VNNI on this CPU";
    return AVX2;
  }
  if (!vnni_agrees()) {
    vnni_note = "AVX-512 VNNI path disagreed with AVX2 at load; using AVX2";
    return AVX2;
  }
  vnni_note = "in use";
  return VNNI;
#else
  vnni_note = "not built (no AVX2 at build time)";
  return SCALAR;
#endif
}

static int best_path() {
  static const int path = choose_path();
  return path;
}

// ---- the primitives ----------------------------------------------------------------------------
// Tasks capture pointers, shapes and strides, never an mx::array: an array's graph belongs to the
// thread that builds it, and a copy released on the stream thread races with it.

// f(S{}) with S the C++ type of the scales' dtype (float16, bfloat16 or float32): a task is
// built per dtype, and takes typed pointers, never the arrays.
template <typename F>
static void by_scale_type(mx::Dtype dt, F&& f) {
  if (dt == mx::float16) f(mx::float16_t{});
  else if (dt == mx::bfloat16) f(mx::bfloat16_t{});
  else if (dt == mx::uint8) f(E8M0{});  // MXFP4's scales (experts only)
  else f(0.f);
}

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
    const int K = x.shape(-1), N = out.shape(-1), M = (int)(x.size() / K);
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
    by_scale_type(sc.dtype(), [&](auto tag) {
      using S = decltype(tag);
      enc.dispatch([=, s = sc.data<S>(), b = bi.data<S>()] {
        std::vector<float> buf; product(path, tiles, xv.gather(buf), wp, s, b, M, N, K, gs, bits, yp); });
    });
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

// x (..., K) float32 @ dequantize(w, scales, biases).T -> (..., n) float32, with w, scales and
// biases packed by pack() (tiles of 8 rows): w (tiles, K * bits / 4) uint32, scales and biases
// (tiles, K / group_size, 8). n: the rows of the weight before packing (default 8 * tiles).
static mx::array qmm_rows(const mx::array& x, const mx::array& w, const mx::array& scales,
                          const mx::array& biases, int group_size, int bits, int path, int tiles, int n) {
  if (bits != 4 && bits != 8) throw std::invalid_argument("[qmm_rows] bits must be 4 or 8");
  if (group_size != 32 && group_size != 64) throw std::invalid_argument("[qmm_rows] group_size must be 32 or 64");
  if (x.dtype() != mx::float32) throw std::invalid_argument("[qmm_rows] x must be float32");
  if (w.ndim() != 2 || w.dtype() != mx::uint32) throw std::invalid_argument("[qmm_rows] w must be 2-D uint32 (packed)");
  const int K = x.shape(-1), T = w.shape(0);
  if ((long)w.shape(1) * 4 / bits != K || K % group_size)
    throw std::invalid_argument("[qmm_rows] x's last dimension does not match w");
  if (scales.shape() != mx::Shape{T, K / group_size, 8} || biases.shape() != scales.shape() ||
      biases.dtype() != scales.dtype())
    throw std::invalid_argument("[qmm_rows] scales/biases do not match w (packed: tiles, groups, 8)");
  if (n < 0) n = 8 * T;
  if (n > 8 * T || n <= 8 * (T - 1)) throw std::invalid_argument("[qmm_rows] n does not match w's tiles");
  if (path < 0) path = best_path();
  if (path > best_path()) throw std::invalid_argument("[qmm_rows] path not built for this CPU");
  auto shape = x.shape();
  shape.back() = n;
  auto s = mx::to_stream({});
  return mx::array(shape, mx::float32, std::make_shared<QuantizedRows>(s, group_size, bits, path, tiles),
                   {x, w, scales, biases});
}

// exp of n floats in place, every element by the same function whatever its position (so a
// value gets the same bits alone or in a batch): Cephes' expf polynomial 8 at a time with
// AVX2 (about 1 ulp; exactly 0 from -88.4 down, -inf included), std::exp without.
#if defined(__AVX2__) && defined(__FMA__)
static inline __m256 exp8(__m256 x) {
  x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.3762626647949f)), _mm256_set1_ps(-88.3762626647949f));
  __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_add_ps(_mm256_fmadd_ps(y, _mm256_mul_ps(x, x), x), _mm256_set1_ps(1.f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}
#endif

static void exp_inplace(float* x, size_t n) {
  size_t i = 0;
#if defined(__AVX2__) && defined(__FMA__)
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, exp8(_mm256_loadu_ps(x + i)));
  if (i < n) {
    alignas(32) float tail[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    std::memcpy(tail, x + i, (n - i) * sizeof(float));
    _mm256_store_ps(tail, exp8(_mm256_load_ps(tail)));
    std::memcpy(x + i, tail, (n - i) * sizeof(float));
    i = n;
  }
#endif
  for (; i < n; i++) x[i] = std::exp(x[i]);
}

// silu(x @ gate^T) * (x @ up^T) as one op: both products from one quantization of x (the
// same bits as two qmm_rows calls), then the SwiGLU elementwise, in place of two products,
// two slices and MLX's compiled (scalar exp) SiLU-times-up kernel. gelu: gemma's GeGLU,
// gelu_approx(g) = 0.5 g (1 + tanh(u)) = g * sigmoid(2u), u = sqrt(2/pi) (g + 0.044715 g^3).
class QuantizedSwiGLU : public mx::UnaryPrimitive {
 public:
  QuantizedSwiGLU(mx::Stream s, int group_size, int bits, bool gelu)
      : mx::UnaryPrimitive(s), gs_(group_size), bits_(bits), gelu_(gelu) {}
  void eval_cpu(const std::vector<mx::array>& in, mx::array& out) override {
    const mx::array& x = in[0];
    for (size_t i = 1; i < in.size(); i++)
      if (!in[i].flags().row_contiguous) throw std::invalid_argument("[qmm_swiglu] weights must be row contiguous");
    out.set_data(mx::allocator::malloc(out.nbytes()));
    const int K = x.shape(-1), N = out.shape(-1), M = (int)(x.size() / K);
    auto& enc = mx::cpu::get_command_encoder(stream());
    for (auto& a : in) enc.set_input_array(a);
    enc.set_output_array(out);
    const View xv(x);
    const int gs = gs_, bits = bits_, path = best_path();
    const bool gelu = gelu_;
    auto run = [=, wg = (const uint8_t*)in[1].data<uint32_t>(), wu = (const uint8_t*)in[4].data<uint32_t>(),
                yp = out.data<float>()](auto sg, auto bg, auto su, auto bu) {
      std::vector<float> buf, up((size_t)M * N);
      const float* xp = xv.gather(buf);
      product(path, false, xp, wg, sg, bg, M, N, K, gs, bits, yp);
      product(path, false, xp, wu, su, bu, M, N, K, gs, bits, up.data());
      std::vector<float> e((size_t)M * N);
      if (gelu)
        for (size_t i = 0; i < e.size(); i++) e[i] = -1.5957691216057308f * (yp[i] + 0.044715f * yp[i] * yp[i] * yp[i]);
      else
        for (size_t i = 0; i < e.size(); i++) e[i] = -yp[i];
      exp_inplace(e.data(), e.size());
      for (size_t i = 0; i < e.size(); i++) yp[i] = yp[i] / (1.f + e[i]) * up[i];
    };
    by_scale_type(in[2].dtype(), [&](auto tag) {
      using S = decltype(tag);
      enc.dispatch([=, a = in[2].data<S>(), b = in[3].data<S>(), c = in[5].data<S>(), d = in[6].data<S>()] {
        run(a, b, c, d); });
    });
  }
  void eval_gpu(const std::vector<mx::array>&, mx::array&) override { throw std::runtime_error("CPU only"); }
  const char* name() const override { return gelu_ ? "QuantizedGeGLU" : "QuantizedSwiGLU"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const QuantizedSwiGLU&>(other);
    return gs_ == o.gs_ && bits_ == o.bits_ && gelu_ == o.gelu_;
  }

 private:
  int gs_, bits_;
  bool gelu_;
};

static mx::array qmm_swiglu(const mx::array& x, const mx::array& wg, const mx::array& sg, const mx::array& bg,
                            const mx::array& wu, const mx::array& su, const mx::array& bu, int group_size, int bits,
                            int n, bool gelu) {
  // the checks of qmm_rows, for both weights
  const mx::array gate = qmm_rows(x, wg, sg, bg, group_size, bits, -1, 0, n);
  const mx::array up = qmm_rows(x, wu, su, bu, group_size, bits, -1, 0, n);
  if (wg.shape() != wu.shape() || sg.dtype() != su.dtype())
    throw std::invalid_argument("[qmm_swiglu] gate and up differ in shape or scale dtype");
  return mx::array(gate.shape(), mx::float32,
                   std::make_shared<QuantizedSwiGLU>(mx::to_stream({}), group_size, bits, gelu),
                   {x, wg, sg, bg, wu, su, bu});
}

// ---- experts: each row times the experts it chose ------------------------------------------------
// A mixture-of-experts layer multiplies each token's row by the k experts its router chose
// (mx.gather_qmm). The (row, choice) pairs are grouped by expert: each expert's rows are
// quantized together and its tiles are read once for all of them, by the same tile kernels as
// qmm_rows, so every output has the bits qmm_rows gives for that row and that expert's weight.
// Weights: (experts, tiles, ...), each expert packed by pack().

template <typename S>
struct ExpertWeights {
  int E = 0, nw = 0;  // experts; weights sharing the rows (2: gate and up)
  const uint8_t* W[2];
  const S* SC[2];
  const S* BI[2];
};

// Pairs p < P: input row x[p / xdiv] (K floats) times expert ids[p]'s weights (N rows). Fills
// order (the pairs with a valid expert, grouped by expert) and, per weight, ys[w]: one output
// row of N for each pair in that order. rows: the tokens, for the threading threshold.
template <typename S>
static void experts_product(int path, const ExpertWeights<S>& ew, const float* x, int xdiv, const uint32_t* ids,
                            int P, int N, int K, int gs, int bits, long rows, std::vector<int>& order,
                            std::vector<float>* ys) {
  const uint64_t c0 = __rdtsc();
  const int E = ew.E, T = (N + 7) / 8, nb = K / 32, ng = K / gs;
  // the caller's buffers, kept between calls (a decode step makes two calls a layer); helpers
  // read them through the references
  struct Job { int e, w, t0, t1; };
  thread_local std::vector<int> start_tl, next_tl;
  thread_local std::vector<Acts> acts_tl;
  thread_local std::vector<float> rows_tl;
  thread_local std::vector<Job> jobs_tl;
  std::vector<int>& start = start_tl;
  std::vector<Acts>& acts = acts_tl;
  std::vector<Job>& jobs = jobs_tl;
  start.assign(E + 1, 0);
  for (int p = 0; p < P; p++)
    if (ids[p] < (uint32_t)E) start[ids[p] + 1]++;
  for (int e = 0; e < E; e++) start[e + 1] += start[e];
  order.resize(start[E]);
  next_tl.assign(start.begin(), start.end() - 1);
  for (int p = 0; p < P; p++)
    if (ids[p] < (uint32_t)E) order[next_tl[ids[p]]++] = p;
  if ((int)acts.size() < E) acts.resize(E);
  jobs.clear();
  const int chunk = (int)std::max(1L, CHUNK_BYTES / ((long)K * bits));
  for (int e = 0; e < E; e++) {
    const int n = start[e + 1] - start[e];
    if (!n) continue;
    rows_tl.resize((size_t)n * K);
    for (int i = 0; i < n; i++)
      std::memcpy(rows_tl.data() + (size_t)i * K, x + (size_t)(order[start[e] + i] / xdiv) * K, K * sizeof(float));
    quantize_rows(rows_tl.data(), n, K, gs, acts[e]);
    for (int w = 0; w < ew.nw; w++)
      for (int t = 0; t < T; t += chunk) jobs.push_back({e, w, t, std::min(T, t + chunk)});
  }
  for (int w = 0; w < ew.nw; w++) ys[w].resize((size_t)start[E] * N);
  const long wbytes = (long)T * nb * tile_block_bytes(bits), sgroups = (long)T * ng * 8;
  auto run = [&](int j) {
    const Job& job = jobs[j];
    run_tiles<S>(path, bits, ew.W[job.w] + job.e * wbytes, ew.SC[job.w] + job.e * sgroups,
                 ew.BI[job.w] + job.e * sgroups, job.t0, job.t1, gs, acts[job.e],
                 ys[job.w].data() + (size_t)start[job.e] * N, N);
  };
  if ((long)start[E] * N * K * ew.nw >= THREAD_MACS && rows >= THREAD_ROWS) pool.run((int)jobs.size(), run);
  else for (int j = 0; j < (int)jobs.size(); j++) run(j);
  calls.fetch_add(1, std::memory_order_relaxed);
  cycles.fetch_add(__rdtsc() - c0, std::memory_order_relaxed);
}

// A task's start: weights (inputs from the third on) must be row contiguous; out gets its
// buffer and the encoder every array.
static mx::cpu::CommandEncoder& expert_task(mx::Stream s, const std::vector<mx::array>& in, mx::array& out) {
  for (size_t i = 2; i < in.size(); i++)
    if (!in[i].flags().row_contiguous) throw std::invalid_argument("[experts] weights must be row contiguous");
  out.set_data(mx::allocator::malloc(out.nbytes()));
  auto& enc = mx::cpu::get_command_encoder(s);
  for (auto& a : in) enc.set_input_array(a);
  enc.set_output_array(out);
  return enc;
}

class ExpertRows : public mx::UnaryPrimitive {
 public:
  ExpertRows(mx::Stream s, int group_size, int bits, int path, bool swiglu)
      : mx::UnaryPrimitive(s), gs_(group_size), bits_(bits), path_(path), swiglu_(swiglu) {}
  void eval_cpu(const std::vector<mx::array>& in, mx::array& out) override {
    const mx::array &x = in[0], &ids = in[1];
    auto& enc = expert_task(stream(), in, out);
    const int K = x.shape(-1), N = out.shape(-1), P = (int)ids.size(), k = ids.shape(-1);
    const int xdiv = (long)(x.size() / K) == P ? 1 : k;
    const int gs = gs_, bits = bits_, path = path_, nw = swiglu_ ? 2 : 1, E = in[2].shape(0);
    const View xv(x);
    // ids (int32 or uint32, possibly a strided slice) are read when the task runs
    auto run = [=, ip = (const uint32_t*)ids.data<uint32_t>(), ishape = ids.shape(), istrides = ids.strides(),
                icontig = ids.flags().row_contiguous, yp = out.data<float>()](const auto& ew) {
      thread_local std::vector<float> buf, ys[2], e;  // the stream thread's, kept between calls
      thread_local std::vector<uint32_t> idv;
      thread_local std::vector<int> order;
      const uint32_t* id = ip;
      if (!icontig) {
        idv.resize(P);
        for (int p = 0; p < P; p++) idv[p] = ip[mx::elem_to_loc(p, ishape, istrides)];
        id = idv.data();
      }
      experts_product(path, ew, xv.gather(buf), xdiv, id, P, N, K, gs, bits, P / k, order, ys);
      if (order.size() < (size_t)P)  // pairs naming no expert
        for (int p = 0; p < P; p++)
          if (id[p] >= (uint32_t)E) std::fill_n(yp + (size_t)p * N, N, NAN);
      if (nw == 2) {  // silu(gate) * up, as qmm_swiglu
        std::vector<float>& g = ys[0];
        e.resize(g.size());
        for (size_t i = 0; i < e.size(); i++) e[i] = -g[i];
        exp_inplace(e.data(), e.size());
        for (size_t i = 0; i < e.size(); i++) g[i] = g[i] / (1.f + e[i]) * ys[1][i];
      }
      for (size_t i = 0; i < order.size(); i++)
        std::memcpy(yp + (size_t)order[i] * N, ys[0].data() + i * N, N * sizeof(float));
    };
    by_scale_type(in[3].dtype(), [&](auto tag) {
      using S = decltype(tag);
      ExpertWeights<S> ew;
      ew.E = E;
      ew.nw = nw;
      for (int w = 0; w < nw; w++) {
        ew.W[w] = (const uint8_t*)in[2 + 3 * w].data<uint32_t>();
        ew.SC[w] = in[3 + 3 * w].data<S>();
        ew.BI[w] = in[4 + 3 * w].data<S>();
      }
      enc.dispatch([=] { run(ew); });
    });
  }
  void eval_gpu(const std::vector<mx::array>&, mx::array&) override { throw std::runtime_error("CPU only"); }
  const char* name() const override { return "ExpertRows"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const ExpertRows&>(other);
    return gs_ == o.gs_ && bits_ == o.bits_ && path_ == o.path_ && swiglu_ == o.swiglu_;
  }

 private:
  int gs_, bits_, path_;
  bool swiglu_;
};

// bits: 4, 8 or FP4 (MXFP4: group 32, uint8 scales, biases unused)
static void check_experts(const mx::array& x, const mx::array& ids, const mx::array& w, const mx::array& scales,
                          const mx::array& biases, int group_size, int bits, int n) {
  if (bits != 4 && bits != 8 && bits != FP4) throw std::invalid_argument("[gather_qmm_rows] bits must be 4 or 8");
  if (group_size != 32 && (group_size != 64 || bits == FP4))
    throw std::invalid_argument("[gather_qmm_rows] group_size must be 32 or 64 (mxfp4: 32)");
  if ((bits == FP4) != (scales.dtype() == mx::uint8) || (bits != FP4 && !mx::issubdtype(scales.dtype(), mx::floating)))
    throw std::invalid_argument("[gather_qmm_rows] scales: uint8 for mxfp4, floating point for affine");
  if (x.dtype() != mx::float32 || x.ndim() < 1) throw std::invalid_argument("[gather_qmm_rows] x must be float32");
  if (w.ndim() != 3 || w.dtype() != mx::uint32)
    throw std::invalid_argument("[gather_qmm_rows] w must be 3-D uint32 (experts, packed by pack())");
  const int K = x.shape(-1), E = w.shape(0), T = w.shape(1);
  if ((long)w.shape(2) * 4 / (bits == FP4 ? 4 : bits) != K || K % group_size)
    throw std::invalid_argument("[gather_qmm_rows] x's last dimension does not match w");
  if (scales.shape() != mx::Shape{E, T, K / group_size, 8} || biases.shape() != scales.shape() ||
      biases.dtype() != scales.dtype())
    throw std::invalid_argument("[gather_qmm_rows] scales/biases do not match w (experts, tiles, groups, 8)");
  if (n > 8 * T || n <= 8 * (T - 1)) throw std::invalid_argument("[gather_qmm_rows] n does not match w's tiles");
  if (ids.ndim() < 1 || !mx::issubdtype(ids.dtype(), mx::integer))
    throw std::invalid_argument("[gather_qmm_rows] indices: integers, (..., k)");
  const long rows = (long)(x.size() / K), P = (long)ids.size();
  if (rows != P && rows * ids.shape(-1) != P)
    throw std::invalid_argument("[gather_qmm_rows] x needs a row per index or a row per index row");
}

static mx::array experts_op(const mx::array& x, const mx::array& ids, std::vector<mx::array> weights, int group_size,
                            int bits, int n, int path, bool swiglu) {
  if (path < 0) path = best_path();
  if (path > best_path()) throw std::invalid_argument("[gather_qmm_rows] path not built for this CPU");
  auto s = mx::to_stream({});
  mx::array i = ids.dtype() == mx::int32 || ids.dtype() == mx::uint32 ? ids : mx::astype(ids, mx::int32, s);
  auto shape = ids.shape();
  shape.push_back(n);
  std::vector<mx::array> inputs = {x, i};
  inputs.insert(inputs.end(), weights.begin(), weights.end());
  return mx::array(shape, mx::float32, std::make_shared<ExpertRows>(s, group_size, bits, path, swiglu), inputs);
}

// x (..., K) float32: a row per index, or a row per index row (shared by its k choices);
// indices (..., k) integers < experts; w, scales, biases: each expert's weight packed by
// pack(), stacked. Out: indices.shape + (n,), row (..., j) = x's row times expert indices[..., j].
// mode "mxfp4": MXFP4 weights (bits 4, group 32, uint8 scales, no biases).
static mx::array gather_qmm_rows(const mx::array& x, const mx::array& ids, const mx::array& w, const mx::array& scales,
                                 const std::optional<mx::array>& biases, int group_size, int bits, int n, int path,
                                 const std::string& mode) {
  if (mode != "affine" && (mode != "mxfp4" || bits != 4))
    throw std::invalid_argument("[gather_qmm_rows] mode: affine, or mxfp4 with bits 4");
  if (mode == "mxfp4") bits = FP4;
  if (!biases && bits != FP4) throw std::invalid_argument("[gather_qmm_rows] affine weights need biases");
  const mx::array& b = bits == FP4 ? scales : *biases;  // unused at FP4: scales hold its place
  if (n < 0 && w.ndim() == 3) n = 8 * w.shape(1);
  check_experts(x, ids, w, scales, b, group_size, bits, n);
  return experts_op(x, ids, {w, scales, b}, group_size, bits, n, path, false);
}

// silu(gate product) * (up product), both as gather_qmm_rows: one op, one quantization of x.
static mx::array gather_swiglu(const mx::array& x, const mx::array& ids, const mx::array& wg, const mx::array& sg,
                               const mx::array& bg, const mx::array& wu, const mx::array& su, const mx::array& bu,
                               int group_size, int bits, int n, int path) {
  if (n < 0 && wg.ndim() == 3) n = 8 * wg.shape(1);
  check_experts(x, ids, wg, sg, bg, group_size, bits, n);
  check_experts(x, ids, wu, su, bu, group_size, bits, n);
  if (wg.shape() != wu.shape() || sg.dtype() != su.dtype())
    throw std::invalid_argument("[gather_swiglu] gate and up differ in shape or scale dtype");
  return experts_op(x, ids, {wg, sg, bg, wu, su, bu}, group_size, bits, n, path, true);
}

// ---- a whole mixture-of-experts block ------------------------------------------------------------
// qwen3moe's block after its router product: softmax over the experts, the top k (their
// probabilities renormalized if asked), SwiGLU through each chosen expert, down, and the
// probability-weighted sum of the k outputs, as one op in place of about a dozen. A row's sum
// runs over its choices in one order (by probability, then expert), so a row gets the same bits
// alone or in a batch.

static void route_rows(const float* logits, int M, int E, int k, bool normalize, uint32_t* ids, float* scores) {
  thread_local std::vector<float> p;
  thread_local std::vector<int> idx;
  p.resize(E);
  idx.resize(E);
  for (int m = 0; m < M; m++) {
    const float* l = logits + (size_t)m * E;
    float top = -INFINITY, total = 0.f;
    for (int e = 0; e < E; e++) top = std::fmax(top, l[e]);
    for (int e = 0; e < E; e++) total += p[e] = std::exp(l[e] - top);
    for (int e = 0; e < E; e++) p[e] = std::isnan(p[e]) ? -1.f : p[e] / total;  // a strict order for the sort
    for (int e = 0; e < E; e++) idx[e] = e;
    std::partial_sort(idx.begin(), idx.begin() + k, idx.end(),
                      [&](int a, int b) { return p[a] > p[b] || (p[a] == p[b] && a < b); });
    float sum = 0.f;
    for (int j = 0; j < k; j++) sum += p[idx[j]];
    for (int j = 0; j < k; j++) {
      ids[(size_t)m * k + j] = (uint32_t)idx[j];
      scores[(size_t)m * k + j] = normalize ? p[idx[j]] / sum : p[idx[j]];
    }
  }
}

class MoeBlock : public mx::UnaryPrimitive {
 public:
  MoeBlock(mx::Stream s, int k, bool normalize, int gs, int bits, int down_gs, int down_bits, int hidden)
      : mx::UnaryPrimitive(s), k_(k), norm_(normalize), gs_(gs), bits_(bits), dgs_(down_gs), dbits_(down_bits),
        hidden_(hidden) {}
  void eval_cpu(const std::vector<mx::array>& in, mx::array& out) override {
    auto& enc = expert_task(stream(), in, out);
    const int D = in[0].shape(-1), E = in[1].shape(-1), M = (int)(in[0].size() / D), N = out.shape(-1);
    const int k = k_, H = hidden_, gs = gs_, bits = bits_, dgs = dgs_, dbits = dbits_, path = best_path();
    const bool normalize = norm_;
    const View xv(in[0]), lv(in[1]);
    auto run = [=, yp = out.data<float>()](const auto& gu, const auto& dn) {
      // buffers of the stream's thread, kept between layers and steps (fewer mallocs a step)
      thread_local std::vector<float> xb, lb, ys[2], yd, scores, e;
      thread_local std::vector<uint32_t> ids, sorted_ids;
      thread_local std::vector<int> order, order2, pos;
      const int P = M * k;
      ids.resize(P);
      sorted_ids.resize(P);
      scores.resize(P);
      route_rows(lv.gather(lb), M, E, k, normalize, ids.data(), scores.data());
      experts_product(path, gu, xv.gather(xb), k, ids.data(), P, H, D, gs, bits, M, order, ys);
      std::vector<float>& h = ys[0];
      {
        e.resize(h.size());
        for (size_t i = 0; i < e.size(); i++) e[i] = -h[i];
        exp_inplace(e.data(), e.size());
        for (size_t i = 0; i < e.size(); i++) h[i] = h[i] / (1.f + e[i]) * ys[1][i];
      }
      // h's rows are grouped by expert already: the down product keeps their order
      for (int i = 0; i < P; i++) sorted_ids[i] = ids[order[i]];
      experts_product(path, dn, h.data(), 1, sorted_ids.data(), P, N, H, dgs, dbits, M, order2, &yd);
      pos.resize(P);
      for (int i = 0; i < P; i++) pos[order[order2[i]]] = i;
      for (int m = 0; m < M; m++) {
        float* y = yp + (size_t)m * N;
        for (int j = 0; j < k; j++) {
          const float s = scores[(size_t)m * k + j];
          const float* v = yd.data() + (size_t)pos[m * k + j] * N;
          if (j == 0) for (int i = 0; i < N; i++) y[i] = v[i] * s;
          else for (int i = 0; i < N; i++) y[i] += v[i] * s;
        }
      }
    };
    by_scale_type(in[3].dtype(), [&](auto tag) {
      using S = decltype(tag);
      ExpertWeights<S> gu, dn;
      gu.E = dn.E = E;
      gu.nw = 2;
      dn.nw = 1;
      for (int w = 0; w < 3; w++) {
        ExpertWeights<S>& ew = w < 2 ? gu : dn;
        const int slot = w < 2 ? w : 0;
        ew.W[slot] = (const uint8_t*)in[2 + 3 * w].data<uint32_t>();
        ew.SC[slot] = in[3 + 3 * w].data<S>();
        ew.BI[slot] = in[4 + 3 * w].data<S>();
      }
      enc.dispatch([=] { run(gu, dn); });
    });
  }
  void eval_gpu(const std::vector<mx::array>&, mx::array&) override { throw std::runtime_error("CPU only"); }
  const char* name() const override { return "MoeBlock"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const MoeBlock&>(other);
    return k_ == o.k_ && norm_ == o.norm_ && gs_ == o.gs_ && bits_ == o.bits_ && dgs_ == o.dgs_ &&
           dbits_ == o.dbits_ && hidden_ == o.hidden_;
  }

 private:
  int k_;
  bool norm_;
  int gs_, bits_, dgs_, dbits_, hidden_;
};

// x (..., D) float32, logits (..., E) float32 (the router's product); gate and up (E experts,
// hidden rows each) and down (E, D rows each) packed as gather_qmm_rows takes them.
// sum over the top k experts e of p_e * down_e(silu(gate_e x) * up_e x) -> (..., D).
static mx::array moe_swiglu(const mx::array& x, const mx::array& logits, int k, bool normalize, const mx::array& wg,
                            const mx::array& sg, const mx::array& bg, const mx::array& wu, const mx::array& su,
                            const mx::array& bu, const mx::array& wd, const mx::array& sd, const mx::array& bd,
                            int group_size, int bits, int down_group_size, int down_bits, int hidden, int n) {
  const int E = wg.ndim() == 3 ? wg.shape(0) : 0;
  if (logits.dtype() != mx::float32 || logits.ndim() < 1 || logits.shape(-1) != E || x.ndim() < 1 ||
      (long)(logits.size() / E) != (long)(x.size() / std::max(1, x.shape(-1))))
    throw std::invalid_argument("[moe_swiglu] logits: float32 (..., experts), a row per row of x");
  if (k < 1 || k > E) throw std::invalid_argument("[moe_swiglu] k must be 1 .. experts");
  const mx::array ids = mx::zeros({1, k}, mx::int32);  // for the shape checks only
  const mx::array row = mx::zeros({1, x.shape(-1)}, mx::float32);
  check_experts(row, ids, wg, sg, bg, group_size, bits, hidden);
  check_experts(row, ids, wu, su, bu, group_size, bits, hidden);
  check_experts(mx::zeros({1, k, hidden}, mx::float32), ids, wd, sd, bd, down_group_size, down_bits, n);
  if (wg.shape() != wu.shape() || sg.dtype() != su.dtype())
    throw std::invalid_argument("[moe_swiglu] gate and up differ in shape or scale dtype");
  if (x.dtype() != mx::float32) throw std::invalid_argument("[moe_swiglu] x must be float32");
  if (wd.shape(0) != E || sd.dtype() != sg.dtype())
    throw std::invalid_argument("[moe_swiglu] down differs from gate in experts or scale dtype");
  auto shape = x.shape();
  shape.back() = n;
  return mx::array(shape, mx::float32,
                   std::make_shared<MoeBlock>(mx::to_stream({}), k, normalize, group_size, bits, down_group_size,
                                              down_bits, hidden),
                   {x, logits, wg, sg, bg, wu, su, bu, wd, sd, bd});
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

// cap * tanh(x / cap) (gemma2's logit soft-capping) as one op: tanh(u) = 1 - 2 / (exp(2u) + 1)
// through the vectorized exp, where MLX's divide, scalar tanh and multiply were three passes.
class SoftCap : public mx::UnaryPrimitive {
 public:
  SoftCap(mx::Stream s, float cap) : mx::UnaryPrimitive(s), cap_(cap) {}
  void eval_cpu(const std::vector<mx::array>& in, mx::array& out) override {
    const mx::array& x = in[0];
    out.set_data(mx::allocator::malloc(out.nbytes()));
    auto& enc = mx::cpu::get_command_encoder(stream());
    enc.set_input_array(x); enc.set_output_array(out);
    enc.dispatch([v = View(x), yp = out.data<float>(), n = (size_t)x.size(), cap = cap_] {
      std::vector<float> buf;
      const float* xp = v.gather(buf);
      for (size_t i = 0; i < n; i++) yp[i] = 2.f * xp[i] / cap;
      exp_inplace(yp, n);
      for (size_t i = 0; i < n; i++) yp[i] = cap * (1.f - 2.f / (yp[i] + 1.f));
    });
  }
  void eval_gpu(const std::vector<mx::array>&, mx::array&) override { throw std::runtime_error("CPU only"); }
  const char* name() const override { return "SoftCap"; }
  bool is_equivalent(const mx::Primitive& o) const override { return cap_ == static_cast<const SoftCap&>(o).cap_; }

 private:
  float cap_;
};

static mx::array softcap(const mx::array& x, float cap) {
  if (x.dtype() != mx::float32 || !(cap > 0.f)) throw std::invalid_argument("[softcap] float32 x and cap > 0");
  return mx::array(x.shape(), mx::float32, std::make_shared<SoftCap>(mx::to_stream({}), cap), {x});
}

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


// ---- embedding rows from the packed tiles ---------------------------------------------------------
// A tied embedding multiplies as the output head through its packed tiles; looking its rows up
// there too saves keeping MLX's copy (SmolLM2: 32 MB).

class PackedRows : public mx::UnaryPrimitive {
 public:
  PackedRows(mx::Stream s, int group_size, int bits) : mx::UnaryPrimitive(s), gs_(group_size), bits_(bits) {}
  void eval_cpu(const std::vector<mx::array>& in, mx::array& out) override {
    const mx::array &ids = in[0], &w = in[1], &sc = in[2], &bi = in[3];
    out.set_data(mx::allocator::malloc(out.nbytes()));
    auto& enc = mx::cpu::get_command_encoder(stream());
    for (auto& a : in) enc.set_input_array(a);
    enc.set_output_array(out);
    const int K = out.shape(-1), gs = gs_, bits = bits_;
    const long rows = 8L * w.shape(0);
    // ids (possibly strided) are read when the task runs, once they are computed
    auto run = [=, ip = ids.data<int32_t>(), count = ids.size(), shape = ids.shape(), strides = ids.strides(),
                wp = (const uint8_t*)w.data<uint32_t>(), yp = out.data<float>()](auto s, auto b) {
      using S = std::remove_const_t<std::remove_pointer_t<decltype(s)>>;
      for (size_t r = 0; r < count; r++) {
        const long n = ip[mx::elem_to_loc((int)r, shape, strides)];
        if (n < 0 || n >= rows) { std::fill_n(yp + r * K, K, NAN); continue; }
        if (bits == 4) dequantize_row<4, S>(wp, s, b, n, K, gs, yp + r * K);
        else dequantize_row<8, S>(wp, s, b, n, K, gs, yp + r * K);
      }
    };
    by_scale_type(sc.dtype(), [&](auto tag) {
      using S = decltype(tag);
      enc.dispatch([=, s = sc.data<S>(), b = bi.data<S>()] { run(s, b); });
    });
  }
  void eval_gpu(const std::vector<mx::array>&, mx::array&) override { throw std::runtime_error("CPU only"); }
  const char* name() const override { return "PackedRows"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const PackedRows&>(other);
    return gs_ == o.gs_ && bits_ == o.bits_;
  }

 private:
  int gs_, bits_;
};

// Rows ids (any shape, integers) of the weight packed by pack(): ids.shape + (K,) float32.
static mx::array packed_rows(const mx::array& ids, const mx::array& w, const mx::array& scales,
                             const mx::array& biases, int group_size, int bits) {
  if ((bits != 4 && bits != 8) || (group_size != 32 && group_size != 64))
    throw std::invalid_argument("[packed_rows] bits 4 or 8, group_size 32 or 64");
  if (w.ndim() != 2 || w.dtype() != mx::uint32 || scales.ndim() != 3 || scales.shape(0) != w.shape(0) ||
      biases.shape() != scales.shape() || (long)w.shape(1) * 4 / bits != (long)scales.shape(1) * group_size)
    throw std::invalid_argument("[packed_rows] w, scales and biases as pack() makes them");
  if (!mx::issubdtype(ids.dtype(), mx::integer)) throw std::invalid_argument("[packed_rows] integer ids");
  auto s = mx::to_stream({});
  auto shape = ids.shape();
  shape.push_back(w.shape(1) * 4 / bits);
  return mx::array(shape, mx::float32, std::make_shared<PackedRows>(s, group_size, bits),
                   {mx::astype(ids, mx::int32, s), w, scales, biases});
}

// ---- decode attention ------------------------------------------------------------------------
// One query token a sequence (decode): softmax(scale q.k + mask) v for every head as one op, in
// place of the CPU fallback of mx.fast.scaled_dot_product_attention (a GQA reshape, two matmuls
// of one row per head through BLAS, a mask op and a softmax: ~7 ops a layer). Sums over the
// keys run in key order, one key at a time, so masked (left-padded) keys add exact zeros and a
// sequence gets the same bits alone or in a batch.

struct Strided4 {  // a 4-d float view: shape and strides in elements
  const float* p;
  int64_t s[4];
  int n[4];
  explicit Strided4(const mx::array& a) : p(a.data<float>()) {
    for (int i = 0; i < 4; i++) { s[i] = a.strides()[i]; n[i] = a.shape(i); }
  }
};

static inline float dot_row(const float* a, const float* b, int D) {
  int d = 0;
  float t = 0.f;
#if defined(__AVX2__) && defined(__FMA__)
  __m256 acc = _mm256_setzero_ps();
  for (; d + 8 <= D; d += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), _mm256_loadu_ps(b + d), acc);
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_movehdup_ps(h));
  t = _mm_cvtss_f32(h);
#endif
  for (; d < D; d++) t = std::fma(a[d], b[d], t);
  return t;
}

static inline void axpy_row(float a, const float* x, float* y, int D) {
  int d = 0;
#if defined(__AVX2__) && defined(__FMA__)
  const __m256 va = _mm256_set1_ps(a);
  for (; d + 8 <= D; d += 8) _mm256_storeu_ps(y + d, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + d), _mm256_loadu_ps(y + d)));
#endif
  for (; d < D; d++) y[d] = std::fma(a, x[d], y[d]);
}

class DecodeAttention : public mx::UnaryPrimitive {
 public:
  DecodeAttention(mx::Stream s, float scale, int mask_kind, float softcap)
      : mx::UnaryPrimitive(s), scale_(scale), mask_(mask_kind), softcap_(softcap) {}
  void eval_cpu(const std::vector<mx::array>& in, mx::array& out) override {
    out.set_data(mx::allocator::malloc(out.nbytes()));
    auto& enc = mx::cpu::get_command_encoder(stream());
    for (auto& a : in) enc.set_input_array(a);
    enc.set_output_array(out);
    const Strided4 q(in[0]), k(in[1]), v(in[2]);
    // the mask as (B, H, 1, S) with stride 0 where it broadcasts
    const void* mp = nullptr;
    int64_t ms[4] = {0, 0, 0, 0};
    if (mask_) {
      const mx::array& m = in[3];
      mp = mask_ == 1 ? (const void*)m.data<bool>() : (const void*)m.data<float>();
      for (int i = 0; i < 4; i++) ms[i] = m.shape(i) == 1 ? 0 : m.strides()[i];
    }
    enc.dispatch([=, yp = out.data<float>(), scale = scale_, kind = mask_, cap = softcap_] {
      const int B = q.n[0], H = q.n[1], D = q.n[3], Hk = k.n[1], S = k.n[2], Dv = v.n[3];
      const int group = H / Hk;
      std::vector<float> w(S);
      for (int b = 0; b < B; b++)
        for (int h = 0; h < H; h++) {
          const float* qp = q.p + b * q.s[0] + h * q.s[1];
          const float* kp = k.p + b * k.s[0] + (h / group) * k.s[1];
          const float* vp = v.p + b * v.s[0] + (h / group) * v.s[1];
          float top = -INFINITY;
          for (int j = 0; j < S; j++) {
            float x = scale * dot_row(qp, kp + j * k.s[2], D);
            if (cap > 0.f) x = cap * std::tanh(x / cap);
            if (kind == 1) {
              if (!((const bool*)mp)[b * ms[0] + h * ms[1] + j * ms[3]]) x = -INFINITY;
            } else if (kind == 2) {
              x += ((const float*)mp)[b * ms[0] + h * ms[1] + j * ms[3]];
            }
            w[j] = x;
            top = std::fmax(top, x);
          }
          float* y = yp + ((size_t)b * H + h) * Dv;
          std::fill_n(y, Dv, 0.f);
          float total = 0.f;
          for (int j = 0; j < S; j++) w[j] = top == -INFINITY ? -INFINITY : w[j] - top;
          exp_inplace(w.data(), S);
          for (int j = 0; j < S; j++) {
            const float e = w[j];
            total += e;
            if (e != 0.f) axpy_row(e, vp + j * v.s[2], y, Dv);
          }
          const float inv = total > 0.f ? 1.f / total : 0.f;
          for (int d = 0; d < Dv; d++) y[d] *= inv;
        }
    });
  }
  void eval_gpu(const std::vector<mx::array>&, mx::array&) override { throw std::runtime_error("CPU only"); }
  const char* name() const override { return "DecodeAttention"; }
  bool is_equivalent(const mx::Primitive& other) const override {
    auto& o = static_cast<const DecodeAttention&>(other);
    return scale_ == o.scale_ && mask_ == o.mask_ && softcap_ == o.softcap_;
  }

 private:
  float scale_;
  int mask_;  // 0 none, 1 bool (true: attend), 2 additive float
  float softcap_;  // > 0: scores become softcap * tanh(scores / softcap) before the mask (gemma2)
};

// mx.fast.scaled_dot_product_attention for one query token: q (B, H, 1, D), k (B, Hk, S, D),
// v (B, Hk, S, Dv) float32 with unit last strides, H a multiple of Hk; mask None or a 4-d bool
// or float32 array broadcastable to (B, H, 1, S).
static mx::array decode_attention(const mx::array& q, const mx::array& k, const mx::array& v, float scale,
                                  std::optional<mx::array> mask, float softcap) {
  for (const auto* a : {&q, &k, &v})
    if (a->dtype() != mx::float32 || a->ndim() != 4)
      throw std::invalid_argument("[decode_attention] float32 q, k, v of 4 dimensions");
  const int B = q.shape(0), H = q.shape(1), Hk = k.shape(1), S = k.shape(2);
  if (q.shape(2) != 1 || k.shape(0) != B || v.shape(0) != B || v.shape(1) != Hk || v.shape(2) != S ||
      k.shape(3) != q.shape(3) || Hk == 0 || H % Hk)
    throw std::invalid_argument("[decode_attention] shapes: q (B, H, 1, D), k (B, Hk, S, D), v (B, Hk, S, Dv)");
  auto s = mx::to_stream({});
  std::vector<mx::array> inputs = {q, k, v};
  for (auto& a : inputs)
    if (a.strides().back() != 1 && a.shape(-1) > 1) a = mx::contiguous(a, false, s);
  int kind = 0;
  if (mask) {
    const mx::array& m = *mask;
    if (m.ndim() != 4 || (m.dtype() != mx::bool_ && m.dtype() != mx::float32) || m.shape(2) != 1 ||
        (m.shape(0) != 1 && m.shape(0) != B) || (m.shape(1) != 1 && m.shape(1) != H) || m.shape(3) != S)
      throw std::invalid_argument("[decode_attention] mask: bool or float32, broadcastable to (B, H, 1, S)");
    kind = m.dtype() == mx::bool_ ? 1 : 2;
    inputs.push_back(m);
  }
  return mx::array({B, H, 1, v.shape(3)}, mx::float32, std::make_shared<DecodeAttention>(s, scale, kind, softcap),
                   inputs);
}

}  // namespace qk

NB_MODULE(_qmm, m) {
  m.def("qmm_rows", &qk::qmm_rows, nb::arg("x"), nb::arg("w"), nb::arg("scales"), nb::arg("biases"),
        nb::arg("group_size"), nb::arg("bits"), nb::arg("path") = -1, nb::arg("tiles") = -1, nb::arg("n") = -1,
        "x (..., K) float32 times the affine-quantized w (n, K), packed by pack(), transposed: (..., n).\n"
        "tiles: 1 dequantized tiles and BLAS, 0 the int8 kernels, -1 tiles from blas_rows() rows on");
  m.def("qmm_swiglu", &qk::qmm_swiglu, nb::arg("x"), nb::arg("gate_w"), nb::arg("gate_scales"),
        nb::arg("gate_biases"), nb::arg("up_w"), nb::arg("up_scales"), nb::arg("up_biases"), nb::arg("group_size"),
        nb::arg("bits"), nb::arg("n") = -1, nb::arg("gelu") = false,
        "silu(x @ gate.T) * (x @ up.T) (gelu: gelu_approx for silu) with both weights packed by pack(): one CPU op, "
        "int8 products");
  m.def("gather_qmm_rows", &qk::gather_qmm_rows, nb::arg("x"), nb::arg("indices"), nb::arg("w"), nb::arg("scales"),
        nb::arg("biases").none(), nb::arg("group_size"), nb::arg("bits"), nb::arg("n") = -1, nb::arg("path") = -1,
        nb::arg("mode") = "affine",
        "mx.gather_qmm for the experts' weights, each packed by pack() and stacked: x (..., K) float32 with a row\n"
        "per index or per index row, indices (..., k) -> indices.shape + (n,). mode: affine or mxfp4 (no biases)");
  m.def("gather_swiglu", &qk::gather_swiglu, nb::arg("x"), nb::arg("indices"), nb::arg("gate_w"),
        nb::arg("gate_scales"), nb::arg("gate_biases"), nb::arg("up_w"), nb::arg("up_scales"), nb::arg("up_biases"),
        nb::arg("group_size"), nb::arg("bits"), nb::arg("n") = -1, nb::arg("path") = -1,
        "silu(gather_qmm_rows(gate)) * gather_qmm_rows(up): the experts' SwiGLU as one CPU op");
  m.def("moe_swiglu", &qk::moe_swiglu, nb::arg("x"), nb::arg("logits"), nb::arg("k"), nb::arg("normalize"),
        nb::arg("gate_w"), nb::arg("gate_scales"), nb::arg("gate_biases"), nb::arg("up_w"), nb::arg("up_scales"),
        nb::arg("up_biases"), nb::arg("down_w"), nb::arg("down_scales"), nb::arg("down_biases"),
        nb::arg("group_size"), nb::arg("bits"), nb::arg("down_group_size"), nb::arg("down_bits"), nb::arg("hidden"),
        nb::arg("n"),
        "a qwen3moe block after its router: softmax, top k, each chosen expert's SwiGLU and down product, and\n"
        "their probability-weighted sum, as one CPU op");
  m.def("softcap", &qk::softcap, nb::arg("x"), nb::arg("cap"), "cap * tanh(x / cap) as one CPU op (float32)");
  m.def("rms_norm", &qk::rms_norm, nb::arg("x"), nb::arg("weight"), nb::arg("eps"),
        "mx.fast.rms_norm as one CPU op (float32)");
  m.def("rope", &qk::rope, nb::arg("x"), nb::arg("dims"), nb::arg("traditional"), nb::arg("base"),
        nb::arg("scale"), nb::arg("offset"), "mx.fast.rope as one CPU op (float32, default frequencies)");
  m.def("packed_rows", &qk::packed_rows, nb::arg("ids"), nb::arg("w"), nb::arg("scales"), nb::arg("biases"),
        nb::arg("group_size"), nb::arg("bits"), "rows ids of a weight packed by pack(), as float32 (an embedding lookup)");
  m.def("decode_attention", &qk::decode_attention, nb::arg("q"), nb::arg("k"), nb::arg("v"), nb::arg("scale"),
        nb::arg("mask").none() = nb::none(), nb::arg("softcap") = 0.f,
        "mx.fast.scaled_dot_product_attention for one query token a sequence, as one CPU op (float32); "
        "softcap > 0: gemma2's softcap * tanh(scores / softcap) before the mask");
  m.def("blas_rows", [] { return qk::BLAS_ROWS; }, "products of this many rows or more use tiles and BLAS");
  m.def("set_blas_rows", [](int rows) { qk::BLAS_ROWS = rows; }, "for measurements: the tile threshold");
  m.def("has_blas", [] { return qk::blas_sgemm() != nullptr; },
        "whether products of blas_rows rows or more go through dequantized tiles and cblas_sgemm");
  m.def("best_path", &qk::best_path, "0 scalar, 1 AVX2, 2 AVX-512 VNNI: the fastest path this CPU runs");
  m.def("vnni_note", [] { qk::best_path(); return qk::vnni_note; }, "whether the AVX-512 VNNI path is used, or why not");
  m.def("thread_macs", [] { return qk::THREAD_MACS; }, "products of fewer multiply-adds stay on the calling thread");
  m.def("set_thread_macs", [](long macs) { qk::THREAD_MACS = macs; },
        "for measurements: products of fewer multiply-adds stay on the calling thread");
  m.def("set_thread_rows", [](long rows) { qk::THREAD_ROWS = rows; },
        "products of fewer rows stay on the calling thread");
  m.def("start_threads", [](int threads, int spin_us) { qk::pool.start(threads, spin_us); },
        "helper threads for large products (once; later calls do nothing)");
  m.def("sharing", [] { return qk::pool.helpers > 0 && qk::pool.alone.load() == 0; },
        "whether products are shared with helper threads now (not backed off on a busy machine)");
  m.def("stats", [] { return nb::make_tuple(qk::calls.load(), qk::cycles.load()); },
        "(products run, TSC cycles inside them)");
  m.def("tsc", [] { return (uint64_t)__rdtsc(); }, "the time-stamp counter, to scale stats()");
}
