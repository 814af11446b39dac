/* fuzz-control.c: libFuzzer target for the control protocol
 * (common/ctl/ctl-proto.c, ctl-run.c): word splitting, control characters,
 * argument checking, rate and target parsing, the engine calls and the
 * JSON replies.  The input is a client's byte stream: it is cut into lines
 * at LF as a host does (lines over CTL_MAX_LINE are the host's to refuse,
 * so they are skipped here), each line handed to ctl_handle_line() with a
 * fake engine (the engine.h functions below: no source, no common/engine
 * code).  Every reply must be one line of JSON starting {"ok":.
 *
 * The fake engine answers from canned state that makes the JSON writer
 * escape quotes, backslashes and control characters; detach without
 * --force fails, and flush fails every other time. */
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ctl-proto.h"
#include "engine.h"
#include "json.h"
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

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
  fuzz_quiet_logs("fuzz-control");
  return 0;
}

static void check_reply(const char *reply)
{
  size_t n = strlen(reply);
  FUZZ_CHECK(n > 8 && reply[n - 1] == '\n', "reply is not one line: %s", reply);
  FUZZ_CHECK(memchr(reply, '\n', n - 1) == NULL, "reply has two lines: %s", reply);
  FUZZ_CHECK(strncmp(reply, "{\"ok\":", 6) == 0, "reply is not {\"ok\":...: %s", reply);
  char err[256];
  struct json *j = json_parse(reply, n - 1, err, sizeof err);
  FUZZ_CHECK(j, "reply is not JSON (%s): %s", err, reply);
  json_free(j);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
  fake_reset();
  size_t start = 0;
  for (size_t i = 0; i <= size; i++) {
    if (i < size && data[i] != '\n') continue;
    size_t len = i - start;
    if (len <= CTL_MAX_LINE) {
      char *line = malloc(len + 1);
      FUZZ_CHECK(line, "out of memory");
      memcpy(line, data + start, len);
      line[len] = '\0';
      bool empty = false;
      char *reply = ctl_handle_line(&fake, line, len, "fuzz", "fuzz client", &empty);
      FUZZ_CHECK(reply || empty, "no reply to a non-empty line");
      if (reply) check_reply(reply);
      free(reply);
      free(line);
    }
    start = i + 1;
  }
  return 0;
}
