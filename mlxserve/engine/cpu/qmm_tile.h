// The decode kernel over the packed tiles (qmm.cpp), included once per instruction set: the
// includer defines QK_ISA (a name suffix) and the integer steps QK_ACC4(sum, w, x) (4 bits: u8
// weights by s8 x into the running sum), QK_FINISH4(sum) (that sum as 8 int32 lanes) and
// QK_ACC8(sum, |w|, x with w's sign) (8 bits, int32 lanes). Every path gives the same int32
// sums, then the same float arithmetic: the same bits.

// R activation rows (from m0) by one tile of 8 weight rows; out: R x 8 floats.
template <int BITS, typename S, int R>
static inline void QK_CAT(tile, QK_ISA)(const uint8_t* wt, const S* sc, const S* bi, int gs, const Acts& a, int m0,
                             float* out) {
  const int K = a.K, nb = a.nblocks, ng = a.ngroups, bpg = gs / 32;
  const __m256i m4 = _mm256_set1_epi8(15);
  const int8_t* xq = a.q.data() + (size_t)m0 * K;
  const float* dx = a.d.data() + (size_t)m0 * nb;
  __m256 acc[R];
  for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
  for (int b = 0; b < nb; b++) {
    const uint8_t* wb = wt + (size_t)b * tile_block_bytes(BITS);
    const int8_t* xb = xq + b * 32;
    __m256i isum[R];
    for (int r = 0; r < R; r++) isum[r] = _mm256_setzero_si256();
    if (BITS == 4) {
      // 16-bit partial sums: at most 8 x 2 x 15 x 127 = 30480 a lane over the block
#pragma GCC unroll 4
      for (int v = 0; v < 4; v++) {
        const __m256i raw = _mm256_loadu_si256((const __m256i*)(wb + v * 32));
        const __m256i lo = _mm256_and_si256(raw, m4), hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4);
        for (int r = 0; r < R; r++) {
          const int8_t* x = xb + (size_t)r * K;
          isum[r] = QK_ACC4(isum[r], lo, bcast4(x + 4 * v));
          isum[r] = QK_ACC4(isum[r], hi, bcast4(x + 16 + 4 * v));
        }
      }
      for (int r = 0; r < R; r++) isum[r] = QK_FINISH4(isum[r]);
    } else if (BITS == FP4) {
      // codes to twice their value (|w| <= 12) by a table, w's sign moved onto x; 16-bit
      // partial sums: at most 8 x 2 x 12 x 127 = 24384 a lane over the block
      const __m256i lut = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)FP4_TWICE));
#pragma GCC unroll 4
      for (int v = 0; v < 4; v++) {
        const __m256i raw = _mm256_loadu_si256((const __m256i*)(wb + v * 32));
        const __m256i wl = _mm256_shuffle_epi8(lut, _mm256_and_si256(raw, m4));
        const __m256i wh = _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4));
        const __m256i al = _mm256_sign_epi8(wl, wl), ah = _mm256_sign_epi8(wh, wh);
        for (int r = 0; r < R; r++) {
          const int8_t* x = xb + (size_t)r * K;
          isum[r] = QK_ACC4(isum[r], al, _mm256_sign_epi8(bcast4(x + 4 * v), wl));
          isum[r] = QK_ACC4(isum[r], ah, _mm256_sign_epi8(bcast4(x + 16 + 4 * v), wh));
        }
      }
      for (int r = 0; r < R; r++) isum[r] = QK_FINISH4(isum[r]);
    } else {
      // q - 128 signed: |w| as the unsigned operand, w's sign moved onto x
#pragma GCC unroll 8
      for (int j = 0; j < 8; j++) {
        const __m256i w = _mm256_loadu_si256((const __m256i*)(wb + j * 32));
        const __m256i wabs = _mm256_sign_epi8(w, w);
        for (int r = 0; r < R; r++) {
          isum[r] = QK_ACC8(isum[r], wabs, _mm256_sign_epi8(bcast4(xb + (size_t)r * K + 4 * j), w));
        }
      }
    }
    const int g = b / bpg;
    const __m256 s = load8(sc + g * 8);
    for (int r = 0; r < R; r++)
      acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(s, _mm256_set1_ps(dx[(size_t)r * nb + b])),
                               _mm256_cvtepi32_ps(isum[r]), acc[r]);
    if (BITS != FP4 && b % bpg == bpg - 1) {
      __m256 bias = load8(bi + g * 8);
      if (BITS == 8) bias = _mm256_fmadd_ps(_mm256_set1_ps(128.f), s, bias);
      for (int r = 0; r < R; r++)
        acc[r] = _mm256_fmadd_ps(bias, _mm256_set1_ps(a.sum[(size_t)(m0 + r) * ng + g]), acc[r]);
    }
  }
  for (int r = 0; r < R; r++) _mm256_storeu_ps(out + r * 8, acc[r]);
}

template <int BITS, typename S>
static void QK_CAT(tiles, QK_ISA)(const uint8_t* W, const S* SC, const S* BI, int t0, int t1, int gs, const Acts& a,
                       float* Y, int N) {
  const int nb = a.nblocks, ng = a.ngroups, M = a.M;
  alignas(32) float out[4 * 8];
  // rows in groups of 16 (their int8 copy stays in L1 while the chunk's tiles pass by, from L2)
  for (int m0 = 0; m0 < M; m0 += 16)
  for (int t = t0; t < t1; t++) {
    const uint8_t* wt = W + (size_t)t * nb * tile_block_bytes(BITS);
    const S* sc = SC + (size_t)t * ng * 8;
    const S* bi = BI + (size_t)t * ng * 8;
    const int cols = std::min(8, N - 8 * t);
    for (int m = m0; m < std::min(M, m0 + 16); m += 4) {
      const int R = std::min(4, std::min(M, m0 + 16) - m);
      switch (R) {
        case 4: QK_CAT(tile, QK_ISA)<BITS, S, 4>(wt, sc, bi, gs, a, m, out); break;
        case 3: QK_CAT(tile, QK_ISA)<BITS, S, 3>(wt, sc, bi, gs, a, m, out); break;
        case 2: QK_CAT(tile, QK_ISA)<BITS, S, 2>(wt, sc, bi, gs, a, m, out); break;
        default: QK_CAT(tile, QK_ISA)<BITS, S, 1>(wt, sc, bi, gs, a, m, out); break;
      }
      for (int r = 0; r < R; r++) std::memcpy(Y + (size_t)(m + r) * N + 8 * t, out + r * 8, cols * sizeof(float));
    }
  }
}
