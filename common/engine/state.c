/* state.c: the engine's state changes -- completion, switch-over from
 * standby, detach -- and local failures: every change of engine.state
 * happens here. */
#include "engine-int.h"
#include "log.h"
#include "util.h"

#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <time.h>

const char *engine_state_name(enum engine_state s)
{
  switch (s) {
  case ENGINE_CONNECTING: return "connecting";
  case ENGINE_PROXYING: return "proxying";
  case ENGINE_SOURCE_LOST: return "source-lost";
  case ENGINE_COMPLETE: return "complete";
  case ENGINE_DETACHED: return "detached";
  }
  return "?";
}

void engine_set_state_locked(struct engine *e, enum engine_state st)
{
  if (e->state == st) return;
  log_debug("engine: %s -> %s", engine_state_name(e->state), engine_state_name(st));
  e->state = st;
}

void engine_set_error(struct engine *e, const char *fmt, ...)
{
  va_list ap;
  va_start(ap, fmt);
  pthread_mutex_lock(&e->lock);
  vsnprintf(e->last_error, sizeof e->last_error, fmt, ap);
  pthread_mutex_unlock(&e->lock);
  va_end(ap);
}

/* The one completion check, whichever way the last block arrived (a
 * fetch, a zero run, a client write). */
void engine_check_complete(struct engine *e)
{
  bool detach = false;
  if (bitmap_count(e->bm) != e->nblocks) return;
  pthread_mutex_lock(&e->lock);
  if (e->state == ENGINE_PROXYING || e->state == ENGINE_SOURCE_LOST ||
      e->state == ENGINE_CONNECTING) {
    struct timespec ts;
    engine_set_state_locked(e, ENGINE_COMPLETE);
    clock_gettime(CLOCK_REALTIME, &ts);
    e->completed_unix_us = (uint64_t) ts.tv_sec * 1000000 + (uint64_t) ts.tv_nsec / 1000;
    e->copy.running = false;
    log_info("every block is present (%" PRIu64 " blocks): migration complete",
             e->nblocks);
    detach = e->cfg.detach_when_complete;
  }
  pthread_mutex_unlock(&e->lock);
  if (bitmap_mark_complete(e->bm) < 0 && errno != EBUSY)
    log_error("recording completion in bitmap %s failed: %s", e->bitmap_path,
              strerror(errno));
  if (detach) {
    char err[256];
    if (engine_detach(e, false, err, sizeof err) < 0)
      log_error("detach after completion failed: %s", err);
  }
}

/* The cache disk failed a write (full, I/O error): fetching more would
 * only fail again (D7), so the background copy stops until the operator
 * resumes it; the cause is in status. */
void engine_local_failure(struct engine *e, const char *what, uint64_t off, int err)
{
  pthread_mutex_lock(&e->lock);
  bool first = !e->copy.paused && e->copy.running;
  e->local_errors++;
  snprintf(e->last_error, sizeof e->last_error, "%s the cache image %s at %"
           PRIu64 " failed: %s; background copy paused (free space or fix the "
           "disk, then 'xnbd-ctl resume')", what, e->cache_path, off, strerror(err));
  if (e->copy.running) e->copy.paused = true;
  pthread_mutex_unlock(&e->lock);
  if (first) log_error("%s", e->last_error);
  else log_debug("%s", e->last_error);
}

void engine_activate(struct engine *e, const char *why)
{
  pthread_mutex_lock(&e->lock);
  bool was = e->standby;
  e->standby = false;
  if (was && e->cache_all_at_activate) {
    e->cache_all_at_activate = false;
    if (e->state != ENGINE_COMPLETE && e->state != ENGINE_DETACHED)
      e->copy.running = true;
  }
  bool run = e->copy.running;
  pthread_mutex_unlock(&e->lock);
  if (was) {
    log_info("activated (%s): blocks read from now on are kept%s", why,
             run ? "; background copy started (--cache-all)" : "");
    if (e->src) source_wake(e->src);
  }
}

int engine_detach(struct engine *e, bool force, char *err, size_t errlen)
{
  uint64_t missing = e->nblocks - bitmap_count(e->bm);
  pthread_mutex_lock(&e->lock);
  if (e->state == ENGINE_DETACHED) {
    pthread_mutex_unlock(&e->lock);
    return 0;
  }
  if (missing && !force) {
    pthread_mutex_unlock(&e->lock);
    snprintf(err, errlen, "refusing to detach: %" PRIu64 " of %" PRIu64
             " blocks are still missing (run cache-all and wait, or detach "
             "--force to serve them as I/O errors)", missing, e->nblocks);
    return -1;
  }
  engine_set_state_locked(e, ENGINE_DETACHED);
  e->copy.running = false;
  e->forced_missing = missing;
  pthread_mutex_unlock(&e->lock);
  if (missing)
    log_warn("FORCED detach with %" PRIu64 " blocks missing: reads of them "
             "fail with EIO from now on", missing);
  else
    log_info("detached from the source: every block is local");
  source_stop(e->src);            /* no request touches the source after this (I7) */
  source_stop(e->dsrc);
  source_stop(e->msrc);
  /* The openers of the digest export and the read map, if still
   * connecting (the tick that joins them has stopped): what they open is
   * closed at once, never used. */
  companion_abandon(e->dig_opener);
  e->dig_opener = NULL;
  companion_abandon(e->map_opener);
  e->map_opener = NULL;
  return 0;
}
