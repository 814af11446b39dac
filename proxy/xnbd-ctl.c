/* xnbd-ctl: drive a running xnbd-proxy over its control socket.
 *
 *   xnbd-ctl --control SOCK COMMAND [ARGS]
 *
 * Sends one protocol line per command (common/ctl/ctl-proto.h, whose command
 * table also gives this program its command names, usage and help) and
 * reads the JSON reply.  `cache-all --wait` keeps the connection and polls `status`.
 * Exit status: 0 ok, 1 the proxy said no (or could not be reached), 2 usage. */
#include "ctl-proto.h"
#include "json.h"
#include "target.h"
#include "util.h"

#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#ifndef XNBD_VERSION
#define XNBD_VERSION "unknown"
#endif

#define EXIT_NO    1
#define EXIT_USAGE 2
#define REPLY_MAX  (1 << 20)      /* a reply line longer than this is bogus */

static const char *progname = "xnbd-ctl";
static const char *sock_path;
static int timeout_ms = -1;       /* -1: per-command default; 0: none */
static volatile sig_atomic_t interrupted;
static bool bar_shown;            /* a progress bar line is open on stderr */

/* After Ctrl-C (or SIGTERM) while waiting for cache-all. */
static void __attribute__((noreturn)) stop_waiting(void)
{
  if (bar_shown) fputc('\n', stderr);
  fprintf(stderr, "%s: stopped waiting; the background copy goes on in "
          "xnbd-proxy\n", progname);
  exit(130);
}

static void usage_error(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
static void usage_error(const char *fmt, ...)
{
  va_list ap;
  fprintf(stderr, "%s: ", progname);
  va_start(ap, fmt);
  vfprintf(stderr, fmt, ap);
  va_end(ap);
  fprintf(stderr, "\nTry '%s --help' for more information.\n", progname);
  exit(EXIT_USAGE);
}

static void fail(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
static void fail(const char *fmt, ...)
{
  va_list ap;
  if (bar_shown) fputc('\n', stderr);
  fprintf(stderr, "%s: ", progname);
  va_start(ap, fmt);
  vfprintf(stderr, fmt, ap);
  va_end(ap);
  fputc('\n', stderr);
  exit(EXIT_NO);
}

/* xnbd-ctl's own options of some commands; names, usage and descriptions
 * come from the protocol's command table (ctl_commands). */
static const struct {
  enum ctl_cmd_id id;
  const char *opts;               /* appended to the usage */
  const char *help;               /* appended to the description */
} cli_extras[] = {
  { CTL_STATUS, "[--json]", "--json prints the proxy's JSON reply" },
  { CTL_CACHE_ALL, "[--wait] [--progress]", "--wait returns when every block is "
    "present, --progress shows the progress (and waits)" },
  { CTL_HELP, NULL, "as the running proxy knows them" },
};

static const char *extra_opts(enum ctl_cmd_id id)
{
  for (size_t i = 0; i < ARRAY_SIZE(cli_extras); i++)
    if (cli_extras[i].id == id) return cli_extras[i].opts;
  return NULL;
}

static const char *extra_help(enum ctl_cmd_id id)
{
  for (size_t i = 0; i < ARRAY_SIZE(cli_extras); i++)
    if (cli_extras[i].id == id) return cli_extras[i].help;
  return NULL;
}

/* Prints text word-wrapped between column col and column 79; *at is the
 * current column, and the text follows what is there after a space. */
static void put_wrapped(const char *text, int *at, int col)
{
  while (*text) {
    size_t w = strcspn(text, " ");
    if (*at > col && *at + 1 + (int) w > 79) {
      printf("\n%*s", col, "");
      *at = col;
    } else if (*at > col) {
      putchar(' ');
      (*at)++;
    }
    printf("%.*s", (int) w, text);
    *at += w;
    text += w;
    while (*text == ' ') text++;
  }
}

/* "status, cache-all, ..." */
static const char *command_names(void)
{
  static char buf[256];
  size_t n = 0;
  for (size_t i = 0; i < CTL_NCOMMANDS && n < sizeof buf; i++)
    n += snprintf(buf + n, sizeof buf - n, "%s%s", i ? ", " : "", ctl_commands[i].name);
  return buf;
}

static void usage(void)
{
  printf("Usage: %s --control SOCKET COMMAND [ARGS]\n"
         "Control a running xnbd-proxy through its control socket.\n"
         "\n"
         "Commands:\n", progname);
  for (size_t i = 0; i < CTL_NCOMMANDS; i++) {
    const struct ctl_command *cmd = &ctl_commands[i];
    const char *opts = extra_opts(cmd->id), *help = extra_help(cmd->id);
    char head[64];
    int n = snprintf(head, sizeof head, "  %s%s%s", cmd->usage, opts ? " " : "",
                     opts ? opts : "");
    int at = 29;
    printf("%s", head);
    if (n > 28)
      printf("\n%29s", "");
    else
      printf("%*s", 29 - n, "");
    put_wrapped(cmd->description, &at, 29);
    if (cmd->alias) {
      printf(";");
      at++;
      put_wrapped("also called", &at, 29);
      put_wrapped(cmd->alias, &at, 29);
    }
    if (help) {
      printf(";");
      at++;
      put_wrapped(help, &at, 29);
    }
    putchar('\n');
  }
  /* The commands that wait for the source or the disk get longer. */
  char slow[128];
  size_t n = 0;
  slow[0] = '\0';
  for (size_t i = 0; i < CTL_NCOMMANDS && n < sizeof slow; i++)
    if (ctl_commands[i].may_block)
      n += snprintf(slow + n, sizeof slow - n, "%s%s", n ? ", " : "", ctl_commands[i].name);
  int at = 29;
  printf("\n"
         "Options:\n"
         "  -c, --control SOCKET       the proxy's control socket (xnbd-proxy --control)\n"
         "  -t, --timeout SECONDS      ");
  put_wrapped("how long to wait for a reply (default 30, and 600 for", &at, 29);
  put_wrapped(slow, &at, 29);
  printf(";");
  at++;
  put_wrapped("0: forever)", &at, 29);
  printf("\n");
  printf(
"  -h, --help                 show this help\n"
"  -V, --version              show the version\n"
"\n"
"xnbd-bgctl compatible forms (SOCKET may also be given with -c):\n"
"  %s --query SOCKET             same as status\n"
"  %s --cache-all SOCKET         cache-all --wait (--progress to show it)\n"
"  %s --switch [--force] SOCKET  same as detach\n"
"  %s --reconnect SOCKET HOST PORT | --reconnect SOCKET URI\n"
"\n"
"Exit status: 0 done, 1 refused or failed (the reason is printed), 2 usage.\n"
"See xnbd-ctl(1) for the line protocol, usable with socat or nc -U.\n",
         progname, progname, progname, progname);
}

/* ---- talking to the proxy ------------------------------------------------ */

struct ctl_client {
  int fd;
  char *buf;                      /* bytes received after the last line */
  size_t len, cap;
};

static void ctl_client_open(struct ctl_client *c)
{
  struct sockaddr_un sa;
  struct stat st;
  int err;

  memset(c, 0, sizeof *c);
  memset(&sa, 0, sizeof sa);
  sa.sun_family = AF_UNIX;
  if (strlen(sock_path) >= sizeof sa.sun_path)
    fail("control socket path %s is too long (at most %zu bytes); use a "
         "shorter path or a symbolic link", sock_path, sizeof sa.sun_path - 1);
  strcpy(sa.sun_path, sock_path);
  c->fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (c->fd < 0)
    fail("cannot create a socket: %s", strerror(errno));
  if (connect(c->fd, (struct sockaddr *) &sa, sizeof sa) == 0)
    return;
  err = errno;
  if (err == ENOENT)
    fail("cannot connect to control socket %s: %s (is xnbd-proxy running "
         "with --control %s?)", sock_path, strerror(err), sock_path);
  if (err == EACCES || err == EPERM)
    fail("cannot connect to control socket %s: %s (the socket is mode 0600: "
         "run %s as the user that runs xnbd-proxy)", sock_path, strerror(err),
         progname);
  if (stat(sock_path, &st) == 0 && !S_ISSOCK(st.st_mode))
    fail("cannot connect to control socket %s: it is not a socket (check the "
         "path given to xnbd-proxy --control)", sock_path);
  if (err == ECONNREFUSED)
    fail("cannot connect to control socket %s: %s (no xnbd-proxy is listening "
         "on it: the socket is left over from a proxy that stopped; is "
         "xnbd-proxy running with --control %s?)", sock_path, strerror(err),
         sock_path);
  fail("cannot connect to control socket %s: %s", sock_path, strerror(err));
}

static uint64_t now_ms(void) { return now_ns() / 1000000; }

/* Sends one command line and returns its reply line (malloc'd, no LF). */
static char *ctl_client_request(struct ctl_client *c, const char *line, int limit_ms)
{
  size_t n = strlen(line);
  uint64_t deadline = limit_ms > 0 ? now_ms() + limit_ms : 0;
  char *req = malloc(n + 1);

  if (!req) fail("out of memory");
  memcpy(req, line, n);
  req[n] = '\n';
  for (size_t off = 0; off <= n; ) {
    ssize_t r = send(c->fd, req + off, n + 1 - off, MSG_NOSIGNAL);
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) {
      /* The proxy may have answered and closed (too many clients):
       * prefer its reply to our write error. */
      if (errno == EPIPE || errno == ECONNRESET) break;
      fail("cannot send \"%s\" to xnbd-proxy on %s: %s", line, sock_path, strerror(errno));
    }
    off += r;
  }
  free(req);

  for (;;) {
    char *nl = c->len ? memchr(c->buf, '\n', c->len) : NULL;
    if (nl) {
      size_t ln = nl - c->buf;
      char *out = strndup(c->buf, ln);
      if (!out) fail("out of memory");
      memmove(c->buf, nl + 1, c->len - ln - 1);
      c->len -= ln + 1;
      return out;
    }
    if (c->len >= REPLY_MAX)
      fail("reply from %s is longer than %d bytes without a line end; is it "
           "an xnbd-proxy control socket?", sock_path, REPLY_MAX);
    if (c->cap - c->len < 4096) {
      size_t cap = c->cap ? c->cap * 2 : 8192;
      char *b = realloc(c->buf, cap);
      if (!b) fail("out of memory");
      c->buf = b;
      c->cap = cap;
    }
    int wait = -1;
    if (deadline) {
      uint64_t now = now_ms();
      if (now >= deadline)
        fail("no reply to \"%s\" from xnbd-proxy on %s within %d s; it may be "
             "busy (see its log); use --timeout to wait longer", line,
             sock_path, limit_ms / 1000);
      wait = (int) MIN(deadline - now, (uint64_t) 1000);
    }
    struct pollfd p = { c->fd, POLLIN, 0 };
    int r = poll(&p, 1, wait);
    if (r < 0 && errno != EINTR)
      fail("poll: %s", strerror(errno));
    if (r <= 0) {
      if (interrupted) stop_waiting();
      continue;
    }
    ssize_t got = read(c->fd, c->buf + c->len, c->cap - c->len);
    if (got < 0 && errno == EINTR) continue;
    if (got < 0 && errno != ECONNRESET)
      fail("cannot read the reply from %s: %s", sock_path, strerror(errno));
    if (got <= 0)
      fail("xnbd-proxy closed the control connection on %s without replying "
           "to \"%s\" (did it exit? see its log)", sock_path, line);
    c->len += got;
  }
}

/* Sends a command and parses the reply; exits with the proxy's error when
 * it says ok:false.  *raw (if given) gets the reply line. */
static struct json *ctl_client_command(struct ctl_client *c, const char *line, int limit_ms,
                                 char **raw)
{
  char *reply = ctl_client_request(c, line, limit_ms);
  char err[128];
  struct json *j = json_parse(reply, strlen(reply), err, sizeof err);
  bool ok = false;

  if (!j || json_type(j) != JSON_OBJECT || !json_bool(json_get(j, "ok"), &ok))
    fail("unexpected reply from %s (%s): %.200s; is it an xnbd-proxy control "
         "socket, and of the same version?", sock_path,
         j ? "no \"ok\" member" : err, reply);
  if (!ok) {
    const char *e = json_str(json_get(j, "error"));
    fail("%s", e ? e : "the proxy refused the command without giving a reason");
  }
  if (raw) *raw = reply;
  else free(reply);
  return j;
}

static void ctl_client_close(struct ctl_client *c)
{
  close(c->fd);
  free(c->buf);
}

/* ---- reading status replies -------------------------------------------- */

static uint64_t u64_of(const struct json *j, const char *path, bool *have)
{
  uint64_t v = 0;
  bool ok = json_u64(json_get(j, path), &v);
  if (have) *have = ok;
  return v;
}

static bool bool_of(const struct json *j, const char *path)
{
  bool v = false;
  json_bool(json_get(j, path), &v);
  return v;
}

static const char *str_of(const struct json *j, const char *path)
{
  const char *s = json_str(json_get(j, path));
  return s ? s : "";
}

/* Prints s with control characters shown as spaces (no terminal escapes
 * from a remote error message). */
static void put_clean(FILE *f, const char *s)
{
  for (; *s; s++)
    fputc((unsigned char) *s < 0x20 || *s == 0x7f ? ' ' : *s, f);
}

static const char *size_str(uint64_t v, char *buf, size_t len)
{
  return human_size(v, buf, len);
}

static const char *rate_str(uint64_t bps, char *buf, size_t len)
{
  char h[32];
  snprintf(buf, len, "%s/s", human_size(bps, h, sizeof h));
  return buf;
}

/* Percentage in tenths, rounded down: 1000 only when complete. */
static unsigned permille(uint64_t present, uint64_t total)
{
  if (!total) return 1000;
  return (unsigned) ((unsigned __int128) MIN(present, total) * 1000 / total);
}

/* Bytes present, from blocks (the last block may be partial). */
static void progress_bytes(const struct json *j, uint64_t *done, uint64_t *total)
{
  uint64_t bs = u64_of(j, "block_size", NULL);
  uint64_t present = u64_of(j, "blocks.present", NULL);
  uint64_t nblocks = u64_of(j, "blocks.total", NULL);
  *total = u64_of(j, "image_size", NULL);
  if (present >= nblocks)
    *done = *total;
  else
    *done = MIN((unsigned __int128) present * bs, (unsigned __int128) *total);
}

static void print_status(const struct json *j)
{
  char a[32], b[32];
  uint64_t done, total;
  bool have;
  unsigned pm;

  progress_bytes(j, &done, &total);
  pm = permille(u64_of(j, "blocks.present", NULL), u64_of(j, "blocks.total", NULL));
  printf("state:          %s\n", str_of(j, "state"));
  printf("progress:       %u.%u%% (%s of %s present)\n", pm / 10, pm % 10,
         size_str(done, a, sizeof a), size_str(total, b, sizeof b));
  printf("blocks:         %" PRIu64 " present, %" PRIu64 " missing, %" PRIu64
         " in flight (%" PRIu64 " blocks of %s)\n",
         u64_of(j, "blocks.present", NULL), u64_of(j, "blocks.missing", NULL),
         u64_of(j, "blocks.inflight", NULL), u64_of(j, "blocks.total", NULL),
         size_str(u64_of(j, "block_size", NULL), a, sizeof a));
  printf("fetched:        %s from the source (%" PRIu64 " on-demand fetches, %"
         PRIu64 " background, %" PRIu64 " errors)\n",
         size_str(u64_of(j, "bytes.fetched", NULL), a, sizeof a),
         u64_of(j, "fetches.ondemand", NULL), u64_of(j, "fetches.background", NULL),
         u64_of(j, "fetches.errors", NULL));
  printf("zero-skipped:   %s\n", size_str(u64_of(j, "bytes.zero_skipped", NULL), a, sizeof a));
  if (bool_of(j, "dedup") || u64_of(j, "bytes.seeded", NULL)) {
    char d[32];
    uint64_t stale = u64_of(j, "fetches.seed_stale", NULL);
    printf("from seeds:     %s (verified by SHA-256; %s of digests read",
           size_str(u64_of(j, "bytes.seeded", NULL), a, sizeof a),
           size_str(u64_of(j, "bytes.digests", NULL), d, sizeof d));
    if (stale)
      printf("; %" PRIu64 " run%s fetched instead: the seed had changed", stale,
             stale == 1 ? "" : "s");
    printf(")\n");
  }
  printf("local writes:   %s\n", size_str(u64_of(j, "bytes.local_written", NULL), a, sizeof a));
  printf("fetch rate:     %s\n", rate_str(u64_of(j, "fetch_rate", NULL), a, sizeof a));
  printf("waiting:        %" PRIu64 " client requests waiting on the source\n",
         u64_of(j, "ondemand_waiting", NULL));
  uint64_t rate = u64_of(j, "background.rate", NULL);
  printf("background:     %s, %s%s, window %s\n",
         bool_of(j, "background.paused") ? "paused" :
         bool_of(j, "background.running") ? "running" : "not running",
         rate ? "rate limit " : "no rate limit",
         rate ? rate_str(rate, a, sizeof a) : "",
         size_str(u64_of(j, "background.window", NULL), b, sizeof b));
  printf("connections:    %" PRIu64 " of %" PRIu64 " up\n",
         u64_of(j, "connections.up", NULL), u64_of(j, "connections.total", NULL));
  printf("target:         "); put_clean(stdout, str_of(j, "target")); putchar('\n');
  printf("source id:      "); put_clean(stdout, str_of(j, "source_id")); putchar('\n');
  printf("last error:     ");
  put_clean(stdout, *str_of(j, "last_error") ? str_of(j, "last_error") : "none");
  putchar('\n');
  double done_at;
  if (json_double(json_get(j, "completed_at"), &done_at) && done_at > 0) {
    time_t t = (time_t) done_at;
    struct tm tm;
    char when[64];
    if (gmtime_r(&t, &tm) && strftime(when, sizeof when, "%Y-%m-%d %H:%M:%S", &tm))
      printf("completed:      %s.%03d UTC\n", when,
             (int) ((done_at - (double) t) * 1000) % 1000);
  }
  uint64_t forced = u64_of(j, "forced_missing", &have);
  if (have && forced)
    printf("forced missing: %" PRIu64 " blocks were missing at a forced detach "
           "(they read as I/O errors)\n", forced);
}

/* The proxy's help reply: its commands, as it knows them. */
static void print_help(const struct json *j)
{
  const struct json *cmds = json_get(j, "commands");
  for (size_t i = 0; i < json_length(cmds); i++) {
    const struct json *c = json_index(cmds, i);
    const struct json *aliases = json_get(c, "aliases");
    int at = 29;
    printf("  ");
    put_clean(stdout, str_of(c, "usage"));
    int n = 2 + (int) strlen(str_of(c, "usage"));
    if (n > 28) printf("\n%29s", "");
    else printf("%*s", 29 - n, "");
    /* put_wrapped prints as is: clean the text first. */
    char *d = strdup(str_of(c, "description"));
    if (!d) fail("out of memory");
    for (char *p = d; *p; p++)
      if ((unsigned char) *p < 0x20 || *p == 0x7f) *p = ' ';
    put_wrapped(d, &at, 29);
    free(d);
    for (size_t k = 0; k < json_length(aliases); k++) {
      printf("%s", k ? ", " : "; also called ");
      put_clean(stdout, json_str(json_index(aliases, k)) ? json_str(json_index(aliases, k)) : "");
    }
    putchar('\n');
  }
}

/* ---- cache-all --wait / --progress ---------------------------------------- */

static void on_signal(int sig) { interrupted = 1; }

static void eta_str(double secs, char *buf, size_t len)
{
  if (secs < 0 || secs > 99 * 86400.0) { snprintf(buf, len, "?"); return; }
  uint64_t s = (uint64_t) (secs + 0.5);
  if (s < 60) snprintf(buf, len, "%" PRIu64 "s", s);
  else if (s < 3600) snprintf(buf, len, "%" PRIu64 "m%02" PRIu64 "s", s / 60, s % 60);
  else snprintf(buf, len, "%" PRIu64 "h%02" PRIu64 "m", s / 3600, s / 60 % 60);
}

/* Progress rate over the last ~10 s, from a ring of samples. */
#define NSAMPLES 64
struct samples {
  uint64_t t_ms[NSAMPLES], bytes[NSAMPLES];
  unsigned n, head;
};

static double sample_rate(struct samples *s, uint64_t t, uint64_t bytes)
{
  unsigned oldest;
  s->t_ms[s->head] = t;
  s->bytes[s->head] = bytes;
  s->head = (s->head + 1) % NSAMPLES;
  if (s->n < NSAMPLES) s->n++;
  /* The oldest sample no more than 10 s old. */
  oldest = (s->head + NSAMPLES - s->n) % NSAMPLES;
  while (s->n > 1 && t - s->t_ms[oldest] > 10000) {
    oldest = (oldest + 1) % NSAMPLES;
    s->n--;
  }
  if (t - s->t_ms[oldest] < 1000 || bytes < s->bytes[oldest])
    return -1;
  return (bytes - s->bytes[oldest]) * 1000.0 / (t - s->t_ms[oldest]);
}

static int cache_all_wait(struct ctl_client *c, bool progress)
{
  bool tty = progress && isatty(STDERR_FILENO);
  int poll_ms = tty ? 250 : 500;
  uint64_t last_line = 0, stopped_since = 0;
  char last_error[512] = "";
  struct samples smp = { .n = 0 };
  struct sigaction sa = { .sa_handler = on_signal };

  sigaction(SIGINT, &sa, NULL);
  sigaction(SIGTERM, &sa, NULL);
  for (;;) {
    struct json *j = ctl_client_command(c, "status", 30000, NULL);
    const char *state = str_of(j, "state");
    uint64_t done, total, t = now_ms();
    bool complete = strcmp(state, "complete") == 0;
    bool detached = strcmp(state, "detached") == 0;
    bool paused = bool_of(j, "background.paused");
    unsigned pm = permille(u64_of(j, "blocks.present", NULL), u64_of(j, "blocks.total", NULL));
    char a[32], b[32], r[32], eta[32];
    double prate;

    progress_bytes(j, &done, &total);
    prate = sample_rate(&smp, t, done);
    if (complete || detached) eta_str(0, eta, sizeof eta);
    else eta_str(prate > 0 ? (total - done) / prate : -1, eta, sizeof eta);
    size_str(done, a, sizeof a);
    size_str(total, b, sizeof b);
    rate_str(u64_of(j, "fetch_rate", NULL), r, sizeof r);

    /* A new error from the engine is worth a line of its own. */
    const char *le = str_of(j, "last_error");
    if (progress && *le && strncmp(le, last_error, sizeof last_error - 1) != 0) {
      fputs(bar_shown ? "\r\033[K" : "", stderr);
      fputs("last error: ", stderr);
      put_clean(stderr, le);
      fputc('\n', stderr);
      last_line = 0;
    }
    snprintf(last_error, sizeof last_error, "%s", le);

    bool finished = complete || detached;
    const char *note = strcmp(state, "proxying") && !finished ? state :
                       paused ? "paused" : NULL;
    if (tty) {
      char bar[31];
      unsigned fill = pm * 30 / 1000;
      memset(bar, '#', fill);
      memset(bar + fill, '-', 30 - fill);
      bar[30] = '\0';
      fprintf(stderr, "\r[%s] %3u.%u%%  %s/%s  %s  ETA %s%s%s\033[K", bar,
              pm / 10, pm % 10, a, b, r, eta, note ? "  " : "", note ? note : "");
      bar_shown = !finished;
      if (finished) fputc('\n', stderr);
    } else if (progress && (finished || last_line == 0 || t - last_line >= 2000)) {
      fprintf(stderr, "progress %u.%u%% %s/%s rate %s eta %s%s%s\n", pm / 10,
              pm % 10, a, b, r, eta, note ? " " : "", note ? note : "");
      last_line = t;
    }
    fflush(stderr);

    if (detached) {
      uint64_t missing = u64_of(j, "blocks.missing", NULL) + u64_of(j, "forced_missing", NULL);
      json_free(j);
      if (missing)
        fail("the proxy was detached from the source (forced) with blocks "
             "missing; they can no longer be copied");
      if (!progress)
        printf("every block is present (%s); the proxy is detached from the "
               "source\n", b);
      return 0;
    }
    if (complete) {
      json_free(j);
      if (!progress)
        printf("every block is present (%s); detach with: %s -c %s detach\n",
               b, progname, sock_path);
      return 0;
    }
    /* The copy stopped by itself (not paused, source not lost) before
     * the end. */
    if (!bool_of(j, "background.running") && !paused &&
        strcmp(state, "proxying") == 0) {
      if (!stopped_since) stopped_since = t;
      else if (t - stopped_since > 5000) {
        if (bar_shown) fputc('\n', stderr);
        fprintf(stderr, "%s: the background copy stopped with blocks missing "
                "(state %s", progname, state);
        if (*le) { fputs(", last error: ", stderr); put_clean(stderr, le); }
        fprintf(stderr, "); see xnbd-proxy's log, then run cache-all again\n");
        json_free(j);
        return EXIT_NO;
      }
    } else {
      stopped_since = 0;
    }
    json_free(j);

    struct timespec ts = { 0, poll_ms * 1000000L };
    nanosleep(&ts, NULL);
    if (interrupted)
      stop_waiting();
  }
}

/* ---- commands -------------------------------------------------------------- */

enum { OPT_JSON = 256, OPT_WAIT, OPT_PROGRESS, OPT_QUERY, OPT_CACHE_ALL,
       OPT_SWITCH, OPT_RECONNECT };

/* What the command line asked for. */
struct invocation {
  const struct ctl_command *cmd;
  const char *flag_name;        /* the word or xnbd-bgctl flag used */
  bool force, json_out, wait, progress;
  char **args;
  int nargs;
  char uri[1024];
};

static const struct option opts[] = {
  { "control", required_argument, NULL, 'c' },
  { "timeout", required_argument, NULL, 't' },
  { "force", no_argument, NULL, 'f' },
  { "json", no_argument, NULL, OPT_JSON },
  { "wait", no_argument, NULL, OPT_WAIT },
  { "progress", no_argument, NULL, OPT_PROGRESS },
  { "query", no_argument, NULL, OPT_QUERY },
  { "cache-all", no_argument, NULL, OPT_CACHE_ALL },
  { "cache-all2", no_argument, NULL, OPT_CACHE_ALL },
  { "switch", no_argument, NULL, OPT_SWITCH },
  { "reconnect", no_argument, NULL, OPT_RECONNECT },
  { "help", no_argument, NULL, 'h' },
  { "version", no_argument, NULL, 'V' },
  { NULL, 0, NULL, 0 },
};

static int parse_timeout(const char *arg)
{
  char *end;
  long v;
  errno = 0;
  v = strtol(arg, &end, 10);
  if (errno || *end || end == arg || v < 0 || v > 86400 * 365)
    usage_error("--timeout: \"%s\" is not a number of seconds", arg);
  return v == 0 ? 0 : (int) MIN(v * 1000, (long) INT32_MAX);
}

/* Options.  Returns -1 to go on, or an exit status (--help, --version). */
static int parse_options(int argc, char **argv, struct invocation *in)
{
  int opt, longindex;
  while ((opt = getopt_long(argc, argv, "c:t:fhV", opts, &longindex)) != -1) {
    switch (opt) {
    case 'c': sock_path = optarg; break;
    case 't': timeout_ms = parse_timeout(optarg); break;
    case 'f': in->force = true; break;
    case OPT_JSON: in->json_out = true; break;
    case OPT_WAIT: in->wait = true; break;
    case OPT_PROGRESS: in->progress = true; break;
    case OPT_QUERY: case OPT_CACHE_ALL: case OPT_SWITCH: case OPT_RECONNECT: {
      enum ctl_cmd_id want = opt == OPT_QUERY ? CTL_STATUS : opt == OPT_CACHE_ALL ?
        CTL_CACHE_ALL : opt == OPT_SWITCH ? CTL_DETACH : CTL_RECONNECT;
      if (in->flag_name)
        usage_error("%s and --%s: give one command", in->flag_name, opts[longindex].name);
      in->flag_name = opt == OPT_QUERY ? "--query" : opt == OPT_CACHE_ALL ? "--cache-all" :
                      opt == OPT_SWITCH ? "--switch" : "--reconnect";
      in->cmd = &ctl_commands[want];
      break;
    }
    case 'h': usage(); return 0;
    case 'V': printf("xnbd-ctl %s\n", XNBD_VERSION); return 0;
    default:
      fprintf(stderr, "Try '%s --help' for more information.\n", progname);
      return EXIT_USAGE;
    }
  }
  in->args = argv + optind;
  in->nargs = argc - optind;
  return -1;
}

/* The command: an xnbd-bgctl flag (--query SOCKET, --reconnect SOCKET HOST
 * PORT, ...) or a word. */
static void resolve_command(struct invocation *in)
{
  if (!in->flag_name) {
    if (in->nargs < 1)
      usage_error("no command given (%s)", command_names());
    in->cmd = ctl_command_find(in->args[0]);
    if (!in->cmd)
      usage_error("unknown command \"%s\" (commands: %s)", in->args[0], command_names());
    in->flag_name = in->args[0];
    in->args++, in->nargs--;
    return;
  }
  if (!sock_path) {
    if (in->nargs < 1)
      usage_error("%s needs the control socket: %s %s SOCKET", in->flag_name,
                  progname, in->flag_name);
    sock_path = in->args[0];
    in->args++, in->nargs--;
  }
  if (in->cmd->id == CTL_CACHE_ALL)
    in->wait = true;              /* xnbd-bgctl --cache-all waits for the end */
  if (in->cmd->id == CTL_RECONNECT) {
    if (in->nargs == 2) {
      bool v6 = strchr(in->args[0], ':') != NULL;
      snprintf(in->uri, sizeof in->uri, "%s%s%s:%s", v6 ? "[" : "", in->args[0],
               v6 ? "]" : "", in->args[1]);
      in->args[0] = in->uri;
      in->nargs = 1;
    } else if (in->nargs != 1) {
      usage_error("usage: %s --reconnect SOCKET HOST PORT (or -c SOCKET "
                  "--reconnect URI)", progname);
    }
  }
}

/* Arguments and options per command; then the request line. */
static void check_and_build(struct invocation *in, char *line, size_t linelen)
{
  const struct ctl_command *cmd = in->cmd;
  int want_args = cmd->arg ? 1 : 0;
  if (!sock_path)
    usage_error("which proxy? give its control socket with --control SOCKET "
                "(the path given to xnbd-proxy --control)");
  if (in->nargs != want_args) {
    if (in->nargs < want_args)
      usage_error("%s: missing %s; usage: %s -c SOCKET %s (%s)", in->flag_name,
                  cmd->arg, progname, cmd->usage, cmd->description);
    usage_error("%s: unexpected argument \"%s\"; usage: %s -c SOCKET %s", in->flag_name,
                in->args[want_args], progname, cmd->usage);
  }
  if (in->json_out && cmd->id != CTL_STATUS)
    usage_error("--json goes with status only");
  if ((in->wait || in->progress) && cmd->id != CTL_CACHE_ALL)
    usage_error("--wait and --progress go with cache-all only");
  if (in->force && !cmd->flag)
    usage_error("--force does not go with %s (usage: %s)", in->flag_name, cmd->usage);
  if (in->progress)
    in->wait = true;
  if (want_args) {
    const char *a = in->args[0];
    /* One line, words split by spaces: an argument cannot hold either. */
    if (strpbrk(a, " \t\r\n") || !a[0])
      usage_error("%s: \"%s\" must be one word without spaces", in->flag_name, a);
    if (cmd->id == CTL_RATE) {
      uint64_t bps;
      const char *why;
      if (parse_rate(a, &bps, &why) < 0)
        usage_error("rate: cannot parse \"%s\": %s (use e.g. 100mbit, 12M, 0 "
                    "for unlimited)", a, why);
    }
    if (cmd->id == CTL_RECONNECT) {
      struct target t;
      char err[512];
      if (target_parse(a, NULL, &t, err, sizeof err) < 0)
        usage_error("reconnect: %s", err);
      target_free(&t);
    }
  }
  if (snprintf(line, linelen, "%s%s%s%s%s", cmd->name,
               in->force ? " " : "", in->force ? cmd->flag : "",
               want_args ? " " : "", want_args ? in->args[0] : "") >= (int) linelen)
    usage_error("%s: argument too long", in->flag_name);
}

/* The reply, for a person (or raw with --json).  Returns the exit status. */
static int report(struct invocation *in, struct ctl_client *c, struct json *j,
                  const char *raw)
{
  char h[32];
  uint64_t v;
  switch (in->cmd->id) {
  case CTL_STATUS:
    if (in->json_out) puts(raw);
    else print_status(j);
    break;
  case CTL_CACHE_ALL:
    if (in->wait)
      return cache_all_wait(c, in->progress);
    printf("background copy started; follow it with: %s -c %s status\n",
           progname, sock_path);
    break;
  case CTL_ACTIVATE: printf("activated: blocks are kept from now on\n"); break;
  case CTL_PAUSE: printf("background copy paused\n"); break;
  case CTL_RESUME: printf("background copy resumed\n"); break;
  case CTL_RATE:
    v = u64_of(j, "rate", NULL);
    if (v) printf("background copy limited to %s (%" PRIu64 " bytes/s)\n",
                  rate_str(v, h, sizeof h), v);
    else printf("background copy rate unlimited\n");
    break;
  case CTL_DETACH:
    v = u64_of(j, "forced_missing", NULL);
    if (v) printf("detached from the source; %" PRIu64 " blocks were missing "
                  "and read as I/O errors\n", v);
    else printf("detached from the source; xnbd-proxy now serves the local copy\n");
    break;
  case CTL_RECONNECT:
    printf("now using the source at ");
    put_clean(stdout, *str_of(j, "target") ? str_of(j, "target") : in->args[0]);
    putchar('\n');
    break;
  case CTL_FLUSH: break;
  case CTL_HELP:
    print_help(j);
    break;
  case CTL_NCOMMANDS: break;
  }
  return 0;
}

int main(int argc, char **argv)
{
  struct invocation in = { 0 };
  char line[CTL_MAX_LINE + 1];
  struct ctl_client c;
  char *raw = NULL;
  int rc;

  if (argv[0] && strrchr(argv[0], '/')) progname = strrchr(argv[0], '/') + 1;
  else if (argv[0] && argv[0][0]) progname = argv[0];
  if ((rc = parse_options(argc, argv, &in)) >= 0) return rc;
  resolve_command(&in);
  check_and_build(&in, line, sizeof line);

  int limit = timeout_ms >= 0 ? timeout_ms : in.cmd->may_block ? 600000 : 30000;
  ctl_client_open(&c);
  struct json *j = ctl_client_command(&c, line, limit, &raw);
  rc = report(&in, &c, j, raw);
  free(raw);
  json_free(j);
  ctl_client_close(&c);
  if (fflush(stdout) == EOF || ferror(stdout))
    fail("cannot write to standard output: %s", strerror(errno));
  return rc;
}
