/* Unit tests for common/ctl (the control protocol and its socket server)
 * and common/lib/json.c.
 *
 * A FAKE engine (the engine.h functions below, with canned behaviour and
 * call records) stands in for the real one, so the test needs neither a
 * source nor common/engine/engine.c: nothing here or in common/ctl refers
 * to any other engine symbol, so the linker never pulls engine.o out of
 * libxnbd-common.a.  The server runs on its own threads; the tests are its
 * clients over the real unix socket. */
#include <criterion/criterion.h>

#include <dirent.h>
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <semaphore.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "ctl-proto.h"
#include "ctl-server.h"
#include "engine.h"
#include "json.h"
#include "util.h"

/* ---- the fake engine -------------------------------------------------- */

struct engine {
  pthread_mutex_t lock;
  struct engine_stats st;
  int bg_start_calls, bg_pause_calls, bg_resume_calls, rate_calls;
  int detach_calls, reconnect_calls, flush_calls;
  int reconnect_started;        /* engine_reconnect entered (before its delay) */
  int stats_calls;
  uint64_t last_rate;
  bool last_force;
  char last_target[512];
  int detach_rc;                 /* canned results */
  char detach_err[256];
  int flush_rc, flush_errno;
  unsigned reconnect_delay_ms;
  char bg_start_err[256];        /* non-empty: engine_bg_start fails */
};

static struct engine fake = { .lock = PTHREAD_MUTEX_INITIALIZER };

static void fake_reset(void)
{
  pthread_mutex_lock(&fake.lock);
  memset((char *) &fake + sizeof fake.lock, 0, sizeof fake - sizeof fake.lock);
  struct engine_stats *s = &fake.st;
  s->state = ENGINE_PROXYING;
  s->image_size = UINT64_C(3) << 30;
  s->block_size = 4096;
  s->blocks_total = 786432;
  s->blocks_present = 330301;
  s->blocks_missing = 456000;
  s->blocks_inflight = 131;
  s->bytes_fetched = UINT64_C(9007199254740993);   /* 2^53 + 1: exact? */
  s->bytes_zero_skipped = 22;
  s->bytes_local_written = 33;
  s->fetches_ondemand = 44;
  s->fetches_background = 55;
  s->fetch_errors = 66;
  s->fetches_seed_stale = 77;
  s->fetch_rate = 12500000;
  s->ondemand_waiting = 7;
  s->bg_running = true;
  s->bg_paused = false;
  s->bg_rate = 0;
  s->bg_window = 32 << 20;
  s->connections_up = 1;
  s->connections = 2;
  strcpy(s->target, "nbd://siteA:10809/vm1");
  strcpy(s->source_id, "vm1 \"quoted\" back\\slash\ttab");
  strcpy(s->last_error, "read failed:\nline two \x01");
  s->forced_missing = 0;
  pthread_mutex_unlock(&fake.lock);
}

void engine_get_stats(struct engine *e, struct engine_stats *st)
{
  pthread_mutex_lock(&e->lock);
  *st = e->st;
  e->stats_calls++;
  pthread_mutex_unlock(&e->lock);
}

const char *engine_state_name(enum engine_state s)
{
  switch (s) {
  case ENGINE_CONNECTING: return "connecting";
  case ENGINE_PROXYING: return "proxying";
  case ENGINE_SOURCE_LOST: return "source-lost";
  case ENGINE_COMPLETE: return "complete";
  case ENGINE_DETACHED: return "detached";
  }
  return "unknown";
}

int engine_bg_start(struct engine *e, char *err, size_t errlen)
{
  pthread_mutex_lock(&e->lock);
  e->bg_start_calls++;
  int r = 0;
  if (e->bg_start_err[0]) {
    snprintf(err, errlen, "%s", e->bg_start_err);
    r = -1;
  }
  pthread_mutex_unlock(&e->lock);
  return r;
}

void engine_activate(struct engine *e, const char *why) { (void) e; (void) why; }

int engine_bg_pause(struct engine *e, char *err, size_t errlen)
{
  pthread_mutex_lock(&e->lock);
  e->bg_pause_calls++;
  pthread_mutex_unlock(&e->lock);
  return 0;
}

int engine_bg_resume(struct engine *e, char *err, size_t errlen)
{
  pthread_mutex_lock(&e->lock);
  e->bg_resume_calls++;
  pthread_mutex_unlock(&e->lock);
  return 0;
}

int engine_set_bg_rate(struct engine *e, uint64_t bps)
{
  pthread_mutex_lock(&e->lock);
  e->rate_calls++;
  e->last_rate = bps;
  e->st.bg_rate = bps;
  pthread_mutex_unlock(&e->lock);
  return 0;
}

int engine_detach(struct engine *e, bool force, char *err, size_t errlen)
{
  pthread_mutex_lock(&e->lock);
  e->detach_calls++;
  e->last_force = force;
  int r = e->detach_rc;
  if (r < 0)
    snprintf(err, errlen, "%s", e->detach_err);
  else {
    e->st.state = ENGINE_DETACHED;
    if (force) e->st.forced_missing = e->st.blocks_missing;
  }
  pthread_mutex_unlock(&e->lock);
  return r;
}

int engine_reconnect(struct engine *e, const char *target, char *err, size_t errlen)
{
  pthread_mutex_lock(&e->lock);
  unsigned delay = e->reconnect_delay_ms;
  e->reconnect_started++;
  pthread_mutex_unlock(&e->lock);
  if (delay) {
    struct timespec ts = { delay / 1000, (delay % 1000) * 1000000L };
    nanosleep(&ts, NULL);
  }
  pthread_mutex_lock(&e->lock);
  e->reconnect_calls++;
  snprintf(e->last_target, sizeof e->last_target, "%s", target);
  snprintf(e->st.target, sizeof e->st.target, "%s", target);
  pthread_mutex_unlock(&e->lock);
  return 0;
}

int engine_flush(struct engine *e)
{
  pthread_mutex_lock(&e->lock);
  e->flush_calls++;
  int r = e->flush_rc;
  if (r < 0) errno = e->flush_errno;
  pthread_mutex_unlock(&e->lock);
  return r;
}

static int fake_get(int *field)
{
  pthread_mutex_lock(&fake.lock);
  int v = *field;
  pthread_mutex_unlock(&fake.lock);
  return v;
}

/* ---- the server under test -------------------------------------------- */

static char dir[64];
static char sock_path[128];
static struct ctl_server *ctl;

static void make_dir(void)
{
  signal(SIGPIPE, SIG_IGN);
  strcpy(dir, "/tmp/xnbd-test-control.XXXXXX");
  cr_assert_not_null(mkdtemp(dir));
  snprintf(sock_path, sizeof sock_path, "%s/ctl.sock", dir);
  fake_reset();
}

static void remove_dir(void)
{
  DIR *d = opendir(dir);
  struct dirent *de;
  char p[512];
  if (!d) return;
  while ((de = readdir(d)) != NULL)
    if (strcmp(de->d_name, ".") && strcmp(de->d_name, "..")) {
      snprintf(p, sizeof p, "%s/%s", dir, de->d_name);
      unlink(p);
    }
  closedir(d);
  rmdir(dir);
}

static void start_server(void)
{
  char err[512] = "";
  make_dir();
  ctl = ctl_server_start(sock_path, &fake, "xnbd-proxy", err, sizeof err);
  cr_assert_not_null(ctl, "ctl_server_start: %s", err);
}

static void stop_server(void)
{
  ctl_server_stop(ctl);
  ctl = NULL;
  remove_dir();
}

TestSuite(control, .init = start_server, .fini = stop_server, .timeout = 60);
TestSuite(control_socket, .init = make_dir, .fini = remove_dir, .timeout = 60);
TestSuite(json, .timeout = 30);
TestSuite(ctl_proto, .init = fake_reset, .timeout = 30);
TestSuite(xnbd_ctl, .init = start_server, .fini = stop_server, .timeout = 60);

/* ---- a small client ----------------------------------------------------- */

struct client {
  int fd;
  char buf[65536];
  size_t len;
};

static struct client *cl_open(void)
{
  struct client *c = calloc(1, sizeof *c);
  struct sockaddr_un sa = { .sun_family = AF_UNIX };
  cr_assert_not_null(c);
  strcpy(sa.sun_path, sock_path);
  c->fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  cr_assert_geq(c->fd, 0);
  cr_assert_eq(connect(c->fd, (struct sockaddr *) &sa, sizeof sa), 0,
               "connect %s: %s", sock_path, strerror(errno));
  return c;
}

static void cl_close(struct client *c)
{
  close(c->fd);
  free(c);
}

static void cl_send(struct client *c, const char *s, size_t n)
{
  cr_assert_eq(write_all(c->fd, s, n), 0, "write: %s", strerror(errno));
}

/* One reply line (without LF, malloc'd), or NULL at EOF; fails the test
 * after timeout_ms without a full line. */
static char *cl_line_timeout(struct client *c, int timeout_ms)
{
  for (;;) {
    char *nl = memchr(c->buf, '\n', c->len);
    if (nl) {
      size_t n = nl - c->buf;
      char *line = strndup(c->buf, n);
      memmove(c->buf, nl + 1, c->len - n - 1);
      c->len -= n + 1;
      return line;
    }
    cr_assert_lt(c->len, sizeof c->buf, "reply line too long");
    struct pollfd p = { c->fd, POLLIN, 0 };
    int r = poll(&p, 1, timeout_ms);
    cr_assert_gt(r, 0, "no reply within %d ms", timeout_ms);
    ssize_t got = read(c->fd, c->buf + c->len, sizeof c->buf - c->len);
    if (got == 0 || (got < 0 && errno == ECONNRESET)) {
      cr_assert_eq(c->len, 0, "EOF in the middle of a reply line");
      return NULL;
    }
    cr_assert_gt(got, 0, "read: %s", strerror(errno));
    c->len += got;
  }
}

static char *cl_line(struct client *c) { return cl_line_timeout(c, 5000); }

static struct json *parse_reply(const char *line)
{
  char err[128];
  cr_assert_not_null(line, "connection closed instead of a reply");
  struct json *j = json_parse(line, strlen(line), err, sizeof err);
  cr_assert_not_null(j, "reply is not JSON (%s): %s", err, line);
  cr_assert_eq(json_type(j), JSON_OBJECT, "reply is not an object: %s", line);
  return j;
}

/* Sends a command line (LF added) and returns the parsed reply. */
static struct json *cl_cmd(struct client *c, const char *cmd)
{
  char *line;
  struct json *j;
  cl_send(c, cmd, strlen(cmd));
  cl_send(c, "\n", 1);
  line = cl_line(c);
  j = parse_reply(line);
  free(line);
  return j;
}

static bool reply_ok(const struct json *j)
{
  bool ok = false;
  cr_assert(json_bool(json_get(j, "ok"), &ok), "reply has no boolean \"ok\"");
  return ok;
}

static const char *reply_error(const struct json *j)
{
  cr_assert_not(reply_ok(j), "expected ok:false");
  const char *e = json_str(json_get(j, "error"));
  cr_assert_not_null(e, "ok:false reply without an error string");
  return e;
}

static uint64_t get_u64(const struct json *j, const char *path)
{
  uint64_t v = 0;
  cr_assert(json_u64(json_get(j, path), &v), "member %s missing or not an integer", path);
  return v;
}

static bool get_bool(const struct json *j, const char *path)
{
  bool v = false;
  cr_assert(json_bool(json_get(j, path), &v), "member %s missing or not a boolean", path);
  return v;
}

static const char *get_str(const struct json *j, const char *path)
{
  const char *s = json_str(json_get(j, path));
  cr_assert_not_null(s, "member %s missing or not a string", path);
  return s;
}

static unsigned nclients_now(void)
{
  return ctl_server_clients(ctl);
}

static void wait_nclients(unsigned n)
{
  for (int i = 0; i < 500 && nclients_now() != n; i++)
    usleep(10000);
  cr_assert_eq(nclients_now(), n, "%u control clients, expected %u", nclients_now(), n);
}

/* ---- status ------------------------------------------------------------ */

Test(control, status_reports_every_engine_field)
{
  struct client *c = cl_open();
  struct json *j = cl_cmd(c, "status");
  cr_assert(reply_ok(j));
  cr_assert_str_eq(get_str(j, "state"), "proxying");
  cr_assert_eq(get_u64(j, "image_size"), UINT64_C(3) << 30);
  cr_assert_eq(get_u64(j, "block_size"), 4096);
  cr_assert_eq(get_u64(j, "blocks.total"), 786432);
  cr_assert_eq(get_u64(j, "blocks.present"), 330301);
  cr_assert_eq(get_u64(j, "blocks.missing"), 456000);
  cr_assert_eq(get_u64(j, "blocks.inflight"), 131);
  cr_assert_eq(get_u64(j, "bytes.fetched"), UINT64_C(9007199254740993));
  cr_assert_eq(get_u64(j, "bytes.zero_skipped"), 22);
  cr_assert_eq(get_u64(j, "bytes.local_written"), 33);
  cr_assert_eq(get_u64(j, "fetches.ondemand"), 44);
  cr_assert_eq(get_u64(j, "fetches.background"), 55);
  cr_assert_eq(get_u64(j, "fetches.errors"), 66);
  cr_assert_eq(get_u64(j, "fetches.seed_stale"), 77);
  cr_assert_eq(get_u64(j, "fetch_rate"), 12500000);
  cr_assert_eq(get_u64(j, "ondemand_waiting"), 7);
  cr_assert_eq(get_bool(j, "background.running"), true);
  cr_assert_eq(get_bool(j, "background.paused"), false);
  cr_assert_eq(get_u64(j, "background.rate"), 0);
  cr_assert_eq(get_u64(j, "background.window"), 32 << 20);
  cr_assert_eq(get_u64(j, "connections.up"), 1);
  cr_assert_eq(get_u64(j, "connections.total"), 2);
  cr_assert_str_eq(get_str(j, "target"), "nbd://siteA:10809/vm1");
  cr_assert_str_eq(get_str(j, "source_id"), "vm1 \"quoted\" back\\slash\ttab");
  cr_assert_str_eq(get_str(j, "last_error"), "read failed:\nline two \x01");
  cr_assert_eq(get_u64(j, "forced_missing"), 0);
  double p = -1;
  cr_assert(json_double(json_get(j, "progress"), &p));
  cr_assert_float_eq(p, 0.4199, 1e-9);    /* 330301/786432 = 0.41999.. */
  json_free(j);
  cl_close(c);
}

/* completed_at appears once the engine recorded the moment every block was
 * present, as seconds since the epoch with the microseconds. */
Test(control, status_has_completed_at_only_once_complete)
{
  struct client *c = cl_open();
  struct json *j = cl_cmd(c, "status");
  cr_assert(reply_ok(j));
  cr_assert_null(json_get(j, "completed_at"));
  json_free(j);
  pthread_mutex_lock(&fake.lock);
  fake.st.state = ENGINE_COMPLETE;
  fake.st.completed_unix_us = UINT64_C(1796640000000042);
  pthread_mutex_unlock(&fake.lock);
  j = cl_cmd(c, "status");
  cr_assert(reply_ok(j));
  cr_assert_str_eq(get_str(j, "state"), "complete");
  double t = 0;
  cr_assert(json_double(json_get(j, "completed_at"), &t));
  cr_assert_float_eq(t, 1796640000.000042, 1e-6);
  json_free(j);
  cl_close(c);
}

Test(control, status_reply_is_one_line_with_escaped_strings)
{
  struct client *c = cl_open();
  cl_send(c, "status\n", 7);
  char *line = cl_line(c);
  cr_assert_not_null(line);
  cr_assert_not_null(strstr(line, "\"last_error\":\"read failed:\\nline two \\u0001\""), "%s", line);
  cr_assert_not_null(strstr(line, "\"progress\":0.4199}"), "%s", line);
  for (char *p = line; *p; p++)
    cr_assert_geq((unsigned char) *p, 0x20, "raw control character in reply");
  free(line);
  cl_close(c);
}

Test(control, progress_is_rounded_down_and_complete_only_when_all_present)
{
  struct client *c = cl_open();
  pthread_mutex_lock(&fake.lock);
  fake.st.blocks_total = 1000000;
  fake.st.blocks_present = 999999;
  pthread_mutex_unlock(&fake.lock);
  struct json *j = cl_cmd(c, "status");
  double p;
  cr_assert(json_double(json_get(j, "progress"), &p));
  cr_assert_float_eq(p, 0.9999, 1e-9);
  json_free(j);

  pthread_mutex_lock(&fake.lock);
  fake.st.blocks_total = 0;
  fake.st.blocks_present = 0;
  pthread_mutex_unlock(&fake.lock);
  j = cl_cmd(c, "status");
  cr_assert(json_double(json_get(j, "progress"), &p));
  cr_assert_float_eq(p, 1.0, 1e-9);
  json_free(j);
  cl_close(c);
}

Test(control, query_is_an_alias_of_status)
{
  struct client *c = cl_open();
  struct json *j = cl_cmd(c, "query");
  cr_assert(reply_ok(j));
  cr_assert_str_eq(get_str(j, "state"), "proxying");
  json_free(j);
  cl_close(c);
}

/* ---- commands reach the engine ---------------------------------------- */

Test(control, background_commands_call_the_engine)
{
  struct client *c = cl_open();
  struct json *j;
  j = cl_cmd(c, "cache-all"); cr_assert(reply_ok(j)); json_free(j);
  cr_assert_eq(fake_get(&fake.bg_start_calls), 1);
  j = cl_cmd(c, "pause"); cr_assert(reply_ok(j)); json_free(j);
  cr_assert_eq(fake_get(&fake.bg_pause_calls), 1);
  j = cl_cmd(c, "resume"); cr_assert(reply_ok(j)); json_free(j);
  cr_assert_eq(fake_get(&fake.bg_resume_calls), 1);
  cl_close(c);
}

Test(control, cache_all_failure_passes_the_engine_message)
{
  struct client *c = cl_open();
  pthread_mutex_lock(&fake.lock);
  strcpy(fake.bg_start_err, "cannot start the background copy: the proxy is detached");
  pthread_mutex_unlock(&fake.lock);
  struct json *j = cl_cmd(c, "cache-all");
  cr_assert_str_eq(reply_error(j), "cannot start the background copy: the proxy is detached");
  json_free(j);
  cl_close(c);
}

Test(control, rate_parses_network_and_byte_units)
{
  struct client *c = cl_open();
  struct json *j = cl_cmd(c, "rate 100mbit");
  cr_assert(reply_ok(j));
  cr_assert_eq(get_u64(j, "rate"), 12500000);
  json_free(j);
  cr_assert_eq(fake.last_rate, 12500000);

  j = cl_cmd(c, "rate 12M");
  cr_assert_eq(get_u64(j, "rate"), 12 << 20);
  json_free(j);
  j = cl_cmd(c, "rate 0");
  cr_assert(reply_ok(j));
  json_free(j);
  cr_assert_eq(fake.last_rate, 0);
  cr_assert_eq(fake_get(&fake.rate_calls), 3);
  cl_close(c);
}

Test(control, rate_rejects_garbage_with_usage)
{
  struct client *c = cl_open();
  struct json *j = cl_cmd(c, "rate fast");
  const char *e = reply_error(j);
  cr_assert_not_null(strstr(e, "rate"), "%s", e);
  cr_assert_not_null(strstr(e, "\"fast\""), "%s", e);
  cr_assert_not_null(strstr(e, "usage: rate LIMIT"), "%s", e);
  json_free(j);
  j = cl_cmd(c, "rate");
  e = reply_error(j);
  cr_assert_not_null(strstr(e, "rate: missing argument; usage: rate LIMIT"), "%s", e);
  json_free(j);
  cr_assert_eq(fake_get(&fake.rate_calls), 0);
  cl_close(c);
}

Test(control, detach_passes_force_and_reports_state)
{
  struct client *c = cl_open();
  struct json *j = cl_cmd(c, "detach");
  cr_assert(reply_ok(j));
  cr_assert_str_eq(get_str(j, "state"), "detached");
  json_free(j);
  cr_assert_eq(fake_get(&fake.detach_calls), 1);
  cr_assert_eq(fake.last_force, false);

  j = cl_cmd(c, "detach --force");
  cr_assert(reply_ok(j));
  cr_assert_eq(get_u64(j, "forced_missing"), 456000);
  json_free(j);
  cr_assert_eq(fake.last_force, true);

  j = cl_cmd(c, "switch");
  cr_assert(reply_ok(j));
  json_free(j);
  cr_assert_eq(fake_get(&fake.detach_calls), 3);
  cr_assert_eq(fake.last_force, false);
  cl_close(c);
}

Test(control, detach_refusal_message_is_passed_through)
{
  const char *msg = "cannot detach: 456000 blocks (1.7 GiB) are still missing; "
    "run cache-all and wait, or detach --force to lose them";
  struct client *c = cl_open();
  pthread_mutex_lock(&fake.lock);
  fake.detach_rc = -1;
  strcpy(fake.detach_err, msg);
  pthread_mutex_unlock(&fake.lock);
  struct json *j = cl_cmd(c, "detach");
  cr_assert_str_eq(reply_error(j), msg);
  json_free(j);
  cl_close(c);
}

Test(control, detach_rejects_unknown_option)
{
  struct client *c = cl_open();
  struct json *j = cl_cmd(c, "detach --now");
  const char *e = reply_error(j);
  cr_assert_not_null(strstr(e, "detach: unknown argument \"--now\"; usage: detach [--force]"), "%s", e);
  json_free(j);
  j = cl_cmd(c, "detach --force extra");
  e = reply_error(j);
  cr_assert_not_null(strstr(e, "too many arguments"), "%s", e);
  cr_assert_not_null(strstr(e, "usage: detach [--force]"), "%s", e);
  json_free(j);
  cr_assert_eq(fake_get(&fake.detach_calls), 0);
  cl_close(c);
}

Test(control, reconnect_passes_the_uri)
{
  struct client *c = cl_open();
  struct json *j = cl_cmd(c, "reconnect nbd://siteA-backup:10809/vm1");
  cr_assert(reply_ok(j));
  cr_assert_str_eq(get_str(j, "target"), "nbd://siteA-backup:10809/vm1");
  json_free(j);
  cr_assert_eq(fake_get(&fake.reconnect_calls), 1);
  cr_assert_str_eq(fake.last_target, "nbd://siteA-backup:10809/vm1");

  j = cl_cmd(c, "reconnect");
  cr_assert_not_null(strstr(reply_error(j), "reconnect: missing argument; usage: reconnect URI"));
  json_free(j);
  cl_close(c);
}

Test(control, flush_calls_the_engine_and_reports_errno)
{
  struct client *c = cl_open();
  struct json *j = cl_cmd(c, "flush");
  cr_assert(reply_ok(j));
  json_free(j);
  cr_assert_eq(fake_get(&fake.flush_calls), 1);

  pthread_mutex_lock(&fake.lock);
  fake.flush_rc = -1;
  fake.flush_errno = EIO;
  pthread_mutex_unlock(&fake.lock);
  j = cl_cmd(c, "flush");
  const char *e = reply_error(j);
  cr_assert_not_null(strstr(e, "flush failed: Input/output error"), "%s", e);
  json_free(j);
  cl_close(c);
}

Test(control, help_lists_every_command)
{
  struct client *c = cl_open();
  struct json *j = cl_cmd(c, "help");
  cr_assert(reply_ok(j));
  const struct json *cmds = json_get(j, "commands");
  cr_assert_eq(json_type(cmds), JSON_ARRAY);
  cr_assert_eq(json_length(cmds), CTL_NCOMMANDS);
  static const char *want[] = { "status", "cache-all", "activate", "pause", "resume", "rate",
                                "detach", "reconnect", "flush", "help" };
  for (size_t i = 0; i < ARRAY_SIZE(want); i++) {
    const struct json *e = json_index(cmds, i);
    cr_assert_str_eq(get_str(e, "command"), want[i]);
    cr_assert_not_null(json_str(json_get(e, "usage")));
    cr_assert_not_null(json_str(json_get(e, "description")));
  }
  cr_assert_str_eq(json_str(json_index(json_get(json_index(cmds, 0), "aliases"), 0)), "query");
  json_free(j);
  cl_close(c);
}

/* ---- bad input ---------------------------------------------------------- */

Test(control, unknown_command_is_named_in_the_error)
{
  struct client *c = cl_open();
  struct json *j = cl_cmd(c, "frobnicate now");
  const char *e = reply_error(j);
  cr_assert_not_null(strstr(e, "unknown command \"frobnicate\""), "%s", e);
  cr_assert_not_null(strstr(e, "help"), "%s", e);
  json_free(j);
  j = cl_cmd(c, "status");
  cr_assert(reply_ok(j));
  json_free(j);
  cl_close(c);
}

Test(control, extra_arguments_are_refused_with_usage)
{
  struct client *c = cl_open();
  struct json *j = cl_cmd(c, "status please");
  const char *e = reply_error(j);
  cr_assert_not_null(strstr(e, "status: too many arguments (\"please\" is extra); usage: status"), "%s", e);
  json_free(j);
  j = cl_cmd(c, "pause a b c d e f g h i j k");
  cr_assert_not_null(strstr(reply_error(j), "pause: too many arguments"));
  json_free(j);
  cr_assert_eq(fake_get(&fake.bg_pause_calls), 0);
  cl_close(c);
}

Test(control, overlong_line_gets_an_error_and_the_connection_goes_on)
{
  struct client *c = cl_open();
  char *big = malloc(10000);
  memset(big, 'x', 10000);
  cl_send(c, big, 10000);
  cl_send(c, "\n", 1);
  char *line = cl_line(c);
  struct json *j = parse_reply(line);
  cr_assert_not_null(strstr(reply_error(j), "command line too long"), "%s", line);
  json_free(j);
  free(line);
  j = cl_cmd(c, "status");
  cr_assert(reply_ok(j));
  json_free(j);

  /* The same with the long line arriving in pieces and the next command
   * right behind it in the same write. */
  cl_send(c, big, 5000);
  usleep(20000);
  cl_send(c, big, 5000);
  cl_send(c, "\npause\n", 7);
  line = cl_line(c);
  j = parse_reply(line);
  cr_assert_not_null(strstr(reply_error(j), "command line too long"));
  json_free(j);
  free(line);
  j = parse_reply(line = cl_line(c));
  cr_assert(reply_ok(j), "%s", line);
  json_free(j);
  free(line);
  cr_assert_eq(fake_get(&fake.bg_pause_calls), 1);
  free(big);
  cl_close(c);
}

Test(control, line_of_exactly_the_limit_is_accepted)
{
  struct client *c = cl_open();
  char line[CTL_MAX_LINE + 3];
  /* "status" padded with spaces to 4096 bytes, then CR LF. */
  memset(line, ' ', sizeof line);
  memcpy(line, "status", 6);
  memcpy(line + CTL_MAX_LINE, "\r\n", 2);
  cl_send(c, line, CTL_MAX_LINE + 2);
  char *r = cl_line(c);
  struct json *j = parse_reply(r);
  cr_assert(reply_ok(j), "%s", r);
  json_free(j);
  free(r);
  /* One byte more is too long. */
  memset(line, ' ', sizeof line);
  memcpy(line, "status", 6);
  line[CTL_MAX_LINE + 1] = '\n';
  cl_send(c, line, CTL_MAX_LINE + 2);
  j = parse_reply(r = cl_line(c));
  cr_assert_not_null(strstr(reply_error(j), "too long"));
  json_free(j);
  free(r);
  cl_close(c);
}

Test(control, crlf_and_tabs_and_empty_lines_are_accepted)
{
  struct client *c = cl_open();
  cl_send(c, "\n\r\n  \t \nrate\t 1M \r\n", 20);
  char *r = cl_line(c);
  struct json *j = parse_reply(r);
  cr_assert(reply_ok(j), "%s", r);
  cr_assert_eq(get_u64(j, "rate"), 1 << 20);
  json_free(j);
  free(r);
  cl_close(c);
}

Test(control, garbage_bytes_get_a_valid_json_error)
{
  struct client *c = cl_open();
  static const char junk[] = "\x01\x02\x03\xff\xfe\x00zz\n";
  cl_send(c, junk, sizeof junk - 1);
  char *r = cl_line(c);
  struct json *j = parse_reply(r);
  cr_assert_not_null(strstr(reply_error(j), "control character"), "%s", r);
  json_free(j);
  free(r);

  /* Bytes that are not UTF-8 in a command name come back as U+FFFD. */
  cl_send(c, "st\xff\xfetus\n", 8);
  j = parse_reply(r = cl_line(c));
  const char *e = reply_error(j);
  cr_assert_not_null(strstr(e, "unknown command \"st\xef\xbf\xbd\xef\xbf\xbdtus\""), "%s", e);
  json_free(j);
  free(r);

  /* An NUL byte in the middle of an otherwise good line. */
  cl_send(c, "status\0x\n", 9);
  j = parse_reply(r = cl_line(c));
  e = reply_error(j);
  cr_assert_not_null(strstr(e, "invalid command line \"status\": byte 7"), "%s", e);
  json_free(j);
  free(r);

  j = cl_cmd(c, "status");
  cr_assert(reply_ok(j));
  json_free(j);
  cl_close(c);
}

Test(control, pipelined_commands_are_answered_in_order)
{
  struct client *c = cl_open();
  cl_send(c, "status\nbogus\nrate 8kbit\nhelp\n", 29);
  char *r;
  struct json *j;
  j = parse_reply(r = cl_line(c)); cr_assert(json_get(j, "state")); json_free(j); free(r);
  j = parse_reply(r = cl_line(c)); cr_assert_not_null(strstr(reply_error(j), "bogus")); json_free(j); free(r);
  j = parse_reply(r = cl_line(c)); cr_assert_eq(get_u64(j, "rate"), 1000); json_free(j); free(r);
  j = parse_reply(r = cl_line(c)); cr_assert(json_get(j, "commands")); json_free(j); free(r);
  cl_close(c);
}

struct flood { struct client *c; int n; };

static void *flood_main(void *arg)
{
  struct flood *f = arg;
  for (int i = 0; i < f->n; i++)
    if (write_all(f->c->fd, "status\n", 7) < 0)
      break;
  shutdown(f->c->fd, SHUT_WR);
  return NULL;
}

Test(control, client_that_reads_slowly_gets_every_reply)
{
  /* 20000 status replies are ~14 MB: far past the output budget, so the
   * server must stop reading and later resume. */
  struct client *c = cl_open();
  struct flood f = { c, 20000 };
  pthread_t t;
  cr_assert_eq(pthread_create(&t, NULL, flood_main, &f), 0);
  usleep(200000);                /* let the output pile up */
  int n = 0;
  char *r;
  while ((r = cl_line_timeout(c, 10000)) != NULL) {
    if (n == 0 || n == 19999) {
      struct json *j = parse_reply(r);
      cr_assert(reply_ok(j));
      json_free(j);
    }
    free(r);
    n++;
  }
  pthread_join(t, NULL);
  cr_assert_eq(n, 20000);
  cl_close(c);
}

Test(control, half_closed_client_gets_the_reply_to_its_last_line)
{
  struct client *c = cl_open();
  cl_send(c, "status", 6);          /* no LF */
  shutdown(c->fd, SHUT_WR);
  char *r = cl_line(c);
  struct json *j = parse_reply(r);
  cr_assert(reply_ok(j), "%s", r);
  json_free(j);
  free(r);
  cr_assert_null(cl_line(c), "the server should close after answering");
  cl_close(c);
  wait_nclients(0);
}

Test(control, client_leaving_mid_line_is_cleaned_up)
{
  struct client *a = cl_open();
  struct json *j = cl_cmd(a, "status");
  json_free(j);
  wait_nclients(1);
  cl_send(a, "sta", 3);
  close(a->fd);
  free(a);
  wait_nclients(0);

  struct client *b = cl_open();
  j = cl_cmd(b, "status");
  cr_assert(reply_ok(j));
  json_free(j);
  cl_close(b);
}

Test(control, slow_engine_call_does_not_block_other_clients)
{
  pthread_mutex_lock(&fake.lock);
  fake.reconnect_delay_ms = 1000;
  pthread_mutex_unlock(&fake.lock);
  struct client *a = cl_open(), *b = cl_open();
  cl_send(a, "reconnect nbd+unix:///vm1?socket=/run/x.sock\nstatus\n", 52);
  usleep(50000);

  struct timespec t0, t1;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  struct json *j = cl_cmd(b, "status");
  clock_gettime(CLOCK_MONOTONIC, &t1);
  cr_assert(reply_ok(j));
  json_free(j);
  long ms = (t1.tv_sec - t0.tv_sec) * 1000 + (t1.tv_nsec - t0.tv_nsec) / 1000000;
  cr_assert_lt(ms, 500, "status waited %ld ms behind another client's reconnect", ms);

  /* a's replies arrive in order: reconnect, then status. */
  char *r = cl_line(a);
  j = parse_reply(r);
  cr_assert(reply_ok(j));
  cr_assert_str_eq(get_str(j, "target"), "nbd+unix:///vm1?socket=/run/x.sock");
  json_free(j);
  free(r);
  j = parse_reply(r = cl_line(a));
  cr_assert(json_get(j, "blocks"));
  json_free(j);
  free(r);
  cl_close(a);
  cl_close(b);
}

Test(control, client_leaving_during_an_engine_call_is_cleaned_up)
{
  pthread_mutex_lock(&fake.lock);
  fake.reconnect_delay_ms = 200;
  pthread_mutex_unlock(&fake.lock);
  struct client *a = cl_open();
  cl_send(a, "reconnect nbd://elsewhere\nstatus\n", 33);
  /* Gone while the call runs (it takes 200 ms): once it has begun. */
  for (int i = 0; i < 500 && fake_get(&fake.reconnect_started) == 0; i++)
    usleep(10000);
  cr_assert_eq(fake_get(&fake.reconnect_started), 1, "the reconnect never began");
  cl_close(a);
  wait_nclients(0);
  cr_assert_eq(fake_get(&fake.reconnect_calls), 1);
  struct client *b = cl_open();
  struct json *j = cl_cmd(b, "status");
  cr_assert(reply_ok(j));
  json_free(j);
  cl_close(b);
}

Test(control, at_most_64_clients_at_once)
{
  struct client *cs[CTL_MAX_CLIENTS];
  for (int i = 0; i < CTL_MAX_CLIENTS; i++) {
    cs[i] = cl_open();
    struct json *j = cl_cmd(cs[i], "pause");
    cr_assert(reply_ok(j));
    json_free(j);
  }
  struct client *extra = cl_open();
  char *r = cl_line(extra);
  struct json *j = parse_reply(r);
  cr_assert_not_null(strstr(reply_error(j), "too many control clients"));
  json_free(j);
  free(r);
  cr_assert_null(cl_line(extra));
  cl_close(extra);

  cl_close(cs[0]);
  wait_nclients(CTL_MAX_CLIENTS - 1);
  cs[0] = cl_open();
  j = cl_cmd(cs[0], "status");
  cr_assert(reply_ok(j));
  json_free(j);
  for (int i = 0; i < CTL_MAX_CLIENTS; i++)
    cl_close(cs[i]);
  wait_nclients(0);
}

Test(control, socket_is_mode_0600)
{
  struct stat st;
  cr_assert_eq(lstat(sock_path, &st), 0);
  cr_assert(S_ISSOCK(st.st_mode));
  cr_assert_eq(st.st_mode & 07777, 0600, "mode %o", (unsigned) (st.st_mode & 07777));
}

/* ---- creating and removing the socket ---------------------------------- */

Test(control_socket, stale_socket_is_replaced_and_removed_on_free)
{
  struct sockaddr_un sa = { .sun_family = AF_UNIX };
  char err[512] = "";
  strcpy(sa.sun_path, sock_path);
  int fd = socket(AF_UNIX, SOCK_STREAM, 0);
  cr_assert_eq(bind(fd, (struct sockaddr *) &sa, sizeof sa), 0);
  close(fd);                        /* left behind: nobody listens */

  struct ctl_server *c = ctl_server_start(sock_path, &fake, "xnbd-proxy", err, sizeof err);
  cr_assert_not_null(c, "%s", err);
  struct stat st;
  cr_assert_eq(lstat(sock_path, &st), 0);
  cr_assert_eq(st.st_mode & 07777, 0600);
  ctl_server_stop(c);
  cr_assert_eq(lstat(sock_path, &st), -1, "socket left behind by ctl_server_stop");
}

Test(control_socket, live_socket_is_not_taken_over)
{
  char err[512] = "";
  struct ctl_server *first = ctl_server_start(sock_path, &fake, "xnbd-proxy", err, sizeof err);
  cr_assert_not_null(first, "%s", err);
  struct ctl_server *second = ctl_server_start(sock_path, &fake, "xnbd-proxy", err, sizeof err);
  cr_assert_null(second);
  cr_assert_not_null(strstr(err, "in use by a running process"), "%s", err);
  ctl_server_stop(first);
}

Test(control_socket, regular_file_is_not_replaced)
{
  char err[512] = "";
  FILE *f = fopen(sock_path, "w");
  cr_assert_not_null(f);
  fputs("precious\n", f);
  fclose(f);
  cr_assert_null(ctl_server_start(sock_path, &fake, "xnbd-proxy", err, sizeof err));
  cr_assert_not_null(strstr(err, "is not a socket"), "%s", err);
  struct stat st;
  cr_assert_eq(stat(sock_path, &st), 0);
  cr_assert_eq(st.st_size, 9);
}

Test(control_socket, too_long_path_is_refused)
{
  char err[512] = "", path[300];
  memset(path, 'a', sizeof path - 1);
  path[sizeof path - 1] = '\0';
  cr_assert_null(ctl_server_start(path, &fake, "xnbd-proxy", err, sizeof err));
  cr_assert_not_null(strstr(err, "too long"), "%s", err);
}

Test(control_socket, missing_directory_is_reported)
{
  char err[512] = "", path[200];
  snprintf(path, sizeof path, "%s/no/such/dir/ctl.sock", dir);
  cr_assert_null(ctl_server_start(path, &fake, "xnbd-proxy", err, sizeof err));
  cr_assert_not_null(strstr(err, "No such file or directory"), "%s", err);
}

/* ---- the protocol without a socket -------------------------------------- */

/* Runs one request line through ctl_parse + ctl_run; returns the reply
 * line (malloc'd, with its LF). */
static char *run_line(const char *text)
{
  char line[CTL_MAX_LINE + 8];
  bool empty = false;
  size_t n = strlen(text);
  cr_assert_lt(n, sizeof line);
  memcpy(line, text, n + 1);
  char *r = ctl_handle_line(&fake, line, n, "xnbd-proxy", "test", &empty);
  cr_assert_not(empty, "no reply to \"%s\"", text);
  cr_assert_not_null(r, "out of memory answering \"%s\"", text);
  cr_assert_eq(r[strlen(r) - 1], '\n', "reply without LF: %s", r);
  return r;
}

/* The doc comment at the top of common/ctl/ctl-proto.h (malloc'd). */
static char *protocol_text(void)
{
  static const char *tries[] = { "../common/ctl/ctl-proto.h", "common/ctl/ctl-proto.h" };
  for (size_t i = 0; i < ARRAY_SIZE(tries); i++) {
    FILE *f = fopen(tries[i], "r");
    if (!f) continue;
    char *buf = calloc(1, 65536);
    cr_assert_not_null(buf);
    size_t n = fread(buf, 1, 65535, f);
    fclose(f);
    buf[n] = '\0';
    char *end = strstr(buf, "*/");
    cr_assert_not_null(end, "%s: no doc comment", tries[i]);
    *end = '\0';
    return buf;
  }
  cr_assert_fail("common/ctl/ctl-proto.h not found from %s: run the test from "
                 "tests/ (tests/run-tests.sh) or the source root", getcwd(NULL, 0));
  return NULL;
}

Test(ctl_proto, every_command_has_help_text_and_is_in_the_help_reply)
{
  char *r = run_line("help");
  struct json *j = parse_reply(r);
  cr_assert(reply_ok(j));
  const struct json *cmds = json_get(j, "commands");
  cr_assert_eq(json_length(cmds), CTL_NCOMMANDS);
  for (size_t i = 0; i < CTL_NCOMMANDS; i++) {
    const struct ctl_command *c = &ctl_commands[i];
    cr_assert_eq((size_t) c->id, i, "ctl_commands[%zu] has id %d", i, (int) c->id);
    cr_assert(c->name && c->name[0], "command %zu has no name", i);
    cr_assert(c->description && strlen(c->description) > 10, "%s: no help text", c->name);
    cr_assert(c->usage && strncmp(c->usage, c->name, strlen(c->name)) == 0,
              "%s: usage \"%s\" does not start with the name", c->name, c->usage);
    if (c->arg)
      cr_assert_not_null(strstr(c->usage, c->arg), "%s: usage omits %s", c->name, c->arg);
    if (c->flag)
      cr_assert_not_null(strstr(c->usage, c->flag), "%s: usage omits %s", c->name, c->flag);
    cr_assert_eq(ctl_command_find(c->name), c);
    if (c->alias)
      cr_assert_eq(ctl_command_find(c->alias), c);
    const struct json *e = json_index(cmds, i);
    cr_assert_str_eq(get_str(e, "command"), c->name);
    cr_assert_str_eq(get_str(e, "usage"), c->usage);
    cr_assert_str_eq(get_str(e, "description"), c->description);
    const struct json *aliases = json_get(e, "aliases");
    cr_assert_eq(json_length(aliases), c->alias ? 1 : 0, "%s: aliases", c->name);
    if (c->alias)
      cr_assert_str_eq(json_str(json_index(aliases, 0)), c->alias);
  }
  cr_assert_null(ctl_command_find("frobnicate"));
  json_free(j);
  free(r);
}

Test(ctl_proto, every_command_is_documented_in_the_protocol_text)
{
  char *doc = protocol_text();
  for (size_t i = 0; i < CTL_NCOMMANDS; i++) {
    const struct ctl_command *c = &ctl_commands[i];
    char want[128];
    /* Each command has its own paragraph: " *   USAGE  ...". */
    snprintf(want, sizeof want, "\n *   %s ", c->usage);
    cr_assert_not_null(strstr(doc, want), "ctl-proto.h does not document \"%s\"", c->usage);
    if (c->alias) {
      snprintf(want, sizeof want, "(alias: %s)", c->alias);
      cr_assert_not_null(strstr(doc, want), "ctl-proto.h does not document %s's alias %s",
                         c->name, c->alias);
    }
  }
  free(doc);
}

/* Member paths of a JSON object text at nesting depth 1 ("state") and 2
 * ("blocks.total"). */
static size_t object_keys(const char *t, char keys[][64], size_t max)
{
  char parent[64] = "";
  size_t n = 0;
  int depth = 0;
  for (const char *p = t; *p; p++) {
    if (*p == '{' || *p == '[') depth++;
    else if (*p == '}' || *p == ']') depth--;
    else if (*p == '"') {
      const char *q = p + 1;
      while (*q && *q != '"') q += (*q == '\\' && q[1]) ? 2 : 1;
      cr_assert_eq(*q, '"', "unterminated string in %s", t);
      if (q[1] == ':' && depth <= 2) {
        int len = (int) (q - p - 1);
        cr_assert_lt(n, max);
        if (depth == 1) {
          snprintf(parent, sizeof parent, "%.*s", len, p + 1);
          snprintf(keys[n++], 64, "%s", parent);
        } else {
          snprintf(keys[n++], 64, "%s.%.*s", parent, len, p + 1);
        }
      }
      p = q;
    }
  }
  return n;
}

/* The contents of a file of the source tree (malloc'd). */
static char *source_file(const char *path)
{
  char p[512];
  const char *dirs[] = { "..", "." };
  for (size_t i = 0; i < ARRAY_SIZE(dirs); i++) {
    snprintf(p, sizeof p, "%s/%s", dirs[i], path);
    FILE *f = fopen(p, "r");
    if (!f) continue;
    char *buf = calloc(1, 1 << 20);
    cr_assert_not_null(buf);
    size_t n = fread(buf, 1, (1 << 20) - 1, f);
    fclose(f);
    buf[n] = '\0';
    return buf;
  }
  cr_assert_fail("%s not found: run the test from tests/ or the source root", path);
  return NULL;
}

Test(ctl_proto, every_status_member_is_documented)
{
  char keys[128][64];
  char *r = run_line("status");
  char *doc = protocol_text();
  char *man = source_file("man/xnbd-ctl.1");
  size_t n = object_keys(r, keys, ARRAY_SIZE(keys));
  cr_assert_gt(n, 30, "only %zu members in %s", n, r);
  for (size_t i = 0; i < n; i++) {
    /* ctl-proto.h shows the reply's shape: "name":... */
    char quoted[80];
    const char *dot = strchr(keys[i], '.');
    snprintf(quoted, sizeof quoted, "\"%s\":", dot ? dot + 1 : keys[i]);
    cr_assert_not_null(strstr(doc, quoted), "status member %s is not documented in "
                       "ctl-proto.h; reply: %s", keys[i], r);
    /* xnbd-ctl(1) names each one by its path (blocks.total). */
    cr_assert_not_null(strstr(man, keys[i]), "status member %s is not documented in "
                       "man/xnbd-ctl.1", keys[i]);
  }
  /* The scanner does see members the engine added lately. */
  for (const char *k = "rtt_us\0standby\0wire.rx_raw\0bytes.bridged\0"; *k; k += strlen(k) + 1) {
    bool seen = false;
    for (size_t i = 0; i < n; i++) seen |= strcmp(keys[i], k) == 0;
    cr_assert(seen, "%s missing from the status reply %s", k, r);
  }
  free(man);
  free(doc);
  free(r);
}

Test(ctl_proto, every_command_is_in_the_xnbd_ctl_man_page)
{
  char *man = source_file("man/xnbd-ctl.1");
  for (size_t i = 0; i < CTL_NCOMMANDS; i++) {
    const char *name = ctl_commands[i].name;
    char a[64], b[64], c[64];
    snprintf(a, sizeof a, "\n.B %s\n", name);
    snprintf(b, sizeof b, "\n.BR %s ", name);
    snprintf(c, sizeof c, "\n.BI %s ", name);
    cr_assert(strstr(man, a) || strstr(man, b) || strstr(man, c),
              "man/xnbd-ctl.1 has no paragraph for the command %s", name);
  }
  free(man);
}

Test(ctl_proto, parse_sets_flag_and_argument_and_refuses_the_rest)
{
  char line[64];
  struct ctl_request req;
  char *reply;

  strcpy(line, "detach -f\r");
  cr_assert_eq(ctl_parse(line, strlen(line), &req, &reply), CTL_PARSE_OK);
  cr_assert_eq(req.cmd->id, CTL_DETACH);
  cr_assert(req.flag);
  cr_assert_null(req.arg);

  strcpy(line, "switch");
  cr_assert_eq(ctl_parse(line, strlen(line), &req, &reply), CTL_PARSE_OK);
  cr_assert_eq(req.cmd->id, CTL_DETACH);
  cr_assert_not(req.flag);

  strcpy(line, "\t rate \t 5M ");
  cr_assert_eq(ctl_parse(line, strlen(line), &req, &reply), CTL_PARSE_OK);
  cr_assert_eq(req.cmd->id, CTL_RATE);
  cr_assert_str_eq(req.arg, "5M");

  strcpy(line, " \t\r");
  cr_assert_eq(ctl_parse(line, strlen(line), &req, &reply), CTL_PARSE_EMPTY);
  cr_assert_null(reply);

  static const char *bad[] = { "detach --force --force", "detach --now", "rate",
                               "rate 1 2", "help me", "Status", "a b c d e f g h i j" };
  for (size_t i = 0; i < ARRAY_SIZE(bad); i++) {
    strcpy(line, bad[i]);
    cr_assert_eq(ctl_parse(line, strlen(line), &req, &reply), CTL_PARSE_BAD, "%s", bad[i]);
    struct json *j = parse_reply(reply);
    reply_error(j);
    json_free(j);
    free(reply);
  }
}

Test(ctl_proto, unknown_command_error_lists_every_command)
{
  char *r = run_line("xyzzy");
  struct json *j = parse_reply(r);
  const char *e = reply_error(j);
  for (size_t i = 0; i < CTL_NCOMMANDS; i++)
    cr_assert_not_null(strstr(e, ctl_commands[i].usage), "%s missing from: %s",
                       ctl_commands[i].usage, e);
  json_free(j);
  free(r);
}

Test(ctl_proto, fixed_replies_are_valid_json_errors)
{
  const char *fixed[] = { ctl_reply_too_long, ctl_reply_busy, ctl_reply_oom };
  for (size_t i = 0; i < ARRAY_SIZE(fixed); i++) {
    size_t n = strlen(fixed[i]);
    cr_assert_eq(fixed[i][n - 1], '\n');
    struct json *j = json_parse(fixed[i], n - 1, NULL, 0);
    cr_assert_not_null(j, "%s", fixed[i]);
    reply_error(j);
    json_free(j);
  }
}

/* ---- json --------------------------------------------------------------- */

static char *escaped(const char *s)
{
  char *buf = NULL;
  size_t len = 0;
  FILE *f = open_memstream(&buf, &len);
  json_fput_string(f, s);
  fclose(f);
  return buf;
}

Test(json, escapes_quotes_backslashes_and_control_characters)
{
  char *e = escaped("a\"b\\c\nd\te\x01\x1f\x7f");
  cr_assert_str_eq(e, "\"a\\\"b\\\\c\\nd\\te\\u0001\\u001f\\u007f\"");
  free(e);
}

Test(json, invalid_utf8_becomes_replacement_character)
{
  char *e = escaped("ok \xc3\xa9 bad \xff \xc0\xaf \xed\xa0\x80 cut \xe2\x82");
  cr_assert_str_eq(e, "\"ok \xc3\xa9 bad \\ufffd \\ufffd\\ufffd \\ufffd\\ufffd\\ufffd cut \\ufffd\\ufffd\"");
  free(e);
}

Test(json, escaped_strings_parse_back_to_the_original)
{
  const char *orig = "q\" b\\ nl\n tab\t ctl\x02 \xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80";
  char *e = escaped(orig);
  struct json *j = json_parse(e, strlen(e), NULL, 0);
  cr_assert_not_null(j);
  cr_assert_str_eq(json_str(j), orig);
  json_free(j);
  free(e);
}

Test(json, parses_nested_values_and_unicode_escapes)
{
  const char *t = " {\"a\":{\"b\":[1,-2.5e3,true,false,null,\"x\\u00e9\\ud83d\\ude00\"]},"
    "\"big\":18446744073709551615,\"neg\":-1,\"frac\":0.5} ";
  char err[128];
  struct json *j = json_parse(t, strlen(t), err, sizeof err);
  cr_assert_not_null(j, "%s", err);
  const struct json *arr = json_get(j, "a.b");
  cr_assert_eq(json_length(arr), 6);
  uint64_t u;
  cr_assert(json_u64(json_index(arr, 0), &u));
  cr_assert_eq(u, 1);
  double d;
  cr_assert(json_double(json_index(arr, 1), &d));
  cr_assert_float_eq(d, -2500.0, 1e-9);
  bool b;
  cr_assert(json_bool(json_index(arr, 2), &b) && b);
  cr_assert(json_bool(json_index(arr, 3), &b) && !b);
  cr_assert_eq(json_type(json_index(arr, 4)), JSON_NULL);
  cr_assert_str_eq(json_str(json_index(arr, 5)), "x\xc3\xa9\xf0\x9f\x98\x80");
  cr_assert(json_u64(json_get(j, "big"), &u));
  cr_assert_eq(u, UINT64_MAX);
  cr_assert_not(json_u64(json_get(j, "neg"), &u));
  cr_assert_not(json_u64(json_get(j, "frac"), &u));
  cr_assert_null(json_get(j, "a.c"));
  cr_assert_null(json_get(j, "big.x"));
  json_free(j);
}

Test(json, rejects_malformed_text)
{
  static const char *bad[] = {
    "", "{", "}", "{\"a\"}", "{\"a\":}", "{\"a\":1,}", "[1,]", "[1 2]",
    "\"unterminated", "\"bad \\x escape\"", "\"\\u12\"", "\"\\ud800\"",
    "\"\\u0000\"", "01", "1.", "-", "1e", "tru", "nul", "{} x", "\"a\nb\"",
    "{\"a\":1}}", "[\"\\", "'single'",
  };
  for (size_t i = 0; i < ARRAY_SIZE(bad); i++) {
    char err[128] = "";
    struct json *j = json_parse(bad[i], strlen(bad[i]), err, sizeof err);
    cr_assert_null(j, "accepted malformed JSON: %s", bad[i]);
    cr_assert_neq(err[0], '\0', "no reason for rejecting: %s", bad[i]);
  }
}

Test(json, deep_nesting_is_refused_not_a_stack_overflow)
{
  size_t n = 100000;
  char *t = malloc(2 * n);
  memset(t, '[', n);
  memset(t + n, ']', n);
  char err[128];
  cr_assert_null(json_parse(t, 2 * n, err, sizeof err));
  cr_assert_not_null(strstr(err, "nested too deeply"), "%s", err);
  free(t);
}

/* ---- the xnbd-ctl program against this server ---------------------------- */

/* The built xnbd-ctl: $XNBD_BUILD (exported by tests/run-tests.sh), else
 * the default build directory seen from tests/ or from the source root. */
static const char *ctl_prog(void)
{
  static char path[4096];
  const char *b = getenv("XNBD_BUILD");
  const char *tries[] = { b, "../build", "build" };
  for (size_t i = 0; i < ARRAY_SIZE(tries); i++) {
    if (!tries[i]) continue;
    snprintf(path, sizeof path, "%s/xnbd-ctl", tries[i]);
    if (access(path, X_OK) == 0) return path;
  }
  cr_assert_fail("xnbd-ctl not found: build it (make) and run the test through "
          "tests/run-tests.sh, or set XNBD_BUILD");
  return NULL;
}

/* Runs xnbd-ctl with args (shell words; "SOCK" is replaced by the
 * socket path), stdout and stderr into out; returns the exit status. */
static int run_ctl(char *out, size_t outlen, const char *args)
{
  char cmd[8192], a[4096];
  const char *p = args, *hit;
  size_t n = 0;
  a[0] = '\0';
  while ((hit = strstr(p, "SOCK")) != NULL) {
    n += snprintf(a + n, sizeof a - n, "%.*s'%s'", (int) (hit - p), p, sock_path);
    p = hit + 4;
  }
  snprintf(a + n, sizeof a - n, "%s", p);
  snprintf(cmd, sizeof cmd, "'%s' %s 2>&1 </dev/null", ctl_prog(), a);
  FILE *f = popen(cmd, "r");
  cr_assert_not_null(f);
  size_t got = fread(out, 1, outlen - 1, f);
  out[got] = '\0';
  int st = pclose(f);
  cr_assert(WIFEXITED(st), "xnbd-ctl %s: killed by a signal", args);
  return WEXITSTATUS(st);
}

Test(xnbd_ctl, status_prints_a_readable_summary)
{
  char out[8192];
  cr_assert_eq(run_ctl(out, sizeof out, "-c SOCK status"), 0, "%s", out);
  cr_assert_not_null(strstr(out, "state:          proxying\n"), "%s", out);
  cr_assert_not_null(strstr(out, "progress:       41.9% (1.3 GiB of 3.0 GiB present)"), "%s", out);
  cr_assert_not_null(strstr(out, "330301 present, 456000 missing, 131 in flight"), "%s", out);
  cr_assert_not_null(strstr(out, "connections:    1 of 2 up"), "%s", out);
  /* Control characters from the proxy are not passed to the terminal. */
  cr_assert_not_null(strstr(out, "last error:     read failed: line two  \n"), "%s", out);
}

Test(xnbd_ctl, status_json_prints_the_reply)
{
  char out[8192];
  cr_assert_eq(run_ctl(out, sizeof out, "--control SOCK status --json"), 0, "%s", out);
  struct json *j = json_parse(out, strlen(out), NULL, 0);
  cr_assert_not_null(j, "%s", out);
  cr_assert(reply_ok(j));
  cr_assert_eq(get_u64(j, "blocks.inflight"), 131);
  json_free(j);
}

Test(xnbd_ctl, commands_reach_the_engine)
{
  char out[4096];
  cr_assert_eq(run_ctl(out, sizeof out, "-c SOCK rate 100mbit"), 0, "%s", out);
  cr_assert_eq(fake.last_rate, 12500000);
  cr_assert_not_null(strstr(out, "12500000 bytes/s"), "%s", out);
  cr_assert_eq(run_ctl(out, sizeof out, "-c SOCK pause"), 0, "%s", out);
  cr_assert_eq(run_ctl(out, sizeof out, "-c SOCK resume"), 0, "%s", out);
  cr_assert_eq(run_ctl(out, sizeof out, "-c SOCK flush"), 0, "%s", out);
  cr_assert_eq(run_ctl(out, sizeof out, "-c SOCK cache-all"), 0, "%s", out);
  cr_assert_eq(run_ctl(out, sizeof out, "-c SOCK reconnect nbd://b:10809/vm1"), 0, "%s", out);
  cr_assert_str_eq(fake.last_target, "nbd://b:10809/vm1");
  cr_assert_eq(run_ctl(out, sizeof out, "-c SOCK detach --force"), 0, "%s", out);
  cr_assert_eq(fake.last_force, true);
  cr_assert_eq(fake.bg_pause_calls + fake.bg_resume_calls + fake.flush_calls +
               fake.bg_start_calls + fake.detach_calls, 5);
}

Test(xnbd_ctl, help_prints_the_proxys_command_list)
{
  char out[8192];
  cr_assert_eq(run_ctl(out, sizeof out, "-c SOCK help"), 0, "%s", out);
  for (size_t i = 0; i < CTL_NCOMMANDS; i++) {
    char want[128];
    snprintf(want, sizeof want, "  %s ", ctl_commands[i].usage);
    cr_assert_not_null(strstr(out, want), "help lacks %s:\n%s", ctl_commands[i].usage, out);
  }
  cr_assert_not_null(strstr(out, "also called query"), "%s", out);
}

Test(xnbd_ctl, refusal_exits_1_with_the_proxys_reason)
{
  char out[4096];
  pthread_mutex_lock(&fake.lock);
  fake.detach_rc = -1;
  strcpy(fake.detach_err, "refusing to detach: 5 of 9 blocks are still missing");
  pthread_mutex_unlock(&fake.lock);
  cr_assert_eq(run_ctl(out, sizeof out, "-c SOCK detach"), 1, "%s", out);
  cr_assert_str_eq(out, "xnbd-ctl: refusing to detach: 5 of 9 blocks are still missing\n");
}

Test(xnbd_ctl, missing_socket_exits_1_and_says_what_to_check)
{
  char out[4096];
  cr_assert_eq(run_ctl(out, sizeof out, "-c /nonexistent/ctl.sock status"), 1, "%s", out);
  cr_assert_str_eq(out, "xnbd-ctl: cannot connect to control socket /nonexistent/ctl.sock: "
                   "No such file or directory (is xnbd-proxy running with --control "
                   "/nonexistent/ctl.sock?)\n");
}

Test(xnbd_ctl, usage_errors_exit_2)
{
  static const char *bad[] = {
    "-c SOCK", "status", "-c SOCK frobnicate", "-c SOCK rate", "-c SOCK rate 1 2",
    "-c SOCK rate fast", "-c SOCK pause --json", "-c SOCK status --force",
    "-c SOCK detach --wait", "-c SOCK --bogus status", "-c SOCK -t x status",
    "--query", "--query SOCK extra", "--query --switch SOCK",
    "-c SOCK reconnect 'a b'", "-c SOCK reconnect http://siteA/vm1",
    "-c SOCK reconnect xnbd:///vm1",
  };
  char out[4096];
  for (size_t i = 0; i < ARRAY_SIZE(bad); i++) {
    cr_assert_eq(run_ctl(out, sizeof out, bad[i]), 2, "xnbd-ctl %s: %s", bad[i], out);
    cr_assert_not_null(strstr(out, "--help"), "xnbd-ctl %s: %s", bad[i], out);
  }
  cr_assert_eq(fake.bg_pause_calls + fake.detach_calls + fake.rate_calls +
               fake.reconnect_calls, 0);
  cr_assert_eq(run_ctl(out, sizeof out, "--help"), 0);
  /* --help comes from the protocol's command table. */
  for (size_t i = 0; i < CTL_NCOMMANDS; i++) {
    char want[128];
    snprintf(want, sizeof want, "\n  %s", ctl_commands[i].usage);
    cr_assert_not_null(strstr(out, want), "--help lacks %s:\n%s", ctl_commands[i].usage, out);
  }
  cr_assert_eq(run_ctl(out, sizeof out, "--version"), 0);
  cr_assert_not_null(strstr(out, "xnbd-ctl "));
}

Test(xnbd_ctl, xnbd_bgctl_forms_work)
{
  char out[4096];
  cr_assert_eq(run_ctl(out, sizeof out, "--query SOCK"), 0, "%s", out);
  cr_assert_not_null(strstr(out, "state:"), "%s", out);
  cr_assert_eq(run_ctl(out, sizeof out, "-c SOCK --query"), 0, "%s", out);
  cr_assert_eq(run_ctl(out, sizeof out, "--reconnect SOCK siteB 10809"), 0, "%s", out);
  cr_assert_str_eq(fake.last_target, "siteB:10809");
  cr_assert_eq(run_ctl(out, sizeof out, "--reconnect SOCK fe80::1 10809"), 0, "%s", out);
  cr_assert_str_eq(fake.last_target, "[fe80::1]:10809");
  cr_assert_eq(run_ctl(out, sizeof out, "-c SOCK --reconnect nbd://c/x"), 0, "%s", out);
  cr_assert_str_eq(fake.last_target, "nbd://c/x");
  cr_assert_eq(run_ctl(out, sizeof out, "--switch --force SOCK"), 0, "%s", out);
  cr_assert_eq(fake.last_force, true);
}

/* Plays the engine's background copy: complete after about a second, or
 * detached (forced) when *arg says so. */
static void *finish_copy(void *arg)
{
  bool forced = *(bool *) arg;
  /* Start once xnbd-ctl has started the copy and seen the first status,
   * so its first progress line is the starting point however slow it is
   * to start (bounded: 10 s). */
  for (int i = 0; i < 1000 && !(fake_get(&fake.bg_start_calls) > 0 &&
                                fake_get(&fake.stats_calls) > 0); i++)
    usleep(10000);
  for (int i = 0; i < 10; i++) {
    usleep(120000);
    pthread_mutex_lock(&fake.lock);
    fake.st.bg_running = true;
    fake.st.blocks_present = MIN(fake.st.blocks_total,
                                 fake.st.blocks_present + (forced ? 1000 : 50000));
    fake.st.blocks_missing = fake.st.blocks_total - fake.st.blocks_present;
    pthread_mutex_unlock(&fake.lock);
  }
  pthread_mutex_lock(&fake.lock);
  if (forced) {
    fake.st.state = ENGINE_DETACHED;
    fake.st.forced_missing = fake.st.blocks_missing;
  } else {
    fake.st.blocks_present = fake.st.blocks_total;
    fake.st.blocks_missing = 0;
    fake.st.state = ENGINE_COMPLETE;
  }
  fake.st.bg_running = false;
  pthread_mutex_unlock(&fake.lock);
  return NULL;
}

Test(xnbd_ctl, cache_all_wait_returns_when_every_block_is_present)
{
  char out[16384];
  bool forced = false;
  pthread_t t;
  cr_assert_eq(pthread_create(&t, NULL, finish_copy, &forced), 0);
  int rc = run_ctl(out, sizeof out, "-c SOCK cache-all --progress");
  pthread_join(t, NULL);
  cr_assert_eq(rc, 0, "%s", out);
  cr_assert_eq(fake.bg_start_calls, 1);
  /* Not a terminal: plain lines, the last one at 100%. */
  cr_assert_not_null(strstr(out, "progress 41.9% 1.3 GiB/3.0 GiB rate 11.9 MiB/s eta ?\n"), "%s", out);
  cr_assert_not_null(strstr(out, "progress 100.0% 3.0 GiB/3.0 GiB rate 11.9 MiB/s eta 0s\n"), "%s", out);
  cr_assert_null(strchr(out, '\r'), "%s", out);
  cr_assert_not_null(strstr(out, "last error: read failed: line two"), "%s", out);
}

Test(xnbd_ctl, cache_all_wait_fails_when_detached_with_blocks_missing)
{
  char out[16384];
  bool forced = true;
  pthread_t t;
  cr_assert_eq(pthread_create(&t, NULL, finish_copy, &forced), 0);
  int rc = run_ctl(out, sizeof out, "--cache-all SOCK");
  pthread_join(t, NULL);
  cr_assert_eq(rc, 1, "%s", out);
  cr_assert_not_null(strstr(out, "detached from the source (forced) with blocks missing"), "%s", out);
}
