/* engine-life.c: opening and closing the engine, statistics, and the
 * operator's controls (background copy, rate, detach, reconnect). */
#include "engine-int.h"
#include "workq.h"
#include "wan.h"
#include "log.h"
#include "util.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <sys/eventfd.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

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

static void *persister_main(void *arg)
{
  struct engine *e = arg;
  pthread_mutex_lock(&e->lock);
  while (!atomic_load(&e->stopping)) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    uint64_t ns = ts.tv_nsec + (uint64_t) e->cfg.persist_interval_ms * 1000000u;
    ts.tv_sec += ns / 1000000000u;
    ts.tv_nsec = ns % 1000000000u;
    pthread_cond_timedwait(&e->persist_cond, &e->lock, &ts);
    if (atomic_load(&e->stopping)) break;
    pthread_mutex_unlock(&e->lock);
    if (bitmap_persist(e->bm) < 0)
      log_error("persisting bitmap %s failed: %s (will retry)", e->bitmap_path,
                strerror(errno));
    pthread_mutex_lock(&e->lock);
  }
  pthread_mutex_unlock(&e->lock);
  return NULL;
}

static int open_cache(struct engine *e, bool must_exist, char *err, size_t errlen)
{
  struct stat st;
  int fd;
  if (stat(e->cache_path, &st) < 0) {
    if (errno != ENOENT || must_exist) {
      snprintf(err, errlen, "cannot use cache image %s: %s", e->cache_path,
               strerror(errno));
      return -1;
    }
    fd = open(e->cache_path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0 || ftruncate(fd, e->size) < 0) {
      snprintf(err, errlen, "cannot create cache image %s: %s", e->cache_path,
               strerror(errno));
      if (fd >= 0) close(fd);
      return -1;
    }
    close(fd);
    log_info("created sparse cache image %s (%" PRIu64 " bytes)", e->cache_path, e->size);
  } else if (S_ISREG(st.st_mode) && (uint64_t) st.st_size != e->size) {
    /* With --clear-bitmap the old content is not used: any size will do. */
    if (((uint64_t) st.st_size > e->size && !e->cfg.clear_bitmap) ||
        truncate(e->cache_path, e->size) < 0) {
      snprintf(err, errlen, "cache image %s is %" PRIu64 " bytes but the "
               "source is %" PRIu64 " bytes: use a new --cache file for this "
               "source", e->cache_path, (uint64_t) st.st_size, e->size);
      return -1;
    }
  }
  e->fb = file_backend_open(e->cache_path, false, e->cfg.wq, err, errlen);
  if (!e->fb) return -1;
  e->cache_fd = file_backend_fd(e->fb);
  return 0;
}

struct engine *engine_open(const struct engine_config *cfg, char *err, size_t errlen)
{
  struct engine *e = calloc(1, sizeof *e);
  struct bitmap_info bi;
  bool complete = false, have_bitmap = false;
  char berr[BITMAP_ERR_MAX];

  if (!e) { snprintf(err, errlen, "out of memory"); return NULL; }
  e->cfg = *cfg;
  e->target = cfg->target ? strdup(cfg->target) : NULL;
  e->target_export = strdup(cfg->target_export ? cfg->target_export : "");
  e->cache_path = strdup(cfg->cache_path);
  e->bitmap_path = strdup(cfg->bitmap_path);
  e->cfg.target = e->target;
  e->cfg.target_export = e->target_export;
  e->bs = cfg->block_size ? cfg->block_size : 4096;
  if (!e->cfg.connections) e->cfg.connections = 2;
  e->bg_window_auto = !e->cfg.bg_window;
  e->bg_window = e->cfg.bg_window ? e->cfg.bg_window : 16 << 20;
  if (!e->cfg.max_fetch) e->cfg.max_fetch = 4 << 20;
  if (!e->cfg.source_timeout_s) e->cfg.source_timeout_s = 60;
  if (!e->cfg.persist_interval_ms) e->cfg.persist_interval_ms = 1000;
  e->bg_rate = e->cfg.bg_rate;
  e->cache_fd = -1;
  e->wake_fd = -1;
  pthread_mutex_init(&e->lock, NULL);
  pthread_cond_init(&e->persist_cond, NULL);

  if (e->target && strncmp(e->target, "xnbds://", 8) == 0) {
    struct wan_tls_config tc = {
      .cert_dir = cfg->tls_certificates, .psk_file = cfg->tls_psk,
      .psk_username = cfg->tls_username, .verify_peer = cfg->tls_verify,
    };
    e->wan_tls = wan_tls_new(false, &tc, err, errlen);
    if (!e->wan_tls) goto fail;
  }
  if (e->bs < 4096 || !is_power_of_2(e->bs)) {
    snprintf(err, errlen, "block size %u is not a power of two >= 4096", e->bs);
    goto fail;
  }
  /* A complete bitmap means the source is not needed at all. */
  if (!cfg->clear_bitmap) {
    if (bitmap_peek(e->bitmap_path, &bi, berr, sizeof berr) == 0) {
      have_bitmap = true;
      complete = bi.complete;
    } else if (errno != ENOENT) {
      snprintf(err, errlen, "%s", berr);
      goto fail;
    }
  }
  if (complete) {
    e->size = bi.image_size;
    snprintf(e->source_id, sizeof e->source_id, "%s", bi.source_id);
    if (bi.block_size != e->bs) {
      snprintf(err, errlen, "bitmap %s was made with block size %u, not %u: "
               "use --block-size %u", e->bitmap_path, bi.block_size, e->bs,
               bi.block_size);
      goto fail;
    }
  } else {
    uint32_t max_req = 0;
    char id[512];
    if (!e->target) {
      snprintf(err, errlen, "no --target given and bitmap %s is not complete: "
               "the source is needed to fetch missing blocks", e->bitmap_path);
      goto fail;
    }
    if (source_probe(e, e->target, &e->size, id, sizeof id, &max_req, err, errlen) < 0)
      goto fail;
    snprintf(e->source_id, sizeof e->source_id, "%s", cfg->source_id ? cfg->source_id : id);
    if (max_req && e->cfg.max_fetch > max_req) e->cfg.max_fetch = max_req;
    if (e->cfg.max_fetch < e->bs) e->cfg.max_fetch = e->bs;
  }
  e->nblocks = e->size / e->bs + (e->size % e->bs != 0);
  if (have_bitmap && access(e->cache_path, F_OK) < 0 && errno == ENOENT) {
    /* A new, empty cache would turn every "present" block into zeros. */
    snprintf(err, errlen, "bitmap %s exists but cache image %s does not: the "
             "blocks the bitmap records as present would read as zeros. "
             "Restore the cache image, or start over with --clear-bitmap",
             e->bitmap_path, e->cache_path);
    goto fail;
  }
  e->bm = bitmap_open(e->bitmap_path, e->size, e->bs, e->source_id,
                      cfg->clear_bitmap, berr, sizeof berr);
  if (!e->bm) { snprintf(err, errlen, "%s", berr); goto fail; }
  /* The bitmap (I5) first: it names a wrong source better than the cache can. */
  if (open_cache(e, complete, err, errlen) < 0) goto fail;
  bitmap_set_data_sync(e->bm, engine_sync_data_hook, e);
  if (cfg->clear_bitmap) {
    /* Old cache content is not trusted: every block will be fetched. */
    log_info("--clear-bitmap: starting over; every block will be fetched again");
  }
  e->state = complete ? ENGINE_DETACHED : ENGINE_CONNECTING;
  e->standby = cfg->standby && !complete;
  e->bg_running = cfg->cache_all && !e->standby;
  if (e->standby)
    log_info("standby: reads of missing blocks pass through from the source "
             "and are not kept, until 'xnbd-ctl activate' or the first write");
  log_info("cache %s, bitmap %s: %" PRIu64 " of %" PRIu64 " blocks of %u "
           "bytes present%s", e->cache_path, e->bitmap_path,
           bitmap_count(e->bm), e->nblocks, e->bs,
           complete ? " (complete: the source is not contacted)" : "");
  if (!complete) {
    e->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (e->wake_fd < 0 || fetcher_start(e, err, errlen) < 0) goto fail;
  }
  if (pthread_create(&e->persister, NULL, persister_main, e) != 0) {
    snprintf(err, errlen, "cannot start the bitmap persister thread");
    goto fail;
  }
  e->persister_started = true;
  if (!complete) engine_check_complete(e);
  return e;

fail:
  engine_close(e);
  return NULL;
}

void engine_close(struct engine *e)
{
  if (!e) return;
  atomic_store(&e->stopping, true);
  if (e->fetcher_started) fetcher_stop(e);
  if (e->persister_started) {
    pthread_mutex_lock(&e->lock);
    pthread_cond_broadcast(&e->persist_cond);
    pthread_mutex_unlock(&e->lock);
    pthread_join(e->persister, NULL);
  }
  if (e->bm && e->fb) {
    if (engine_flush(e) < 0)
      log_error("final flush of %s failed: %s", e->cache_path, strerror(errno));
  }
  bitmap_close(e->bm);
  file_backend_close(e->fb);
  if (e->wake_fd >= 0) close(e->wake_fd);
  if (e->probe_handle) {
    fetcher_close_handle(e->probe_handle);
  }
  wan_tls_free(e->wan_tls);
  for (size_t i = 0; i < e->inflight.nbuckets; i++)
    for (struct hnode *n = e->inflight.b[i], *next; n; n = next) {
      next = n->next;
      free(n);
    }
  free(e->inflight.b);
  free(e->zero_known);
  free(e->waiting);
  free(e->target); free(e->target_export); free(e->cache_path);
  free(e->bitmap_path); free(e->new_target);
  pthread_mutex_destroy(&e->lock);
  pthread_cond_destroy(&e->persist_cond);
  free(e);
}

void engine_get_stats(struct engine *e, struct engine_stats *st)
{
  memset(st, 0, sizeof *st);
  pthread_mutex_lock(&e->lock);
  st->state = e->state;
  st->image_size = e->size;
  st->block_size = e->bs;
  st->blocks_total = e->nblocks;
  st->blocks_present = bitmap_count(e->bm);
  st->blocks_inflight = e->blocks_inflight;
  st->blocks_missing = st->blocks_total - st->blocks_present;
  st->bytes_fetched = e->bytes_fetched;
  st->bytes_zero_skipped = e->bytes_zero_skipped;
  st->bytes_bridged = e->bytes_bridged;
  st->bytes_local_written = e->bytes_local_written;
  st->fetches_ondemand = e->fetches_ondemand;
  st->fetches_background = e->fetches_background;
  st->fetch_errors = e->fetch_errors;
  st->fetch_rate = e->fetch_rate;
  st->ondemand_waiting = e->ondemand_waiting;
  st->bg_running = e->bg_running;
  st->standby = e->standby;
  st->bg_paused = e->bg_paused;
  st->bg_rate = e->bg_rate;
  st->bg_window = e->bg_window;
  st->rtt_us = e->rtt_ns / 1000;
  st->connections = e->state == ENGINE_DETACHED ? 0 : e->cfg.connections;
  st->forced_missing = e->forced_missing;
  snprintf(st->target, sizeof st->target, "%s", e->target ? e->target : "");
  snprintf(st->source_id, sizeof st->source_id, "%s", e->source_id);
  snprintf(st->last_error, sizeof st->last_error, "%s", e->last_error);
  pthread_mutex_unlock(&e->lock);
  st->connections_up = e->fetcher_started ? fetcher_connections_up(e) : 0;
  st->wire_tx_raw = atomic_load(&wan_totals.tx_raw);
  st->wire_tx = atomic_load(&wan_totals.tx_wire);
  st->wire_rx = atomic_load(&wan_totals.rx_wire);
  st->wire_rx_raw = atomic_load(&wan_totals.rx_raw);
}

static bool attached(struct engine *e, char *err, size_t errlen)
{
  if (e->state == ENGINE_DETACHED) {
    snprintf(err, errlen, "the proxy is detached from its source: nothing "
             "left to copy");
    return false;
  }
  return true;
}

void engine_activate(struct engine *e, const char *why)
{
  pthread_mutex_lock(&e->lock);
  bool was = e->standby;
  e->standby = false;
  pthread_mutex_unlock(&e->lock);
  if (was) {
    log_info("activated (%s): blocks read from now on are kept", why);
    fetcher_wake(e);
  }
}

int engine_bg_start(struct engine *e, char *err, size_t errlen)
{
  pthread_mutex_lock(&e->lock);
  if (e->standby) {
    pthread_mutex_unlock(&e->lock);
    snprintf(err, errlen, "the proxy is in standby: the VM may still write at "
             "the source, so copying now could keep stale blocks. After the "
             "switch-over run 'activate' (or let the VM write here), then cache-all");
    return -1;
  }
  if (e->state == ENGINE_COMPLETE || e->state == ENGINE_DETACHED) {
    pthread_mutex_unlock(&e->lock);
    return 0;               /* already done: success, nothing to do */
  }
  e->bg_running = true;
  e->bg_paused = false;
  pthread_mutex_unlock(&e->lock);
  log_info("background copy started");
  fetcher_wake(e);
  return 0;
}

int engine_bg_pause(struct engine *e, char *err, size_t errlen)
{
  pthread_mutex_lock(&e->lock);
  bool ok = attached(e, err, errlen);
  if (ok) e->bg_paused = true;
  pthread_mutex_unlock(&e->lock);
  if (ok) log_info("background copy paused");
  return ok ? 0 : -1;
}

int engine_bg_resume(struct engine *e, char *err, size_t errlen)
{
  pthread_mutex_lock(&e->lock);
  bool ok = attached(e, err, errlen);
  if (ok) e->bg_paused = false;
  pthread_mutex_unlock(&e->lock);
  if (ok) { log_info("background copy resumed"); fetcher_wake(e); }
  return ok ? 0 : -1;
}

int engine_set_bg_rate(struct engine *e, uint64_t bps)
{
  pthread_mutex_lock(&e->lock);
  e->bg_rate = bps;
  pthread_mutex_unlock(&e->lock);
  log_info("background rate limit: %" PRIu64 " bytes/s%s", bps, bps ? "" : " (none)");
  fetcher_wake(e);
  return 0;
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
  e->state = ENGINE_DETACHED;
  e->bg_running = false;
  e->forced_missing = missing;
  pthread_mutex_unlock(&e->lock);
  if (missing)
    log_warn("FORCED detach with %" PRIu64 " blocks missing: reads of them "
             "fail with EIO from now on", missing);
  else
    log_info("detached from the source: every block is local");
  if (e->fetcher_started) fetcher_stop(e);
  return 0;
}

int engine_reconnect(struct engine *e, const char *target, char *err, size_t errlen)
{
  char *t = strdup(target);
  if (!t) { snprintf(err, errlen, "out of memory"); return -1; }
  pthread_mutex_lock(&e->lock);
  if (e->state == ENGINE_DETACHED) {
    pthread_mutex_unlock(&e->lock);
    free(t);
    snprintf(err, errlen, "the proxy is detached: it no longer uses a source");
    return -1;
  }
  free(e->new_target);
  e->new_target = t;
  free(e->target);               /* what status shows from now on */
  e->target = strdup(target);
  pthread_mutex_unlock(&e->lock);
  log_info("reconnecting to %s", target);
  fetcher_wake(e);
  return 0;
}
