/* identity.c: the source identity the proxy records and checks (I5);
 * formats and rules in identity.h. */
#include "identity.h"
#include "util.h"

#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>

#include <libnbd.h>
#include <openssl/evp.h>
#include <openssl/sha.h>

#define DESC_KEY "xnbd-image-id="

static void to_hex(const unsigned char *b, size_t n, char *out)
{
  for (size_t i = 0; i < n; i++)
    sprintf(out + 2 * i, "%02x", b[i]);
}

static bool is_lower_hex(const char *s, size_t n)
{
  for (size_t i = 0; i < n; i++)
    if (!((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'f'))) return false;
  return true;
}

static bool parse_u64(const char *s, size_t n, uint64_t *v)
{
  uint64_t x = 0;
  if (n == 0 || n > 20) return false;
  for (size_t i = 0; i < n; i++) {
    if (s[i] < '0' || s[i] > '9') return false;
    if (x > (UINT64_MAX - (s[i] - '0')) / 10) return false;
    x = x * 10 + (s[i] - '0');
  }
  *v = x;
  return true;
}

/* The "export=..." word for a name: raw when it is short and has no space
 * or control character, else its SHA-256. */
static void export_word(const char *name, size_t len, char *out, size_t outlen)
{
  bool plain = len <= SOURCE_ID_NAME_MAX;
  for (size_t i = 0; plain && i < len; i++)
    if ((unsigned char) name[i] <= 0x20 || name[i] == 0x7f) plain = false;
  if (plain) {
    snprintf(out, outlen, "export=%.*s", (int) len, name);
  } else {
    unsigned char md[SHA256_DIGEST_LENGTH];
    char hex[2 * SHA256_DIGEST_LENGTH + 1];
    SHA256((const unsigned char *) name, len, md);
    to_hex(md, sizeof md, hex);
    snprintf(out, outlen, "export-sha256=%s", hex);
  }
}

/* ---------- parsing identity strings ---------- */

struct parsed {
  char exp[SOURCE_ID_MAX + 32];   /* normalized export word */
  uint64_t size;
  bool has_xid, derived, has_sample;
  char xid[33];
  uint64_t gen;
  char sample[65];
};

/* Splits id into its words from the right: the trailing known words, each
 * at most once; what precedes them is "export=NAME" (NAME may hold spaces
 * in a legacy identity) or "export-sha256=HEX". */
static enum source_id_kind parse(const char *id, struct parsed *p)
{
  size_t end = strlen(id);
  bool have_size = false, have_gen = false, have_from = false;
  memset(p, 0, sizeof *p);
  for (;;) {
    size_t start = end;
    while (start > 0 && id[start - 1] != ' ') start--;
    if (start == 0) break;                  /* the first word: the export */
    const char *w = id + start;
    size_t n = end - start;
#define KEY(k) (n > sizeof k - 1 && memcmp(w, k, sizeof k - 1) == 0)
#define VAL (w + vk), (n - vk)
    size_t vk;
    if (KEY("size=") && !have_size) {
      vk = 5;
      if (!parse_u64(VAL, &p->size)) return SOURCE_ID_OTHER;
      have_size = true;
    } else if (KEY("xnbd-id=") && !p->has_xid) {
      vk = 8;
      if (n - vk != 32 || !is_lower_hex(VAL)) return SOURCE_ID_OTHER;
      memcpy(p->xid, w + vk, 32);
      p->has_xid = true;
    } else if (KEY("gen=") && !have_gen) {
      vk = 4;
      if (!parse_u64(VAL, &p->gen)) return SOURCE_ID_OTHER;
      have_gen = true;
    } else if (KEY("id-from=") && !have_from) {
      vk = 8;
      if (n - vk != 4 || memcmp(w + vk, "stat", 4) != 0) return SOURCE_ID_OTHER;
      p->derived = have_from = true;
    } else if (KEY("sample=") && !p->has_sample) {
      vk = 7;
      if (n - vk != 64 || !is_lower_hex(VAL)) return SOURCE_ID_OTHER;
      memcpy(p->sample, w + vk, 64);
      p->has_sample = true;
    } else {
      break;                                /* part of a legacy name */
    }
#undef KEY
#undef VAL
    end = start - 1;                        /* drop the word and its space */
    if (have_size) break;                   /* size= follows the export */
  }
  if (!have_size || p->has_xid != have_gen || (have_from && !p->has_xid) ||
      (p->has_xid && p->has_sample))
    return SOURCE_ID_OTHER;
  /* The export word(s): id[0, end). */
  if (end > 14 && memcmp(id, "export-sha256=", 14) == 0) {
    if (end != 14 + 64 || !is_lower_hex(id + 14, 64)) return SOURCE_ID_OTHER;
    snprintf(p->exp, sizeof p->exp, "%.*s", (int) end, id);
  } else if (end >= 7 && memcmp(id, "export=", 7) == 0) {
    export_word(id + 7, end - 7, p->exp, sizeof p->exp);
  } else {
    return SOURCE_ID_OTHER;
  }
  if (p->has_xid) return SOURCE_ID_XNBD;
  if (p->has_sample) return SOURCE_ID_SAMPLED;
  return SOURCE_ID_LEGACY;
}

enum source_id_kind source_identity_kind(const char *id)
{
  struct parsed p;
  return id ? parse(id, &p) : SOURCE_ID_OTHER;
}

/* ---------- matching ---------- */

/* Copies s for a message: at most 200 bytes, control characters as '?'. */
static const char *shown(const char *s, char *buf, size_t len)
{
  size_t i = 0;
  for (; s[i] && i + 1 < len && i < 200; i++)
    buf[i] = ((unsigned char) s[i] < 0x20 || s[i] == 0x7f) ? '?' : s[i];
  buf[i] = '\0';
  if (s[i] && len > 4 && i + 4 < len) strcpy(buf + i, "...");
  return buf;
}

static bool say(char *why, size_t whylen, bool result, const char *fmt, ...)
  __attribute__((format(printf, 4, 5)));
static bool say(char *why, size_t whylen, bool result, const char *fmt, ...)
{
  va_list ap;
  if (why && whylen) {
    va_start(ap, fmt);
    vsnprintf(why, whylen, fmt, ap);
    va_end(ap);
  }
  return result;
}

static const char *derived_note(const struct parsed *a, const struct parsed *b)
{
  return a->derived || b->derived ?
    " (an image id derived from file metadata, id-from=stat, changes with "
    "any write to the image, even through the server, and with some "
    "reboots: the server could not keep IMAGE.xnbd-id next to the image)" : "";
}

bool source_identity_match(const char *recorded, const char *current,
                           char *why, size_t whylen)
{
  struct parsed r, c;
  enum source_id_kind kr, kc;
  char b1[256], b2[256];

  if (why && whylen) why[0] = '\0';
  if (!recorded || !current)
    return say(why, whylen, false, "no source identity to compare");
  if (strcmp(recorded, current) == 0) return true;
  kr = parse(recorded, &r);
  kc = parse(current, &c);
  if (kr == SOURCE_ID_OTHER || kc == SOURCE_ID_OTHER)
    return say(why, whylen, false, "the bitmap records the source identity "
               "\"%s\", but the source's identity is \"%s\"",
               shown(recorded, b1, sizeof b1), shown(current, b2, sizeof b2));
  if (r.size != c.size)
    return say(why, whylen, false, "the source's size differs: the bitmap was "
               "made for a source of %" PRIu64 " bytes, this source has %" PRIu64
               " bytes", r.size, c.size);
  bool same_export = strcmp(r.exp, c.exp) == 0;
  if (kr == SOURCE_ID_XNBD && kc == SOURCE_ID_XNBD) {
    if (strcmp(r.xid, c.xid) != 0)
      return say(why, whylen, false, "a different image: the bitmap was made "
                 "from xnbd-server image id %s, the source serves image id %s "
                 "(another image file, or the same file replaced, restored or "
                 "copied, or its IMAGE.xnbd-id deleted)%s", r.xid, c.xid,
                 derived_note(&r, &c));
    if (r.gen != c.gen)
      return say(why, whylen, false, "the same image (id %s), but its "
                 "generation changed from %" PRIu64 " to %" PRIu64 ": it was "
                 "modified while no xnbd-server was serving it (edited behind "
                 "the server's back), so the cached blocks may be stale",
                 r.xid, r.gen, c.gen);
    if (!same_export)
      return say(why, whylen, true, "note: the same image (id %s, generation "
                 "%" PRIu64 ") is now served as %s (was %s)", r.xid, r.gen,
                 shown(c.exp, b2, sizeof b2), shown(r.exp, b1, sizeof b1));
    return true;                 /* e.g. only the word order or a note differs */
  }
  if (!same_export)
    return say(why, whylen, false, "another export: the bitmap was made for "
               "%s, the source is %s", shown(r.exp, b1, sizeof b1),
               shown(c.exp, b2, sizeof b2));
  if (kr == SOURCE_ID_LEGACY)
    return say(why, whylen, true, "warning: the bitmap records only the export "
               "name and size of its source (it was made by an older "
               "xnbd-proxy), so whether this is the same image cannot be "
               "checked: accepted on name and size alone");
  if (kc == SOURCE_ID_LEGACY)
    return say(why, whylen, false, "the bitmap records a full identity (%s) but "
               "the source's identity names only its export and size",
               kr == SOURCE_ID_XNBD ? "an xnbd-server image id" : "sampled blocks");
  if (kr == SOURCE_ID_XNBD)
    return say(why, whylen, false, "the bitmap was made from an xnbd-server "
               "image (id %s, generation %" PRIu64 "), but this source publishes "
               "no image id (another kind of server, or xnbd-server "
               "--image-id=off), so it cannot be shown to be the same image",
               r.xid, r.gen);
  if (kc == SOURCE_ID_XNBD)
    return say(why, whylen, false, "the bitmap was made from a source that "
               "published no image id (identified by sampled blocks), but this "
               "source is an xnbd-server image (id %s), so it cannot be shown "
               "to be the same image", c.xid);
  /* Both sampled. */
  if (strcmp(r.sample, c.sample) != 0)
    return say(why, whylen, false, "the sampled blocks differ (%d blocks of "
               "%d bytes at fixed offsets, including the first and the last): "
               "another image of the same size, or this image was written "
               "since the cache was made", SOURCE_ID_SAMPLES, SOURCE_ID_SAMPLE_LEN);
  return true;
}

/* ---------- computing the identity of a connected source ---------- */

/* The description's image id, if it carries one: "xnbd-image-id=HEX32"
 * and "gen=N" words, optionally "id-from=stat"; other words ignored. */
static bool desc_image_id(const char *d, char *hex, uint64_t *gen, bool *derived)
{
  bool have_id = false, have_gen = false;
  *derived = false;
  while (d && *d) {
    size_t n;
    while (*d == ' ') d++;
    n = strcspn(d, " ");
    if (n == sizeof DESC_KEY - 1 + 32 && memcmp(d, DESC_KEY, sizeof DESC_KEY - 1) == 0 &&
        is_lower_hex(d + sizeof DESC_KEY - 1, 32)) {
      memcpy(hex, d + sizeof DESC_KEY - 1, 32);
      hex[32] = '\0';
      have_id = true;
    } else if (n > 4 && memcmp(d, "gen=", 4) == 0 && parse_u64(d + 4, n - 4, gen)) {
      have_gen = true;
    } else if (n == 12 && memcmp(d, "id-from=stat", 12) == 0) {
      *derived = true;
    }
    d += n;
  }
  return have_id && have_gen;
}

/* One read buffer shared by the sample reads; freed when the last of us
 * and libnbd lets go (libnbd runs .free exactly once per command, also
 * when the handle is closed with the command still pending). */
struct samples {
  unsigned refs, done;
  int err;
  unsigned char buf[SOURCE_ID_SAMPLES][SOURCE_ID_SAMPLE_LEN];
};

static void samples_unref(void *user_data)
{
  struct samples *s = user_data;
  if (--s->refs == 0) free(s);
}

static int sample_done(void *user_data, int *error)
{
  struct samples *s = user_data;
  if (*error && !s->err) s->err = *error;
  s->done++;
  return 1;
}

/* Offset of sample i of n over nblk blocks: evenly spread, first and last
 * included, distinct when nblk >= n. */
static uint64_t sample_block(unsigned i, unsigned n, uint64_t nblk)
{
  if (n < 2) return 0;
  /* i * (nblk - 1) / (n - 1) without overflow for any nblk. */
  uint64_t q = (nblk - 1) / (n - 1), r = (nblk - 1) % (n - 1);
  return i * q + (i * r) / (n - 1);
}

unsigned source_sample_layout(uint64_t size, uint64_t off[SOURCE_ID_SAMPLES],
                              uint32_t len[SOURCE_ID_SAMPLES])
{
  uint64_t nblk = size / SOURCE_ID_SAMPLE_LEN + (size % SOURCE_ID_SAMPLE_LEN != 0);
  unsigned n = (unsigned) MIN(nblk, (uint64_t) SOURCE_ID_SAMPLES);
  for (unsigned i = 0; i < n; i++) {
    off[i] = sample_block(i, n, nblk) * SOURCE_ID_SAMPLE_LEN;
    len[i] = (uint32_t) MIN((uint64_t) SOURCE_ID_SAMPLE_LEN, size - off[i]);
  }
  return n;
}

int source_sample_hash(unsigned n, const uint64_t *off, const uint32_t *len,
                       const unsigned char (*buf)[SOURCE_ID_SAMPLE_LEN], char hex[65])
{
  unsigned char md[SHA256_DIGEST_LENGTH];
  unsigned mdlen = 0;
  EVP_MD_CTX *ctx = EVP_MD_CTX_new();
  bool ok = ctx && EVP_DigestInit_ex(ctx, EVP_sha256(), NULL) &&
            EVP_DigestUpdate(ctx, "xnbd-sample-v1", 14);
  for (unsigned i = 0; ok && i < n; i++) {
    unsigned char hdr[12];
    put_be64(hdr, off[i]);
    put_be32(hdr + 8, len[i]);
    ok = EVP_DigestUpdate(ctx, hdr, sizeof hdr) &&
         EVP_DigestUpdate(ctx, buf[i], len[i]);
  }
  ok = ok && EVP_DigestFinal_ex(ctx, md, &mdlen) && mdlen == sizeof md;
  EVP_MD_CTX_free(ctx);
  if (!ok) return -1;
  to_hex(md, sizeof md, hex);
  return 0;
}

static int sample_digest(struct nbd_handle *h, uint64_t size, unsigned timeout_s,
                         char *hex, char *err, size_t errlen)
{
  uint64_t off[SOURCE_ID_SAMPLES];
  uint32_t len[SOURCE_ID_SAMPLES];
  unsigned n = source_sample_layout(size, off, len), issued = 0;
  uint64_t deadline = now_ns() + (uint64_t) (timeout_s ? timeout_s : 60) * 1000000000u;
  struct samples *s = calloc(1, sizeof *s);
  int rc = -1;

  if (!s) { snprintf(err, errlen, "out of memory"); return -1; }
  s->refs = 1;
  for (unsigned i = 0; i < n; i++) {
    s->refs++;
    if (nbd_aio_pread(h, s->buf[i], len[i], off[i],
                      (nbd_completion_callback) { .callback = sample_done,
                                                  .user_data = s,
                                                  .free = samples_unref }, 0) < 0) {
      /* .free has run already (libnbd frees on a failed submission). */
      snprintf(err, errlen, "reading a sample block of the source at offset "
               "%" PRIu64 " failed: %s", off[i], nbd_get_error());
      goto out;
    }
    issued++;
  }
  while (s->done < issued) {
    uint64_t now = now_ns();
    if (now >= deadline) {
      snprintf(err, errlen, "reading %u sample blocks of the source timed out "
               "(--source-timeout)", issued);
      goto out;
    }
    int ms = (int) MIN((deadline - now) / 1000000 + 1, (uint64_t) 1000);
    if (nbd_poll(h, ms) < 0) {
      snprintf(err, errlen, "reading sample blocks of the source failed: %s",
               nbd_get_error());
      goto out;
    }
  }
  if (s->err) {
    snprintf(err, errlen, "reading sample blocks of the source failed: %s",
             strerror(s->err));
    goto out;
  }
  if (source_sample_hash(n, off, len, (const unsigned char (*)[SOURCE_ID_SAMPLE_LEN]) s->buf,
                         hex) < 0) {
    snprintf(err, errlen, "SHA-256 of the sample blocks failed (OpenSSL)");
    goto out;
  }
  rc = 0;
out:
  samples_unref(s);
  return rc;
}

/* The export word and, when the description carries one, the xnbd image
 * id part.  Returns 1 (id complete), 0 (no image id: exp filled), -1. */
static int identity_from_description(struct nbd_handle *h, uint64_t size,
                                     char *exp, size_t explen,
                                     char *id, size_t idlen)
{
  char hex[33];
  uint64_t gen = 0;
  bool derived, have;
  char *name = nbd_get_canonical_export_name(h);
  char *desc;
  int n;

  if (!name) name = nbd_get_export_name(h);
  export_word(name ? name : "", name ? strlen(name) : 0, exp, explen);
  free(name);
  desc = nbd_get_export_description(h);     /* NULL: the source sent none */
  have = desc_image_id(desc, hex, &gen, &derived);
  free(desc);
  if (!have) return 0;
  n = snprintf(id, idlen, "%s size=%" PRIu64 " xnbd-id=%s gen=%" PRIu64 "%s",
               exp, size, hex, gen, derived ? " id-from=stat" : "");
  return n < 0 || (size_t) n >= idlen ? -1 : 1;
}

int source_identity_quick(struct nbd_handle *h, uint64_t size, char *id, size_t idlen)
{
  char exp[SOURCE_ID_NAME_MAX + 80];
  return identity_from_description(h, size, exp, sizeof exp, id, idlen);
}

int source_identity(struct nbd_handle *h, uint64_t size, unsigned timeout_s,
                    char *id, size_t idlen, char *err, size_t errlen)
{
  char exp[SOURCE_ID_NAME_MAX + 80], hex[65];
  int n = identity_from_description(h, size, exp, sizeof exp, id, idlen);

  if (n == 1) return 0;
  if (n == 0) {
    if (sample_digest(h, size, timeout_s, hex, err, errlen) < 0) return -1;
    n = snprintf(id, idlen, "%s size=%" PRIu64 " sample=%s", exp, size, hex);
    if (n >= 0 && (size_t) n < idlen) return 0;
  }
  snprintf(err, errlen, "the source identity does not fit in %zu bytes", idlen);
  return -1;
}
