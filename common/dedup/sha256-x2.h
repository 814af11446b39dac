/* sha256-x2.h: SHA-256 of two 4 KiB blocks at once, with the x86 SHA
 * extensions where the CPU has them (about twice OpenSSL's rate for one
 * buffer on such CPUs: the two hash chains fill the unit's latency).
 * Callers check sha256_x2_available() once and use OpenSSL otherwise. */
#ifndef XNBD_SHA256_X2_H
#define XNBD_SHA256_X2_H

#include <stdbool.h>
#include <stdint.h>

#define SHA256_X2_BLOCK 4096

/* Whether this CPU has SHA-NI, SSSE3 and SSE4.1 (x86-64 only). */
bool sha256_x2_available(void);

/* The digests of the 4096-byte messages a and b.  Only when available. */
void sha256_x2(const uint8_t *a, const uint8_t *b, uint8_t outa[32], uint8_t outb[32]);

#endif
