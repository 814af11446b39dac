/* sha256-x2.c: SHA-256 of two 4 KiB blocks at once with the x86 SHA
 * extensions (sha256-x2.h).
 *
 * One SHA-256 stream is a chain of dependent sha256rnds2 instructions: the
 * unit waits on each result.  Two independent streams interleaved keep it
 * busy, so two blocks cost little more than one (OpenSSL hashes one
 * buffer at a time).  Written from the FIPS 180-4 definition and the
 * instructions' documented semantics: the state is kept as the pair
 * (A,B,E,F) / (C,D,G,H) the instructions use; each group of four rounds
 * adds four schedule words and their constants, and the schedule is
 * extended four words at a time (sha256msg1, the W[t-7] term, sha256msg2).
 * A 4 KiB message is 64 blocks of data and one constant padding block. */
#include "sha256-x2.h"

#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include <cpuid.h>
#include <immintrin.h>

#define TARGET __attribute__((target("sha,sse4.1,ssse3")))

static const uint32_t K[64] = {
  0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
  0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
  0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
  0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
  0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
  0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
  0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
  0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
};

static const uint32_t H0[8] = {
  0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19,
};

/* The last block of every 4 KiB message: 0x80, zeros, and the length in
 * bits (32768) as a 64-bit big-endian number. */
static const uint8_t PAD[64] __attribute__((aligned(16))) = {
  0x80, [62] = 0x80, [63] = 0x00,
};

/* (state0, state1) = (A,B,E,F), (C,D,G,H) from H[0..7]. */
TARGET static void load_state(const uint32_t *h, __m128i *s0, __m128i *s1)
{
  __m128i abcd = _mm_loadu_si128((const __m128i *) (const void *) h);
  __m128i efgh = _mm_loadu_si128((const __m128i *) (const void *) (h + 4));
  __m128i cdab = _mm_shuffle_epi32(abcd, 0xB1);
  efgh = _mm_shuffle_epi32(efgh, 0x1B);                   /* H G F E -> lanes */
  *s0 = _mm_alignr_epi8(cdab, efgh, 8);                   /* A B E F */
  *s1 = _mm_blend_epi16(efgh, cdab, 0xF0);                /* C D G H */
}

TARGET static void store_digest(__m128i s0, __m128i s1, uint8_t out[32])
{
  const __m128i bswap = _mm_set_epi64x(0x0c0d0e0f08090a0bLL, 0x0405060700010203LL);
  __m128i feba = _mm_shuffle_epi32(s0, 0x1B);
  __m128i dchg = _mm_shuffle_epi32(s1, 0xB1);
  __m128i abcd = _mm_blend_epi16(feba, dchg, 0xF0);
  __m128i efgh = _mm_alignr_epi8(dchg, feba, 8);
  _mm_storeu_si128((__m128i *) (void *) out, _mm_shuffle_epi8(abcd, bswap));
  _mm_storeu_si128((__m128i *) (void *) (out + 16), _mm_shuffle_epi8(efgh, bswap));
}

/* Schedule words 4g..4g+3 from the previous four groups. */
#define EXTEND(w, g)                                                          \
  w[(g) & 3] = _mm_sha256msg2_epu32(                                          \
    _mm_add_epi32(_mm_sha256msg1_epu32(w[(g) & 3], w[((g) + 1) & 3]),         \
                  _mm_alignr_epi8(w[((g) + 3) & 3], w[((g) + 2) & 3], 4)),    \
    w[((g) + 3) & 3])

#define ROUNDS4(s0, s1, wg, g)                                                \
  do {                                                                        \
    __m128i m_ = _mm_add_epi32(wg, _mm_loadu_si128((const __m128i *) (const void *) &K[4 * (g)])); \
    s1 = _mm_sha256rnds2_epu32(s1, s0, m_);                                   \
    s0 = _mm_sha256rnds2_epu32(s0, s1, _mm_shuffle_epi32(m_, 0x0E));          \
  } while (0)

/* One 64-byte block into two states at once (pa, pb: the two messages). */
TARGET static void compress2(__m128i *a0, __m128i *a1, __m128i *b0, __m128i *b1,
                             const uint8_t *pa, const uint8_t *pb)
{
  const __m128i bswap = _mm_set_epi64x(0x0c0d0e0f08090a0bLL, 0x0405060700010203LL);
  __m128i wa[4], wb[4];
  __m128i sa0 = *a0, sa1 = *a1, sb0 = *b0, sb1 = *b1;
  for (int g = 0; g < 4; g++) {
    wa[g] = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *) (const void *) (pa + 16 * g)), bswap);
    wb[g] = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *) (const void *) (pb + 16 * g)), bswap);
    ROUNDS4(sa0, sa1, wa[g], g);
    ROUNDS4(sb0, sb1, wb[g], g);
  }
#pragma GCC unroll 12
  for (int g = 4; g < 16; g++) {
    EXTEND(wa, g);
    EXTEND(wb, g);
    ROUNDS4(sa0, sa1, wa[g & 3], g);
    ROUNDS4(sb0, sb1, wb[g & 3], g);
  }
  *a0 = _mm_add_epi32(*a0, sa0);
  *a1 = _mm_add_epi32(*a1, sa1);
  *b0 = _mm_add_epi32(*b0, sb0);
  *b1 = _mm_add_epi32(*b1, sb1);
}

TARGET static void sha256_x2_ni(const uint8_t *a, const uint8_t *b, uint8_t outa[32],
                                uint8_t outb[32])
{
  __m128i a0, a1, b0, b1;
  load_state(H0, &a0, &a1);
  b0 = a0;
  b1 = a1;
  for (size_t off = 0; off < SHA256_X2_BLOCK; off += 64)
    compress2(&a0, &a1, &b0, &b1, a + off, b + off);
  compress2(&a0, &a1, &b0, &b1, PAD, PAD);
  store_digest(a0, a1, outa);
  store_digest(b0, b1, outb);
}

bool sha256_x2_available(void)
{
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  bool sha = b & (1u << 29);
  if (!__get_cpuid(1, &a, &b, &c, &d)) return false;
  bool sse41 = c & (1u << 19), ssse3 = c & (1u << 9);
  return sha && sse41 && ssse3;
}

void sha256_x2(const uint8_t *a, const uint8_t *b, uint8_t outa[32], uint8_t outb[32])
{
  sha256_x2_ni(a, b, outa, outb);
}

#else

bool sha256_x2_available(void) { return false; }

void sha256_x2(const uint8_t *a, const uint8_t *b, uint8_t outa[32], uint8_t outb[32])
{
  (void) a; (void) b;
  memset(outa, 0, 32);
  memset(outb, 0, 32);
}

#endif
