/* fuzz-control.c: libFuzzer target for xnbd-proxy's control protocol
 * (proxy/control.c): line framing, over-long lines, control characters,
 * word splitting, argument checking, rate parsing, engine calls on job
 * threads and the JSON replies.
 *
 * As in tests/unit/test-control.c, control.c is compiled into this file
 * with a fake engine (the engine.h functions below), so no source and no
 * common/engine code is needed.  The control socket is created once; each
 * input is one client connection, handed to the control's accept callback
 * as one end of a socketpair.  The harness writes the input (the whole of
 * it is the client's byte stream), half-closes, reads the replies and
 * runs the loop until the control has freed the client and every job.
 * An input that starts with the byte 0xff is the rest's stream from a
 * client that closes its socket once it has written it, reading nothing
 * (replies then meet a closed socket, jobs a client that left).
 *
 * The fake engine answers from canned state that makes the JSON writer
 * escape quotes, backslashes and control characters; detach without
 * --force fails, and flush fails every other time. */
#include <dirent.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <event2/thread.h>

#include "../../proxy/control.c"
#include "fuzz-common.h"

/* ---- the fake engine ------------------------------------------------- */

struct engine {
  pthread_mutex_t lock;
  struct engine_stats st;
  unsigned flushes;
};

static struct engine fake = { .lock = PTHREAD_MUTEX_INITIALIZER };

static void fake_reset(void)
{
  struct engine_stats *s = &fake.st;
  pthread_mutex_lock(&fake.lock);
  memset(s, 0, sizeof *s);
  s->state = ENGINE_PROXYING;
  s->image_size = UINT64_C(3) << 30;
  s->block_size = 4096;
  s->blocks_total = 786432;
  s->blocks_present = 786431;
  s->blocks_missing = 1;
  s->bytes_fetched = UINT64_MAX;
  strcpy(s->target, "nbd://siteA:10809/vm1");
  strcpy(s->source_id, "vm1 \"quoted\" back\\slash\ttab \xc3\xa9 \xff");
  strcpy(s->last_error, "read failed:\nline two \x01\x7f");
  fake.flushes = 0;
  pthread_mutex_unlock(&fake.lock);
}

void engine_get_stats(struct engine *e, struct engine_stats *st)
{
  pthread_mutex_lock(&e->lock);
  *st = e->st;
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
  int busy = e->st.bg_running;
  e->st.bg_running = true;
  pthread_mutex_unlock(&e->lock);
  if (busy) {
    snprintf(err, errlen, "the background copy is already running");
    return -1;
  }
  return 0;
}

void engine_activate(struct engine *e, const char *why) { (void) e; (void) why; }

int engine_bg_pause(struct engine *e, char *err, size_t errlen)
{
  pthread_mutex_lock(&e->lock);
  e->st.bg_paused = true;
  pthread_mutex_unlock(&e->lock);
  return 0;
}

int engine_bg_resume(struct engine *e, char *err, size_t errlen)
{
  pthread_mutex_lock(&e->lock);
  int r = e->st.bg_paused ? 0 : -1;   /* -1 with no message: the generic one */
  e->st.bg_paused = false;
  pthread_mutex_unlock(&e->lock);
  return r;
}

int engine_set_bg_rate(struct engine *e, uint64_t bps)
{
  pthread_mutex_lock(&e->lock);
  e->st.bg_rate = bps;
  pthread_mutex_unlock(&e->lock);
  return bps == 1 ? -1 : 0;
}

int engine_detach(struct engine *e, bool force, char *err, size_t errlen)
{
  if (!force) {
    snprintf(err, errlen, "detach refused: 1 block is missing; use --force");
    return -1;
  }
  pthread_mutex_lock(&e->lock);
  e->st.state = ENGINE_DETACHED;
  e->st.forced_missing = e->st.blocks_missing;
  pthread_mutex_unlock(&e->lock);
  return 0;
}

int engine_reconnect(struct engine *e, const char *target, char *err, size_t errlen)
{
  if (strlen(target) % 3 == 0)
    return -1;                         /* no message: the generic one */
  pthread_mutex_lock(&e->lock);
  snprintf(e->st.target, sizeof e->st.target, "%s", target);
  pthread_mutex_unlock(&e->lock);
  return 0;
}

int engine_flush(struct engine *e)
{
  pthread_mutex_lock(&e->lock);
  unsigned n = e->flushes++;
  pthread_mutex_unlock(&e->lock);
  if (n % 2) { errno = EIO; return -1; }
  return 0;
}

/* ---- the harness ----------------------------------------------------- */

static struct event_base *base;
static struct control *ctl;
static char dir[64], sock_path[128];

static void cleanup(void)
{
  control_free(ctl);
  ctl = NULL;
  rmdir(dir);
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
  char err[512];
  fuzz_quiet_logs("fuzz-control");
  FUZZ_CHECK(evthread_use_pthreads() == 0, "evthread_use_pthreads");
  base = event_base_new();
  FUZZ_CHECK(base, "event_base_new");
  snprintf(dir, sizeof dir, "%s/xnbd-fuzz-control.XXXXXX",
           access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp");
  FUZZ_CHECK(mkdtemp(dir), "mkdtemp: %s", strerror(errno));
  snprintf(sock_path, sizeof sock_path, "%s/ctl.sock", dir);
  ctl = control_new(base, sock_path, &fake, err, sizeof err);
  FUZZ_CHECK(ctl, "control_new: %s", err);
  atexit(cleanup);
  return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
  struct fuzz_client c;
  struct sockaddr_un sa = { .sun_family = AF_UNIX };
  int sv[2];

  fake_reset();
  FUZZ_CHECK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0,
             "socketpair: %s", strerror(errno));
  evutil_make_socket_nonblocking(sv[0]);
  accept_cb(ctl->listener, sv[0], (struct sockaddr *) &sa, sizeof sa, ctl);
  FUZZ_CHECK(ctl->nclients == 1, "the control refused the client");
  bool hangup = size > 0 && data[0] == 0xff;
  fuzz_client_start(&c, base, sv[1], data + hangup, size - hangup);
  c.hangup = hangup;

  for (unsigned i = 0; !c.eof || ctl->nclients > 0 || ctl->jobs; i++) {
    FUZZ_CHECK(i < 1000000, "no end after %u loop turns", i);
    event_base_loop(base, EVLOOP_ONCE);
  }
  event_free(c.ev);
  if (c.fd >= 0) close(c.fd);
  return 0;
}
