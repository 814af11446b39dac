/* crashload: a journalled write workload for crash tests (invariant I2,
 * DESIGN.md §3), and the checker that runs after the crash.
 *
 *   crashload write --uri URI --journal FILE --seed N
 *                   [--seconds S] [--qd N] [--max-ops N] [--hot BLOCKS]
 *                   [--rate OPS]
 *       Writes to the export until the connection dies (the test kills the
 *       server), S seconds pass (default 10) or N operations were issued:
 *       whole-block writes (1-4 blocks), partial writes inside a block,
 *       writes straddling block boundaries, some with FUA, and a FLUSH
 *       every 2-8 writes, up to --qd (default 8) requests in flight, never
 *       two in flight that overlap.  Half the writes go to a small "hot"
 *       set of blocks, so ranges are written many times.  Every 512-byte
 *       sector written carries a stamp (magic, seed, sequence number, its
 *       own offset) followed by bytes derived from them, so any sector read
 *       back names the write it came from.  --rate issues at most OPS
 *       requests a second (default 0: as fast as the server answers).
 *
 *       The journal gets one line per event, appended (and fdatasync'd
 *       after each batch) in the order this program saw them:
 *         S SEED SIZE           started (connected)
 *         I SEQ OFF LEN FUA     write about to be sent
 *         W SEQ                 write acknowledged
 *         E SEQ ERRNO           write or flush failed (outcome unknown)
 *         f SEQ                 flush about to be sent
 *         F SEQ                 flush acknowledged
 *         X REASON              stopped
 *       A write is "flushed" when its W line comes before the f line of a
 *       flush that got its F line, or when it had FUA and got its W line.
 *
 *   crashload verify --uri URI --journal FILE --source IMG [--dump FILE]
 *       Reads the whole export and checks every sector against the journal.
 *       Allowed contents of a sector: if some flushed write covers it, the
 *       newest such write or any later issued write covering it; otherwise
 *       the source's data (IMG) or any issued write covering it (acknowledged
 *       or not: a write in flight at the crash may or may not have landed).
 *       Anything else fails, with the block, the candidates and what was
 *       found.  --dump writes the content read to FILE.
 *
 * Exit status: 0 success; 1 verification failed, or (write) the server
 * failed a request while the connection was up; 2 usage or I/O error. */
#include "util.h"

#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <unistd.h>

#include <libnbd.h>

#define BS          4096u
#define SECTOR      512u
#define MAGIC       "XNBDCRSH"
#define MAX_QD      64
#define MAX_WRITE   (4 * BS)  /* largest write pick_write makes */
#define MAX_REPORT  20
#define READ_CHUNK  (1u << 20)

static const char *uri, *journal_path, *source_path, *dump_path;
static uint64_t seed, max_ops;
static unsigned seconds = 10, qd = 8, hot = 64, rate;

static void die(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
static void die(const char *fmt, ...)
{
  va_list ap;
  fputs("crashload: ", stderr);
  va_start(ap, fmt);
  vfprintf(stderr, fmt, ap);
  va_end(ap);
  fputc('\n', stderr);
  exit(2);
}

/* ---------- deterministic data ---------- */

static uint64_t splitmix64(uint64_t *x)
{
  uint64_t z = (*x += UINT64_C(0x9E3779B97F4A7C15));
  z = (z ^ (z >> 30)) * UINT64_C(0xBF58476D1CE4E5B9);
  z = (z ^ (z >> 27)) * UINT64_C(0x94D049BB133111EB);
  return z ^ (z >> 31);
}

static uint64_t rng_state;
static uint64_t rnd(uint64_t n) { return splitmix64(&rng_state) % n; }

static void put_le64(void *p, uint64_t v) { v = htole64(v); memcpy(p, &v, 8); }
static uint64_t get_le64(const void *p) { uint64_t v; memcpy(&v, p, 8); return le64toh(v); }

/* The content write SEQ puts in the sector at image offset OFF. */
static void stamp_sector(unsigned char *s, uint64_t gen, uint64_t seq, uint64_t off)
{
  uint64_t x = gen ^ (seq * UINT64_C(0x9E3779B97F4A7C15)) ^
               (off * UINT64_C(0xC2B2AE3D27D4EB4F));
  memcpy(s, MAGIC, 8);
  put_le64(s + 8, gen);
  put_le64(s + 16, seq);
  put_le64(s + 24, off);
  for (unsigned i = 32; i < SECTOR; i += 8) put_le64(s + i, splitmix64(&x));
}

/* ---------- journal ---------- */

static int jfd = -1;

static void jrec(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void jrec(const char *fmt, ...)
{
  char line[1024];
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(line, sizeof line, fmt, ap);
  va_end(ap);
  if (n < 0 || (size_t) n >= sizeof line) die("journal line too long");
  if (write_all(jfd, line, n) < 0) die("writing journal %s: %s", journal_path, strerror(errno));
}

static void jsync(void)
{
  if (fdatasync(jfd) < 0) die("syncing journal %s: %s", journal_path, strerror(errno));
}

/* ---------- write mode ---------- */

struct op {
  bool active, done, flush, fua;
  int err;
  uint64_t seq, off, len;
  unsigned char *buf;
};

static int op_done_cb(void *user_data, int *error)
{
  struct op *o = user_data;
  o->done = true;
  o->err = *error;
  return 1;
}

static bool overlaps_active(struct op *ops, uint64_t off, uint64_t len)
{
  for (unsigned i = 0; i < qd; i++)
    if (ops[i].active && !ops[i].flush &&
        off < ops[i].off + ops[i].len && ops[i].off < off + len)
      return true;
  return false;
}

/* Picks a write range; false if every try overlapped a write in flight. */
static bool pick_write(struct op *ops, uint64_t size, uint64_t hot_base,
                       uint64_t *off, uint64_t *len)
{
  uint64_t nblocks = size / BS;
  for (int tries = 0; tries < 32; tries++) {
    uint64_t b = rnd(2) ? hot_base + rnd(MIN(hot, nblocks)) : rnd(nblocks);
    unsigned kind = rnd(100);
    uint64_t o, end;
    if (kind < 40) {                          /* whole blocks */
      uint64_t n = 1 + rnd(4);
      o = b * BS;
      end = MIN(size, o + n * BS);
    } else if (kind < 80) {                   /* part of one block */
      uint64_t s = rnd(8), n = 1 + rnd(8 - s);
      if (s == 0 && n == 8) n = 7;
      o = b * BS + s * SECTOR;
      end = o + n * SECTOR;
    } else {                                  /* straddles 1-2 boundaries */
      o = b * BS + (1 + rnd(7)) * SECTOR;
      end = (b + 1 + rnd(2)) * BS + (1 + rnd(7)) * SECTOR;
      if (end > size) continue;
    }
    if (end - o > MAX_WRITE) abort();
    if (overlaps_active(ops, o, end - o)) continue;
    *off = o;
    *len = end - o;
    return true;
  }
  return false;
}

static int do_write(void)
{
  struct nbd_handle *h;
  struct op ops[MAX_QD];
  uint64_t seq = 0, issued = 0, acked = 0, failed = 0, flushes = 0, flushed = 0;
  unsigned nactive = 0, since_flush = 0, flush_every;
  int64_t size;
  const char *reason = NULL;
  char why[512] = "";

  rng_state = seed;
  h = nbd_create();
  if (!h) die("libnbd: %s", nbd_get_error());
  if (nbd_connect_uri(h, uri) < 0) die("cannot connect to %s: %s", uri, nbd_get_error());
  size = nbd_get_size(h);
  if (size < (int64_t) (4 * BS) || size % BS)
    die("export size %" PRId64 " is not a multiple of %u (or too small)", size, BS);
  if (nbd_can_flush(h) != 1 || nbd_can_fua(h) != 1)
    die("the export does not support FLUSH and FUA");
  uint64_t nblocks = size / BS;
  uint64_t hot_base = rnd(nblocks - MIN(hot, nblocks) + 1);

  jfd = open(journal_path, O_WRONLY | O_CREAT | O_TRUNC | O_APPEND | O_CLOEXEC, 0644);
  if (jfd < 0) die("cannot create journal %s: %s", journal_path, strerror(errno));
  jrec("S %" PRIu64 " %" PRId64 "\n", seed, size);
  jsync();

  memset(ops, 0, sizeof ops);
  for (unsigned i = 0; i < qd; i++)
    if (!(ops[i].buf = malloc(MAX_WRITE))) die("out of memory");
  flush_every = 2 + rnd(7);
  uint64_t t_start = now_ns(), next_ns = t_start;
  uint64_t deadline = t_start + (uint64_t) seconds * 1000000000u;
  uint64_t hard_deadline = deadline + UINT64_C(60) * 1000000000u;
  bool stop = false, dead = false;

  while (!dead) {
    /* Fill the queue. */
    while (!stop && nactive < qd) {
      if (now_ns() >= deadline) { stop = true; reason = "time limit reached"; break; }
      if (max_ops && issued >= max_ops) { stop = true; reason = "operation limit reached"; break; }
      if (rate && now_ns() < (next_ns = t_start + issued * UINT64_C(1000000000) / rate)) break;
      struct op *o = NULL;
      for (unsigned i = 0; i < qd; i++) if (!ops[i].active) { o = &ops[i]; break; }
      bool flush = since_flush >= flush_every;
      uint64_t off = 0, len = 0;
      if (!flush && !pick_write(ops, size, hot_base, &off, &len)) break;
      o->active = true;
      o->done = false;
      o->err = 0;
      o->flush = flush;
      o->seq = ++seq;
      int64_t cookie;
      nbd_completion_callback cb = { .callback = op_done_cb, .user_data = o };
      if (flush) {
        since_flush = 0;
        flush_every = 2 + rnd(7);
        o->fua = false;
        jrec("f %" PRIu64 "\n", o->seq);
        cookie = nbd_aio_flush(h, cb, 0);
        flushes++;
      } else {
        since_flush++;
        o->fua = rnd(100) < 15;
        o->off = off;
        o->len = len;
        for (uint64_t k = 0; k < len; k += SECTOR)
          stamp_sector(o->buf + k, seed, o->seq, off + k);
        jrec("I %" PRIu64 " %" PRIu64 " %" PRIu64 " %d\n", o->seq, off, len, o->fua);
        cookie = nbd_aio_pwrite(h, o->buf, len, off, cb, o->fua ? LIBNBD_CMD_FLAG_FUA : 0);
      }
      issued++;
      nactive++;
      if (cookie < 0) {       /* not sent: the connection is gone? */
        if (!nbd_aio_is_dead(h) && !nbd_aio_is_closed(h))
          die("%s %" PRIu64 "+%" PRIu64 " could not be sent: %s",
              flush ? "flush" : "write", off, len, nbd_get_error());
        snprintf(why, sizeof why, "%s", nbd_get_error());
        jrec("E %" PRIu64 " %d\n", o->seq, nbd_get_errno() ? nbd_get_errno() : EIO);
        o->active = false;
        nactive--;
        dead = true;
        reason = why;
        break;
      }
    }
    if (dead) break;
    if (stop && nactive == 0) break;
    if (now_ns() >= hard_deadline) die("requests still in flight 60 s after the time limit");

    int wait_ms = 1000;
    if (rate && !stop && nactive < qd && next_ns > now_ns())
      wait_ms = (int) MIN(1000, (next_ns - now_ns()) / 1000000 + 1);
    int r = nbd_poll(h, wait_ms);
    if (r < 0 && !reason) {
      snprintf(why, sizeof why, "connection lost: %s", nbd_get_error());
      reason = why;
    }
    /* Completions, in the order of our slots (all are concurrent). */
    for (unsigned i = 0; i < qd; i++) {
      struct op *o = &ops[i];
      if (!o->active || !o->done) continue;
      if (o->err) {
        jrec("E %" PRIu64 " %d\n", o->seq, o->err);
        failed++;
      } else if (o->flush) {
        jrec("F %" PRIu64 "\n", o->seq);
        flushed++;
      } else {
        jrec("W %" PRIu64 "\n", o->seq);
        acked++;
      }
      o->active = false;
      nactive--;
    }
    jsync();
    if (r < 0 || nbd_aio_is_dead(h) || nbd_aio_is_closed(h)) {
      dead = true;
      if (!reason) reason = "connection lost";
    }
  }
  /* Whatever is still active was in flight when the connection died. */
  jrec("X %.900s\n", reason ? reason : "stopped");
  jsync();
  close(jfd);
  printf("write: %" PRIu64 " requests issued: %" PRIu64 " writes acked, %" PRIu64
         " of %" PRIu64 " flushes done, %" PRIu64 " failed, %u in flight at the "
         "end; %s\n", issued, acked, flushed, flushes, failed, nactive,
         reason ? reason : "stopped");
  nbd_close(h);       /* retires whatever is left without waiting */
  for (unsigned i = 0; i < qd; i++) free(ops[i].buf);
  if (failed && !dead) {
    fprintf(stderr, "crashload: the server failed %" PRIu64 " requests while "
            "the connection was up\n", failed);
    return 1;
  }
  return 0;
}

/* ---------- verify mode ---------- */

enum wstate { W_NONE, W_INFLIGHT, W_ACKED, W_FAILED };

struct wrec {
  bool is_write, is_flush, fua;
  enum wstate st;
  uint64_t off, len;
  uint64_t issue_pos, ack_pos;    /* journal line numbers */
  bool flushed;                   /* covered by a completed flush, or FUA */
};

static struct wrec *recs;
static uint64_t nrecs;

static struct wrec *rec_at(uint64_t seq, uint64_t lineno)
{
  if (seq == 0 || seq > (UINT64_C(1) << 32))
    die("journal line %" PRIu64 ": bad sequence number %" PRIu64, lineno, seq);
  if (seq >= nrecs) {
    uint64_t n = MAX(seq + 1, nrecs * 2);
    recs = realloc(recs, n * sizeof *recs);
    if (!recs) die("out of memory");
    memset(recs + nrecs, 0, (n - nrecs) * sizeof *recs);
    nrecs = n;
  }
  return &recs[seq];
}

static const char *wdesc(uint64_t seq, char *buf, size_t len)
{
  struct wrec *w = &recs[seq];
  snprintf(buf, len, "write seq %" PRIu64 " (%" PRIu64 "+%" PRIu64 ", %s%s%s)",
           seq, w->off, w->len,
           w->st == W_ACKED ? "acked" : w->st == W_FAILED ? "failed, outcome unknown" : "in flight",
           w->flushed ? ", flushed" : "", w->fua ? ", FUA" : "");
  return buf;
}

static void describe_found(const unsigned char *got, const unsigned char *src,
                           uint64_t gen, char *buf, size_t len)
{
  if (memcmp(got, src, SECTOR) == 0)
    snprintf(buf, len, "the source's data");
  else if (is_zero(got, SECTOR))
    snprintf(buf, len, "zeros");
  else if (memcmp(got, MAGIC, 8) == 0) {
    uint64_t g = get_le64(got + 8), s = get_le64(got + 16), o = get_le64(got + 24);
    unsigned char want[SECTOR];
    stamp_sector(want, g, s, o);
    snprintf(buf, len, "a stamp of write seq %" PRIu64 " for offset %" PRIu64
             "%s%s%s", s, o, g != gen ? " from another run" : "",
             memcmp(want, got, SECTOR) ? " (damaged)" : "",
             s < nrecs && recs[s].is_write ? "" : " (never issued)");
  } else {
    char hex[3 * 16 + 1];
    for (int i = 0; i < 16; i++) snprintf(hex + 3 * i, 4, "%02x ", got[i]);
    hex[3 * 16 - 1] = '\0';
    snprintf(buf, len, "unknown data (first bytes %s)", hex);
  }
}

static int do_verify(void)
{
  FILE *jf = fopen(journal_path, "r");
  char line[1024];
  uint64_t lineno = 0, gen = 0, max_fpos = 0;
  int64_t size = -1;
  bool started = false;
  char end_reason[1024] = "(no X line: the writer did not finish)";

  if (!jf) die("cannot open journal %s: %s", journal_path, strerror(errno));
  while (fgets(line, sizeof line, jf)) {
    uint64_t seq, off, len;
    int fua, err;
    char type = line[0];
    lineno++;
    if (!strchr(line, '\n')) die("journal line %" PRIu64 " is truncated", lineno);
    if (type == 'S' && sscanf(line, "S %" SCNu64 " %" SCNd64, &gen, &size) == 2) {
      started = true;
      continue;
    }
    if (!started) die("journal %s does not start with an S line", journal_path);
    if (type == 'I' && sscanf(line, "I %" SCNu64 " %" SCNu64 " %" SCNu64 " %d",
                              &seq, &off, &len, &fua) == 4) {
      struct wrec *w = rec_at(seq, lineno);
      if (w->is_write || w->is_flush) die("journal line %" PRIu64 ": seq %" PRIu64 " reused", lineno, seq);
      if (off + len > (uint64_t) size || off % SECTOR || len % SECTOR || !len)
        die("journal line %" PRIu64 ": bad range %" PRIu64 "+%" PRIu64, lineno, off, len);
      *w = (struct wrec) { .is_write = true, .fua = fua, .st = W_INFLIGHT,
                           .off = off, .len = len, .issue_pos = lineno };
    } else if (type == 'W' && sscanf(line, "W %" SCNu64, &seq) == 1) {
      struct wrec *w = rec_at(seq, lineno);
      if (!w->is_write || w->st != W_INFLIGHT) die("journal line %" PRIu64 ": W for unknown write", lineno);
      w->st = W_ACKED;
      w->ack_pos = lineno;
    } else if (type == 'E' && sscanf(line, "E %" SCNu64 " %d", &seq, &err) == 2) {
      struct wrec *w = rec_at(seq, lineno);
      if (w->is_write) w->st = W_FAILED;
    } else if (type == 'f' && sscanf(line, "f %" SCNu64, &seq) == 1) {
      struct wrec *w = rec_at(seq, lineno);
      *w = (struct wrec) { .is_flush = true, .st = W_INFLIGHT, .issue_pos = lineno };
    } else if (type == 'F' && sscanf(line, "F %" SCNu64, &seq) == 1) {
      struct wrec *w = rec_at(seq, lineno);
      if (!w->is_flush) die("journal line %" PRIu64 ": F for unknown flush", lineno);
      w->st = W_ACKED;
      if (w->issue_pos > max_fpos) max_fpos = w->issue_pos;
    } else if (type == 'X') {
      snprintf(end_reason, sizeof end_reason, "%.1000s", line + 2);
      end_reason[strcspn(end_reason, "\n")] = '\0';
    } else
      die("journal line %" PRIu64 " not understood: %s", lineno, line);
  }
  fclose(jf);
  if (!started) die("journal %s is empty", journal_path);

  /* Which writes a completed flush (or their own FUA) made durable. */
  uint64_t n_w = 0, n_acked = 0, n_flushed = 0, n_inflight = 0, n_f = 0, n_fdone = 0;
  for (uint64_t s = 1; s < nrecs; s++) {
    struct wrec *w = &recs[s];
    if (w->is_flush) { n_f++; n_fdone += w->st == W_ACKED; }
    if (!w->is_write) continue;
    n_w++;
    if (w->st == W_ACKED) {
      n_acked++;
      w->flushed = w->fua || w->ack_pos < max_fpos;
      n_flushed += w->flushed;
    } else
      n_inflight++;
  }

  /* Per sector: the writes covering it, in sequence order (CSR arrays). */
  uint64_t nsec = size / SECTOR;
  uint32_t *start = calloc(nsec + 1, sizeof *start);
  if (!start) die("out of memory");
  for (uint64_t s = 1; s < nrecs; s++)
    if (recs[s].is_write)
      for (uint64_t k = recs[s].off / SECTOR; k < (recs[s].off + recs[s].len) / SECTOR; k++)
        start[k + 1]++;
  for (uint64_t k = 0; k < nsec; k++) start[k + 1] += start[k];
  uint32_t *list = malloc((start[nsec] + 1) * sizeof *list);
  uint32_t *fill = calloc(nsec, sizeof *fill);
  if (!list || !fill) die("out of memory");
  for (uint64_t s = 1; s < nrecs; s++)
    if (recs[s].is_write)
      for (uint64_t k = recs[s].off / SECTOR; k < (recs[s].off + recs[s].len) / SECTOR; k++)
        list[start[k] + fill[k]++] = s;

  /* Read the export and the source. */
  struct nbd_handle *h = nbd_create();
  if (!h) die("libnbd: %s", nbd_get_error());
  if (nbd_connect_uri(h, uri) < 0) die("cannot connect to %s: %s", uri, nbd_get_error());
  if (nbd_get_size(h) != size)
    die("export size %" PRId64 " differs from the journal's %" PRId64, nbd_get_size(h), size);
  int sfd = open(source_path, O_RDONLY | O_CLOEXEC);
  if (sfd < 0) die("cannot open source image %s: %s", source_path, strerror(errno));
  int dfd = -1;
  if (dump_path &&
      (dfd = open(dump_path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644)) < 0)
    die("cannot create %s: %s", dump_path, strerror(errno));
  unsigned char *got = malloc(READ_CHUNK), *src = malloc(READ_CHUNK);
  unsigned char want[SECTOR];
  if (!got || !src) die("out of memory");

  uint64_t bad = 0, bad_blocks = 0, last_bad_block = UINT64_MAX;
  uint64_t c_src = 0, c_newest = 0, c_older = 0, c_unacked = 0, c_lost = 0;
  for (uint64_t coff = 0; coff < (uint64_t) size; coff += READ_CHUNK) {
    size_t clen = MIN(READ_CHUNK, (uint64_t) size - coff);
    if (nbd_pread(h, got, clen, coff, 0) < 0)
      die("reading %zu bytes at %" PRIu64 " through %s failed: %s", clen, coff,
          uri, nbd_get_error());
    if (pread_all(sfd, src, clen, coff) < 0)
      die("reading source %s at %" PRIu64 ": %s", source_path, coff, strerror(errno));
    if (dfd >= 0 && pwrite_all(dfd, got, clen, coff) < 0)
      die("writing %s: %s", dump_path, strerror(errno));
    for (size_t so = 0; so < clen; so += SECTOR) {
      uint64_t off = coff + so, k = off / SECTOR;
      const unsigned char *g = got + so, *sr = src + so;
      uint32_t *ws = list + start[k], nw = start[k + 1] - start[k];
      int64_t floor_i = -1;       /* index in ws of the newest flushed write */
      for (uint32_t i = 0; i < nw; i++)
        if (recs[ws[i]].flushed) floor_i = i;
      bool ok = false;
      if (floor_i < 0 && memcmp(g, sr, SECTOR) == 0) {
        ok = true;
        c_src++;
        /* Source data although an acked (unflushed) write covers it. */
        for (uint32_t i = 0; i < nw; i++)
          if (recs[ws[i]].st == W_ACKED) { c_lost++; break; }
      }
      for (int64_t i = (int64_t) nw - 1; !ok && i >= MAX(floor_i, 0); i--) {
        stamp_sector(want, gen, ws[i], off);
        if (memcmp(g, want, SECTOR) == 0) {
          ok = true;
          if (i == (int64_t) nw - 1) c_newest++;
          else c_older++;
          if (recs[ws[i]].st != W_ACKED) c_unacked++;
        }
      }
      if (ok) continue;
      bad++;
      uint64_t blk = off / BS;
      if (blk != last_bad_block) { bad_blocks++; last_bad_block = blk; }
      if (bad > MAX_REPORT) continue;
      char found[256], cands[2048] = "", d[160];
      size_t cl = 0;
      describe_found(g, sr, gen, found, sizeof found);
      if (floor_i < 0)
        cl += snprintf(cands + cl, sizeof cands - cl, "the source's data");
      for (int64_t i = MAX(floor_i, 0); i < (int64_t) nw && cl < sizeof cands - 200; i++)
        cl += snprintf(cands + cl, sizeof cands - cl, "%s%s", cl ? ", " : "",
                       wdesc(ws[i], d, sizeof d));
      printf("MISMATCH block %" PRIu64 " (offset %" PRIu64 "), sector %" PRIu64
             " of the block (offset %" PRIu64 "): found %s; allowed: %s\n",
             blk, blk * BS, (off % BS) / SECTOR, off, found, cands);
      if (nw && floor_i < 0)
        printf("  (no write covering this sector was flushed)\n");
    }
  }
  if (dfd >= 0 && close(dfd) < 0) die("closing %s: %s", dump_path, strerror(errno));
  close(sfd);
  nbd_shutdown(h, 0);
  nbd_close(h);

  printf("verify: %" PRIu64 " writes issued (%" PRIu64 " acked, %" PRIu64
         " flushed, %" PRIu64 " in flight or failed), %" PRIu64 " flushes "
         "(%" PRIu64 " done); writer ended: %s\n",
         n_w, n_acked, n_flushed, n_inflight, n_f, n_fdone, end_reason);
  printf("verify: sectors: %" PRIu64 " source, %" PRIu64 " newest write, %"
         PRIu64 " older write, %" PRIu64 " from unacked writes, %" PRIu64
         " unflushed writes not kept; %" PRIu64 " bad sectors in %" PRIu64
         " blocks: %s\n", c_src, c_newest, c_older, c_unacked, c_lost,
         bad, bad_blocks, bad ? "FAIL" : "OK");
  free(start); free(list); free(fill); free(got); free(src); free(recs);
  return bad ? 1 : 0;
}

/* ---------- main ---------- */

static void usage(void)
{
  fprintf(stderr,
    "usage: crashload write --uri URI --journal FILE --seed N [--seconds S]\n"
    "                       [--qd N] [--max-ops N] [--hot BLOCKS] [--rate OPS]\n"
    "       crashload verify --uri URI --journal FILE --source IMG [--dump FILE]\n");
  exit(2);
}

static uint64_t num(const char *opt, const char *s, uint64_t lo, uint64_t hi)
{
  char *end;
  errno = 0;
  unsigned long long v = strtoull(s, &end, 0);
  if (errno || *end || end == s || v < lo || v > hi)
    die("%s %s: expected a number from %" PRIu64 " to %" PRIu64, opt, s, lo, hi);
  return v;
}

int main(int argc, char **argv)
{
  enum { O_URI = 256, O_JOURNAL, O_SEED, O_SECONDS, O_QD, O_MAXOPS, O_HOT, O_RATE,
         O_SOURCE, O_DUMP };
  static const struct option longopts[] = {
    { "uri", required_argument, 0, O_URI },
    { "journal", required_argument, 0, O_JOURNAL },
    { "seed", required_argument, 0, O_SEED },
    { "seconds", required_argument, 0, O_SECONDS },
    { "qd", required_argument, 0, O_QD },
    { "max-ops", required_argument, 0, O_MAXOPS },
    { "hot", required_argument, 0, O_HOT },
    { "rate", required_argument, 0, O_RATE },
    { "source", required_argument, 0, O_SOURCE },
    { "dump", required_argument, 0, O_DUMP },
    { 0, 0, 0, 0 }
  };
  int c;
  bool have_seed = false;
  if (argc < 2) usage();
  const char *mode = argv[1];
  optind = 2;
  while ((c = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
    switch (c) {
    case O_URI: uri = optarg; break;
    case O_JOURNAL: journal_path = optarg; break;
    case O_SEED: seed = num("--seed", optarg, 0, UINT64_MAX); have_seed = true; break;
    case O_SECONDS: seconds = num("--seconds", optarg, 1, 3600); break;
    case O_QD: qd = num("--qd", optarg, 1, MAX_QD); break;
    case O_MAXOPS: max_ops = num("--max-ops", optarg, 1, UINT64_C(1) << 30); break;
    case O_HOT: hot = num("--hot", optarg, 1, UINT32_MAX); break;
    case O_RATE: rate = num("--rate", optarg, 0, 1000000); break;
    case O_SOURCE: source_path = optarg; break;
    case O_DUMP: dump_path = optarg; break;
    default: usage();
    }
  }
  if (optind != argc || !uri || !journal_path) usage();
  if (strcmp(mode, "write") == 0) {
    if (!have_seed) usage();
    return do_write();
  }
  if (strcmp(mode, "verify") == 0) {
    if (!source_path) usage();
    return do_verify();
  }
  usage();
}
