/* life.c: opening and closing the engine, statistics, and the operator's
 * controls (background copy, rate, detach, reconnect, activate). */
#include "engine-int.h"
#include "identity.h"
#include "digest.h"
#include "read-map.h"
#include "digest-backend.h"
#include "workq.h"
#include "wan.h"
#include "log.h"
#include "util.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <sys/eventfd.h>
#include <time.h>
#include <unistd.h>

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

static int sync_data_hook(void *opaque)
{
  struct engine *e = opaque;
  return cache_sync(e->cache);
}

static void config_defaults(struct engine *e, const struct engine_config *cfg)
{
  e->cfg = *cfg;
  e->target = cfg->target ? strdup(cfg->target) : NULL;
  e->target_export = strdup(cfg->target_export ? cfg->target_export : "");
  e->cache_path = strdup(cfg->cache_path);
  e->bitmap_path = strdup(cfg->bitmap_path);
  e->cfg.target = e->target;
  e->cfg.target_export = e->target_export;
  e->bs = cfg->block_size ? cfg->block_size : 4096;
  if (!e->cfg.connections) e->cfg.connections = 2;
  e->copy.window_auto = !e->cfg.bg_window;
  win_init(&e->copy.win);
  e->copy.window = e->cfg.bg_window ? e->cfg.bg_window : e->copy.win.window;
  if (!e->cfg.max_fetch) e->cfg.max_fetch = 4 << 20;
  if (!e->cfg.source_timeout_s) e->cfg.source_timeout_s = 60;
  if (!e->cfg.persist_interval_ms) e->cfg.persist_interval_ms = 1000;
  e->copy.rate = e->cfg.bg_rate;
  pthread_mutex_init(&e->lock, NULL);
  for (unsigned i = 0; i < STRIPES; i++) pthread_mutex_init(&e->stripe[i], NULL);
  pthread_cond_init(&e->persist_cond, NULL);
  pthread_cond_init(&e->jobs_cond, NULL);
}

/* Blocks present in the bitmap at path, opened with its own geometry and
 * identity (so it opens whatever the source is); -1 with err on failure. */
static int64_t bitmap_present(const char *path, const struct bitmap_info *bi,
                              char *err, size_t errlen)
{
  struct bitmap *bm = bitmap_open(path, bi->image_size, bi->block_size,
                                  bi->source_id, false, err, errlen);
  int64_t n;
  if (!bm) return -1;
  n = (int64_t) bitmap_count(bm);
  bitmap_close(bm);
  return n;
}

/* I5: the identity recorded in the bitmap against the source's current
 * one, by the rules in identity.h.  Returns 0 (e->source_id is then what
 * bitmap_open must be given; e->cfg.clear_bitmap is set when an empty
 * bitmap of another source starts over) or -1 with a message in err. */
static int check_source(struct engine *e, const struct bitmap_info *bi,
                        const char *current, char *err, size_t errlen)
{
  char why[1024] = "";
  bool ok;
  int64_t present;
  if (e->cfg.standby && source_identity_kind(current) == SOURCE_ID_SAMPLED &&
      source_identity_kind(bi->source_id) == SOURCE_ID_SAMPLED) {
    /* The VM still writes the source: its samples move legitimately. */
    log_info("standby: the source's sampled blocks are not compared with "
             "those recorded in bitmap %s", e->bitmap_path);
    ok = true;
  } else
    ok = source_identity_match(bi->source_id, current, why, sizeof why);
  if (ok) {
    if (why[0]) log_warn("bitmap %s: %s", e->bitmap_path, why);
    snprintf(e->source_id, sizeof e->source_id, "%s", bi->source_id);
    return 0;
  }
  present = bitmap_present(e->bitmap_path, bi, err, errlen);
  if (present < 0) return -1;
  if (present == 0) {
    log_info("bitmap %s was made for another source (%s); it holds no "
             "blocks, so it starts over for this source", e->bitmap_path, why);
    e->cfg.clear_bitmap = true;
    return 0;
  }
  snprintf(err, errlen, "bitmap %s (%" PRId64 " blocks present) was made for "
           "another source; the source identity does not match: %s. Start "
           "over with --clear-bitmap (every block is fetched again), or, if "
           "you are sure this is the right source, keep the cache with "
           "--source-id='%s'", e->bitmap_path, present, why, bi->source_id);
  return -1;
}

/* Connects to the source (unless the bitmap is complete): size, identity,
 * limits; with a bitmap from before, checks it is for this source. */
static int open_source(struct engine *e, const struct bitmap_info *bi,
                       char *err, size_t errlen)
{
  struct source_info info;
  struct source_config sc = {
    .target = e->target, .export_name = e->target_export,
    .connections = e->cfg.connections, .timeout_s = e->cfg.source_timeout_s,
    .compress_level = e->cfg.compress_level,
    .tls_certificates = e->cfg.tls_certificates, .tls_psk = e->cfg.tls_psk,
    .tls_username = e->cfg.tls_username, .tls_verify = e->cfg.tls_verify,
    .tick = copy_tick, .opaque = e,
  };
  if (!e->target) {
    snprintf(err, errlen, "no --target given and bitmap %s is not complete: "
             "the source is needed to fetch missing blocks", e->bitmap_path);
    return -1;
  }
  e->src = source_open(&sc, &info, err, errlen);
  if (!e->src) return -1;
  e->size = info.size;
  e->has_status = info.has_status;
  snprintf(e->live_id, sizeof e->live_id, "%s", info.id);
  const char *current = e->cfg.source_id ? e->cfg.source_id : info.id;
  snprintf(e->source_id, sizeof e->source_id, "%s", current);
  if (bi && !e->cfg.clear_bitmap && check_source(e, bi, current, err, errlen) < 0)
    return -1;
  if (info.max_request && e->cfg.max_fetch > info.max_request)
    e->cfg.max_fetch = info.max_request;
  if (e->cfg.max_fetch < e->bs) e->cfg.max_fetch = e->bs;
  return 0;
}

/* --digests FILE: made by xnbd-digest from the source's image; it must
 * carry the sampled identity the source has now (identity.h). */
static int open_digest_file(struct engine *e, char *err, size_t errlen)
{
  const char *p = strstr(e->live_id, " sample=");
  char sample[65];
  if (!p || strlen(p + 8) < 64) {
    snprintf(err, errlen, "--digests %s: this source publishes %s, not a "
             "sampled identity; digest files are for sources that publish no "
             "digests (xnbd-server publishes its own: drop --digests)",
             e->cfg.digests_path, e->live_id);
    return -1;
  }
  memcpy(sample, p + 8, 64);
  sample[64] = '\0';
  return digest_file_open(e->cfg.digests_path, e->size, sample, &e->dfile, err, errlen);
}

/* The seeds' index is loaded (or built) on a thread of its own while the
 * source's handshake takes its round trip (a reload took 7 ms alone, up
 * to 27 ms while the source hashed the first digests): the first digests
 * need it to be of use. */
struct index_opener {
  const struct engine_config *cfg;
  struct index *ix;
  char err[1024];
};

static void *index_opener_main(void *arg)
{
  struct index_opener *o = arg;
  o->ix = index_open(o->cfg->seeds, o->cfg->nseeds, o->cfg->index_path, 0,
                     o->err, sizeof o->err);
  return NULL;
}

/* Starts opening the index if seeds are used; false if no thread could be
 * started (open_dedup opens it then). */
static bool index_opener_start(struct engine *e, struct index_opener *o, pthread_t *t)
{
  o->cfg = &e->cfg;
  o->ix = NULL;
  o->err[0] = '\0';
  if (!e->cfg.nseeds || e->bs != DIGEST_BLOCK) return false;
  return pthread_create(t, NULL, index_opener_main, o) == 0;
}

/* Deduplication, before any file is made: the seeds' index (from the
 * opener if it ran: o), and the digest file if given (the digest export
 * is opened by open_digests). */
static int open_dedup(struct engine *e, struct index_opener *o, char *err, size_t errlen)
{
  if (!e->cfg.nseeds) return 0;
  if (e->bs != DIGEST_BLOCK) {
    log_warn("--seed needs --block-size 4096 (digests are per 4 KiB block): "
             "the seeds are not used");
    return 0;
  }
  if (o) {
    e->ix = o->ix;
    if (!e->ix) snprintf(err, errlen, "%s", o->err);
  } else
    e->ix = index_open(e->cfg.seeds, e->cfg.nseeds, e->cfg.index_path, 0, err, errlen);
  if (!e->ix) return -1;
  if (e->cfg.digests_path && open_digest_file(e, err, errlen) < 0) return -1;
  struct index_stats is;
  index_get_stats(e->ix, &is);
  log_info("deduplication: %u seed%s, %" PRIu64 " blocks indexed (%" PRIu64 " hashed "
           "now)%s%s", is.seeds, is.seeds > 1 ? "s" : "", is.blocks_indexed,
           is.blocks_hashed, e->cfg.digests_path ? "; the source's digests from " : "",
           e->cfg.digests_path ? e->cfg.digests_path : "");
  return 0;
}

/* An older copy of this disk in the cache (the VM moves back to a site
 * whose cache it left, or a bitmap started over on an old cache): data at
 * blocks not present, each used only if it hashes to the source's digest.
 * Worth the digests only when there is a fair amount of it. */
static void find_old_data(struct engine *e)
{
  /* Where the cache holds data now (SEEK_DATA): elsewhere it reads as
   * zero, and zero runs need no write (cache_may_hold_data). */
  uint64_t *cd = calloc(e->nblocks / 64 + 1, sizeof *cd);
  int64_t n = cd ? cache_data_blocks(e->cache, e->bs, cd) : -1;
  if (n < 0) free(cd);
  else e->cache_data = (_Atomic uint64_t *) cd;
  if (e->bs != DIGEST_BLOCK || n <= 0) return;
  e->old_data = malloc((e->nblocks / 64 + 1) * sizeof *e->old_data);
  if (!e->old_data) return;
  memcpy(e->old_data, cd, (e->nblocks / 64 + 1) * sizeof *e->old_data);
  uint64_t old = 0;
  for (uint64_t b = 0; n > 0 && b < e->nblocks; b++) {
    if (!(e->old_data[b / 64] >> (b % 64) & 1)) continue;
    if (bitmap_test(e->bm, b)) e->old_data[b / 64] &= ~(UINT64_C(1) << (b % 64));
    else old++;
  }
  if (old < 256) {                /* under 1 MiB: not worth the digests */
    free(e->old_data);
    e->old_data = NULL;
    return;
  }
  log_info("cache %s holds %" PRIu64 " blocks of older data where no block is "
           "present yet: each is kept if it matches the source's digest",
           e->cache_path, old);
}

/* The source's companion exports (the digests, the read map) are opened
 * on threads of their own while the data source opens and the seeds are
 * indexed: each open costs several round trips (connect, negotiation),
 * which on a WAN is most of the start-up. */
struct companion {
  pthread_t thread;
  struct engine *e;
  bool prefetch;                /* digests: ask the first once connected */
  /* RUNNING, then DONE (the thread finished: a join will not wait) or
   * ABANDONED (nobody will join: the thread closes what it opened and
   * frees the companion itself). */
  atomic_int state;
  struct source_config dc;      /* its strings are the companion's own */
  struct source_info info;
  struct source *s;
  char why[512];
  /* Written (a uint64_t 1) once the thread is done, if set: wakes the
   * source thread whose tick joins it (companion_arm).  Closed with it. */
  atomic_int wake_fd;
  int cancel_fd;                /* dc.cancel_fd: written to give the open up */
};

enum { COMP_RUNNING, COMP_DONE, COMP_ABANDONED };
#define COMP_ABANDON_WAIT_S 2

static void companion_free(struct companion *o)
{
  int fd = atomic_load(&o->wake_fd);
  if (fd >= 0) close(fd);
  if (o->cancel_fd >= 0) close(o->cancel_fd);
  free((char *) o->dc.target);
  free((char *) o->dc.export_name);
  free((char *) o->dc.tls_certificates);
  free((char *) o->dc.tls_psk);
  free((char *) o->dc.tls_username);
  free(o);
}

static void *companion_main(void *arg)
{
  struct companion *o = arg;
  o->s = source_open(&o->dc, &o->info, o->why, sizeof o->why);
  if (atomic_exchange(&o->state, COMP_DONE) == COMP_ABANDONED) {
    source_close(o->s);
    companion_free(o);
    return NULL;
  }
  /* (o stays valid: whoever frees it joins this thread first) */
  int fd = atomic_load(&o->wake_fd);
  uint64_t one = 1;
  if (fd >= 0 && write(fd, &one, sizeof one) < 0 && errno != EAGAIN)
    log_debug("waking the source thread failed: %s", strerror(errno));
  return NULL;
}

static char *dup_or_null(const char *s, bool *oom)
{
  char *d = s ? strdup(s) : NULL;
  if (s && !d) *oom = true;
  return d;
}

/* Starts opening export target_export + suffix (its size is checked at
 * the join: the image's size may not be known yet); with prefetch, the
 * first digests are read with its handshake (xnbd://), and asked as soon
 * as it is joined if not (dig_attach, copy_digest_prefetch).  The thread
 * touches nothing of the engine: it may be abandoned.  NULL if no thread
 * could be started. */
static struct companion *companion_start(struct engine *e, const char *suffix, bool prefetch)
{
  _Static_assert(DIG_CHUNK_BLOCKS * DIGEST_LEN <= WAN_EARLY_MAX, "a chunk fits an early read");
  struct companion *o = calloc(1, sizeof *o);
  bool oom = false;
  if (!o) return NULL;
  o->e = e;
  o->prefetch = prefetch;
  atomic_init(&o->state, COMP_RUNNING);
  atomic_init(&o->wake_fd, -1);
  o->cancel_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  o->dc = (struct source_config) {
    .target = dup_or_null(e->target, &oom), .export_name = dup_or_null(e->target_export, &oom),
    .connections = 1, .timeout_s = e->cfg.source_timeout_s,
    .compress_level = e->cfg.compress_level,
    .tls_certificates = dup_or_null(e->cfg.tls_certificates, &oom),
    .tls_psk = dup_or_null(e->cfg.tls_psk, &oom),
    .tls_username = dup_or_null(e->cfg.tls_username, &oom),
    .tls_verify = e->cfg.tls_verify, .export_suffix = suffix,
    /* The first chunk's digests go with the handshake (xnbd://). */
    .early_read = prefetch ? DIG_CHUNK_BLOCKS * DIGEST_LEN : 0,
    .cancellable = o->cancel_fd >= 0, .cancel_fd = o->cancel_fd,
  };
  if (oom || pthread_create(&o->thread, NULL, companion_main, o) != 0) {
    companion_free(o);
    return NULL;
  }
  return o;
}

bool companion_finished(struct companion *o) { return atomic_load(&o->state) == COMP_DONE; }

/* Has the thread wake the source thread through fd (taken: closed with
 * o; -1: none) when done; whether it is still running.  (Either the
 * thread sees fd or this sees it done: both are sequentially consistent.) */
static bool companion_arm(struct companion *o, int fd)
{
  atomic_store(&o->wake_fd, fd);
  return !companion_finished(o);
}

void companion_abandon(struct companion *o)
{
  if (!o) return;
  /* The open is given up (source_config.cancellable): its connections
   * close within a poll, and a WAN pump stops its handshake as libnbd
   * closes its end -- nothing more reaches the source (I7 after detach).
   * It is waited for a little (COMP_ABANDON_WAIT_S), so a close does not
   * leave the thread and its pump running. */
  uint64_t one = 1;
  if (o->cancel_fd >= 0 && write(o->cancel_fd, &one, sizeof one) < 0)
    log_debug("giving up an open: %s", strerror(errno));
  pthread_t t = o->thread;
  struct timespec until;
  clock_gettime(CLOCK_REALTIME, &until);
  until.tv_sec += COMP_ABANDON_WAIT_S;
  /* Still nobody else's: joined, it is closed here; else the thread
   * closes what it opens and frees o itself (from the exchange on). */
  bool joined = pthread_timedjoin_np(t, NULL, &until) == 0;
  if (!joined && atomic_exchange(&o->state, COMP_ABANDONED) == COMP_DONE)
    joined = pthread_join(t, NULL) == 0;
  if (!joined) {
    pthread_detach(t);
    return;
  }
  source_close(o->s);
  companion_free(o);
}

struct source *companion_join(struct engine *e, struct companion *o, uint64_t expected,
                              char *why, size_t whylen)
{
  if (!o) {
    snprintf(why, whylen, "cannot start a thread to connect to it");
    return NULL;
  }
  pthread_join(o->thread, NULL);
  struct source *s = o->s;
  if (!s)
    snprintf(why, whylen, "%s", o->why);
  else if (o->info.size != expected) {
    snprintf(why, whylen, "source %s: export %s has %" PRIu64 " bytes, not the "
             "%" PRIu64 " expected", e->target, o->dc.export_suffix, o->info.size,
             expected);
    source_close(s);
    s = NULL;
  }
  companion_free(o);
  return s;
}

static void dig_opener_start(struct engine *e, bool prefetch)
{
  e->dig_opener = companion_start(e, DIGEST_EXPORT_SUFFIX, prefetch);
}

/* Waits for the digest export's opener; its source, or NULL with why. */
static struct source *dig_opener_join(struct engine *e, char *why, size_t whylen)
{
  struct companion *o = e->dig_opener;
  e->dig_opener = NULL;
  return companion_join(e, o, digest_export_size(e->size), why, whylen);
}

/* The digest opener is done: its source (or why not) becomes the copy's
 * digests; with prefetch, the first chunk's, read with the handshake or
 * asked now, too.  At engine_open (deferred false) a failure gives the
 * seeds up altogether; on the tick (deferred: clients are served already
 * and may look at the index) the copy goes on without deduplication. */
static void dig_attach(struct engine *e, bool deferred)
{
  char why[512];
  bool prefetch = e->dig_opener && e->dig_opener->prefetch;
  struct source *s = dig_opener_join(e, why, sizeof why);
  if (s && source_start(s, why, sizeof why) < 0) {
    source_close(s);
    s = NULL;
  }
  if (!s) {
    log_warn("the source publishes no block digests (%s): %s cannot be used "
             "(xnbd-server publishes them; see xnbd-proxy(8))", why,
             e->ix ? "the seeds" : "the older data in the cache");
    if (deferred) {
      pthread_mutex_lock(&e->lock);
      e->dig_pending = false;
      e->copy.dig_off = true;
      snprintf(e->last_error, sizeof e->last_error, "the source publishes no block "
               "digests (%.300s): copying without deduplication", why);
      pthread_mutex_unlock(&e->lock);
      return;
    }
    if (e->ix) index_close(e->ix);
    e->ix = NULL;
    free(e->old_data);
    e->old_data = NULL;
    return;
  }
  pthread_mutex_lock(&e->lock);   /* (engine_stats reads it under the lock) */
  e->dsrc = s;
  e->dig_pending = false;
  pthread_mutex_unlock(&e->lock);
  if (prefetch) copy_digest_prefetch(e, s, digest_export_size(e->size));
  log_info("deduplication: the source publishes digests%s",
           deferred ? " (joined after clients were let in)" : "");
}

/* The source's digest export, when seeds or an older copy can use it
 * (with seeds, engine_open started opening it already).  Clients are
 * served at once: an opener still at work (a far source; over xnbd://,
 * the source hashing the first digests read with the handshake, perhaps
 * from a cold disk) is joined on the tick (engine_digests_tick) and the
 * copy waits for it meanwhile (dig_pending). */
static void open_digests(struct engine *e)
{
  bool want = (e->ix || e->old_data) && !e->dfile;
  if (!want) {
    companion_abandon(e->dig_opener);
    e->dig_opener = NULL;
    return;
  }
  if (!e->dig_opener) dig_opener_start(e, false);
  if (e->dig_opener && !companion_finished(e->dig_opener) &&
      companion_arm(e->dig_opener, source_wake_fd_dup(e->src))) {
    e->dig_pending = true;
    log_debug("the source's digest export is still opening: clients are served "
              "meanwhile, the copy waits for it");
    return;
  }
  dig_attach(e, false);
}

void engine_digests_tick(struct engine *e)
{
  if (e->dig_opener && companion_finished(e->dig_opener)) dig_attach(e, true);
}

/* The cache image, checked against the bitmap: a cache shorter than the
 * blocks the bitmap calls present would serve zeros for them (D2). */
static int open_store(struct engine *e, bool complete, bool have_bitmap,
                      char *err, size_t errlen)
{
  char berr[BITMAP_ERR_MAX];
  uint64_t old_size;
  if (have_bitmap && access(e->cache_path, F_OK) < 0 && errno == ENOENT) {
    snprintf(err, errlen, "bitmap %s exists but cache image %s does not: the "
             "blocks the bitmap records as present would read as zeros. "
             "Restore the cache image, or start over with --clear-bitmap",
             e->bitmap_path, e->cache_path);
    return -1;
  }
  e->bm = bitmap_open(e->bitmap_path, e->size, e->bs, e->source_id,
                      e->cfg.clear_bitmap, berr, sizeof berr);
  if (!e->bm) { snprintf(err, errlen, "%s", berr); return -1; }
  /* The bitmap (I5) first: it names a wrong source better than the cache can. */
  e->cache = cache_open(e->cache_path, e->size, complete, e->cfg.clear_bitmap,
                        e->cfg.wq, &old_size, err, errlen);
  if (!e->cache) return -1;
  if (old_size < e->size && !e->cfg.clear_bitmap) {
    uint64_t b = bitmap_next_set(e->bm, old_size / e->bs);
    if (b < e->nblocks) {
      snprintf(err, errlen, "cache image %s was %" PRIu64 " bytes, shorter than "
               "the %" PRIu64 "-byte image, but bitmap %s records block %" PRIu64
               " (offset %" PRIu64 ") and maybe others past its end as present: "
               "the cache was truncated or replaced, and those blocks would read "
               "as zeros. Restore the cache image, or start over with "
               "--clear-bitmap", e->cache_path, old_size, e->size, e->bitmap_path,
               b, b * e->bs);
      return -1;
    }
  }
  bitmap_set_data_sync(e->bm, sync_data_hook, e);
  return 0;
}

struct engine *engine_open(const struct engine_config *cfg, char *err, size_t errlen)
{
  struct engine *e = calloc(1, sizeof *e);
  struct bitmap_info bi;
  bool complete = false, have_bitmap = false, ix_thread = false;
  char berr[BITMAP_ERR_MAX];
  struct index_opener ixo;
  pthread_t ixt;

  if (!e) { snprintf(err, errlen, "out of memory"); return NULL; }
  config_defaults(e, cfg);
  if (!e->target_export || !e->cache_path || !e->bitmap_path) {
    snprintf(err, errlen, "out of memory");
    goto fail;
  }
  const char *why;
  if (!util_block_size_ok(e->bs, &why)) {
    snprintf(err, errlen, "block size %u: %s", e->bs, why);
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
    /* Seeds will want the digest export: its round trips overlap these. */
    if (cfg->nseeds && !cfg->digests_path && e->bs == DIGEST_BLOCK && e->target)
      dig_opener_start(e, !have_bitmap && cfg->cache_all && !cfg->standby);
    ix_thread = index_opener_start(e, &ixo, &ixt);
    int rc = open_source(e, have_bitmap ? &bi : NULL, err, errlen);
    if (ix_thread) pthread_join(ixt, NULL);
    if (rc < 0) {
      if (ix_thread && ixo.ix) index_close(ixo.ix);
      goto fail;
    }
    /* An xnbd-server tells which regions its VM read last (read-map.h);
     * other servers have no such export: not asked. */
    if (strstr(e->live_id, " xnbd-id="))
      e->map_opener = companion_start(e, READ_MAP_SUFFIX, false);
  }
  e->nblocks = e->size / e->bs + (e->size % e->bs != 0);
  /* Seeds and digests before any file is made: a refusal leaves nothing. */
  if (!complete && open_dedup(e, ix_thread ? &ixo : NULL, err, errlen) < 0) goto fail;
  if (open_store(e, complete, have_bitmap, err, errlen) < 0) goto fail;
  if (cfg->clear_bitmap)
    log_info("--clear-bitmap: starting over; no block is present");
  if (!complete) {
    find_old_data(e);
    open_digests(e);
  }
  e->state = complete ? ENGINE_DETACHED : ENGINE_CONNECTING;
  e->standby = cfg->standby && !complete;
  e->copy.running = cfg->cache_all && !e->standby;
  e->cache_all_at_activate = cfg->cache_all && e->standby;
  if (e->standby)
    log_info("standby: reads of missing blocks pass through from the source "
             "and are not kept, until 'xnbd-ctl activate' or the first write%s",
             e->cache_all_at_activate ? "; --cache-all starts the copy then" : "");
  log_info("cache %s, bitmap %s: %" PRIu64 " of %" PRIu64 " blocks of %u "
           "bytes present%s", e->cache_path, e->bitmap_path,
           bitmap_count(e->bm), e->nblocks, e->bs,
           complete ? " (complete: the source is not contacted)" : "");
  if (!complete) {
    if (copy_init(e) < 0) { snprintf(err, errlen, "out of memory"); goto fail; }
    if (source_start(e->src, err, errlen) < 0) goto fail;
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
  source_stop(e->src);            /* jobs at the source land as failures */
  /* Openers the tick never joined (it has stopped now), or engine_open
   * failed before it could: what they open is closed, never used. */
  companion_abandon(e->dig_opener);
  e->dig_opener = NULL;
  companion_abandon(e->map_opener);
  e->map_opener = NULL;
  source_stop(e->dsrc);
  source_stop(e->msrc);
  pthread_mutex_lock(&e->lock);   /* ... and every landing has run */
  while (e->jobs_live)
    pthread_cond_wait(&e->jobs_cond, &e->lock);
  pthread_mutex_unlock(&e->lock);
  if (e->persister_started) {
    pthread_mutex_lock(&e->lock);
    pthread_cond_broadcast(&e->persist_cond);
    pthread_mutex_unlock(&e->lock);
    pthread_join(e->persister, NULL);
  }
  if (e->bm && e->cache && engine_flush(e) < 0)
    log_error("final flush of %s failed: %s", e->cache_path, strerror(errno));
  source_close(e->src);
  source_close(e->dsrc);
  source_close(e->msrc);
  if (e->ix) index_close(e->ix);
  if (e->dfile) digest_file_close(e->dfile);
  free(e->old_data);
  free((uint64_t *) e->cache_data);
  bitmap_close(e->bm);
  cache_close(e->cache);
  inflight_free_all(e);
  copy_free(e);
  free(e->waiting);
  free(e->target); free(e->target_export); free(e->cache_path);
  free(e->bitmap_path);
  pthread_mutex_destroy(&e->lock);
  for (unsigned i = 0; i < STRIPES; i++) pthread_mutex_destroy(&e->stripe[i]);
  pthread_cond_destroy(&e->persist_cond);
  pthread_cond_destroy(&e->jobs_cond);
  free(e);
}

void engine_get_stats(struct engine *e, struct engine_stats *st)
{
  struct source_stats ss = { 0 };
  memset(st, 0, sizeof *st);
  if (e->src) source_get_stats(e->src, &ss);
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
  st->fetches_prepaged = e->fetches_prepaged;
  st->fetches_recent = e->fetches_recent;
  st->bg_recent_regions = e->copy.nrecent;
  st->bg_recent_done = e->copy.recent_pos;
  st->fetches_joined = e->fetches_joined;
  st->fetches_seed_stale = e->fetches_seed_stale;
  st->fetch_errors = e->fetch_errors;
  st->fetch_rate = e->fetch_rate;
  st->ondemand_waiting = e->nwaiting;
  st->bg_running = e->copy.running;
  st->standby = e->standby;
  st->bg_paused = e->copy.paused;
  st->bg_rate = e->copy.rate;
  st->bg_window = e->copy.window;
  st->bg_inflight = e->copy.inflight_bytes;
  st->bg_seeding = e->copy.local_inflight;
  st->bg_queue_us = e->copy.win.queue_ns / 1000;
  st->rtt_us = ss.rtt_ns / 1000;
  st->connections = e->state == ENGINE_DETACHED ? 0 : e->cfg.connections;
  st->connections_up = e->state == ENGINE_DETACHED ? 0 : ss.connections_up;
  st->forced_missing = e->forced_missing;
  st->completed_unix_us = e->completed_unix_us;
  st->bytes_seeded = e->bytes_seeded;
  st->bytes_digests = e->bytes_digests;
  st->digests = copy_digests_on(e);
  snprintf(st->target, sizeof st->target, "%s", e->src ? ss.target : e->target ? e->target : "");
  snprintf(st->source_id, sizeof st->source_id, "%s", e->source_id);
  /* The engine's own error (local disk, status) wins over the link's. */
  snprintf(st->last_error, sizeof st->last_error, "%s",
           e->last_error[0] ? e->last_error : ss.last_error);
  pthread_mutex_unlock(&e->lock);
  /* This engine's own WAN bytes: its data, digest and read map
   * connections. */
  struct source_stats ds = { 0 }, ms = { 0 };
  pthread_mutex_lock(&e->lock);
  struct source *msrc = e->msrc;  /* set by the tick, under the lock */
  struct source *dsrc = e->dsrc;  /* (so may this be) */
  pthread_mutex_unlock(&e->lock);
  if (dsrc) source_get_stats(dsrc, &ds);
  if (msrc) source_get_stats(msrc, &ms);
  st->wire_tx_raw = ss.wire_tx_raw + ds.wire_tx_raw + ms.wire_tx_raw;
  st->wire_tx = ss.wire_tx + ds.wire_tx + ms.wire_tx;
  st->wire_rx = ss.wire_rx + ds.wire_rx + ms.wire_rx;
  st->wire_rx_raw = ss.wire_rx_raw + ds.wire_rx_raw + ms.wire_rx_raw;
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
  e->copy.running = true;
  e->copy.paused = false;
  pthread_mutex_unlock(&e->lock);
  log_info("background copy started");
  source_wake(e->src);
  return 0;
}

int engine_bg_pause(struct engine *e, char *err, size_t errlen)
{
  pthread_mutex_lock(&e->lock);
  bool ok = attached(e, err, errlen);
  if (ok) e->copy.paused = true;
  pthread_mutex_unlock(&e->lock);
  if (ok) log_info("background copy paused");
  return ok ? 0 : -1;
}

int engine_bg_resume(struct engine *e, char *err, size_t errlen)
{
  pthread_mutex_lock(&e->lock);
  bool ok = attached(e, err, errlen);
  if (ok) {
    e->copy.paused = false;
    e->last_error[0] = '\0';      /* a local failure (D7) is the operator's to clear */
  }
  pthread_mutex_unlock(&e->lock);
  if (ok) { log_info("background copy resumed"); source_wake(e->src); }
  return ok ? 0 : -1;
}

int engine_set_bg_rate(struct engine *e, uint64_t bps)
{
  pthread_mutex_lock(&e->lock);
  e->copy.rate = bps;
  pthread_mutex_unlock(&e->lock);
  log_info("background rate limit: %" PRIu64 " bytes/s%s", bps, bps ? "" : " (none)");
  if (e->src) source_wake(e->src);
  return 0;
}


int engine_reconnect(struct engine *e, const char *target, char *err, size_t errlen)
{
  pthread_mutex_lock(&e->lock);
  bool detached = e->state == ENGINE_DETACHED || !e->src;
  pthread_mutex_unlock(&e->lock);
  if (detached) {
    snprintf(err, errlen, "the proxy is detached: it no longer uses a source");
    return -1;
  }
  if (source_retarget(e->src, target, err, errlen) < 0) return -1;
  log_info("reconnecting to %s", target);
  return 0;
}
