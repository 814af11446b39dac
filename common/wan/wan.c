/* wan.c: the WAN transport (see wan.h): handshake, TLS (OpenSSL) and
 * zstd streaming, run by one pump thread per connection between the WAN
 * socket and a local socketpair. */
#include "wan.h"
#include "nego.h"
#include "pace.h"
#include "log.h"
#include "util.h"

#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <sys/socket.h>
#include <unistd.h>

#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <zstd.h>

#define CHUNK (256 * 1024)
#define HELLO_SIZE 20

struct wan_counters wan_totals;

struct wan_counters *wan_counters_new(void)
{
  struct wan_counters *c = calloc(1, sizeof *c);
  if (c) atomic_store(&c->refs, 1);
  return c;
}

void wan_counters_put(struct wan_counters *c)
{
  if (c && atomic_fetch_sub(&c->refs, 1) == 1) free(c);
}

/* Adds to the process's totals and to the connection owner's counters. */
#define COUNT(p, field, n) do {                                          \
    atomic_fetch_add(&wan_totals.field, (n));                            \
    if ((p)->ctr) atomic_fetch_add(&(p)->ctr->field, (n));               \
  } while (0)
static atomic_uint_fast64_t hello_rtt_min;
static atomic_uint live_pumps;
static atomic_bool early_refused;     /* a server misread early options */

uint64_t wan_handshake_rtt_ns(void) { return atomic_load(&hello_rtt_min); }

/* ---------- TLS ---------- */

struct psk { char *user; unsigned char key[64]; unsigned keylen; };

struct wan_tls {
  SSL_CTX *ctx;
  bool server;
  bool verify;
  struct psk *psks;
  size_t npsk;
  const struct psk *client_psk;
};

static struct wan_tls *psk_owner;   /* OpenSSL's legacy PSK callbacks take no argument */

static int load_psk(struct wan_tls *t, const char *path, char *err, size_t errlen)
{
  FILE *f = fopen(path, "r");
  char line[1024];
  if (!f) {
    snprintf(err, errlen, "cannot read TLS PSK file %s: %s", path, strerror(errno));
    return -1;
  }
  while (fgets(line, sizeof line, f)) {
    char *colon = strchr(line, ':'), *hex;
    size_t hl;
    if (!colon || line[0] == '#') continue;
    *colon = '\0';
    hex = colon + 1;
    hl = strcspn(hex, "\r\n");
    hex[hl] = '\0';
    if (hl == 0 || hl % 2 || hl / 2 > 64) {
      snprintf(err, errlen, "TLS PSK file %s: key of '%s' must be 2 to 128 hex digits "
               "(make one with: psktool -u NAME -p FILE)", path, line);
      fclose(f);
      return -1;
    }
    struct psk *n = realloc(t->psks, (t->npsk + 1) * sizeof *n);
    if (!n) { fclose(f); return -1; }
    t->psks = n;
    struct psk *p = &t->psks[t->npsk];
    p->user = strdup(line);
    p->keylen = hl / 2;
    for (unsigned i = 0; i < p->keylen; i++) {
      unsigned v;
      if (sscanf(hex + 2 * i, "%2x", &v) != 1) {
        snprintf(err, errlen, "TLS PSK file %s: key of '%s' is not hex", path, line);
        free(p->user);
        fclose(f);
        return -1;
      }
      p->key[i] = v;
    }
    t->npsk++;
  }
  fclose(f);
  if (!t->npsk) {
    snprintf(err, errlen, "TLS PSK file %s has no USER:HEXKEY line", path);
    return -1;
  }
  return 0;
}

static unsigned psk_server_cb(SSL *ssl, const char *identity,
                              unsigned char *psk, unsigned max)
{
  struct wan_tls *t = psk_owner;
  for (size_t i = 0; t && identity && i < t->npsk; i++)
    if (strcmp(t->psks[i].user, identity) == 0 && t->psks[i].keylen <= max) {
      memcpy(psk, t->psks[i].key, t->psks[i].keylen);
      return t->psks[i].keylen;
    }
  log_warn("TLS: unknown PSK identity '%s' refused", identity ? identity : "");
  return 0;
}

static unsigned psk_client_cb(SSL *ssl, const char *hint, char *identity,
                              unsigned max_id, unsigned char *psk, unsigned max)
{
  struct wan_tls *t = psk_owner;
  const struct psk *p = t ? t->client_psk : NULL;
  if (!p || strlen(p->user) + 1 > max_id || p->keylen > max) return 0;
  strcpy(identity, p->user);
  memcpy(psk, p->key, p->keylen);
  return p->keylen;
}

static void ssl_errors(char *buf, size_t len)
{
  unsigned long e = ERR_get_error();
  if (!e) snprintf(buf, len, "unknown TLS error");
  else ERR_error_string_n(e, buf, len);
  ERR_clear_error();
}

struct wan_tls *wan_tls_new(bool server, const struct wan_tls_config *cfg,
                            char *err, size_t errlen)
{
  struct wan_tls *t = calloc(1, sizeof *t);
  char path[4096], e[256];
  if (!t) return NULL;
  t->server = server;
  t->verify = cfg->verify_peer;
  t->ctx = SSL_CTX_new(server ? TLS_server_method() : TLS_client_method());
  if (!t->ctx) goto ssl_fail;
  SSL_CTX_set_min_proto_version(t->ctx, TLS1_2_VERSION);
  SSL_CTX_set_mode(t->ctx, SSL_MODE_ENABLE_PARTIAL_WRITE |
                           SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
  if (cfg->psk_file) {
    if (load_psk(t, cfg->psk_file, err, errlen) < 0) goto fail;
    psk_owner = t;
    if (server) SSL_CTX_set_psk_server_callback(t->ctx, psk_server_cb);
    else {
      t->client_psk = &t->psks[0];
      for (size_t i = 0; cfg->psk_username && i < t->npsk; i++)
        if (strcmp(t->psks[i].user, cfg->psk_username) == 0) t->client_psk = &t->psks[i];
      SSL_CTX_set_psk_client_callback(t->ctx, psk_client_cb);
    }
    /* PSK cipher suites for TLS 1.2; TLS 1.3 uses the PSK with SHA-256. */
    SSL_CTX_set_cipher_list(t->ctx, "PSK:ECDHE-PSK:DHE-PSK:HIGH:!aNULL");
  }
  if (cfg->cert_dir) {
    if (server) {
      snprintf(path, sizeof path, "%s/server-cert.pem", cfg->cert_dir);
      if (SSL_CTX_use_certificate_chain_file(t->ctx, path) != 1) {
        ssl_errors(e, sizeof e);
        snprintf(err, errlen, "cannot load TLS certificate %s: %s", path, e);
        goto fail;
      }
      snprintf(path, sizeof path, "%s/server-key.pem", cfg->cert_dir);
      if (SSL_CTX_use_PrivateKey_file(t->ctx, path, SSL_FILETYPE_PEM) != 1) {
        ssl_errors(e, sizeof e);
        snprintf(err, errlen, "cannot load TLS key %s: %s", path, e);
        goto fail;
      }
    } else {
      snprintf(path, sizeof path, "%s/ca-cert.pem", cfg->cert_dir);
      if (SSL_CTX_load_verify_locations(t->ctx, path, NULL) != 1) {
        ssl_errors(e, sizeof e);
        snprintf(err, errlen, "cannot load TLS CA certificate %s: %s", path, e);
        goto fail;
      }
      if (t->verify) SSL_CTX_set_verify(t->ctx, SSL_VERIFY_PEER, NULL);
      snprintf(path, sizeof path, "%s/client-cert.pem", cfg->cert_dir);
      if (access(path, R_OK) == 0) {
        char key[4096];
        snprintf(key, sizeof key, "%s/client-key.pem", cfg->cert_dir);
        if (SSL_CTX_use_certificate_chain_file(t->ctx, path) != 1 ||
            SSL_CTX_use_PrivateKey_file(t->ctx, key, SSL_FILETYPE_PEM) != 1) {
          ssl_errors(e, sizeof e);
          snprintf(err, errlen, "cannot load TLS client certificate %s: %s", path, e);
          goto fail;
        }
      }
    }
  }
  if (!cfg->cert_dir && !cfg->psk_file) {
    snprintf(err, errlen, "TLS needs certificates (--tls-certificates DIR) or "
             "a pre-shared key (--tls-psk FILE)");
    goto fail;
  }
  return t;
ssl_fail:
  ssl_errors(e, sizeof e);
  snprintf(err, errlen, "TLS set-up failed: %s", e);
fail:
  wan_tls_free(t);
  return NULL;
}

void *wan_tls_ssl_ctx(struct wan_tls *t) { return t ? t->ctx : NULL; }

void wan_tls_free(struct wan_tls *t)
{
  if (!t) return;
  if (psk_owner == t) psk_owner = NULL;
  if (t->ctx) SSL_CTX_free(t->ctx);
  for (size_t i = 0; i < t->npsk; i++) free(t->psks[i].user);
  free(t->psks);
  free(t);
}

/* ---------- the pump ---------- */

struct pump {
  int wan, local;
  bool server;
  bool zstd_tx, zstd_rx;          /* what this end sends / receives is zstd */
  bool early_sent;                /* client: the NBD options left with the hello */
  unsigned flags;                 /* client: requested */
  int level;
  struct wan_tls *tls;
  SSL *ssl;
  bool require_tls, allow_zstd;
  uint64_t deadline;              /* handshake */
  char host[256];
  ZSTD_CCtx *cctx;
  ZSTD_DCtx *dctx;
  uint8_t *lin, *wout, *win, *lout;
  size_t wout_off, wout_len, wout_cap, win_off, win_len, lout_off, lout_len;
  bool local_eof, wan_eof, wan_wr_shut, local_wr_shut;
  bool ssl_want_read, ssl_want_write;
  bool dpending;                  /* zstd may hold more output for us */
  bool cpending;                  /* the compressor holds unflushed input */
  struct wan_counters *ctr;       /* the owner's counters (a reference), or NULL */
  struct nego *nego;              /* client: the NBD handshake sent ahead, or NULL */
  uint64_t rx_wire;               /* bytes received on the link, this pump */
  uint64_t early_wire;            /* rx_wire when the early read's reply began */
  bool rx_short;                  /* the last read from the link drained it */
  bool early_seen;                /* the early read's first reply bytes came */
  bool paced;                     /* server: the client asked WAN_F_PACED (pace.h) */
  struct pace pace;
  bool pace_wait;                 /* the pace held the last write back */
  bool pace_held;                 /* ... or some of it */
  bool wan_broken;                /* poll saw POLLERR or POLLHUP on the WAN socket */
  size_t tls_retry_len;           /* a TLS write to repeat with at least this */
};

static void pump_free(struct pump *p)
{
  if (p->ssl) SSL_free(p->ssl);
  if (p->wan >= 0) close(p->wan);
  if (p->local >= 0) close(p->local);
  ZSTD_freeCCtx(p->cctx);
  ZSTD_freeDCtx(p->dctx);
  free(p->lin); free(p->wout); free(p->win); free(p->lout);
  wan_counters_put(p->ctr);
  nego_free(p->nego);
  free(p);
}

/* A client pump's local end while it connects and shakes hands: once
 * libnbd has closed it (the open was given up: source_config.cancellable),
 * nothing more goes to the server. */
static __thread int hs_watch = -1;

/* Waits for fd to be ready (POLLIN/POLLOUT) before the deadline (ECANCELED
 * once hs_watch is closed). */
static int wait_fd(int fd, short ev, uint64_t deadline)
{
  for (;;) {
    uint64_t now = now_ns();
    if (now >= deadline) { errno = ETIMEDOUT; return -1; }
    struct pollfd pf[2] = { { .fd = fd, .events = ev }, { .fd = hs_watch, .events = POLLRDHUP } };
    int r = poll(pf, hs_watch >= 0 ? 2 : 1, (deadline - now) / 1000000 + 1);
    if (r > 0 && hs_watch >= 0 && (pf[1].revents & (POLLRDHUP | POLLHUP | POLLERR))) {
      errno = ECANCELED;
      return -1;
    }
    if (r > 0 && pf[0].revents) return 0;
    if (r < 0 && errno != EINTR) return -1;
  }
}

static int io_exact(int fd, void *buf, size_t len, bool wr, uint64_t deadline)
{
  char *b = buf;
  while (len) {
    ssize_t n = wr ? send(fd, b, len, MSG_NOSIGNAL) : recv(fd, b, len, 0);
    if (n > 0) { b += n; len -= n; continue; }
    if (n == 0) { errno = ECONNRESET; return -1; }
    if (errno != EAGAIN && errno != EINTR) return -1;
    if (wait_fd(fd, wr ? POLLOUT : POLLIN, deadline) < 0) return -1;
  }
  return 0;
}

static int tls_handshake(struct pump *p)
{
  p->ssl = SSL_new(p->tls->ctx);
  if (!p->ssl) return -1;
  SSL_set_fd(p->ssl, p->wan);
  if (!p->server && p->tls->verify && p->host[0]) SSL_set1_host(p->ssl, p->host);
  for (;;) {
    int r = p->server ? SSL_accept(p->ssl) : SSL_connect(p->ssl);
    if (r == 1) return 0;
    int e = SSL_get_error(p->ssl, r);
    if (e == SSL_ERROR_WANT_READ) { if (wait_fd(p->wan, POLLIN, p->deadline) < 0) return -1; }
    else if (e == SSL_ERROR_WANT_WRITE) { if (wait_fd(p->wan, POLLOUT, p->deadline) < 0) return -1; }
    else {
      char m[256];
      ssl_errors(m, sizeof m);
      log_warn("TLS handshake on the WAN link failed: %s", m);
      errno = EPROTO;
      return -1;
    }
  }
}

static int start_stream(struct pump *p);
static int send_preamble(struct pump *p);

static int handshake(struct pump *p)
{
  uint8_t h[HELLO_SIZE];
  if (p->server) {
    unsigned want, accept, st = WAN_ST_OK;
    if (io_exact(p->wan, h, sizeof h, false, p->deadline) < 0) return -1;
    if (memcmp(h, WAN_MAGIC, 8) != 0 || get_be32(h + 8) != WAN_VERSION) {
      log_warn("WAN connection: not an xnbd WAN client (bad magic or version); "
               "plain NBD clients use the --listen port");
      errno = EPROTO;
      return -1;
    }
    want = get_be32(h + 12);
    p->level = get_be32(h + 16);     /* the client's level, both directions */
    if (p->level < 1 || p->level > 19) p->level = WAN_DEFAULT_LEVEL;
    accept = want & (WAN_F_ZSTD | WAN_F_TLS | WAN_F_PACED);
    p->paced = want & WAN_F_PACED;
    if (p->paced)
      log_debug("WAN connection: bulk reads (WAN_F_PACED): the socket holds what the "
                "path needs, the rest waits here (pace.h)");
    if (!p->allow_zstd) accept &= ~WAN_F_ZSTD;
    /* Early bytes (no TLS): the client's stream is already framed as it
     * asked, whatever this end accepts for its own direction. */
    bool early = (want & WAN_F_EARLY) && !(want & WAN_F_TLS);
    if (early) accept |= WAN_F_EARLY;
    if ((want & WAN_F_TLS) && !p->tls) st = WAN_ST_TLS_UNAVAILABLE;
    if (!(want & WAN_F_TLS) && p->require_tls) st = WAN_ST_TLS_REQUIRED;
    memcpy(h, WAN_MAGIC, 8);
    put_be32(h + 8, WAN_VERSION);
    put_be32(h + 12, accept);
    put_be32(h + 16, st);
    if (io_exact(p->wan, h, sizeof h, true, p->deadline) < 0) return -1;
    if (st != WAN_ST_OK) {
      log_warn("WAN connection refused: %s", st == WAN_ST_TLS_REQUIRED
               ? "TLS is required (--tls=require) and the client did not ask for it"
               : "the client asked for TLS but this server has no TLS configured");
      if (early) {
        /* Closing with its early bytes unread would reset the connection,
         * and the answer could be lost with it: end this direction and
         * read what the client sent until it closes (at most 1 s). */
        uint8_t junk[4096];
        uint64_t until = MIN(p->deadline, now_ns() + 1000000000u);
        shutdown(p->wan, SHUT_WR);
        while (wait_fd(p->wan, POLLIN, until) == 0) {
          ssize_t n = recv(p->wan, junk, sizeof junk, 0);
          if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) break;
        }
      }
      errno = EACCES;
      return -1;
    }
    p->zstd_tx = accept & WAN_F_ZSTD;
    p->zstd_rx = early ? want & WAN_F_ZSTD : p->zstd_tx;
    if ((accept & WAN_F_TLS) && tls_handshake(p) < 0) return -1;
    return 0;
  }
  /* Client.  With NBD options to send ahead and no TLS, they leave with
   * the hello (WAN_F_EARLY), framed as asked: one round trip less. */
  bool early = p->nego && !(p->flags & WAN_F_TLS) && !atomic_load(&early_refused);
  if (early) p->flags |= WAN_F_EARLY;
  memcpy(h, WAN_MAGIC, 8);
  put_be32(h + 8, WAN_VERSION);
  put_be32(h + 12, p->flags);
  put_be32(h + 16, p->level);
  uint64_t sent = now_ns();
  if (io_exact(p->wan, h, sizeof h, true, p->deadline) < 0) return -1;
  if (early) {
    p->zstd_tx = p->flags & WAN_F_ZSTD;
    if (start_stream(p) < 0 || send_preamble(p) < 0 ||
        io_exact(p->wan, p->wout, p->wout_len, true, p->deadline) < 0)
      return -1;
    COUNT(p, tx_wire, p->wout_len);
    p->wout_len = 0;
    p->early_sent = true;
  }
  if (io_exact(p->wan, h, sizeof h, false, p->deadline) < 0) return -1;
  uint64_t rtt = now_ns() - sent, old = atomic_load(&hello_rtt_min);
  while ((!old || rtt < old) &&
         !atomic_compare_exchange_weak(&hello_rtt_min, &old, rtt))
    ;
  if (memcmp(h, WAN_MAGIC, 8) != 0) {
    log_warn("WAN connection to %s: the peer is not an xnbd-server WAN port "
             "(use nbd:// for plain NBD servers)", p->host);
    errno = EPROTO;
    return -1;
  }
  if (get_be32(h + 16) != WAN_ST_OK) {
    log_warn("WAN connection to %s refused by the server: %s", p->host,
             get_be32(h + 16) == WAN_ST_TLS_REQUIRED
             ? "it requires TLS (use xnbds:// and TLS credentials)"
             : "it has no TLS configured (use xnbd://, or configure TLS there)");
    errno = EACCES;
    return -1;
  }
  unsigned got = get_be32(h + 12);
  p->zstd_rx = got & WAN_F_ZSTD;
  if (early && !(got & WAN_F_EARLY) && p->zstd_rx != p->zstd_tx) {
    /* A server from before early bytes reads ours as its own framing:
     * this connection is lost, the next ones wait for the answer. */
    atomic_store(&early_refused, true);
    log_warn("WAN connection to %s: the server predates early handshakes and "
             "turned compression %s, so it misread the NBD options sent with the "
             "hello; connections from now on send them after its answer "
             "(upgrading xnbd-server saves that round trip)", p->host,
             p->zstd_rx ? "on" : "off");
    errno = EPROTO;
    return -1;
  }
  if (!early) p->zstd_tx = p->zstd_rx;
  if ((p->flags & WAN_F_TLS) && tls_handshake(p) < 0) return -1;
  return 0;
}

/* WAN I/O through TLS or not: >0 bytes, 0 EOF, -1 would block (flags set),
 * -2 error. */
static ssize_t wan_io(struct pump *p, void *buf, size_t len, bool wr)
{
  if (!p->ssl) {
    ssize_t n = wr ? send(p->wan, buf, len, MSG_NOSIGNAL) : recv(p->wan, buf, len, 0);
    if (n >= 0) return n;
    return (errno == EAGAIN || errno == EINTR) ? -1 : -2;
  }
  int n = wr ? SSL_write(p->ssl, buf, len) : SSL_read(p->ssl, buf, len);
  if (n > 0) return n;
  switch (SSL_get_error(p->ssl, n)) {
  case SSL_ERROR_WANT_READ: p->ssl_want_read = true; return -1;
  case SSL_ERROR_WANT_WRITE: p->ssl_want_write = true; return -1;
  case SSL_ERROR_ZERO_RETURN: return 0;
  default: ERR_clear_error(); return -2;
  }
}

/* Compresses len bytes into the empty wout; ZSTD_e_flush also emits all
 * the compressor holds, ZSTD_e_continue may keep some (p->cpending). */
static int compress(struct pump *p, const void *buf, size_t len, ZSTD_EndDirective mode)
{
  ZSTD_inBuffer in = { buf, len, 0 };
  ZSTD_outBuffer out = { p->wout, p->wout_cap, 0 };
  size_t r;
  do {
    r = ZSTD_compressStream2(p->cctx, &out, &in, mode);
    if (ZSTD_isError(r)) {
      log_error("zstd compression failed: %s", ZSTD_getErrorName(r));
      return -1;
    }
  } while ((mode == ZSTD_e_flush ? r != 0 : in.pos < in.size) && out.pos < out.size);
  if (mode == ZSTD_e_flush ? r != 0 : in.pos < in.size) {
    log_error("zstd output larger than its bound");
    return -1;
  }
  p->wout_len = out.pos;
  p->cpending = mode != ZSTD_e_flush;
  return 0;
}

/* The zstd contexts the directions need (made once). */
static int start_stream(struct pump *p)
{
  if (p->zstd_tx && !p->cctx) {
    if (!(p->cctx = ZSTD_createCCtx())) return -1;
    ZSTD_CCtx_setParameter(p->cctx, ZSTD_c_compressionLevel, p->level);
  }
  if (p->zstd_rx && !p->dctx && !(p->dctx = ZSTD_createDCtx())) return -1;
  return 0;
}

/* The NBD options sent ahead, framed for the WAN, into the empty wout. */
static int send_preamble(struct pump *p)
{
  size_t len;
  const uint8_t *pre = nego_preamble(p->nego, &len);
  struct wan_early *x = nego_early(p->nego);
  if (x) x->sent_ns = now_ns();
  COUNT(p, tx_raw, len);
  if (p->zstd_tx) {
    if (compress(p, pre, len, ZSTD_e_flush) < 0) return -1;
  } else {
    memcpy(p->wout, pre, len);
    p->wout_len = len;
  }
  p->wout_off = 0;
  return 0;
}

/* How much of wout to write now: all of it, or on a paced connection
 * (pace.h) what the socket may take (0: wait, pace_wait).  Not paced
 * while a TLS record waits to be written again (OpenSSL holds it already
 * and wants at least its length), nor once the socket reported an error
 * or hang-up (its queue no longer drains; only a write says what
 * happened). */
static size_t paced_len(struct pump *p)
{
  if (!p->paced || p->tls_retry_len || p->wan_broken) return p->wout_len;
  uint64_t t = now_ns(), srtt, min_rtt, acked;
  if (pace_due(&p->pace, t) && pace_tcp_sample(p->wan, &srtt, &min_rtt, &acked) == 0)
    pace_control(&p->pace, t, srtt, min_rtt, acked);
  int64_t outq = p->pace.limit ? pace_tcp_outq(p->wan) : 0;
  if (outq < 0) return p->wout_len;
  /* held back last time, and the socket is empty now: too little */
  if (outq == 0 && p->pace_held) pace_starved(&p->pace, t);
  size_t len = pace_allow(&p->pace, (uint64_t) outq, p->wout_len);
  p->pace_wait = len == 0;
  p->pace_held = len < p->wout_len;
  return len;
}

/* One pass over both directions; returns 1 if anything moved, 0 if not,
 * -1 on error. */
static int pump_step(struct pump *p)
{
  int moved = 0;
  ssize_t n;

  /* local -> (compress) -> wout.  A full read means more is queued: the
   * compressor keeps it (larger blocks, fewer flushes); whatever it holds
   * is flushed as soon as the local side has nothing more to give, so a
   * reply is never held back waiting for the next one. */
  if (p->wout_len == 0 && !p->local_eof) {
    n = read(p->local, p->lin, CHUNK);
    if (n > 0 && p->nego) {         /* libnbd's handshake: answered here */
      size_t taken;
      if (nego_from_local(p->nego, p->lin, n, &taken) < 0) {
        log_warn("WAN connection to %s: NBD handshake sent ahead: %s", p->host,
                 nego_error(p->nego));
        return -1;
      }
      memmove(p->lin, p->lin + taken, n - taken);
      n -= taken;
      if (n == 0) {
        moved = 1;
        n = -1;
        errno = EAGAIN;               /* nothing to send: as if nothing was read */
      }
    }
    if (n > 0) {
      COUNT(p, tx_raw, n);
      if (p->zstd_tx) {
        if (compress(p, p->lin, n, n < CHUNK ? ZSTD_e_flush : ZSTD_e_continue) < 0)
          return -1;
      } else {
        memcpy(p->wout, p->lin, n);
        p->wout_len = n;
      }
      p->wout_off = 0;
      moved = 1;
    } else if (n < 0 && errno != EAGAIN && errno != EINTR)
      return -1;
    else if (p->cpending) {       /* drained (or EOF): flush what zstd holds */
      if (compress(p, p->lin, 0, ZSTD_e_flush) < 0) return -1;
      p->wout_off = 0;
      moved = 1;
    } else if (n == 0)
      p->local_eof = true, moved = 1;
  }
  /* wout -> WAN (held at the source on a bulk connection: pace.h) */
  p->pace_wait = false;
  if (p->wout_len) {
    size_t len = paced_len(p);
    n = len ? wan_io(p, p->wout + p->wout_off, len, true) : -1;
    p->tls_retry_len = n == -1 && len && p->ssl ? len : 0;
    if (n > 0 && p->paced) pace_wrote(&p->pace, now_ns());
    if (n > 0) {
      COUNT(p, tx_wire, n);
      p->wout_off += n;
      p->wout_len -= n;
      moved = 1;
    } else if (n == -2 || n == 0)
      return -1;
  }
  if (p->local_eof && !p->wout_len && !p->wan_wr_shut) {
    if (p->ssl) SSL_shutdown(p->ssl);
    else shutdown(p->wan, SHUT_WR);
    p->wan_wr_shut = true;
    moved = 1;
  }
  /* WAN -> win */
  if (p->win_len == 0 && !p->wan_eof) {
    n = wan_io(p, p->win, CHUNK, false);
    if (n > 0) {
      COUNT(p, rx_wire, n);
      p->rx_wire += (uint64_t) n;
      p->rx_short = (size_t) n < CHUNK;
      p->win_off = 0;
      p->win_len = n;
      moved = 1;
    } else if (n == 0)
      p->wan_eof = true, moved = 1;
    else if (n == -2)
      return -1;
  }
  /* win -> (decompress) -> lout */
  if ((p->win_len || p->dpending) && !p->lout_len) {
    if (p->zstd_rx) {
      ZSTD_inBuffer in = { p->win + p->win_off, p->win_len, 0 };
      ZSTD_outBuffer out = { p->lout, CHUNK, 0 };
      size_t r = ZSTD_decompressStream(p->dctx, &out, &in);
      if (ZSTD_isError(r)) {
        log_error("WAN stream is corrupt (zstd: %s); closing the connection",
                  ZSTD_getErrorName(r));
        return -1;
      }
      p->win_off += in.pos;
      p->win_len -= in.pos;
      p->lout_len = out.pos;
      p->dpending = out.pos == out.size;  /* output full: call again */
    } else {
      memcpy(p->lout, p->win + p->win_off, p->win_len);
      p->lout_len = p->win_len;
      p->win_len = 0;
    }
    p->lout_off = 0;
    COUNT(p, rx_raw, p->lout_len);
    moved = 1;
    if (p->nego) {                  /* the server's answers, for libnbd in turn */
      if (nego_from_server(p->nego, p->lout, p->lout_len) < 0) {
        log_warn("WAN connection to %s: NBD handshake sent ahead: %s", p->host,
                 nego_error(p->nego));
        return -1;
      }
      p->lout_len = 0;
      struct wan_early *y = nego_early(p->nego);
      if (y && !p->early_seen && nego_early_receiving(p->nego)) {
        /* Timed only from a read that found the link drained (not a
         * backlog the pump came late to: that would read as a faster
         * link), and not over TLS (a read returns one record). */
        p->early_seen = true;
        if (p->rx_short && !p->ssl) {
          y->first_ns = now_ns();
          p->early_wire = p->rx_wire; /* (this read's bytes left out: a lower bound) */
        }
      }
      bool ok;
      struct wan_early *x = nego_early_resolved(p->nego, &ok);
      if (x) {                      /* the read sent with the handshake: in */
        x->done_ns = now_ns();
        x->wire = p->rx_wire - p->early_wire;
        atomic_store_explicit(&x->state, ok ? WAN_EARLY_DONE : WAN_EARLY_FAILED,
                              memory_order_release);
      }
    }
  }
  /* nego -> local (before anything else reaches libnbd) */
  if (p->nego) {
    size_t len;
    const uint8_t *b = nego_to_local(p->nego, &len);
    if (len) {
      n = write(p->local, b, len);
      if (n > 0) {
        nego_delivered(p->nego, n);
        moved = 1;
      } else if (n < 0 && errno != EAGAIN && errno != EINTR)
        return -1;
    }
    if (p->local_eof && p->nego) {   /* libnbd is gone: nothing more to answer */
      nego_free(p->nego);
      p->nego = NULL;
      moved = 1;
    } else if (p->wan_eof && !p->win_len && !p->dpending && !nego_server_done(p->nego)) {
      log_warn("WAN connection to %s: the server closed the connection during the "
               "NBD handshake", p->host);
      return -1;                    /* libnbd sees the end at once */
    } else if (nego_over(p->nego)) {
      log_debug("WAN connection to %s: NBD handshake (sent ahead) done", p->host);
      nego_free(p->nego);
      p->nego = NULL;
      moved = 1;
    }
  }
  /* lout -> local */
  if (p->lout_len) {
    n = write(p->local, p->lout + p->lout_off, p->lout_len);
    if (n > 0) {
      p->lout_off += n;
      p->lout_len -= n;
      moved = 1;
    } else if (n < 0 && errno != EAGAIN && errno != EINTR)
      return -1;
  }
  if (p->wan_eof && !p->win_len && !p->lout_len && !p->dpending && !p->local_wr_shut &&
      !p->nego) {
    shutdown(p->local, SHUT_WR);
    p->local_wr_shut = true;
    moved = 1;
  }
  return moved;
}

static void *pump_main(void *arg)
{
  struct pump *p = arg;

  if (!p->server) hs_watch = p->local;
  if (!p->server) {                 /* finish the non-blocking connect */
    int soerr = 0;
    socklen_t sl = sizeof soerr;
    if (wait_fd(p->wan, POLLOUT, p->deadline) < 0 ||
        getsockopt(p->wan, SOL_SOCKET, SO_ERROR, &soerr, &sl) < 0 || soerr) {
      log_warn("WAN connection to %s failed: %s", p->host,
               strerror(soerr ? soerr : errno));
      goto out;
    }
  }
  if (handshake(p) < 0) {
    if (errno == ECANCELED)
      log_debug("WAN connection to %s given up during its handshake", p->host);
    else if (errno == ETIMEDOUT)
      log_warn("WAN handshake with %s timed out", p->server ? "a client" : p->host);
    goto out;
  }
  hs_watch = -1;
  if (start_stream(p) < 0) goto out;
  /* the NBD handshake goes first, at once (unless it left with the hello) */
  if (p->nego && !p->early_sent && send_preamble(p) < 0) goto out;
  for (;;) {
    int r = pump_step(p);
    if (r < 0) break;
    if (p->local_eof && p->wan_wr_shut && p->wan_eof && p->local_wr_shut) break;
    if (r > 0 || (p->ssl && SSL_pending(p->ssl) > 0 && !p->win_len)) continue;
    struct pollfd pf[2] = { { .fd = p->local }, { .fd = p->wan } };
    if (!p->wout_len && !p->local_eof) pf[0].events |= POLLIN;
    size_t nl = 0;
    if (p->nego) nego_to_local(p->nego, &nl);
    if (p->lout_len || nl) pf[0].events |= POLLOUT;
    if ((p->wout_len && !p->pace_wait) || p->ssl_want_write) pf[1].events |= POLLOUT;
    if ((!p->win_len && !p->wan_eof) || p->ssl_want_read) pf[1].events |= POLLIN;
    p->ssl_want_read = p->ssl_want_write = false;
    /* (held back by the pace: acknowledgements make room, unseen) */
    if (poll(pf, 2, p->pace_wait ? 1 : 1000) < 0 && errno != EINTR) break;
    if ((pf[0].revents | pf[1].revents) & POLLNVAL) break;
    if (pf[1].revents & (POLLERR | POLLHUP)) p->wan_broken = true;
  }
out:
  pump_free(p);
  OPENSSL_thread_stop();          /* this thread's OpenSSL state */
  atomic_fetch_sub(&live_pumps, 1);
  return NULL;
}

unsigned wan_wait_idle(unsigned timeout_ms)
{
  for (unsigned waited = 0; atomic_load(&live_pumps) && waited < timeout_ms; waited += 10)
    usleep(10000);
  return atomic_load(&live_pumps);
}

static struct pump *pump_new(int wan, bool server)
{
  struct pump *p = calloc(1, sizeof *p);
  if (!p) return NULL;
  p->wan = wan;
  p->local = -1;
  p->server = server;
  p->wout_cap = ZSTD_compressBound(2 * CHUNK) + 1024;   /* input held back + a chunk */
  p->lin = malloc(CHUNK);
  p->wout = malloc(p->wout_cap);
  p->win = malloc(CHUNK);
  p->lout = malloc(CHUNK);
  if (!p->lin || !p->wout || !p->win || !p->lout) { p->wan = -1; pump_free(p); return NULL; }
  return p;
}

static int pump_start(struct pump *p)
{
  int sv[2];
  pthread_t t;
  pthread_attr_t a;
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) < 0) return -1;
  fcntl(sv[1], F_SETFL, O_NONBLOCK);
  fcntl(p->wan, F_SETFL, O_NONBLOCK);
  p->local = sv[1];
  pthread_attr_init(&a);
  pthread_attr_setdetachstate(&a, PTHREAD_CREATE_DETACHED);
  atomic_fetch_add(&live_pumps, 1);
  if (pthread_create(&t, &a, pump_main, p) != 0) {
    atomic_fetch_sub(&live_pumps, 1);
    pthread_attr_destroy(&a);
    close(sv[0]);
    p->local = -1;
    close(sv[1]);
    return -1;
  }
  pthread_attr_destroy(&a);
  return sv[0];
}

int wan_serve(int wan_fd, struct wan_tls *tls, bool require_tls,
              bool allow_zstd, unsigned handshake_timeout_s)
{
  struct pump *p = pump_new(wan_fd, true);
  int fd;
  if (!p) return -1;
  p->tls = tls;
  p->require_tls = require_tls;
  p->allow_zstd = allow_zstd;
  p->deadline = now_ns() + (uint64_t) handshake_timeout_s * 1000000000u;
  fd = pump_start(p);
  if (fd < 0) { p->wan = -1; pump_free(p); }
  return fd;
}

int wan_connect(const char *host, const char *port, unsigned flags, int level,
                struct wan_tls *tls, unsigned timeout_s,
                struct wan_counters *counters, const struct wan_nego_cfg *nego,
                char *err, size_t errlen)
{
  struct addrinfo hints = { .ai_socktype = SOCK_STREAM }, *res;
  struct pump *p;
  int fd, e, one = 1;

  if ((flags & WAN_F_TLS) && !tls) {
    snprintf(err, errlen, "xnbds:// needs TLS credentials (--tls-psk or --tls-certificates)");
    return -1;
  }
  e = getaddrinfo(host, port, &hints, &res);
  if (e) {
    snprintf(err, errlen, "cannot resolve %s: %s", host, gai_strerror(e));
    return -1;
  }
  fd = socket(res->ai_family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0 || (connect(fd, res->ai_addr, res->ai_addrlen) < 0 && errno != EINPROGRESS)) {
    snprintf(err, errlen, "cannot connect to %s:%s: %s", host, port, strerror(errno));
    if (fd >= 0) close(fd);
    freeaddrinfo(res);
    return -1;
  }
  freeaddrinfo(res);
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  p = pump_new(fd, false);
  if (!p) { close(fd); snprintf(err, errlen, "out of memory"); return -1; }
  const char *pc = getenv("XNBD_WAN_PACE");
  if (pc && strcmp(pc, "0") == 0) flags &= ~WAN_F_PACED;
  p->flags = flags;
  p->level = level;
  p->tls = tls;
  const char *pl = getenv("XNBD_WAN_PIPELINE");
  if (nego && !(pl && strcmp(pl, "0") == 0)) {
    p->nego = nego_new(nego);
    if (!p->nego) { pump_free(p); snprintf(err, errlen, "out of memory"); return -1; }
  }
  if (counters) {
    atomic_fetch_add(&counters->refs, 1);
    p->ctr = counters;
  }
  snprintf(p->host, sizeof p->host, "%s", host);
  p->deadline = now_ns() + (uint64_t) timeout_s * 1000000000u;
  int local = pump_start(p);
  if (local < 0) {
    snprintf(err, errlen, "cannot start the WAN transport: %s", strerror(errno));
    pump_free(p);
  }
  return local;
}

