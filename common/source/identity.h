/* identity.h: who the source is (invariant I5, "right source").
 *
 * The proxy records a source identity in its bitmap file and, on every
 * later start, compares it with the identity of the source it reaches.  A
 * cache made from one image must never be completed from another, nor
 * from the same image after it was edited: the cached blocks would mix
 * two contents without anyone noticing.
 *
 * IDENTITY STRINGS (at most SOURCE_ID_MAX bytes, space-separated words)
 *
 *   export=NAME size=N xnbd-id=HEX32 gen=G [id-from=stat]
 *       The source is an xnbd-server that publishes a per-image identity
 *       in its export description ("xnbd-image-id=HEX32 gen=G", see
 *       common/store/image-id.h).  gen changes when the image was changed
 *       while no xnbd-server served it; writes THROUGH the server (a VM's
 *       own writes) do not change it.  id-from=stat: the server could not
 *       keep an identity record (read-only directory) and derived the id
 *       from the file's metadata, which any write changes.
 *
 *   export=NAME size=N sample=HEX64
 *       Any other source: SHA-256 over SOURCE_ID_SAMPLES blocks of 4 KiB
 *       read at offsets that depend only on the size (evenly spread, always
 *       including the first and the last block), each preceded by its
 *       offset and length.  This catches another image of the same size
 *       and edits of the sampled blocks; it cannot catch an edit elsewhere,
 *       nor tell apart two clones of one template that differ only outside
 *       the samples.
 *
 *   export=NAME size=N
 *       Legacy: what older proxies recorded.  Accepted against a current
 *       identity with the same export and size, with a warning.
 *
 *   Anything else (a --source-id given by the operator) is compared byte
 *   for byte.  NAME is the export name as the source reports it (canonical
 *   name if it has one); a name longer than SOURCE_ID_NAME_MAX bytes, or
 *   one that contains a space or a control character, is recorded as
 *   export-sha256=HEX64 instead, so the words stay parseable.
 *
 * FALSE ALARMS of the sample check, and the rule the engine applies
 *
 *   The samples compare CONTENT, so they differ whenever the source was
 *   written since the identity was recorded -- legitimately so while the
 *   proxy is in --standby (the VM still runs at the source site and writes
 *   its disk; the proxy keeps nothing), and for a source that is itself a
 *   live proxy or any NBD server a VM writes through.  (The xnbd image id
 *   does not have this problem: writes through xnbd-server keep gen.)  So
 *   the engine:
 *
 *   1. compares only when the bitmap has blocks present (fetched or
 *      written) and, for a SAMPLED identity, only when the proxy is not in
 *      standby (an xnbd image id stays comparable in standby); an EMPTY
 *      bitmap whose identity does not match is simply started over with
 *      the current identity (logged at info level: nothing is lost);
 *   2. when standby ends ('xnbd-ctl activate' or the first write), takes
 *      the identity again and records it (the source is frozen from then
 *      on), so a restart later in the migration compares against the
 *      content the cache was filled from;
 *   3. on a mismatch with blocks present, refuses to start, printing the
 *      bitmap path, the why text of source_identity_match, and the fixes:
 *      --clear-bitmap to start over, or --source-id 'RECORDED' to use the
 *      cache anyway (the operator asserts it is the same source);
 *   4. with --source-id ID, records / compares ID instead of the computed
 *      identity (byte for byte through source_identity_match);
 *   5. after a match, keeps the RECORDED string in the bitmap (a legacy or
 *      renamed-export match must not fail bitmap_open's byte comparison);
 *   6. checks a new address given to 'reconnect' the same way before using
 *      it.
 */
#ifndef XNBD_SOURCE_IDENTITY_H
#define XNBD_SOURCE_IDENTITY_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct nbd_handle;

#define SOURCE_ID_MAX        1024   /* = BITMAP_SOURCE_ID_MAX */
#define SOURCE_ID_SAMPLES    16
#define SOURCE_ID_SAMPLE_LEN 4096
#define SOURCE_ID_NAME_MAX   256

/* The identity of the source on h, a CONNECTED libnbd handle (ready, in
 * the transmission phase; nbd_set_full_info(h, true) set before connecting,
 * or the export description is not received) whose export is size bytes.
 * Synchronous: reads the samples (all in flight at once: one round trip)
 * only when the source publishes no xnbd image id, waiting at most
 * timeout_s seconds.  Returns 0 with the NUL-terminated identity in id
 * (idlen >= SOURCE_ID_MAX + 1 is always enough), or -1 with a message in
 * err (a failed read: the caller cannot check the source and must not
 * proceed as if it had). */
int source_identity(struct nbd_handle *h, uint64_t size, unsigned timeout_s,
                    char *id, size_t idlen, char *err, size_t errlen);

/* Without any I/O (for reconnects, on the fetcher's event loop): the
 * identity of the source on h when it publishes an xnbd image id.
 * Returns 1 with it in id, 0 when the source publishes none (checking
 * it needs source_identity's sample reads), -1 if idlen is too small.
 * A reconnect to an xnbd-server should be matched against the identity
 * recorded at start-up: a source server restarted on an edited image
 * mid-migration then shows a new generation. */
int source_identity_quick(struct nbd_handle *h, uint64_t size, char *id, size_t idlen);

/* Whether recorded (from the bitmap) and current (from source_identity,
 * or --source-id) name the same source.  why receives, NUL-terminated:
 * on false, one sentence saying exactly what differs (size / export /
 * image id / generation / sampled blocks / kind of identity), without
 * the fix (the caller adds it); on true, "" or a warning to log (a legacy
 * recorded identity accepted on export and size alone, or the same image
 * served under another export name). */
bool source_identity_match(const char *recorded, const char *current,
                           char *why, size_t whylen);

/* The sampled identity's parts, for sources read some other way (e.g.
 * xnbd-digest reading the image file): the sample blocks of an export of
 * size bytes (returns n <= SOURCE_ID_SAMPLES; block i is len[i] bytes at
 * off[i]), and the HEX of "sample=HEX" from those blocks' bytes buf[i]
 * (len[i] of each used).  hex receives 64 hex digits and a NUL.  Returns
 * 0, or -1 (OpenSSL failed). */
unsigned source_sample_layout(uint64_t size, uint64_t off[SOURCE_ID_SAMPLES],
                              uint32_t len[SOURCE_ID_SAMPLES]);
int source_sample_hash(unsigned n, const uint64_t *off, const uint32_t *len,
                       const unsigned char (*buf)[SOURCE_ID_SAMPLE_LEN], char hex[65]);

enum source_id_kind {
  SOURCE_ID_OTHER,      /* not one of ours: compared byte for byte */
  SOURCE_ID_LEGACY,     /* export=NAME size=N */
  SOURCE_ID_XNBD,       /* ... xnbd-id=HEX gen=G */
  SOURCE_ID_SAMPLED,    /* ... sample=HEX */
};
/* What kind of identity id is (the engine skips a sampled comparison in
 * standby; an xnbd one stays valid there). */
enum source_id_kind source_identity_kind(const char *id);

#endif
