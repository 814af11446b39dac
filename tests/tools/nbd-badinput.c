/* nbd-badinput: drives an NBD server with malformed, hostile and corner-case
 * input over a raw socket and checks the exact outcome of each case.
 *
 *   nbd-badinput (--unix PATH | --tcp HOST:PORT) [--export NAME]
 *                [--size BYTES] [--handshake-timeout S] [--readonly]
 *                [--write-log FILE] [--case GLOB] [--skip GLOB] [--list]
 *
 * One line per case: "PASS name", "FAIL name: reason" or "SKIP name: reason",
 * then a summary; exit status 1 if any case failed.  After every case the
 * server is probed with a fresh connection (GO + READ); if it stops answering
 * the run stops there, naming the case that killed it.
 *
 * Cases that modify the export only write inside the last MiB (the scratch
 * area) and append "OFFSET LENGTH BYTE" to --write-log for every write that
 * the server acknowledged (zeroing and trimming log BYTE 0), so a test script
 * can apply the same writes to a model copy of the image and compare.
 * Cases where a failed write could land (past the end, oversized, unknown
 * flag) send byte 0xEE, which the model never contains at those places. */
#include "nbd-proto.h"
#include "proto.h"
#include "util.h"

#include <errno.h>
#include <fcntl.h>
#include <fnmatch.h>
#include <getopt.h>
#include <inttypes.h>
#include <netdb.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#define IO_TIMEOUT_MS   10000
#define MAX_PAYLOAD     (32u * 1024 * 1024)
#define MAX_OPT_REPLY   (1u << 20)
#define MIB             (1024u * 1024)
#define N_CONNECTIONS   300

/* Results of the I/O helpers. */
#define IO_OK        0
#define IO_EOF      -1   /* orderly close or reset by the peer */
#define IO_TIMEOUT  -2
#define IO_ERROR    -3

static const char *unix_path, *tcp_addr, *export_name = "";
static const char *case_glob, *skip_glob;
static uint64_t expect_size;
static int handshake_timeout;
static bool readonly_mode;
static FILE *write_log;

static char why[1024];
static bool saw_eof;     /* an I/O helper saw the server close */

static int failf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static int failf(const char *fmt, ...)
{
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(why, sizeof why, fmt, ap);
  va_end(ap);
  return -1;
}

static int skipf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static int skipf(const char *fmt, ...)
{
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(why, sizeof why, fmt, ap);
  va_end(ap);
  return 1;
}

static const char *io_str(int r)
{
  switch (r) {
  case IO_OK: return "ok";
  case IO_EOF: return "connection closed by server";
  case IO_TIMEOUT: return "timed out";
  default: return strerror(errno);
  }
}

static const char *rep_str(uint32_t t)
{
  switch (t) {
  case NBD_REP_ACK: return "ACK";
  case NBD_REP_SERVER: return "SERVER";
  case NBD_REP_INFO: return "INFO";
  case NBD_REP_META_CONTEXT: return "META_CONTEXT";
  case NBD_REP_ERR_UNSUP: return "ERR_UNSUP";
  case NBD_REP_ERR_POLICY: return "ERR_POLICY";
  case NBD_REP_ERR_INVALID: return "ERR_INVALID";
  case NBD_REP_ERR_PLATFORM: return "ERR_PLATFORM";
  case NBD_REP_ERR_TLS_REQD: return "ERR_TLS_REQD";
  case NBD_REP_ERR_UNKNOWN: return "ERR_UNKNOWN";
  case NBD_REP_ERR_SHUTDOWN: return "ERR_SHUTDOWN";
  case NBD_REP_ERR_BLOCK_SIZE_REQD: return "ERR_BLOCK_SIZE_REQD";
  case NBD_REP_ERR_TOO_BIG: return "ERR_TOO_BIG";
  default: return "unknown reply type";
  }
}

/* ------------------------------------------------------------ sockets */

static int deadline_left(uint64_t deadline)
{
  uint64_t now = now_ns();
  if (now >= deadline) return 0;
  return (int) ((deadline - now) / 1000000) + 1;
}

/* Reads exactly len bytes within timeout_ms. */
static int recv_full(int fd, void *buf, size_t len, int timeout_ms)
{
  uint8_t *p = buf;
  uint64_t deadline = now_ns() + (uint64_t) timeout_ms * 1000000;
  while (len > 0) {
    struct pollfd pfd = { .fd = fd, .events = POLLIN };
    int left = deadline_left(deadline);
    if (left == 0) return IO_TIMEOUT;
    int r = poll(&pfd, 1, left);
    if (r < 0) { if (errno == EINTR) continue; return IO_ERROR; }
    if (r == 0) return IO_TIMEOUT;
    ssize_t n = recv(fd, p, len, 0);
    if (n < 0) {
      if (errno == EINTR || errno == EAGAIN) continue;
      if (errno == ECONNRESET) { saw_eof = true; return IO_EOF; }
      return IO_ERROR;
    }
    if (n == 0) { saw_eof = true; return IO_EOF; }
    p += n;
    len -= n;
  }
  return IO_OK;
}

/* Writes all of buf within the I/O timeout.  A peer that has gone away
 * gives IO_EOF. */
static int send_full(int fd, const void *buf, size_t len)
{
  const uint8_t *p = buf;
  uint64_t deadline = now_ns() + (uint64_t) IO_TIMEOUT_MS * 1000000;
  while (len > 0) {
    struct pollfd pfd = { .fd = fd, .events = POLLOUT };
    int left = deadline_left(deadline);
    if (left == 0) return IO_TIMEOUT;
    int r = poll(&pfd, 1, left);
    if (r < 0) { if (errno == EINTR) continue; return IO_ERROR; }
    if (r == 0) return IO_TIMEOUT;
    ssize_t n = send(fd, p, len, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (n < 0) {
      if (errno == EINTR || errno == EAGAIN) continue;
      if (errno == EPIPE || errno == ECONNRESET) { saw_eof = true; return IO_EOF; }
      return IO_ERROR;
    }
    p += n;
    len -= n;
  }
  return IO_OK;
}

/* Waits for the server to close the connection, discarding what it sends
 * (counted in *extra).  IO_OK when closed, IO_TIMEOUT otherwise. */
static int wait_closed(int fd, int timeout_ms, size_t *extra)
{
  uint8_t buf[4096];
  uint64_t deadline = now_ns() + (uint64_t) timeout_ms * 1000000;
  *extra = 0;
  for (;;) {
    struct pollfd pfd = { .fd = fd, .events = POLLIN };
    int left = deadline_left(deadline);
    if (left == 0) return IO_TIMEOUT;
    int r = poll(&pfd, 1, left);
    if (r < 0) { if (errno == EINTR) continue; return IO_ERROR; }
    if (r == 0) return IO_TIMEOUT;
    ssize_t n = recv(fd, buf, sizeof buf, 0);
    if (n == 0 || (n < 0 && errno == ECONNRESET)) return IO_OK;
    if (n < 0) { if (errno == EINTR || errno == EAGAIN) continue; return IO_ERROR; }
    *extra += n;
  }
}

static int dial(void)
{
  int fd = -1;
  if (unix_path) {
    struct sockaddr_un sa = { .sun_family = AF_UNIX };
    if (strlen(unix_path) >= sizeof sa.sun_path) {
      fprintf(stderr, "nbd-badinput: socket path too long: %s\n", unix_path);
      return -1;
    }
    strcpy(sa.sun_path, unix_path);
    fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return -1;
    if (connect(fd, (struct sockaddr *) &sa, sizeof sa) < 0) {
      int e = errno;
      close(fd);
      errno = e;
      return -1;
    }
    return fd;
  }
  char *host = NULL, *port = NULL;
  const char *perr;
  struct addrinfo hints = { .ai_socktype = SOCK_STREAM }, *res = NULL, *ai;
  if (parse_host_port(tcp_addr, NULL, &host, &port, &perr) < 0) {
    fprintf(stderr, "nbd-badinput: --tcp %s: %s\n", tcp_addr, perr);
    return -1;
  }
  int gr = getaddrinfo(host ? host : "127.0.0.1", port, &hints, &res);
  free(host);
  free(port);
  if (gr != 0) {
    fprintf(stderr, "nbd-badinput: %s: %s\n", tcp_addr, gai_strerror(gr));
    errno = EINVAL;
    return -1;
  }
  for (ai = res; ai; ai = ai->ai_next) {
    fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, ai->ai_protocol);
    if (fd < 0) continue;
    if (connect(fd, ai->ai_addr, ai->ai_addrlen) == 0) break;
    close(fd);
    fd = -1;
  }
  freeaddrinfo(res);
  return fd;
}

/* ------------------------------------------------------------ negotiation */

struct session {
  int fd;
  uint16_t hflags;       /* handshake flags from the greeting */
  uint16_t tflags;       /* transmission flags from GO */
  uint64_t size;
  bool structured;
  bool meta;
  uint32_t meta_id;
  uint64_t next_cookie;
  uint32_t bs_min, bs_pref, bs_max;
  bool have_block_size;
};

static void session_init(struct session *s)
{
  memset(s, 0, sizeof *s);
  s->fd = -1;
  /* Distinct bytes, so a cookie echoed in the wrong byte order shows. */
  s->next_cookie = UINT64_C(0x0102030405060708);
}

static void session_close(struct session *s)
{
  if (s->fd >= 0) close(s->fd);
  s->fd = -1;
}

static int greet(struct session *s)
{
  uint8_t g[18];
  int r;
  s->fd = dial();
  if (s->fd < 0) return failf("cannot connect: %s", strerror(errno));
  if ((r = recv_full(s->fd, g, sizeof g, IO_TIMEOUT_MS)) != IO_OK)
    return failf("reading the greeting: %s", io_str(r));
  if (get_be64(g) != NBD_MAGIC)
    return failf("greeting magic is 0x%016" PRIx64 ", expected NBDMAGIC", get_be64(g));
  if (get_be64(g + 8) != NBD_IHAVEOPT)
    return failf("greeting is not newstyle (0x%016" PRIx64 ")", get_be64(g + 8));
  s->hflags = get_be16(g + 16);
  if (!(s->hflags & NBD_FLAG_FIXED_NEWSTYLE))
    return failf("server does not offer fixed newstyle (handshake flags 0x%04x)", s->hflags);
  return 0;
}

static int send_u32(int fd, uint32_t v)
{
  uint8_t b[4];
  put_be32(b, v);
  return send_full(fd, b, 4);
}

/* Sends an option header declaring declared_len, followed by data_len bytes. */
static int send_opt_raw(int fd, uint64_t magic, uint32_t opt, uint32_t declared_len,
                        const void *data, size_t data_len)
{
  uint8_t h[16];
  int r;
  put_be64(h, magic);
  put_be32(h + 8, opt);
  put_be32(h + 12, declared_len);
  if ((r = send_full(fd, h, sizeof h)) != IO_OK) return r;
  return data_len ? send_full(fd, data, data_len) : IO_OK;
}

static int send_opt(int fd, uint32_t opt, const void *data, uint32_t len)
{
  return send_opt_raw(fd, NBD_IHAVEOPT, opt, len, data, len);
}

struct opt_reply {
  uint32_t opt, type, len;
  uint8_t data[MAX_OPT_REPLY];
};
static struct opt_reply rep;   /* the last reply received */

/* Reads one option reply into rep and checks its magic and option field. */
static int recv_opt_reply(int fd, uint32_t want_opt)
{
  uint8_t h[20];
  int r;
  if ((r = recv_full(fd, h, sizeof h, IO_TIMEOUT_MS)) != IO_OK)
    return failf("waiting for the reply to option %u: %s", want_opt, io_str(r));
  if (get_be64(h) != NBD_OPT_REPLY_MAGIC)
    return failf("option reply magic is 0x%016" PRIx64, get_be64(h));
  rep.opt = get_be32(h + 8);
  rep.type = get_be32(h + 12);
  rep.len = get_be32(h + 16);
  if (rep.opt != want_opt)
    return failf("reply names option %u, expected %u", rep.opt, want_opt);
  if (rep.len > MAX_OPT_REPLY)
    return failf("option reply length %u is absurd", rep.len);
  if ((r = recv_full(fd, rep.data, rep.len, IO_TIMEOUT_MS)) != IO_OK)
    return failf("reading the option reply payload: %s", io_str(r));
  if ((rep.type & NBD_REP_FLAG_ERROR) && rep.len > 0 && rep.len > NBD_MAX_STRING)
    return failf("error message of %u bytes is longer than the protocol allows", rep.len);
  return 0;
}

/* Expects a single reply of type want to option opt. */
static int expect_reply(int fd, uint32_t opt, uint32_t want)
{
  if (recv_opt_reply(fd, opt) < 0) return -1;
  if (rep.type != want)
    return failf("option %u got %s (0x%08x), expected %s", opt, rep_str(rep.type),
                 rep.type, rep_str(want));
  return 0;
}

static int send_flags(struct session *s, uint32_t cflags)
{
  int r = send_u32(s->fd, cflags);
  return r == IO_OK ? 0 : failf("sending client flags: %s", io_str(r));
}

/* dial + greeting + client flags (fixed newstyle, and no-zeroes if offered) */
static int handshake(struct session *s)
{
  if (greet(s) < 0) return -1;
  uint32_t f = NBD_FLAG_C_FIXED_NEWSTYLE;
  if (s->hflags & NBD_FLAG_NO_ZEROES) f |= NBD_FLAG_C_NO_ZEROES;
  return send_flags(s, f);
}

/* Builds a GO/INFO payload. */
static size_t info_payload(uint8_t *buf, const char *name, uint16_t n_infos,
                           const uint16_t *infos)
{
  size_t n = strlen(name), p = 0;
  put_be32(buf, n); p += 4;
  memcpy(buf + p, name, n); p += n;
  put_be16(buf + p, n_infos); p += 2;
  for (unsigned i = 0; i < n_infos; i++, p += 2)
    put_be16(buf + p, infos[i]);
  return p;
}

/* Sends GO or INFO and reads the replies up to ACK or an error.  Returns 0
 * on ACK, 1 with *err set on an error reply, -1 on failure. */
static int go_or_info(struct session *s, uint32_t opt, const char *name,
                      bool want_block_size, uint32_t *err)
{
  uint8_t buf[NBD_MAX_STRING + 16];
  uint16_t infos[1] = { NBD_INFO_BLOCK_SIZE };
  bool got_export = false;
  size_t len;
  int r;
  if (strlen(name) > NBD_MAX_STRING) return failf("export name too long");
  len = info_payload(buf, name, want_block_size ? 1 : 0, infos);
  if ((r = send_opt(s->fd, opt, buf, len)) != IO_OK)
    return failf("sending option %u: %s", opt, io_str(r));
  for (int i = 0; i < 64; i++) {
    if (recv_opt_reply(s->fd, opt) < 0) return -1;
    if (rep.type & NBD_REP_FLAG_ERROR) { *err = rep.type; return 1; }
    if (rep.type == NBD_REP_ACK) {
      if (rep.len != 0) return failf("ACK with a %u-byte payload", rep.len);
      if (!got_export) return failf("ACK without NBD_INFO_EXPORT");
      return 0;
    }
    if (rep.type != NBD_REP_INFO)
      return failf("unexpected reply %s (0x%08x) to option %u", rep_str(rep.type), rep.type, opt);
    if (rep.len < 2) return failf("NBD_REP_INFO of %u bytes", rep.len);
    switch (get_be16(rep.data)) {
    case NBD_INFO_EXPORT:
      /* 2 bytes type, 8 bytes size, 2 bytes (16-bit) transmission flags. */
      if (rep.len != 12)
        return failf("NBD_INFO_EXPORT is %u bytes, expected 12 (flags must be 16-bit)", rep.len);
      s->size = get_be64(rep.data + 2);
      s->tflags = get_be16(rep.data + 10);
      got_export = true;
      break;
    case NBD_INFO_BLOCK_SIZE:
      if (rep.len != 14) return failf("NBD_INFO_BLOCK_SIZE is %u bytes, expected 14", rep.len);
      s->bs_min = get_be32(rep.data + 2);
      s->bs_pref = get_be32(rep.data + 6);
      s->bs_max = get_be32(rep.data + 10);
      s->have_block_size = true;
      break;
    default:
      break;   /* other information is allowed */
    }
  }
  return failf("more than 64 replies to option %u", opt);
}

static int go(struct session *s, const char *name)
{
  uint32_t err = 0;
  int r = go_or_info(s, NBD_OPT_GO, name, false, &err);
  if (r == 1) return failf("GO for export '%s' failed with %s (0x%08x)", name, rep_str(err), err);
  if (r < 0) return -1;
  if (expect_size && s->size != expect_size)
    return failf("export size is %" PRIu64 ", expected %" PRIu64, s->size, expect_size);
  return 0;
}

static int negotiate_structured(struct session *s)
{
  int r = send_opt(s->fd, NBD_OPT_STRUCTURED_REPLY, NULL, 0);
  if (r != IO_OK) return failf("sending STRUCTURED_REPLY: %s", io_str(r));
  if (expect_reply(s->fd, NBD_OPT_STRUCTURED_REPLY, NBD_REP_ACK) < 0) return -1;
  s->structured = true;
  return 0;
}

/* SET/LIST_META_CONTEXT payload for one query. */
static size_t meta_payload(uint8_t *buf, const char *name, const char *query)
{
  size_t n = strlen(name), q = query ? strlen(query) : 0, p = 0;
  put_be32(buf, n); p += 4;
  memcpy(buf + p, name, n); p += n;
  put_be32(buf + p, query ? 1 : 0); p += 4;
  if (query) {
    put_be32(buf + p, q); p += 4;
    memcpy(buf + p, query, q); p += q;
  }
  return p;
}

/* Sends (LIST|SET)_META_CONTEXT for base:allocation; returns the number of
 * META_CONTEXT replies naming it (and its id), or -1. */
static int meta_context(struct session *s, uint32_t opt, const char *query, uint32_t *id)
{
  uint8_t buf[NBD_MAX_STRING + 64];
  size_t len = meta_payload(buf, export_name, query);
  int found = 0, r;
  if ((r = send_opt(s->fd, opt, buf, len)) != IO_OK)
    return failf("sending META_CONTEXT option: %s", io_str(r));
  for (int i = 0; i < 64; i++) {
    if (recv_opt_reply(s->fd, opt) < 0) return -1;
    if (rep.type == NBD_REP_ACK) return found;
    if (rep.type != NBD_REP_META_CONTEXT)
      return failf("META_CONTEXT option got %s (0x%08x)", rep_str(rep.type), rep.type);
    if (rep.len < 4) return failf("META_CONTEXT reply of %u bytes", rep.len);
    if (rep.len - 4 == strlen("base:allocation") &&
        memcmp(rep.data + 4, "base:allocation", rep.len - 4) == 0) {
      found++;
      if (id) *id = get_be32(rep.data);
    } else {
      return failf("server offered context '%.*s' that was not asked for",
                   (int) (rep.len - 4), rep.data + 4);
    }
  }
  return failf("more than 64 META_CONTEXT replies");
}

/* A complete session ready for transmission. */
static int open_session(struct session *s, bool structured, bool meta)
{
  session_init(s);
  if (handshake(s) < 0) return -1;
  if (structured && negotiate_structured(s) < 0) return -1;
  if (meta) {
    int n = meta_context(s, NBD_OPT_SET_META_CONTEXT, "base:allocation", &s->meta_id);
    if (n < 0) return -1;
    if (n != 1) return failf("SET_META_CONTEXT base:allocation selected %d contexts", n);
    s->meta = true;
  }
  return go(s, export_name);
}

/* ------------------------------------------------------------ transmission */

static int send_req(struct session *s, uint16_t flags, uint16_t type, uint64_t cookie,
                    uint64_t off, uint32_t len, const void *payload, size_t plen)
{
  uint8_t h[NBD_REQUEST_SIZE];
  int r;
  put_be32(h, NBD_REQUEST_MAGIC);
  put_be16(h + 4, flags);
  put_be16(h + 6, type);
  put_be64(h + 8, cookie);
  put_be64(h + 16, off);
  put_be32(h + 24, len);
  if ((r = send_full(s->fd, h, sizeof h)) != IO_OK)
    return failf("sending request: %s", io_str(r));
  if (plen && (r = send_full(s->fd, payload, plen)) != IO_OK)
    return failf("sending %zu bytes of payload: %s", plen, io_str(r));
  return 0;
}

#define MAX_EXTENTS 1024
struct reply {
  uint32_t error;          /* NBD error (0 = success) */
  bool error_chunk;        /* came as a structured ERROR chunk */
  uint16_t error_type;
  unsigned chunks;
  unsigned n_extents;      /* BLOCK_STATUS */
  uint32_t ext_len[MAX_EXTENTS], ext_flags[MAX_EXTENTS];
  uint32_t ext_context;
};

static int read_discard(int fd, size_t len, uint8_t *dst)
{
  uint8_t tmp[65536];
  while (len > 0) {
    size_t n = MIN(len, sizeof tmp);
    int r = recv_full(fd, dst ? dst : tmp, n, IO_TIMEOUT_MS);
    if (r != IO_OK) return r;
    if (dst) dst += n;
    len -= n;
  }
  return IO_OK;
}

/* Reads the complete reply to the request (type, cookie, off, len).  For a
 * successful READ the data lands in buf (may be NULL to discard). */
static int recv_reply(struct session *s, uint16_t type, uint64_t cookie, uint64_t off,
                      uint32_t len, uint8_t *buf, struct reply *rp)
{
  uint8_t h[NBD_STRUCTURED_HDR_SIZE];
  uint64_t covered = 0;
  int r;
  memset(rp, 0, offsetof(struct reply, ext_len));
  for (unsigned i = 0; i < 4096; i++) {
    if ((r = recv_full(s->fd, h, 4, IO_TIMEOUT_MS)) != IO_OK)
      return failf("waiting for the reply to %s: %s", nbd_cmd_name(type), io_str(r));
    uint32_t magic = get_be32(h);
    if (magic == NBD_SIMPLE_REPLY_MAGIC) {
      if (s->structured && type == NBD_CMD_READ)
        return failf("simple reply to READ after structured replies were negotiated");
      if (i > 0) return failf("simple reply in the middle of a structured reply");
      if ((r = recv_full(s->fd, h + 4, 12, IO_TIMEOUT_MS)) != IO_OK)
        return failf("reading the reply header: %s", io_str(r));
      rp->error = get_be32(h + 4);
      if (get_be64(h + 8) != cookie)
        return failf("reply cookie 0x%016" PRIx64 ", expected 0x%016" PRIx64, get_be64(h + 8), cookie);
      if (rp->error == 0 && type == NBD_CMD_READ &&
          (r = read_discard(s->fd, len, buf)) != IO_OK)
        return failf("reading %u bytes of READ data: %s", len, io_str(r));
      return 0;
    }
    if (magic != NBD_STRUCTURED_REPLY_MAGIC)
      return failf("reply magic 0x%08x", magic);
    if (!s->structured)
      return failf("structured reply although it was not negotiated");
    if ((r = recv_full(s->fd, h + 4, 16, IO_TIMEOUT_MS)) != IO_OK)
      return failf("reading the chunk header: %s", io_str(r));
    uint16_t cflags = get_be16(h + 4), ctype = get_be16(h + 6);
    uint32_t clen = get_be32(h + 16);
    if (get_be64(h + 8) != cookie)
      return failf("chunk cookie 0x%016" PRIx64 ", expected 0x%016" PRIx64, get_be64(h + 8), cookie);
    rp->chunks++;
    if (ctype == NBD_REPLY_TYPE_OFFSET_DATA) {
      uint8_t o[8];
      if (type != NBD_CMD_READ) return failf("OFFSET_DATA chunk for a non-READ");
      if (clen <= 8) return failf("OFFSET_DATA chunk of %u bytes", clen);
      if ((r = recv_full(s->fd, o, 8, IO_TIMEOUT_MS)) != IO_OK) return failf("chunk: %s", io_str(r));
      uint64_t co = get_be64(o);
      if (co < off || co - off > len || clen - 8 > len - (co - off))
        return failf("OFFSET_DATA [%" PRIu64 ", +%u) outside the request", co, clen - 8);
      if ((r = read_discard(s->fd, clen - 8, buf ? buf + (co - off) : NULL)) != IO_OK)
        return failf("chunk data: %s", io_str(r));
      covered += clen - 8;
    } else if (ctype == NBD_REPLY_TYPE_OFFSET_HOLE) {
      uint8_t o[12];
      if (type != NBD_CMD_READ) return failf("OFFSET_HOLE chunk for a non-READ");
      if (clen != 12) return failf("OFFSET_HOLE chunk of %u bytes, expected 12", clen);
      if ((r = recv_full(s->fd, o, 12, IO_TIMEOUT_MS)) != IO_OK) return failf("chunk: %s", io_str(r));
      uint64_t co = get_be64(o);
      uint32_t hl = get_be32(o + 8);
      if (hl == 0 || co < off || co - off > len || hl > len - (co - off))
        return failf("OFFSET_HOLE [%" PRIu64 ", +%u) outside the request", co, hl);
      if (buf) memset(buf + (co - off), 0, hl);
      covered += hl;
    } else if (ctype == NBD_REPLY_TYPE_NONE) {
      if (clen != 0) return failf("NONE chunk with %u bytes", clen);
      if (!(cflags & NBD_REPLY_FLAG_DONE)) return failf("NONE chunk without DONE");
    } else if (ctype == NBD_REPLY_TYPE_BLOCK_STATUS) {
      uint8_t d[8];
      if (type != NBD_CMD_BLOCK_STATUS) return failf("BLOCK_STATUS chunk for another command");
      if (clen < 12 || (clen - 4) % 8) return failf("BLOCK_STATUS chunk of %u bytes", clen);
      if ((r = recv_full(s->fd, d, 4, IO_TIMEOUT_MS)) != IO_OK) return failf("chunk: %s", io_str(r));
      rp->ext_context = get_be32(d);
      for (uint32_t k = 0; k < (clen - 4) / 8; k++) {
        if ((r = recv_full(s->fd, d, 8, IO_TIMEOUT_MS)) != IO_OK) return failf("chunk: %s", io_str(r));
        if (rp->n_extents < MAX_EXTENTS) {
          rp->ext_len[rp->n_extents] = get_be32(d);
          rp->ext_flags[rp->n_extents] = get_be32(d + 4);
          rp->n_extents++;
        }
      }
    } else if (ctype & 0x8000) {
      uint8_t e[6];
      if (clen < 6) return failf("error chunk of %u bytes", clen);
      if ((r = recv_full(s->fd, e, 6, IO_TIMEOUT_MS)) != IO_OK) return failf("chunk: %s", io_str(r));
      uint16_t mlen = get_be16(e + 4);
      if (ctype == NBD_REPLY_TYPE_ERROR && (uint32_t) 6 + mlen != clen)
        return failf("ERROR chunk: message length %u does not match chunk length %u", mlen, clen);
      if (ctype == NBD_REPLY_TYPE_ERROR_OFFSET && (uint32_t) 6 + mlen + 8 != clen)
        return failf("ERROR_OFFSET chunk: lengths %u/%u inconsistent", mlen, clen);
      if ((r = read_discard(s->fd, clen - 6, NULL)) != IO_OK) return failf("chunk: %s", io_str(r));
      rp->error = get_be32(e);
      rp->error_chunk = true;
      rp->error_type = ctype;
      if (rp->error == 0) return failf("error chunk with error 0");
    } else {
      return failf("unknown chunk type %u", ctype);
    }
    if (cflags & NBD_REPLY_FLAG_DONE) {
      if (type == NBD_CMD_READ && rp->error == 0 && covered != len)
        return failf("READ chunks cover %" PRIu64 " bytes of %u", covered, len);
      if (type == NBD_CMD_BLOCK_STATUS && rp->error == 0 && rp->n_extents == 0)
        return failf("BLOCK_STATUS reply without a descriptor chunk");
      return 0;
    }
  }
  return failf("more than 4096 chunks in one reply");
}

/* One request, one reply: 0 with *err = the NBD error, or -1. */
static int request(struct session *s, uint16_t flags, uint16_t type, uint64_t off,
                   uint32_t len, const void *payload, uint8_t *buf, uint32_t *err)
{
  struct reply rp;
  uint64_t cookie = s->next_cookie++;
  size_t plen = type == NBD_CMD_WRITE ? len : 0;
  if (send_req(s, flags, type, cookie, off, len, payload, plen) < 0) return -1;
  if (recv_reply(s, type, cookie, off, len, buf, &rp) < 0) return -1;
  *err = rp.error;
  return 0;
}

static const char *nbd_err_str(uint32_t e)
{
  switch (e) {
  case 0: return "success";
  case NBD_EPERM: return "EPERM";
  case NBD_EIO: return "EIO";
  case NBD_ENOMEM: return "ENOMEM";
  case NBD_EINVAL: return "EINVAL";
  case NBD_ENOSPC: return "ENOSPC";
  case NBD_EOVERFLOW: return "EOVERFLOW";
  case NBD_ENOTSUP: return "ENOTSUP";
  case NBD_ESHUTDOWN: return "ESHUTDOWN";
  default: return "unknown error";
  }
}

/* Sends a request and requires error want from it. */
static int expect_error(struct session *s, uint16_t flags, uint16_t type, uint64_t off,
                        uint32_t len, const void *payload, uint32_t want)
{
  uint32_t err;
  if (request(s, flags, type, off, len, payload, NULL, &err) < 0) return -1;
  if (err != want)
    return failf("got %s (%u), expected %s (%u)", nbd_err_str(err), err, nbd_err_str(want), want);
  return 0;
}

/* A READ that must work: the connection is still in sync. */
static int still_works(struct session *s)
{
  uint8_t buf[4096];
  uint32_t err;
  uint32_t len = s->size < sizeof buf ? (uint32_t) s->size : sizeof buf;
  if (len == 0) return 0;
  if (request(s, 0, NBD_CMD_READ, 0, len, NULL, buf, &err) < 0)
    return failf("connection unusable after the error: %s", why);
  if (err) return failf("READ after the error failed with %s", nbd_err_str(err));
  return 0;
}

static void log_write(uint64_t off, uint64_t len, unsigned byte)
{
  if (write_log) {
    fprintf(write_log, "%" PRIu64 " %" PRIu64 " %u\n", off, len, byte);
    fflush(write_log);
  }
}

static uint64_t scratch_off(const struct session *s) { return s->size - MIB; }

/* ------------------------------------------------------------ negotiation cases */

static int case_greeting_flags(void)
{
  struct session s;
  session_init(&s);
  int rc = greet(&s);
  if (rc == 0 && !(s.hflags & NBD_FLAG_NO_ZEROES))
    rc = failf("handshake flags 0x%04x lack NO_ZEROES", s.hflags);
  else if (rc == 0 && (s.hflags & ~(NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES)))
    rc = failf("handshake flags 0x%04x have undefined bits set", s.hflags);
  session_close(&s);
  return rc;
}

/* After bad client flags the server must hang up, not answer a valid option. */
static int expect_hangup_after(struct session *s, const void *bytes, size_t n)
{
  size_t extra;
  int r = send_full(s->fd, bytes, n);
  if (r != IO_OK && r != IO_EOF) return failf("sending: %s", io_str(r));
  /* A valid LIST that a server still negotiating would answer. */
  send_opt(s->fd, NBD_OPT_LIST, NULL, 0);
  r = wait_closed(s->fd, IO_TIMEOUT_MS, &extra);
  if (r != IO_OK) return failf("server did not disconnect (%s)", io_str(r));
  if (extra) return failf("server sent %zu bytes before disconnecting", extra);
  return 0;
}

static int case_client_flags_garbage_disconnects(void)
{
  struct session s;
  session_init(&s);
  int rc = greet(&s);
  if (rc == 0) rc = expect_hangup_after(&s, "GET / HTTP/1.0\r\n\r\n", 18);
  session_close(&s);
  return rc;
}

static int case_client_flags_unknown_bits_disconnect(void)
{
  struct session s;
  uint8_t b[4];
  session_init(&s);
  int rc = greet(&s);
  put_be32(b, NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES | 0x80000000u);
  if (rc == 0) rc = expect_hangup_after(&s, b, 4);
  session_close(&s);
  return rc;
}

static int case_option_bad_magic_disconnects(void)
{
  struct session s;
  uint8_t h[16];
  size_t extra;
  session_init(&s);
  int rc = handshake(&s);
  if (rc == 0) {
    put_be64(h, NBD_IHAVEOPT ^ 1);
    put_be32(h + 8, NBD_OPT_LIST);
    put_be32(h + 12, 0);
    send_full(s.fd, h, sizeof h);
    int r = wait_closed(s.fd, IO_TIMEOUT_MS, &extra);
    if (r != IO_OK) rc = failf("server did not disconnect (%s)", io_str(r));
    else if (extra) rc = failf("server sent %zu bytes to an option with a bad magic", extra);
  }
  session_close(&s);
  return rc;
}

static int case_option_truncated_then_hangup(void)
{
  struct session s;
  uint8_t data[10] = { 0 };
  session_init(&s);
  int rc = handshake(&s);
  /* Declares 1000 bytes, sends 10, hangs up: the server must just drop it
   * (the probe after this case checks that it still serves). */
  if (rc == 0) send_opt_raw(s.fd, NBD_IHAVEOPT, NBD_OPT_GO, 1000, data, sizeof data);
  session_close(&s);
  return rc;
}

static int case_option_length_absurd(void)
{
  struct session s;
  uint8_t junk[4096] = { 0 };
  session_init(&s);
  int rc = handshake(&s);
  if (rc != 0) goto out;
  if (send_opt_raw(s.fd, NBD_IHAVEOPT, NBD_OPT_GO, 0xffffffffu, junk, sizeof junk) != IO_OK) {
    /* Disconnected while we were still sending: acceptable. */
    goto out;
  }
  uint8_t h[20];
  int r = recv_full(s.fd, h, sizeof h, IO_TIMEOUT_MS);
  if (r == IO_EOF) goto out;                /* disconnect: acceptable */
  if (r != IO_OK) { rc = failf("neither ERR_TOO_BIG nor a disconnect: %s", io_str(r)); goto out; }
  if (get_be64(h) != NBD_OPT_REPLY_MAGIC || get_be32(h + 12) != NBD_REP_ERR_TOO_BIG)
    rc = failf("reply 0x%08x to a 4 GiB option, expected ERR_TOO_BIG or a disconnect",
               get_be32(h + 12));
out:
  session_close(&s);
  return rc;
}

static int case_option_too_big_payload_skipped(void)
{
  struct session s;
  uint32_t len = 64 * 1024 + 1;
  uint8_t *junk = calloc(1, len);
  session_init(&s);
  int rc = junk ? handshake(&s) : failf("out of memory");
  if (rc == 0) {
    memset(junk, 0xff, len);
    int r = send_opt(s.fd, NBD_OPT_GO, junk, len);
    if (r != IO_OK) rc = failf("sending a %u-byte option: %s", len, io_str(r));
  }
  if (rc == 0) rc = expect_reply(s.fd, NBD_OPT_GO, NBD_REP_ERR_TOO_BIG);
  if (rc == 0) rc = go(&s, export_name);     /* the payload was skipped */
  if (rc == 0) rc = still_works(&s);
  free(junk);
  session_close(&s);
  return rc;
}

static int case_option_unknown_unsup_then_go(void)
{
  struct session s;
  session_init(&s);
  int rc = handshake(&s);
  if (rc == 0 && send_opt(s.fd, 0x1234, "hello", 5) != IO_OK) rc = failf("send failed");
  if (rc == 0) rc = expect_reply(s.fd, 0x1234, NBD_REP_ERR_UNSUP);
  if (rc == 0) rc = go(&s, export_name);
  if (rc == 0) rc = still_works(&s);
  session_close(&s);
  return rc;
}

static int case_option_list_with_payload_invalid(void)
{
  struct session s;
  session_init(&s);
  int rc = handshake(&s);
  if (rc == 0 && send_opt(s.fd, NBD_OPT_LIST, "abcd", 4) != IO_OK) rc = failf("send failed");
  if (rc == 0) rc = expect_reply(s.fd, NBD_OPT_LIST, NBD_REP_ERR_INVALID);
  if (rc == 0) rc = go(&s, export_name);
  session_close(&s);
  return rc;
}

static int case_option_list_names_export(void)
{
  struct session s;
  bool found = false;
  session_init(&s);
  int rc = handshake(&s);
  if (rc == 0 && send_opt(s.fd, NBD_OPT_LIST, NULL, 0) != IO_OK) rc = failf("send failed");
  for (int i = 0; rc == 0 && i < 1024; i++) {
    if ((rc = recv_opt_reply(s.fd, NBD_OPT_LIST)) < 0) break;
    if (rep.type == NBD_REP_ACK) {
      if (!found) rc = failf("LIST did not name export '%s'", export_name);
      break;
    }
    if (rep.type != NBD_REP_SERVER) { rc = failf("LIST got %s", rep_str(rep.type)); break; }
    if (rep.len < 4 || get_be32(rep.data) > rep.len - 4) {
      rc = failf("REP_SERVER with inconsistent lengths (%u, name %u)", rep.len,
                 rep.len >= 4 ? get_be32(rep.data) : 0);
      break;
    }
    uint32_t n = get_be32(rep.data);
    if (n == strlen(export_name) && memcmp(rep.data + 4, export_name, n) == 0) found = true;
  }
  session_close(&s);
  return rc;
}

static int case_option_structured_reply_with_payload_invalid(void)
{
  struct session s;
  session_init(&s);
  int rc = handshake(&s);
  if (rc == 0 && send_opt(s.fd, NBD_OPT_STRUCTURED_REPLY, "x", 1) != IO_OK) rc = failf("send failed");
  if (rc == 0) rc = expect_reply(s.fd, NBD_OPT_STRUCTURED_REPLY, NBD_REP_ERR_INVALID);
  if (rc == 0) rc = go(&s, export_name);
  session_close(&s);
  return rc;
}

/* GO with a payload whose inner lengths disagree with the option length. */
static int go_malformed(const uint8_t *payload, uint32_t len)
{
  struct session s;
  session_init(&s);
  int rc = handshake(&s);
  if (rc == 0 && send_opt(s.fd, NBD_OPT_GO, payload, len) != IO_OK) rc = failf("send failed");
  if (rc == 0) rc = expect_reply(s.fd, NBD_OPT_GO, NBD_REP_ERR_INVALID);
  if (rc == 0) rc = go(&s, export_name);
  if (rc == 0) rc = still_works(&s);
  session_close(&s);
  return rc;
}

static int case_option_go_name_longer_than_option_invalid(void)
{
  uint8_t p[10] = { 0 };
  put_be32(p, 100);                /* name length 100 in a 10-byte option */
  return go_malformed(p, sizeof p);
}

static int case_option_go_info_count_mismatch_invalid(void)
{
  uint8_t p[64];
  uint16_t infos[1] = { NBD_INFO_BLOCK_SIZE };
  size_t n = info_payload(p, export_name, 1, infos);
  put_be16(p + 4 + strlen(export_name), 3);   /* claims 3 items, carries 1 */
  return go_malformed(p, n);
}

static int case_option_go_too_short_invalid(void)
{
  uint8_t p[3] = { 0 };
  return go_malformed(p, sizeof p);
}

static int case_option_go_unknown_export(void)
{
  struct session s;
  uint32_t err = 0;
  session_init(&s);
  int rc = handshake(&s);
  if (rc == 0) {
    int r = go_or_info(&s, NBD_OPT_GO, "no-such-export-xyzzy", false, &err);
    if (r == 0) rc = failf("GO for an unknown export succeeded");
    else if (r < 0) rc = -1;
    else if (err != NBD_REP_ERR_UNKNOWN)
      rc = failf("got %s (0x%08x), expected ERR_UNKNOWN", rep_str(err), err);
  }
  if (rc == 0) rc = go(&s, export_name);
  session_close(&s);
  return rc;
}

static int case_option_info_then_go(void)
{
  struct session s;
  uint32_t err = 0;
  session_init(&s);
  int rc = handshake(&s);
  if (rc == 0) {
    int r = go_or_info(&s, NBD_OPT_INFO, export_name, false, &err);
    if (r == 1) rc = failf("INFO failed with %s", rep_str(err));
    else if (r < 0) rc = -1;
    else if (expect_size && s.size != expect_size)
      rc = failf("INFO reports size %" PRIu64 ", expected %" PRIu64, s.size, expect_size);
  }
  if (rc == 0) rc = go(&s, export_name);      /* INFO left us negotiating */
  if (rc == 0) rc = still_works(&s);
  session_close(&s);
  return rc;
}

static int case_option_go_block_size(void)
{
  struct session s;
  uint32_t err = 0;
  session_init(&s);
  int rc = handshake(&s);
  if (rc == 0) {
    int r = go_or_info(&s, NBD_OPT_GO, export_name, true, &err);
    if (r == 1) rc = failf("GO failed with %s", rep_str(err));
    else if (r < 0) rc = -1;
  }
  if (rc == 0 && !s.have_block_size)
    rc = failf("NBD_INFO_BLOCK_SIZE requested but not sent");
  if (rc == 0 && (!is_power_of_2(s.bs_min) || s.bs_min > 65536 ||
                  !is_power_of_2(s.bs_pref) || s.bs_pref < s.bs_min ||
                  s.bs_max < s.bs_pref || s.bs_max % s.bs_min ||
                  s.bs_max > MAX_PAYLOAD))
    rc = failf("inconsistent block sizes min %u preferred %u max %u",
               s.bs_min, s.bs_pref, s.bs_max);
  if (rc == 0) rc = still_works(&s);
  session_close(&s);
  return rc;
}

static int case_option_starttls_refused_then_go(void)
{
  struct session s;
  session_init(&s);
  int rc = handshake(&s);
  if (rc == 0 && send_opt(s.fd, NBD_OPT_STARTTLS, NULL, 0) != IO_OK) rc = failf("send failed");
  if (rc == 0) rc = recv_opt_reply(s.fd, NBD_OPT_STARTTLS);
  if (rc == 0 && !(rep.type & NBD_REP_FLAG_ERROR))
    rc = failf("STARTTLS got %s; a server without TLS must refuse it", rep_str(rep.type));
  else if (rc == 0 && rep.type != NBD_REP_ERR_POLICY && rep.type != NBD_REP_ERR_UNSUP)
    rc = failf("STARTTLS got %s, expected ERR_POLICY (or ERR_UNSUP)", rep_str(rep.type));
  if (rc == 0) rc = go(&s, export_name);
  if (rc == 0) rc = still_works(&s);
  session_close(&s);
  return rc;
}

static int case_option_abort_closes(void)
{
  struct session s;
  uint8_t h[20];
  size_t extra;
  session_init(&s);
  int rc = handshake(&s);
  if (rc == 0 && send_opt(s.fd, NBD_OPT_ABORT, NULL, 0) != IO_OK) rc = failf("send failed");
  if (rc == 0) {
    /* The server should ACK, and may just close. */
    int r = recv_full(s.fd, h, sizeof h, IO_TIMEOUT_MS);
    if (r == IO_OK && (get_be64(h) != NBD_OPT_REPLY_MAGIC || get_be32(h + 12) != NBD_REP_ACK ||
                       get_be32(h + 16) != 0))
      rc = failf("ABORT got reply type 0x%08x, expected ACK", get_be32(h + 12));
    else if (r == IO_OK && wait_closed(s.fd, IO_TIMEOUT_MS, &extra) != IO_OK)
      rc = failf("server did not close after ABORT");
    else if (r == IO_OK && extra)
      rc = failf("server sent %zu bytes after acknowledging ABORT", extra);
    else if (r != IO_OK && r != IO_EOF)
      rc = failf("after ABORT: %s", io_str(r));
  }
  session_close(&s);
  return rc;
}

static int case_option_meta_context_base_allocation(void)
{
  struct session s;
  uint32_t id = 0;
  int n;
  session_init(&s);
  int rc = handshake(&s);
  if (rc == 0) rc = negotiate_structured(&s);
  if (rc == 0 && (n = meta_context(&s, NBD_OPT_LIST_META_CONTEXT, "base:allocation", NULL)) != 1)
    rc = n < 0 ? -1 : failf("LIST_META_CONTEXT base:allocation: %d replies", n);
  if (rc == 0 && (n = meta_context(&s, NBD_OPT_LIST_META_CONTEXT, NULL, NULL)) < 1)
    rc = n < 0 ? -1 : failf("LIST_META_CONTEXT with no query lists nothing");
  if (rc == 0 && (n = meta_context(&s, NBD_OPT_SET_META_CONTEXT, "nosuch:context", NULL)) != 0)
    rc = n < 0 ? -1 : failf("SET_META_CONTEXT of an unknown context selected %d", n);
  if (rc == 0 && (n = meta_context(&s, NBD_OPT_SET_META_CONTEXT, "base:allocation", &id)) != 1)
    rc = n < 0 ? -1 : failf("SET_META_CONTEXT base:allocation: %d replies", n);
  if (rc == 0) rc = go(&s, export_name);
  session_close(&s);
  return rc;
}

static int case_option_meta_context_malformed_invalid(void)
{
  struct session s;
  uint8_t p[64];
  size_t n = meta_payload(p, export_name, "base:allocation");
  session_init(&s);
  int rc = handshake(&s);
  if (rc == 0) rc = negotiate_structured(&s);
  /* Claims two queries, carries one. */
  put_be32(p + 4 + strlen(export_name), 2);
  if (rc == 0 && send_opt(s.fd, NBD_OPT_SET_META_CONTEXT, p, n) != IO_OK) rc = failf("send failed");
  if (rc == 0) rc = expect_reply(s.fd, NBD_OPT_SET_META_CONTEXT, NBD_REP_ERR_INVALID);
  if (rc == 0) rc = go(&s, export_name);
  session_close(&s);
  return rc;
}

/* NBD_OPT_EXPORT_NAME: size, flags, and 124 zero bytes unless NO_ZEROES. */
static int export_name_case(bool no_zeroes)
{
  struct session s;
  uint8_t r10[10], zeros[124], h[16];
  int r;
  session_init(&s);
  int rc = greet(&s);
  if (rc == 0) rc = send_flags(&s, NBD_FLAG_C_FIXED_NEWSTYLE | (no_zeroes ? NBD_FLAG_C_NO_ZEROES : 0));
  if (rc == 0 && send_opt(s.fd, NBD_OPT_EXPORT_NAME, export_name, strlen(export_name)) != IO_OK)
    rc = failf("send failed");
  if (rc == 0 && (r = recv_full(s.fd, r10, sizeof r10, IO_TIMEOUT_MS)) != IO_OK)
    rc = failf("EXPORT_NAME reply: %s", io_str(r));
  if (rc == 0) {
    s.size = get_be64(r10);
    s.tflags = get_be16(r10 + 8);
    if (expect_size && s.size != expect_size)
      rc = failf("EXPORT_NAME size %" PRIu64 ", expected %" PRIu64, s.size, expect_size);
    else if (!(s.tflags & NBD_FLAG_HAS_FLAGS))
      rc = failf("EXPORT_NAME flags 0x%04x lack HAS_FLAGS", s.tflags);
  }
  if (rc == 0 && !no_zeroes) {
    if ((r = recv_full(s.fd, zeros, sizeof zeros, IO_TIMEOUT_MS)) != IO_OK)
      rc = failf("the 124 zero bytes: %s", io_str(r));
    else if (!is_zero(zeros, sizeof zeros))
      rc = failf("the 124 bytes after EXPORT_NAME's reply are not zero");
  }
  /* The next thing on the wire must be the reply to our READ. */
  if (rc == 0) rc = send_req(&s, 0, NBD_CMD_READ, 42, 0, 512, NULL, 0);
  if (rc == 0 && (r = recv_full(s.fd, h, sizeof h, IO_TIMEOUT_MS)) != IO_OK)
    rc = failf("READ reply: %s", io_str(r));
  if (rc == 0 && get_be32(h) != NBD_SIMPLE_REPLY_MAGIC)
    rc = failf("bytes after the EXPORT_NAME reply are %02x%02x%02x%02x, not a reply to READ%s",
               h[0], h[1], h[2], h[3], no_zeroes ? " (zeros sent despite NO_ZEROES?)" : "");
  else if (rc == 0 && (get_be32(h + 4) != 0 || get_be64(h + 8) != 42))
    rc = failf("READ reply error %u cookie %" PRIu64, get_be32(h + 4), get_be64(h + 8));
  session_close(&s);
  return rc;
}

static int case_export_name_with_zeroes(void) { return export_name_case(false); }
static int case_export_name_no_zeroes(void) { return export_name_case(true); }

static int case_export_name_unknown_disconnects(void)
{
  struct session s;
  size_t extra;
  const char *bad = "no-such-export-xyzzy";
  session_init(&s);
  int rc = handshake(&s);
  if (rc == 0 && send_opt(s.fd, NBD_OPT_EXPORT_NAME, bad, strlen(bad)) != IO_OK) rc = failf("send failed");
  if (rc == 0) {
    int r = wait_closed(s.fd, IO_TIMEOUT_MS, &extra);
    if (r != IO_OK) rc = failf("no disconnect after EXPORT_NAME of an unknown export (%s)", io_str(r));
    else if (extra) rc = failf("server sent %zu bytes instead of disconnecting", extra);
  }
  session_close(&s);
  return rc;
}

static int case_transmission_flags_and_size(void)
{
  struct session s;
  int rc = open_session(&s, false, false);
  /* A read-only export need not offer FLUSH and FUA. */
  uint16_t need = NBD_FLAG_HAS_FLAGS |
                  (readonly_mode ? 0 : NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_FUA);
  if (rc == 0 && (s.tflags & need) != need)
    rc = failf("transmission flags 0x%04x lack HAS_FLAGS|SEND_FLUSH|SEND_FUA (0x%04x)%s",
               s.tflags, need, (s.tflags & 0x0d00) == 0x0d00 ? " - byte-swapped?" : "");
  else if (rc == 0 && (s.tflags & 0xf000))
    rc = failf("transmission flags 0x%04x set undefined bits", s.tflags);
  else if (rc == 0 && !readonly_mode && (s.tflags & NBD_FLAG_READ_ONLY))
    rc = failf("writable export advertised READ_ONLY (0x%04x)", s.tflags);
  else if (rc == 0 && readonly_mode && !(s.tflags & NBD_FLAG_READ_ONLY))
    rc = failf("read-only export lacks READ_ONLY (0x%04x)", s.tflags);
  else if (rc == 0 && s.size < 2 * MIB)
    rc = failf("export of %" PRIu64 " bytes is too small for these tests (need 2 MiB)", s.size);
  session_close(&s);
  return rc;
}

/* ------------------------------------------------------------ transmission cases */

static int case_read_ok(void)
{
  struct session s;
  int rc = open_session(&s, false, false);
  if (rc == 0) rc = still_works(&s);
  session_close(&s);
  return rc;
}

#define SIMPLE_ERROR_CASE(fn, flags, type, off_expr, len, want)        \
  static int fn(void)                                                  \
  {                                                                    \
    struct session s;                                                  \
    int rc = open_session(&s, false, false);                           \
    if (rc == 0)                                                       \
      rc = expect_error(&s, flags, type, off_expr, len, NULL, want);   \
    if (rc == 0) rc = still_works(&s);                                 \
    session_close(&s);                                                 \
    return rc;                                                         \
  }

SIMPLE_ERROR_CASE(case_read_past_end_einval, 0, NBD_CMD_READ, s.size - 512, 1024, NBD_EINVAL)
SIMPLE_ERROR_CASE(case_read_at_end_einval, 0, NBD_CMD_READ, s.size, 1, NBD_EINVAL)
SIMPLE_ERROR_CASE(case_read_offset_overflow_einval, 0, NBD_CMD_READ,
                  UINT64_C(0xffffffffffff0000), 0x20000, NBD_EINVAL)
SIMPLE_ERROR_CASE(case_read_zero_length_einval, 0, NBD_CMD_READ, 0, 0, NBD_EINVAL)
SIMPLE_ERROR_CASE(case_read_over_32m_eoverflow, 0, NBD_CMD_READ, 0, MAX_PAYLOAD + 1, NBD_EOVERFLOW)
SIMPLE_ERROR_CASE(case_read_unknown_flag_einval, 0x8000, NBD_CMD_READ, 0, 4096, NBD_EINVAL)
SIMPLE_ERROR_CASE(case_unknown_command_einval, 0, 99, 0, 4096, NBD_EINVAL)
SIMPLE_ERROR_CASE(case_block_status_simple_without_meta_einval, 0, NBD_CMD_BLOCK_STATUS, 0, 4096, NBD_EINVAL)

static int case_flush_zero_range_ok(void)
{
  struct session s;
  int rc = open_session(&s, false, false);
  if (rc == 0 && !(s.tflags & NBD_FLAG_SEND_FLUSH)) {
    if (!readonly_mode) rc = failf("writable export without SEND_FLUSH");
    else rc = expect_error(&s, 0, NBD_CMD_FLUSH, 0, 0, NULL, NBD_EINVAL);
  } else if (rc == 0) {
    rc = expect_error(&s, 0, NBD_CMD_FLUSH, 0, 0, NULL, 0);
  }
  if (rc == 0) rc = still_works(&s);
  session_close(&s);
  return rc;
}

static int case_read_32m_ok(void)
{
  struct session s;
  uint32_t err;
  uint8_t *buf = malloc(MAX_PAYLOAD);
  int rc = buf ? open_session(&s, false, false) : failf("out of memory");
  if (rc == 0 && s.size < MAX_PAYLOAD) rc = skipf("export smaller than 32 MiB");
  if (rc == 0 && request(&s, 0, NBD_CMD_READ, 0, MAX_PAYLOAD, NULL, buf, &err) < 0) rc = -1;
  if (rc == 0 && err) rc = failf("32 MiB READ failed with %s", nbd_err_str(err));
  if (rc == 0) rc = still_works(&s);
  free(buf);
  session_close(&s);
  return rc;
}

static int case_write_past_end_enospc_payload_consumed(void)
{
  struct session s;
  uint8_t buf[8192];
  memset(buf, 0xee, sizeof buf);
  int rc = open_session(&s, false, false);
  if (rc == 0) rc = expect_error(&s, 0, NBD_CMD_WRITE, s.size - 4096, sizeof buf, buf, NBD_ENOSPC);
  if (rc == 0) rc = still_works(&s);
  session_close(&s);
  return rc;
}

static int case_write_unknown_flag_einval_payload_consumed(void)
{
  struct session s;
  uint8_t buf[4096];
  memset(buf, 0xee, sizeof buf);
  int rc = open_session(&s, false, false);
  if (rc == 0) rc = expect_error(&s, 0x8000, NBD_CMD_WRITE, scratch_off(&s), sizeof buf, buf, NBD_EINVAL);
  if (rc == 0) rc = still_works(&s);
  session_close(&s);
  return rc;
}

static int case_write_over_32m_error_server_survives(void)
{
  struct session s;
  struct reply rp;
  uint32_t len = MAX_PAYLOAD + 4096;
  uint8_t *buf = malloc(len);
  int rc = buf ? open_session(&s, false, false) : failf("out of memory");
  if (rc == 0) {
    memset(buf, 0xee, len);
    /* The header, then the payload.  The server may reply with an error and
     * skip the payload, or disconnect: both are fine, success is not. */
    rc = send_req(&s, 0, NBD_CMD_WRITE, 7, 0, len, NULL, 0);
    if (rc == 0) {
      int r = send_full(s.fd, buf, len);
      if (r == IO_EOF) goto out;                 /* disconnected */
      if (r != IO_OK) { rc = failf("sending the payload: %s", io_str(r)); goto out; }
      saw_eof = false;
      if (recv_reply(&s, NBD_CMD_WRITE, 7, 0, len, NULL, &rp) < 0) {
        if (!saw_eof) rc = -1;                   /* disconnected otherwise */
        goto out;
      }
      if (rp.error == 0) rc = failf("a WRITE of 32 MiB + 4 KiB succeeded");
      else rc = still_works(&s);                 /* payload skipped */
    }
  }
out:
  free(buf);
  session_close(&s);
  return rc;
}

static int case_write_zeroes_past_end_enospc(void)
{
  struct session s;
  int rc = open_session(&s, false, false);
  if (rc == 0 && !(s.tflags & NBD_FLAG_SEND_WRITE_ZEROES)) rc = skipf("WRITE_ZEROES not advertised");
  if (rc == 0) rc = expect_error(&s, 0, NBD_CMD_WRITE_ZEROES, s.size - 4096, 8192, NULL, NBD_ENOSPC);
  if (rc == 0) rc = still_works(&s);
  session_close(&s);
  return rc;
}

static int case_trim_past_end_enospc(void)
{
  struct session s;
  int rc = open_session(&s, false, false);
  if (rc == 0 && !(s.tflags & NBD_FLAG_SEND_TRIM)) rc = skipf("TRIM not advertised");
  if (rc == 0) rc = expect_error(&s, 0, NBD_CMD_TRIM, s.size - 4096, 8192, NULL, NBD_ENOSPC);
  if (rc == 0) rc = still_works(&s);
  session_close(&s);
  return rc;
}

static int read_expect_byte(struct session *s, uint64_t off, uint32_t len, uint8_t byte)
{
  uint32_t err;
  uint8_t *buf = malloc(len);
  int rc = buf ? 0 : failf("out of memory");
  if (rc == 0 && request(s, 0, NBD_CMD_READ, off, len, NULL, buf, &err) < 0) rc = -1;
  if (rc == 0 && err) rc = failf("READ back failed with %s", nbd_err_str(err));
  for (uint32_t i = 0; rc == 0 && i < len; i++)
    if (buf[i] != byte)
      rc = failf("byte %" PRIu64 " reads 0x%02x, expected 0x%02x", off + i, buf[i], byte);
  free(buf);
  return rc;
}

static int case_write_fua_reads_back(void)
{
  struct session s;
  uint8_t buf[65536];
  uint32_t err;
  int rc = open_session(&s, false, false);
  uint64_t off = rc == 0 ? scratch_off(&s) + 3 : 0;    /* deliberately unaligned */
  memset(buf, 0x5a, sizeof buf);
  if (rc == 0 && request(&s, NBD_CMD_FLAG_FUA, NBD_CMD_WRITE, off, sizeof buf, buf, NULL, &err) < 0) rc = -1;
  if (rc == 0 && err) rc = failf("WRITE+FUA failed with %s", nbd_err_str(err));
  if (rc == 0) { log_write(off, sizeof buf, 0x5a); rc = read_expect_byte(&s, off, sizeof buf, 0x5a); }
  session_close(&s);
  return rc;
}

static int case_write_zeroes_and_trim_read_zero(void)
{
  struct session s;
  uint8_t buf[131072];
  uint32_t err;
  int rc = open_session(&s, false, false);
  uint64_t off = rc == 0 ? scratch_off(&s) + 131072 : 0;
  if (rc == 0 && (s.tflags & (NBD_FLAG_SEND_WRITE_ZEROES | NBD_FLAG_SEND_TRIM)) !=
                 (NBD_FLAG_SEND_WRITE_ZEROES | NBD_FLAG_SEND_TRIM))
    rc = failf("flags 0x%04x lack SEND_WRITE_ZEROES or SEND_TRIM", s.tflags);
  memset(buf, 0x77, sizeof buf);
  /* data, then WRITE_ZEROES(NO_HOLE) over the first half, TRIM the second. */
  if (rc == 0 && request(&s, 0, NBD_CMD_WRITE, off, sizeof buf, buf, NULL, &err) < 0) rc = -1;
  if (rc == 0 && err) rc = failf("WRITE failed with %s", nbd_err_str(err));
  if (rc == 0) log_write(off, sizeof buf, 0x77);
  if (rc == 0 && request(&s, NBD_CMD_FLAG_NO_HOLE, NBD_CMD_WRITE_ZEROES, off, 65536, NULL, NULL, &err) < 0) rc = -1;
  if (rc == 0 && err) rc = failf("WRITE_ZEROES+NO_HOLE failed with %s", nbd_err_str(err));
  if (rc == 0) { log_write(off, 65536, 0); rc = read_expect_byte(&s, off, 65536, 0); }
  if (rc == 0 && request(&s, 0, NBD_CMD_TRIM, off + 65536, 65536, NULL, NULL, &err) < 0) rc = -1;
  if (rc == 0 && err) rc = failf("TRIM failed with %s", nbd_err_str(err));
  if (rc == 0) { log_write(off + 65536, 65536, 0); rc = read_expect_byte(&s, off + 65536, 65536, 0); }
  session_close(&s);
  return rc;
}

static int case_write_zeroes_fast_zero(void)
{
  struct session s;
  uint32_t err;
  int rc = open_session(&s, false, false);
  uint64_t off = rc == 0 ? scratch_off(&s) + 4 * 65536 : 0;
  if (rc == 0 && !(s.tflags & NBD_FLAG_SEND_FAST_ZERO)) rc = skipf("FAST_ZERO not advertised");
  if (rc == 0 && request(&s, NBD_CMD_FLAG_FAST_ZERO, NBD_CMD_WRITE_ZEROES, off, 65536, NULL, NULL, &err) < 0) rc = -1;
  if (rc == 0 && err != 0 && err != NBD_ENOTSUP)
    rc = failf("WRITE_ZEROES+FAST_ZERO failed with %s (only ENOTSUP is allowed)", nbd_err_str(err));
  if (rc == 0 && err == 0) { log_write(off, 65536, 0); rc = read_expect_byte(&s, off, 65536, 0); }
  if (rc == 0) rc = still_works(&s);
  session_close(&s);
  return rc;
}

static int case_cache_ok(void)
{
  struct session s;
  int rc = open_session(&s, false, false);
  if (rc == 0 && !(s.tflags & NBD_FLAG_SEND_CACHE)) rc = skipf("CACHE not advertised");
  if (rc == 0) rc = expect_error(&s, 0, NBD_CMD_CACHE, 0, MIB, NULL, 0);
  session_close(&s);
  return rc;
}

static int case_bad_request_magic_disconnects(void)
{
  struct session s;
  uint8_t h[NBD_REQUEST_SIZE] = { 0 };
  size_t extra;
  int rc = open_session(&s, false, false);
  if (rc == 0) {
    put_be32(h, 0x12345678);
    put_be32(h + 24, 512);
    send_full(s.fd, h, sizeof h);
    int r = wait_closed(s.fd, IO_TIMEOUT_MS, &extra);
    if (r != IO_OK) rc = failf("no disconnect after a bad request magic (%s)", io_str(r));
  }
  session_close(&s);
  return rc;
}

static int case_disconnect_mid_write_payload(void)
{
  struct session s;
  uint8_t buf[65536];
  uint32_t err;
  int rc = open_session(&s, false, false);
  uint64_t off = rc == 0 ? s.size / 2 : 0;
  /* The partial payload is the export's current content, so whatever the
   * server does with it the image stays as it was. */
  if (rc == 0 && request(&s, 0, NBD_CMD_READ, off, sizeof buf, NULL, buf, &err) < 0) rc = -1;
  if (rc == 0 && err) rc = failf("READ failed with %s", nbd_err_str(err));
  if (rc == 0) rc = send_req(&s, 0, NBD_CMD_WRITE, 1, off, MIB, buf, 1000);
  session_close(&s);
  return rc;
}

static int case_many_reads_then_hangup(void)
{
  struct session s;
  int rc = open_session(&s, false, false);
  for (unsigned i = 0; rc == 0 && i < 64; i++)
    rc = send_req(&s, 0, NBD_CMD_READ, i, (i * MIB) % (s.size - MIB), MIB, NULL, 0);
  session_close(&s);   /* without reading a single reply */
  return rc;
}

static int case_disc_with_16_in_flight(void)
{
  struct session s;
  uint8_t hdrs[17 * NBD_REQUEST_SIZE], h[16];
  bool seen[16] = { false };
  const uint32_t len = 65536;
  size_t extra;
  int rc = open_session(&s, false, false);
  if (rc != 0) goto out;
  for (unsigned i = 0; i <= 16; i++) {
    uint8_t *p = hdrs + i * NBD_REQUEST_SIZE;
    put_be32(p, NBD_REQUEST_MAGIC);
    put_be16(p + 4, 0);
    put_be16(p + 6, i < 16 ? NBD_CMD_READ : NBD_CMD_DISC);
    put_be64(p + 8, 1000 + i);
    put_be64(p + 16, i < 16 ? (uint64_t) i * len : 0);
    put_be32(p + 24, i < 16 ? len : 0);
  }
  if (send_full(s.fd, hdrs, sizeof hdrs) != IO_OK) { rc = failf("sending 16 READs + DISC"); goto out; }
  for (unsigned n = 0; n < 16; n++) {
    int r = recv_full(s.fd, h, sizeof h, IO_TIMEOUT_MS);
    if (r != IO_OK) { rc = failf("got %u of 16 replies before DISC closed the connection: %s", n, io_str(r)); goto out; }
    uint64_t c = get_be64(h + 8);
    if (get_be32(h) != NBD_SIMPLE_REPLY_MAGIC || c < 1000 || c >= 1016 || seen[c - 1000]) {
      rc = failf("bad reply %u: magic 0x%08x cookie %" PRIu64, n, get_be32(h), c);
      goto out;
    }
    seen[c - 1000] = true;
    if (get_be32(h + 4) != 0) { rc = failf("READ %" PRIu64 " failed: %u", c, get_be32(h + 4)); goto out; }
    if ((r = read_discard(s.fd, len, NULL)) != IO_OK) { rc = failf("reply data: %s", io_str(r)); goto out; }
  }
  if (wait_closed(s.fd, IO_TIMEOUT_MS, &extra) != IO_OK) rc = failf("no close after DISC");
  else if (extra) rc = failf("%zu bytes after the last reply (a reply to DISC?)", extra);
out:
  session_close(&s);
  return rc;
}

/* DISC with nothing in flight: the server closes without a reply. */
static int case_disc_idle_closes_cleanly(void)
{
  struct session s;
  size_t extra;
  int rc = open_session(&s, false, false);
  if (rc == 0) rc = still_works(&s);
  if (rc == 0) rc = send_req(&s, 0, NBD_CMD_DISC, 77, 0, 0, NULL, 0);
  if (rc == 0) {
    int r = wait_closed(s.fd, IO_TIMEOUT_MS, &extra);
    if (r != IO_OK) rc = failf("no close after DISC (%s)", io_str(r));
    else if (extra) rc = failf("server replied to DISC with %zu bytes", extra);
  }
  session_close(&s);
  return rc;
}

static int case_block_status_structured_without_meta_einval(void)
{
  struct session s;
  struct reply rp;
  int rc = open_session(&s, true, false);
  if (rc == 0) rc = send_req(&s, 0, NBD_CMD_BLOCK_STATUS, 5, 0, 4096, NULL, 0);
  if (rc == 0) rc = recv_reply(&s, NBD_CMD_BLOCK_STATUS, 5, 0, 4096, NULL, &rp);
  if (rc == 0 && rp.error != NBD_EINVAL) rc = failf("got %s, expected EINVAL", nbd_err_str(rp.error));
  if (rc == 0) rc = still_works(&s);
  session_close(&s);
  return rc;
}

static int case_structured_read_error_chunk(void)
{
  struct session s;
  struct reply rp;
  int rc = open_session(&s, true, false);
  if (rc == 0) rc = send_req(&s, 0, NBD_CMD_READ, 9, s.size - 512, 1024, NULL, 0);
  if (rc == 0) rc = recv_reply(&s, NBD_CMD_READ, 9, s.size - 512, 1024, NULL, &rp);
  if (rc == 0 && !rp.error_chunk) rc = failf("READ error not sent as an error chunk");
  else if (rc == 0 && rp.error_type != NBD_REPLY_TYPE_ERROR)
    rc = failf("error chunk type 0x%04x, expected NBD_REPLY_TYPE_ERROR", rp.error_type);
  else if (rc == 0 && rp.error != NBD_EINVAL) rc = failf("got %s, expected EINVAL", nbd_err_str(rp.error));
  if (rc == 0) rc = still_works(&s);
  session_close(&s);
  return rc;
}

static int case_structured_read_matches_simple(void)
{
  struct session a, b;
  uint32_t err, len = 4 * MIB;
  uint8_t *x = malloc(len), *y = malloc(len);
  int rc = x && y ? open_session(&a, true, false) : failf("out of memory");
  if (rc == 0) rc = open_session(&b, false, false);
  if (rc == 0) memset(x, 0xcc, len);
  if (rc == 0 && request(&a, 0, NBD_CMD_READ, 0, len, NULL, x, &err) < 0) rc = -1;
  if (rc == 0 && err) rc = failf("structured READ failed with %s", nbd_err_str(err));
  if (rc == 0 && request(&b, 0, NBD_CMD_READ, 0, len, NULL, y, &err) < 0) rc = -1;
  if (rc == 0 && err) rc = failf("simple READ failed with %s", nbd_err_str(err));
  if (rc == 0 && memcmp(x, y, len) != 0) {
    uint32_t i = 0;
    while (x[i] == y[i]) i++;
    rc = failf("structured and simple READs differ at byte %u", i);
  }
  session_close(&a);
  session_close(&b);
  free(x);
  free(y);
  return rc;
}

static int case_block_status_base_allocation(void)
{
  struct session s;
  struct reply rp;
  uint64_t sum = 0;
  uint32_t len = 8 * MIB;
  int rc = open_session(&s, true, true);
  if (rc == 0) rc = send_req(&s, 0, NBD_CMD_BLOCK_STATUS, 11, 0, len, NULL, 0);
  if (rc == 0) rc = recv_reply(&s, NBD_CMD_BLOCK_STATUS, 11, 0, len, NULL, &rp);
  if (rc == 0 && rp.error) rc = failf("BLOCK_STATUS failed with %s", nbd_err_str(rp.error));
  if (rc == 0 && rp.ext_context != s.meta_id)
    rc = failf("context id %u, selected %u", rp.ext_context, s.meta_id);
  for (unsigned i = 0; rc == 0 && i < rp.n_extents; i++) {
    if (rp.ext_len[i] == 0) rc = failf("extent %u has length 0", i);
    if (rp.ext_flags[i] & ~(NBD_STATE_HOLE | NBD_STATE_ZERO)) rc = failf("extent %u flags 0x%x", i, rp.ext_flags[i]);
    sum += rp.ext_len[i];
  }
  if (rc == 0 && sum > len && rp.n_extents > 1)
    rc = failf("extents cover %" PRIu64 " bytes, more than the %u asked for", sum, len);
  /* REQ_ONE: exactly one extent. */
  if (rc == 0) rc = send_req(&s, NBD_CMD_FLAG_REQ_ONE, NBD_CMD_BLOCK_STATUS, 12, 0, len, NULL, 0);
  if (rc == 0) rc = recv_reply(&s, NBD_CMD_BLOCK_STATUS, 12, 0, len, NULL, &rp);
  if (rc == 0 && rp.error) rc = failf("BLOCK_STATUS+REQ_ONE failed with %s", nbd_err_str(rp.error));
  if (rc == 0 && rp.n_extents != 1) rc = failf("REQ_ONE gave %u extents", rp.n_extents);
  if (rc == 0 && rp.ext_len[0] > len) rc = failf("REQ_ONE extent longer than asked");
  /* Past the end. */
  if (rc == 0) rc = send_req(&s, 0, NBD_CMD_BLOCK_STATUS, 13, s.size - 512, 1024, NULL, 0);
  if (rc == 0) rc = recv_reply(&s, NBD_CMD_BLOCK_STATUS, 13, s.size - 512, 1024, NULL, &rp);
  if (rc == 0 && rp.error != NBD_EINVAL) rc = failf("BLOCK_STATUS past the end: %s, expected EINVAL", nbd_err_str(rp.error));
  if (rc == 0) rc = still_works(&s);
  session_close(&s);
  return rc;
}

/* ------------------------------------------------------------ resource cases */

static int idle_closed(bool send_client_flags)
{
  struct session s;
  size_t extra;
  session_init(&s);
  int rc = greet(&s);
  if (rc == 0 && send_client_flags) rc = send_flags(&s, NBD_FLAG_C_FIXED_NEWSTYLE);
  if (rc == 0) {
    int r = wait_closed(s.fd, 10000, &extra);
    if (r != IO_OK)
      rc = failf("idle connection still open after 10 s (--handshake-timeout %d)", handshake_timeout);
  }
  session_close(&s);
  return rc;
}

static int case_handshake_timeout_closes_silent_client(void)
{
  if (!handshake_timeout) return skipf("needs --handshake-timeout");
  return idle_closed(false);
}

static int case_handshake_timeout_closes_stalled_negotiation(void)
{
  if (!handshake_timeout) return skipf("needs --handshake-timeout");
  return idle_closed(true);
}

static int case_connections_300_at_once(void)
{
  int fds[N_CONNECTIONS];
  bool got[N_CONNECTIONS] = { false };
  unsigned n = 0, done = 0;
  int rc = 0;
  struct rlimit rl;
  if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < N_CONNECTIONS + 64) {
    rl.rlim_cur = MIN(rl.rlim_max, (rlim_t) N_CONNECTIONS + 64);
    setrlimit(RLIMIT_NOFILE, &rl);
  }
  for (n = 0; n < N_CONNECTIONS; n++) {
    fds[n] = dial();
    if (fds[n] < 0) { rc = failf("connection %u: %s", n, strerror(errno)); break; }
  }
  uint64_t deadline = now_ns() + UINT64_C(20) * 1000000000;
  while (rc == 0 && done < n) {
    struct pollfd pfd[N_CONNECTIONS];
    unsigned map[N_CONNECTIONS], k = 0;
    for (unsigned i = 0; i < n; i++)
      if (!got[i]) { pfd[k].fd = fds[i]; pfd[k].events = POLLIN; map[k++] = i; }
    int left = deadline_left(deadline);
    if (left == 0 || poll(pfd, k, left) <= 0) {
      rc = failf("only %u of %u connections got the greeting within 20 s", done, n);
      break;
    }
    for (unsigned j = 0; j < k; j++) {
      if (!pfd[j].revents) continue;
      uint8_t g[18];
      if (recv_full(pfd[j].fd, g, sizeof g, IO_TIMEOUT_MS) != IO_OK || get_be64(g) != NBD_MAGIC) {
        rc = failf("connection %u: no valid greeting (closed after %u greetings)", map[j], done);
        break;
      }
      got[map[j]] = true;
      done++;
    }
  }
  for (unsigned i = 0; i < n; i++) close(fds[i]);
  return rc;
}

/* ------------------------------------------------------------ read-only cases */

static int case_readonly_write_eperm_payload_consumed(void)
{
  struct session s;
  uint8_t buf[8192];
  memset(buf, 0xee, sizeof buf);
  int rc = open_session(&s, false, false);
  if (rc == 0) rc = expect_error(&s, 0, NBD_CMD_WRITE, 0, sizeof buf, buf, NBD_EPERM);
  if (rc == 0) rc = still_works(&s);
  session_close(&s);
  return rc;
}

/* TRIM / WRITE_ZEROES on a read-only export: EPERM if the command is
 * advertised, EINVAL (an unadvertised command) otherwise. */
static int readonly_refused(uint16_t type, uint16_t flag)
{
  struct session s;
  int rc = open_session(&s, false, false);
  if (rc == 0)
    rc = expect_error(&s, 0, type, 0, 4096, NULL, (s.tflags & flag) ? NBD_EPERM : NBD_EINVAL);
  if (rc == 0) rc = still_works(&s);
  session_close(&s);
  return rc;
}

static int case_readonly_trim_refused(void)
{
  return readonly_refused(NBD_CMD_TRIM, NBD_FLAG_SEND_TRIM);
}

static int case_readonly_write_zeroes_refused(void)
{
  return readonly_refused(NBD_CMD_WRITE_ZEROES, NBD_FLAG_SEND_WRITE_ZEROES);
}

static int case_readonly_write_fua_eperm(void)
{
  struct session s;
  uint8_t buf[512];
  memset(buf, 0xee, sizeof buf);
  int rc = open_session(&s, false, false);
  /* FUA on a read-only export: EINVAL if FUA is not advertised, else EPERM. */
  if (rc == 0)
    rc = expect_error(&s, NBD_CMD_FLAG_FUA, NBD_CMD_WRITE, 0, sizeof buf, buf,
                      (s.tflags & NBD_FLAG_SEND_FUA) ? NBD_EPERM : NBD_EINVAL);
  if (rc == 0) rc = still_works(&s);
  session_close(&s);
  return rc;
}

/* ------------------------------------------------------------ driver */

enum when { ALWAYS, WRITABLE, READONLY };
struct test_case {
  const char *name;
  int (*fn)(void);
  enum when when;
};

#define C(name, when) { #name, case_##name, when }
static const struct test_case cases[] = {
  C(greeting_flags, ALWAYS),
  C(client_flags_garbage_disconnects, ALWAYS),
  C(client_flags_unknown_bits_disconnect, ALWAYS),
  C(option_bad_magic_disconnects, ALWAYS),
  C(option_truncated_then_hangup, ALWAYS),
  C(option_length_absurd, ALWAYS),
  C(option_too_big_payload_skipped, ALWAYS),
  C(option_unknown_unsup_then_go, ALWAYS),
  C(option_list_with_payload_invalid, ALWAYS),
  C(option_list_names_export, ALWAYS),
  C(option_structured_reply_with_payload_invalid, ALWAYS),
  C(option_go_name_longer_than_option_invalid, ALWAYS),
  C(option_go_info_count_mismatch_invalid, ALWAYS),
  C(option_go_too_short_invalid, ALWAYS),
  C(option_go_unknown_export, ALWAYS),
  C(option_info_then_go, ALWAYS),
  C(option_go_block_size, ALWAYS),
  C(option_starttls_refused_then_go, ALWAYS),
  C(option_abort_closes, ALWAYS),
  C(option_meta_context_base_allocation, ALWAYS),
  C(option_meta_context_malformed_invalid, ALWAYS),
  C(export_name_with_zeroes, ALWAYS),
  C(export_name_no_zeroes, ALWAYS),
  C(export_name_unknown_disconnects, ALWAYS),
  C(transmission_flags_and_size, ALWAYS),
  C(read_ok, ALWAYS),
  C(read_past_end_einval, ALWAYS),
  C(read_at_end_einval, ALWAYS),
  C(read_offset_overflow_einval, ALWAYS),
  C(read_zero_length_einval, ALWAYS),
  C(read_over_32m_eoverflow, ALWAYS),
  C(read_32m_ok, ALWAYS),
  C(read_unknown_flag_einval, ALWAYS),
  C(unknown_command_einval, ALWAYS),
  C(flush_zero_range_ok, ALWAYS),
  C(block_status_simple_without_meta_einval, ALWAYS),
  C(block_status_structured_without_meta_einval, ALWAYS),
  C(write_past_end_enospc_payload_consumed, WRITABLE),
  C(write_unknown_flag_einval_payload_consumed, WRITABLE),
  C(write_over_32m_error_server_survives, WRITABLE),
  C(write_zeroes_past_end_enospc, WRITABLE),
  C(trim_past_end_enospc, WRITABLE),
  C(write_fua_reads_back, WRITABLE),
  C(write_zeroes_and_trim_read_zero, WRITABLE),
  C(write_zeroes_fast_zero, WRITABLE),
  C(cache_ok, ALWAYS),
  C(bad_request_magic_disconnects, ALWAYS),
  C(disconnect_mid_write_payload, WRITABLE),
  C(many_reads_then_hangup, ALWAYS),
  C(disc_idle_closes_cleanly, ALWAYS),
  C(disc_with_16_in_flight, ALWAYS),
  C(structured_read_error_chunk, ALWAYS),
  C(structured_read_matches_simple, ALWAYS),
  C(block_status_base_allocation, ALWAYS),
  C(handshake_timeout_closes_silent_client, ALWAYS),
  C(handshake_timeout_closes_stalled_negotiation, ALWAYS),
  C(connections_300_at_once, ALWAYS),
  C(readonly_write_eperm_payload_consumed, READONLY),
  C(readonly_trim_refused, READONLY),
  C(readonly_write_zeroes_refused, READONLY),
  C(readonly_write_fua_eperm, READONLY),
};

/* Is the server still serving?  A fresh session and one READ. */
static int probe(void)
{
  struct session s;
  int rc = open_session(&s, false, false);
  if (rc == 0) rc = still_works(&s);
  session_close(&s);
  return rc;
}

static void usage(FILE *f)
{
  fprintf(f,
    "usage: nbd-badinput (--unix PATH | --tcp HOST:PORT) [--export NAME]\n"
    "                    [--size BYTES] [--handshake-timeout S] [--readonly]\n"
    "                    [--write-log FILE] [--case GLOB] [--skip GLOB] [--list]\n");
}

int main(int argc, char **argv)
{
  static const struct option longopts[] = {
    { "unix", required_argument, NULL, 'u' },
    { "tcp", required_argument, NULL, 't' },
    { "export", required_argument, NULL, 'e' },
    { "size", required_argument, NULL, 's' },
    { "handshake-timeout", required_argument, NULL, 'H' },
    { "readonly", no_argument, NULL, 'r' },
    { "write-log", required_argument, NULL, 'w' },
    { "case", required_argument, NULL, 'c' },
    { "skip", required_argument, NULL, 'S' },
    { "list", no_argument, NULL, 'l' },
    { "help", no_argument, NULL, 'h' },
    { NULL, 0, NULL, 0 },
  };
  const char *perr;
  bool list = false;
  int c;
  while ((c = getopt_long(argc, argv, "u:t:e:s:H:rw:c:S:lh", longopts, NULL)) != -1) {
    switch (c) {
    case 'u': unix_path = optarg; break;
    case 't': tcp_addr = optarg; break;
    case 'e': export_name = optarg; break;
    case 's':
      if (parse_size(optarg, &expect_size, &perr) < 0) {
        fprintf(stderr, "nbd-badinput: --size %s: %s\n", optarg, perr);
        return 2;
      }
      break;
    case 'H': handshake_timeout = atoi(optarg); break;
    case 'r': readonly_mode = true; break;
    case 'w':
      write_log = fopen(optarg, "a");
      if (!write_log) { fprintf(stderr, "nbd-badinput: %s: %s\n", optarg, strerror(errno)); return 2; }
      break;
    case 'c': case_glob = optarg; break;
    case 'S': skip_glob = optarg; break;
    case 'l': list = true; break;
    case 'h': usage(stdout); return 0;
    default: usage(stderr); return 2;
    }
  }
  if (list) {
    for (size_t i = 0; i < ARRAY_SIZE(cases); i++) puts(cases[i].name);
    return 0;
  }
  if (optind != argc || !!unix_path == !!tcp_addr) { usage(stderr); return 2; }
  signal(SIGPIPE, SIG_IGN);

  unsigned passed = 0, failed = 0, skipped = 0;
  if (probe() < 0) {
    printf("FAIL initial_probe: %s\n", why);
    return 1;
  }
  for (size_t i = 0; i < ARRAY_SIZE(cases); i++) {
    const struct test_case *t = &cases[i];
    if (case_glob && fnmatch(case_glob, t->name, 0) != 0) continue;
    if (skip_glob && fnmatch(skip_glob, t->name, 0) == 0) continue;
    if ((t->when == WRITABLE && readonly_mode) || (t->when == READONLY && !readonly_mode)) {
      skipped++;
      printf("SKIP %s: %s export\n", t->name, readonly_mode ? "read-only" : "writable");
      continue;
    }
    why[0] = '\0';
    int r = t->fn();
    if (r == 0) { passed++; printf("PASS %s\n", t->name); }
    else if (r > 0) { skipped++; printf("SKIP %s: %s\n", t->name, why); }
    else { failed++; printf("FAIL %s: %s\n", t->name, why); }
    fflush(stdout);
    if (probe() < 0) {
      if (r == 0) { passed--; failed++; }
      else if (r > 0) { skipped--; failed++; }
      printf("FAIL %s: server stopped serving after this case: %s\n", t->name, why);
      break;
    }
  }
  printf("nbd-badinput: %u passed, %u failed, %u skipped\n", passed, failed, skipped);
  if (write_log) fclose(write_log);
  return failed ? 1 : 0;
}
