"""A ``cblas_sgemm`` for the few-row products of decoding, in front of OpenBLAS.

A decode step multiplies one activation row per running sequence by every weight matrix of the
model. OpenBLAS answers a GEMM with few rows by packing the weight panel first, so a few rows
cost far more than one (benchmarks/results/history-cpu.md). The kernels here stream each weight
element once, from memory straight into AVX-512 FMAs against every row at once, with no packing.

The C source is generated below (every accumulator a named variable: GCC 12 spills arrays of
``__m512`` to the stack on every iteration) and compiled on first use with the system C compiler
(``-O3 -march=native``) into a cache directory keyed by the source, compiler and CPU. No compiler,
no AVX-512 or a failed build: :func:`build` returns ``None`` and OpenBLAS serves every call, as
before. ``backend.configure_blas`` loads the library ``RTLD_GLOBAL`` ahead of OpenBLAS and
``libmlx.so``, so libmlx's undefined ``cblas_sgemm`` resolves here, then hands it OpenBLAS's
``cblas_sgemm`` for everything it does not take: more than :data:`MAX_ROWS` rows (prefill),
transposed A, column-major.

Large products are shared with helper threads (:func:`threads`), which claim column chunks.
Every output element is still one 16-lane accumulation along K in the same order, then the same
reduction, whatever the number of rows or threads: a sequence decodes to the same bits alone or
in a batch.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from ...config import ENV_SMALL_GEMM, CpuSettings
from .machine import cpu_count, cpu_flags

MAX_ROWS = 16  # NUM_PARALLEL's default: every decode step of a full batch comes here
_NN_ROWS = 8  # untransposed B: rows handled per pass
_ACCUMULATORS = 24  # of AVX-512's 32 registers; the rest hold loaded weights and activations
SPIN_US = 300  # a helper's wake-up costs more than the gap between two products of a step


def threads() -> int:
    """Threads per product: ``MLXSERVE_GEMM_THREADS``, else every usable core, at most 4 (a
    cautious cap: more cores than 2 have not been tried)."""
    if (setting := CpuSettings.from_env().gemm_threads) is not None:
        return setting
    return max(1, min(4, cpu_count()))


def _nt_width(rows: int) -> int:
    return max(1, min(4, _ACCUMULATORS // rows))


def _nn_width(rows: int) -> int:
    return max(1, min(6, _ACCUMULATORS // rows))


_HEAD = r"""
#define _GNU_SOURCE /* pthread_setname_np */
#include <stddef.h>
#include <stdint.h>
#include <pthread.h>
#include <unistd.h>
#include <sys/syscall.h>
#include <linux/futex.h>
#include <x86intrin.h>
#ifndef __AVX512F__
#error "needs AVX-512F"
#endif
#include <immintrin.h>

enum { RowMajor = 101, NoTrans = 111 };
typedef void (*sgemm_fn)(int, int, int, int, int, int, float, const float *, int, const float *,
                         int, float, float *, int);
typedef void (*block_fn)(int, int, float, const float *, int, const float *, int, float, float *,
                         int);
static sgemm_fn fallback = 0;
static int max_rows = 0;
static uint64_t taken = 0, passed = 0, helped = 0;

uint64_t mlxserve_sgemm_taken(void) { return __atomic_load_n(&taken, __ATOMIC_RELAXED); }
uint64_t mlxserve_sgemm_passed(void) { return __atomic_load_n(&passed, __ATOMIC_RELAXED); }
uint64_t mlxserve_sgemm_helped(void) { return __atomic_load_n(&helped, __ATOMIC_RELAXED); }

static inline void put(float *c, float v, float alpha, float beta) {
    v *= alpha;
    *c = beta != 0.0f ? v + beta * *c : v;
}
static inline void put16(float *c, __m512 acc, __mmask16 mk, float alpha, float beta) {
    acc = _mm512_mul_ps(acc, _mm512_set1_ps(alpha));
    if (beta != 0.0f) acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mk, c), _mm512_set1_ps(beta), acc);
    _mm512_mask_storeu_ps(c, mk, acc);
}
"""

# Helper threads share the large products: the caller and the helpers claim chunks of the
# output's columns from one counter, so a helper that the OS has not scheduled costs nothing
# (the caller takes every chunk itself; a forked child, which has no helpers, likewise). The
# counter holds the job's sequence number in its high half, so a late helper can never claim a
# chunk of a newer job with an older job's arguments. A helper spins for a while after each job (a decode step calls in bursts), then
# sleeps on a futex. Two cores reading weights double the bandwidth of one on the project
# machine (two processes streaming at once each kept their one-process speed).
_TAIL = r"""
typedef struct {
    block_fn fn; int nt; int N, K, chunk, nchunks; float alpha; const float *A; int lda;
    const float *B; int ldb; float beta; float *C; int ldc;
} job_t;
static job_t job;
static uint64_t ticket = 0;      /* (sequence << 32) | next chunk */
static uint32_t finished = 0;    /* chunks finished in the current job */
static uint32_t wake_word = 0, sleeping = 0;
static uint32_t seq = 0;
static int helper_on = 0;
static long min_bytes = 1 << 19; /* smaller products are not worth a second thread */
static uint64_t spin_cycles = 0;

static void run_chunk(const job_t *j, int c) {
    int n0 = c * j->chunk;
    int n = j->N - n0 < j->chunk ? j->N - n0 : j->chunk;
    const float *b = j->nt ? j->B + (size_t)n0 * j->ldb : j->B + n0;
    j->fn(n, j->K, j->alpha, j->A, j->lda, b, j->ldb, j->beta, j->C + n0, j->ldc);
}

/* Claim and run chunks of job `s` until none is left; returns how many this thread ran. */
static int work(uint32_t s) {
    int ran = 0;
    for (;;) {
        uint64_t t = __atomic_load_n(&ticket, __ATOMIC_ACQUIRE);
        if ((uint32_t)(t >> 32) != s) return ran;
        int c = (int)(uint32_t)t;
        job_t local = job; /* consistent: job is rewritten only after every chunk is claimed */
        if (c >= local.nchunks) return ran;
        if (!__atomic_compare_exchange_n(&ticket, &t, t + 1, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
            continue;
        run_chunk(&local, c);
        __atomic_fetch_add(&finished, 1, __ATOMIC_RELEASE);
        ran++;
    }
}

static void *helper(void *arg) {
    (void)arg;
    uint32_t seen = 0;
    for (;;) {
        uint64_t start = __rdtsc();
        uint32_t s;
        while ((s = (uint32_t)(__atomic_load_n(&ticket, __ATOMIC_ACQUIRE) >> 32)) == seen) {
            if (__rdtsc() - start < spin_cycles) { _mm_pause(); continue; }
            uint32_t w = __atomic_load_n(&wake_word, __ATOMIC_SEQ_CST);
            __atomic_fetch_add(&sleeping, 1, __ATOMIC_SEQ_CST);
            if ((uint32_t)(__atomic_load_n(&ticket, __ATOMIC_SEQ_CST) >> 32) == seen)
                syscall(SYS_futex, &wake_word, FUTEX_WAIT_PRIVATE, w, NULL, NULL, 0);
            __atomic_fetch_sub(&sleeping, 1, __ATOMIC_SEQ_CST);
            start = __rdtsc();
        }
        seen = s;
        if (work(s)) __atomic_fetch_add(&helped, 1, __ATOMIC_RELAXED);
    }
    return NULL;
}

/* threads: the caller plus threads-1 helpers; spin_us: how long a helper stays awake after a
   job. Called once, before any product. */
void mlxserve_sgemm_set_fallback(sgemm_fn fn, int rows, int threads, int spin_us) {
    fallback = fn;
    max_rows = rows;
    if (threads < 2 || helper_on) return;
    uint64_t t0 = __rdtsc();
    usleep(2000);
    spin_cycles = (__rdtsc() - t0) / 2000 * (uint64_t)spin_us;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    for (int i = 1; i < threads; i++) {
        pthread_t th;
        if (pthread_create(&th, &attr, helper, NULL) == 0) {
            pthread_setname_np(th, "mlxserve-gemm"); /* so /proc and profilers can tell it */
            helper_on++;
        }
    }
    pthread_attr_destroy(&attr);
}

/* Jobs come from one thread at a time (MLX's CPU stream thread); a second caller meanwhile
   runs its product alone. */
static int busy = 0;

static void shared(block_fn fn, int nt, int width, int N, int K, float alpha, const float *A,
                   int lda, const float *B, int ldb, float beta, float *C, int ldc) {
    int expected = 0;
    if (!helper_on || (long)N * K * 4 < min_bytes
        || !__atomic_compare_exchange_n(&busy, &expected, 1, 0, __ATOMIC_ACQUIRE, __ATOMIC_RELAXED)) {
        fn(N, K, alpha, A, lda, B, ldb, beta, C, ldc);
        return;
    }
    /* ~128 KiB of weights a chunk, a whole number of kernel widths */
    int chunk = (int)((128 * 1024) / ((long)K * 4));
    chunk = chunk < width ? width : chunk - chunk % width;
    job.fn = fn; job.nt = nt; job.N = N; job.K = K; job.chunk = chunk;
    job.nchunks = (N + chunk - 1) / chunk;
    job.alpha = alpha; job.A = A; job.lda = lda; job.B = B; job.ldb = ldb; job.beta = beta;
    job.C = C; job.ldc = ldc;
    __atomic_store_n(&finished, 0, __ATOMIC_RELAXED);
    uint32_t s = ++seq;
    __atomic_store_n(&ticket, (uint64_t)s << 32, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(&sleeping, __ATOMIC_SEQ_CST)) {
        __atomic_fetch_add(&wake_word, 1, __ATOMIC_SEQ_CST);
        syscall(SYS_futex, &wake_word, FUTEX_WAKE_PRIVATE, helper_on, NULL, NULL, 0);
    }
    work(s);
    while (__atomic_load_n(&finished, __ATOMIC_ACQUIRE) < (uint32_t)job.nchunks) _mm_pause();
    __atomic_store_n(&busy, 0, __ATOMIC_RELEASE);
}

/* TSC cycles spent inside cblas_sgemm, all callers: how docs/performance.md splits a step into
   products and the rest. */
static uint64_t cycles = 0;
uint64_t mlxserve_sgemm_cycles(void) { return __atomic_load_n(&cycles, __ATOMIC_RELAXED); }
static void sgemm(int order, int transa, int transb, int M, int N, int K, float alpha,
                  const float *A, int lda, const float *B, int ldb, float beta, float *C, int ldc);
void cblas_sgemm(int order, int transa, int transb, int M, int N, int K, float alpha,
                 const float *A, int lda, const float *B, int ldb, float beta, float *C, int ldc) {
    uint64_t t0 = __rdtsc();
    sgemm(order, transa, transb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
    __atomic_fetch_add(&cycles, __rdtsc() - t0, __ATOMIC_RELAXED);
}
static void sgemm(int order, int transa, int transb, int M, int N, int K, float alpha,
                  const float *A, int lda, const float *B, int ldb, float beta, float *C, int ldc) {
    if (order != RowMajor || transa != NoTrans || M < 1 || M > max_rows || N < 1 || K < 1) {
        __atomic_fetch_add(&passed, 1, __ATOMIC_RELAXED);
        fallback(order, transa, transb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
        return;
    }
    __atomic_fetch_add(&taken, 1, __ATOMIC_RELAXED);
    int nt = transb != NoTrans;
    int step = nt ? NT_ROWS : NN_ROWS;
    /* Rows of A are re-read for every weight row: past L1 (48 KiB here) two 8-row passes over
       the weights beat one (16 rows, K=1536, one thread: 534-567 us vs 677-684). */
    if (nt && (long)M * K * 4 > 48 * 1024) step = 8;
    for (int m0 = 0; m0 < M; m0 += step) {
        int rows = M - m0 < step ? M - m0 : step;
        shared(nt ? nt_blocks[rows] : nn_blocks[rows], nt, nt ? nt_widths[rows] : 16,
               N, K, alpha, A + (size_t)m0 * lda, lda, B, ldb, beta, C + (size_t)m0 * ldc, ldc);
    }
}
"""


def _fma_rows(rows: int, width: int, a_value) -> list[str]:
    """c[i][j] += a(i) * b[j] for every row i (``a_value(i)``: the C expression of row i's
    operand) and every loaded weight vector b0..b{width-1}: the body both kernels share."""
    out = []
    for i in range(rows):
        out.append(f"        {{ __m512 a = {a_value(i)};")
        out += [f"          c{i}_{j} = _mm512_fmadd_ps(a, b{j}, c{i}_{j});" for j in range(width)]
        out.append("        }")
    return out


def _nt_kernel(rows: int, width: int) -> str:
    """C[0:rows, 0:width] from ``width`` rows of B^T (nn.Linear's weight: contiguous along K)."""
    acc = [(i, j) for i in range(rows) for j in range(width)]

    def step(load: str) -> list[str]:
        out = [f"        __m512 b{j} = {load.format(f'w{j} + k')};" for j in range(width)]
        return out + _fma_rows(rows, width, lambda i: load.format(f"a{i} + k"))

    return "\n".join(
        [
            f"static void nt_{rows}_{width}(int K, float alpha, const float *A, int lda, const float *W, int ldb, float beta, float *C, int ldc) {{",
            *[f"    const float *w{j} = W + (size_t){j} * ldb;" for j in range(width)],
            *[f"    const float *a{i} = A + (size_t){i} * lda;" for i in range(rows)],
            *[f"    __m512 c{i}_{j} = _mm512_setzero_ps();" for i, j in acc],
            "    int k = 0;",
            "    for (; k + 16 <= K; k += 16) {",
            # 8 KiB ahead of each weight stream (the next rows' data, past the end of this row):
            # faster than 1 KiB at 8 rows, and no distance from 3 to 32 KiB did better.
            *[f"        _mm_prefetch((const char *)(w{j} + k + 2048), _MM_HINT_T0);" for j in range(width)],
            *step("_mm512_loadu_ps({})"),
            "    }",
            "    if (k < K) {",
            "        __mmask16 mk = (__mmask16)((1u << (K - k)) - 1u);",
            *step("_mm512_maskz_loadu_ps(mk, {})"),
            "    }",
            *[f"    put(C + (size_t){i} * ldc + {j}, _mm512_reduce_add_ps(c{i}_{j}), alpha, beta);" for i, j in acc],
            "}",
        ]
    )


def _nt_driver(rows: int) -> str:
    w = _nt_width(rows)
    tail = (
        f"    for (; n < N; n++) nt_{rows}_1(K, alpha, A, lda, B + (size_t)n * ldb, ldb, beta, C + n, ldc);"
        if w > 1
        else ""
    )
    return "\n".join(
        [
            f"static void nt_{rows}(int N, int K, float alpha, const float *A, int lda, const float *B, int ldb, float beta, float *C, int ldc) {{",
            "    int n = 0;",
            f"    for (; n + {w} <= N; n += {w}) nt_{rows}_{w}(K, alpha, A, lda, B + (size_t)n * ldb, ldb, beta, C + n, ldc);",
            tail,
            "}",
        ]
    )


def _nn_kernel(rows: int, width: int, masked: bool) -> str:
    """C[0:rows, 0:16*width] from B row-major along N; the masked one is a single tail block."""
    name = f"nn_{rows}_{'m' if masked else width}"
    load = "_mm512_maskz_loadu_ps(mk, b + {})" if masked else "_mm512_loadu_ps(b + {})"
    acc = [(i, j) for i in range(rows) for j in range(width)]
    body = [f"        __m512 b{j} = {load.format(16 * j)};" for j in range(width)]
    body += _fma_rows(rows, width, lambda i: f"_mm512_set1_ps(a{i}[k])")
    mask = "mk" if masked else "(__mmask16)0xFFFF"
    return "\n".join(
        [
            f"static void {name}(int K, float alpha, const float *A, int lda, const float *B, int ldb, float beta, float *C, int ldc{', __mmask16 mk' if masked else ''}) {{",
            *[f"    const float *a{i} = A + (size_t){i} * lda;" for i in range(rows)],
            *[f"    __m512 c{i}_{j} = _mm512_setzero_ps();" for i, j in acc],
            "    const float *b = B;",
            "    for (int k = 0; k < K; k++, b += ldb) {",
            "        _mm_prefetch((const char *)(b + (size_t)8 * ldb), _MM_HINT_T0);",
            *body,
            "    }",
            *[f"    put16(C + (size_t){i} * ldc + {16 * j}, c{i}_{j}, {mask}, alpha, beta);" for i, j in acc],
            "}",
        ]
    )


def _nn_driver(rows: int) -> str:
    w = _nn_width(rows)
    return "\n".join(
        [
            f"static void nn_{rows}(int N, int K, float alpha, const float *A, int lda, const float *B, int ldb, float beta, float *C, int ldc) {{",
            "    int n = 0;",
            f"    for (; n + {16 * w} <= N; n += {16 * w}) nn_{rows}_{w}(K, alpha, A, lda, B + n, ldb, beta, C + n, ldc);",
            "    for (; n < N; n += 16) {",
            "        int left = N - n;",
            f"        nn_{rows}_m(K, alpha, A, lda, B + n, ldb, beta, C + n, ldc, left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1u));",
            "    }",
            "}",
        ]
    )


def c_source() -> str:
    parts = [_HEAD]
    for rows in range(1, MAX_ROWS + 1):
        if _nt_width(rows) > 1:
            parts.append(_nt_kernel(rows, 1))  # the driver's tail
        parts += [_nt_kernel(rows, _nt_width(rows)), _nt_driver(rows)]
    for rows in range(1, _NN_ROWS + 1):
        parts += [_nn_kernel(rows, _nn_width(rows), False), _nn_kernel(rows, 1, True), _nn_driver(rows)]
    table = lambda kind, n: ", ".join(["0"] + [f"{kind}_{r}" for r in range(1, n + 1)])  # noqa: E731
    parts += [
        f"#define NT_ROWS {MAX_ROWS}\n#define NN_ROWS {_NN_ROWS}",
        f"static const block_fn nt_blocks[] = {{{table('nt', MAX_ROWS)}}};",
        f"static const block_fn nn_blocks[] = {{{table('nn', _NN_ROWS)}}};",
        "static const int nt_widths[] = {" + ", ".join(str(_nt_width(max(r, 1))) for r in range(MAX_ROWS + 1)) + "};",
        _TAIL,
    ]
    return "\n\n".join(parts)


# --- build -------------------------------------------------------------------------------------

CFLAGS = ["-O3", "-march=native", "-shared", "-fPIC"]


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")


def unavailable_reason() -> str | None:
    """Why the kernels cannot be built here (None: they can)."""
    if not CpuSettings.from_env().small_gemm:
        return f"{ENV_SMALL_GEMM}=off"
    if not sys.platform.startswith("linux") or platform.machine() not in ("x86_64", "AMD64"):
        return "not x86-64 Linux"
    if "avx512f" not in cpu_flags().split():
        return "no AVX-512 on this CPU"
    if _compiler() is None:
        return "no C compiler (cc)"
    return None


def build() -> tuple[Path | None, str]:
    """The compiled library (built now, or found in the cache) and what happened."""
    why = unavailable_reason()
    if why:
        return None, why
    cc = _compiler()
    source = c_source()
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"compiler unusable: {exc}"
    key = hashlib.sha256("\0".join([source, version, " ".join(CFLAGS), cpu_flags()]).encode())
    target = CpuSettings.from_env().cache_dir / f"smallgemm-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target, "cached"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            src = Path(tmp) / "smallgemm.c"
            src.write_text(source)
            out = Path(tmp) / "smallgemm.so"
            done = subprocess.run([cc, *CFLAGS, "-o", str(out), str(src)], capture_output=True, text=True, timeout=300)
            if done.returncode != 0:
                return None, f"build failed: {done.stderr.strip()[-300:]}"
            os.replace(out, target)  # atomic: concurrent builders write the same bytes
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"build failed: {exc}"
    return target, "built"
