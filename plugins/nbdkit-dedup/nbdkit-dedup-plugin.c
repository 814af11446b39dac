/* nbdkit-dedup-plugin: the migration engine (common/engine) behind
 * nbdkit's front end.  A thin adapter: parameters become an engine_config
 * (with the proxy's parsers and messages), every NBD operation is one
 * host.h call, and the control socket is ctl-server.h's, so xnbd-ctl
 * works against this plugin as against xnbd-proxy.
 *
 * Lifecycle (nbdkit-plugin(3)): .config/.config_complete parse and check
 * the parameters; .get_ready checks what can be checked before the fork
 * (the directories of the files exist); .after_fork (after nbdkit has
 * forked into the background) starts the engine
 * (host_open) and the control socket; .cleanup stops both.  The one
 * engine serves every connection, so the thread model is PARALLEL and
 * multi-conn is offered. */
#define NBDKIT_API_VERSION 2
#include <nbdkit-plugin.h>

#include "host.h"
#include "ctl-server.h"
#include "engine.h"
#include "nbd-proto.h"
#include "target.h"
#include "wan.h"
#include "log.h"
#include "util.h"

#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <fcntl.h>
#include <sys/stat.h>

#define THREAD_MODEL NBDKIT_THREAD_MODEL_PARALLEL

/* -D dedup.verbose=1: the engine's debug messages too. */
NBDKIT_DLL_PUBLIC int dedup_debug_verbose;

static struct engine_config cfg;
static const char *control_path;
static unsigned io_threads = 8;
/* Strings the configuration points to (freed in .unload). */
static char *owned[128];
static unsigned nowned;

static struct engine_host *host;
static struct ctl_server *ctl;

static void log_to_nbdkit(enum log_level level, const char *msg)
{
  switch (level) {
  case LOG_LVL_ERROR: nbdkit_error("%s", msg); break;
  case LOG_LVL_WARN: nbdkit_error("warning: %s", msg); break;
  default: nbdkit_debug("%s", msg); break;
  }
}

static void dedup_load(void)
{
  log_init("dedup", LOG_LVL_INFO);
  log_set_hook(log_to_nbdkit);
  cfg.tls_verify = true;
}

static void dedup_unload(void)
{
  log_set_hook(NULL);
  for (unsigned i = 0; i < nowned; i++) free(owned[i]);
  nowned = 0;
}

/* ---------------------------------------------------------------- parameters */

static const char *keep(char *s)
{
  if (!s) { nbdkit_error("out of memory"); return NULL; }
  if (nowned == sizeof owned / sizeof owned[0]) {
    nbdkit_error("too many parameters");
    free(s);
    return NULL;
  }
  return owned[nowned++] = s;
}

/* Each setter stores one parameter into cfg; -1 after nbdkit_error. */
typedef int setter(const char *key, const char *value, void *field);

static int set_string(const char *key, const char *v, void *f)
{
  return (*(const char **) f = keep(strdup(v))) ? 0 : -1;
}

/* A file or socket path: absolute, because nbdkit (without -f) forks into
 * the background and changes to / before the engine starts. */
static int set_path(const char *key, const char *v, void *f)
{
  if (!*v) { nbdkit_error("%s: the path is empty", key); return -1; }
  return (*(const char **) f = keep(nbdkit_absolute_path(v))) ? 0 : -1;
}

static int set_bool(const char *key, const char *v, void *f)
{
  int b = nbdkit_parse_bool(v);   /* reports a bad value itself */
  if (b < 0) {
    nbdkit_error("%s=%s: expected true or false (also on/off, yes/no, 1/0)", key, v);
    return -1;
  }
  *(bool *) f = b;
  return 0;
}

static int parse_uint_range(const char *key, const char *v, unsigned min, unsigned max,
                            unsigned *out)
{
  char *end;
  unsigned long n;
  errno = 0;
  n = strtoul(v, &end, 10);
  if (errno || *end || !*v || *v == '-' || n < min || n > max) {
    nbdkit_error("%s: '%s' is not a number from %u to %u", key, v, min, max);
    return -1;
  }
  *out = n;
  return 0;
}

#define UINT_SETTER(name, min, max)                                     \
  static int name(const char *key, const char *v, void *f)             \
  { return parse_uint_range(key, v, min, max, f); }
UINT_SETTER(set_connections, 1, 16)
UINT_SETTER(set_source_timeout, 1, 86400 * 7)
UINT_SETTER(set_persist, 10, 3600000)
UINT_SETTER(set_threads, 1, 256)

static int set_size(const char *key, const char *v, void *f)
{
  const char *why;
  if (parse_size(v, f, &why) < 0) {
    nbdkit_error("%s '%s': %s", key, v, why);
    return -1;
  }
  return 0;
}

static int set_max_fetch(const char *key, const char *v, void *f)
{
  uint64_t n;
  if (set_size(key, v, &n) < 0) return -1;
  if (n < 4096 || n > (32u << 20)) {
    nbdkit_error("%s %s: must be from 4K to 32M", key, v);
    return -1;
  }
  *(uint32_t *) f = n;
  return 0;
}

static int set_block_size(const char *key, const char *v, void *f)
{
  const char *why;
  if (util_parse_block_size(v, f, &why) < 0) {
    nbdkit_error("%s %s: %s", key, v, why);
    return -1;
  }
  return 0;
}

static int set_rate(const char *key, const char *v, void *f)
{
  const char *why;
  if (parse_rate(v, f, &why) < 0) {
    nbdkit_error("%s '%s': %s", key, v, why);
    return -1;
  }
  return 0;
}

static int set_compress(const char *key, const char *v, void *f)
{
  unsigned n;
  if (strcmp(v, "off") == 0) { *(int *) f = -1; return 0; }
  if (parse_uint_range(key, v, 1, 19, &n) < 0) return -1;
  *(int *) f = n;
  return 0;
}

/* seed=FILE, repeatable (xnbd-proxy --seed). */
#define MAX_SEEDS 64
static const char *seeds[MAX_SEEDS];

static int set_seed(const char *key, const char *v, void *f)
{
  if (cfg.nseeds >= MAX_SEEDS) {
    nbdkit_error("too many %s= files (at most %d)", key, MAX_SEEDS);
    return -1;
  }
  if (set_path(key, v, &seeds[cfg.nseeds]) < 0) return -1;
  cfg.seeds = seeds;
  cfg.nseeds++;
  return 0;
}

static const struct param {
  const char *key;
  setter *set;
  void *field;
} params[] = {
  { "target", set_string, &cfg.target },
  { "target-export", set_string, &cfg.target_export },
  { "compress", set_compress, &cfg.compress_level },
  { "tls-psk", set_path, &cfg.tls_psk },
  { "tls-certificates", set_path, &cfg.tls_certificates },
  { "tls-username", set_string, &cfg.tls_username },
  { "tls-verify", set_bool, &cfg.tls_verify },
  { "source-id", set_string, &cfg.source_id },
  { "connections", set_connections, &cfg.connections },
  { "source-timeout", set_source_timeout, &cfg.source_timeout_s },
  { "cache", set_path, &cfg.cache_path },
  { "bitmap", set_path, &cfg.bitmap_path },
  { "block-size", set_block_size, &cfg.block_size },
  { "clear-bitmap", set_bool, &cfg.clear_bitmap },
  { "persist-interval", set_persist, &cfg.persist_interval_ms },
  { "cache-all", set_bool, &cfg.cache_all },
  { "bg-rate", set_rate, &cfg.bg_rate },
  { "bg-window", set_size, &cfg.bg_window },
  { "max-fetch", set_max_fetch, &cfg.max_fetch },
  { "detach-when-complete", set_bool, &cfg.detach_when_complete },
  { "standby", set_bool, &cfg.standby },
  { "control", set_path, &control_path },
  { "threads", set_threads, &io_threads },
  { "seed", set_seed, NULL },
  { "index", set_path, &cfg.index_path },
  { "digests", set_path, &cfg.digests_path },
};

static int dedup_config(const char *key, const char *value)
{
  for (size_t i = 0; i < sizeof params / sizeof params[0]; i++)
    if (strcmp(key, params[i].key) == 0)
      return params[i].set(key, value, params[i].field);
  nbdkit_error("unknown parameter '%s' (see 'nbdkit dedup --help')", key);
  return -1;
}

static int dedup_config_complete(void)
{
  char err[1024];
  if (dedup_debug_verbose) log_set_level(LOG_LVL_DEBUG);
  if (!cfg.cache_path || !cfg.bitmap_path) {
    nbdkit_error("cache=FILE and bitmap=FILE are required (the local copy and "
                 "the record of which blocks it holds)");
    return -1;
  }
  if (cfg.target) {
    struct target t;
    if (target_parse(cfg.target, cfg.target_export, &t, err, sizeof err) < 0) {
      nbdkit_error("target: %s", err);
      return -1;
    }
    bool host_port = t.kind == TARGET_HOST_PORT;
    target_free(&t);
    if (cfg.target_export && !host_port) {
      nbdkit_error("target-export= goes with a HOST:PORT target only; a URI "
                   "names its export itself (e.g. nbd://HOST/EXPORT)");
      return -1;
    }
  }
  if (!control_path) {
    nbdkit_error("control=SOCK is required: it is how xnbd-ctl starts the "
                 "background copy and detaches");
    return -1;
  }
  return 0;
}

#define dedup_config_help \
  "target=URI|HOST:PORT    source: nbd://, nbds://, nbd+unix://, xnbd://,\n" \
  "                        xnbds:// URI or HOST:PORT (absent: the bitmap\n" \
  "                        must say every block is here)\n" \
  "cache=FILE              (required) cache image (created sparse if absent)\n" \
  "bitmap=FILE             (required) persistent cached-block bitmap\n" \
  "control=SOCK            (required) control socket for xnbd-ctl (0600)\n" \
  "target-export=NAME      export name for a HOST:PORT target (default \"\")\n" \
  "compress=off|LEVEL      zstd level on xnbd:// links (default 3)\n" \
  "tls-psk=FILE            TLS pre-shared keys for the source (USER:HEXKEY)\n" \
  "tls-certificates=DIR    TLS CA and client certificates for the source\n" \
  "tls-username=NAME       TLS identity (PSK user)\n" \
  "tls-verify=false        do not verify the source's certificate\n" \
  "source-id=ID            identity recorded in the bitmap\n" \
  "connections=N           source connections (default 2)\n" \
  "source-timeout=S        how long reads wait for a lost source (default 60)\n" \
  "block-size=N            cache block size, power of two 4K..32M (default 4K)\n" \
  "clear-bitmap=true       start over: forget which blocks are cached\n" \
  "persist-interval=MS     persist the bitmap this often (default 1000)\n" \
  "cache-all=true          start the background copy at once\n" \
  "bg-rate=RATE            background copy cap, e.g. 50mbit or 20M; 0 = none\n" \
  "bg-window=SIZE          background bytes in flight (default: auto)\n" \
  "max-fetch=SIZE          largest single fetch (default 4M)\n" \
  "detach-when-complete=true  detach once every block is here\n" \
  "standby=true            live migration: keep nothing until activated\n" \
  "seed=FILE               a local image whose blocks are used instead of\n" \
  "                        fetching (repeatable; needs source digests)\n" \
  "index=FILE              keep the seeds' index here\n" \
  "digests=FILE            the source's digests made by xnbd-digest\n" \
  "threads=N               local I/O threads (default 8)\n" \
  "Read-only: nbdkit -r.  Engine debug messages: -D dedup.verbose=1."

/* ---------------------------------------------------------------- lifecycle */

/* The directory that will hold path must exist (the file itself may be
 * created by the engine). */
static int dir_exists(const char *what, const char *path)
{
  char dir[PATH_MAX];
  struct stat st;
  const char *slash = strrchr(path, '/');
  size_t n = slash == path ? 1 : (size_t) (slash - path);
  if (!slash || n >= sizeof dir) return 0;   /* absolute paths only */
  memcpy(dir, path, n);
  dir[n] = '\0';
  if (stat(dir, &st) < 0 || !S_ISDIR(st.st_mode)) {
    const char *why = stat(dir, &st) < 0 ? strerror(errno) : "not a directory";
    nbdkit_error("%s=%s: directory %s: %s; create it or choose another path",
                 what, path, dir, why);
    return -1;
  }
  return 0;
}

/* A file the engine will read: checked before nbdkit forks, so that a
 * typo is reported to the operator instead of to a background process. */
static int readable(const char *key, const char *path)
{
  struct stat st;
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0 || fstat(fd, &st) < 0) {
    nbdkit_error("%s=%s: %s", key, path, strerror(errno));
    if (fd >= 0) close(fd);
    return -1;
  }
  close(fd);
  if (!S_ISREG(st.st_mode) && !S_ISBLK(st.st_mode)) {
    nbdkit_error("%s=%s: not a regular file or block device", key, path);
    return -1;
  }
  return 0;
}

static int dedup_get_ready(void)
{
  if (dir_exists("cache", cfg.cache_path) < 0 ||
      dir_exists("bitmap", cfg.bitmap_path) < 0 ||
      dir_exists("control", control_path) < 0)
    return -1;
  for (unsigned i = 0; i < cfg.nseeds; i++)
    if (readable("seed", cfg.seeds[i]) < 0) return -1;
  if (cfg.index_path && dir_exists("index", cfg.index_path) < 0) return -1;
  if (cfg.digests_path && readable("digests", cfg.digests_path) < 0) return -1;
  return 0;
}

static int dedup_after_fork(void)
{
  char err[4096];
  host = host_open(&cfg, io_threads, err, sizeof err);
  if (!host) { nbdkit_error("%s", err); return -1; }
  ctl = ctl_server_start(control_path, host_engine(host), "nbdkit dedup", err, sizeof err);
  if (!ctl) {
    nbdkit_error("%s", err);
    host_close(host);
    host = NULL;
    return -1;
  }
  return 0;
}

static void dedup_cleanup(void)
{
  ctl_server_stop(ctl);     /* waits for engine calls it runs */
  ctl = NULL;
  host_close(host);         /* stops the fetcher, persists the bitmap */
  host = NULL;
  wan_wait_idle(3000);      /* WAN pumps end once their NBD side closed */
}

/* ---------------------------------------------------------------- connections */

static void *dedup_open(int readonly)
{
  return host;              /* one engine for every connection */
}

static int64_t dedup_get_size(void *h) { return host_size(h); }

static int has(void *h, uint16_t flag) { return (host_flags(h) & flag) != 0; }
static int dedup_can_write(void *h) { return !has(h, NBD_FLAG_READ_ONLY); }
static int dedup_can_flush(void *h) { return has(h, NBD_FLAG_SEND_FLUSH); }
static int dedup_can_trim(void *h) { return has(h, NBD_FLAG_SEND_TRIM); }
static int dedup_can_zero(void *h) { return has(h, NBD_FLAG_SEND_WRITE_ZEROES); }
static int dedup_can_fast_zero(void *h) { return has(h, NBD_FLAG_SEND_FAST_ZERO); }
static int dedup_can_multi_conn(void *h) { return has(h, NBD_FLAG_CAN_MULTI_CONN); }
static int dedup_can_extents(void *h) { return 1; }
static int dedup_can_fua(void *h)
{
  return has(h, NBD_FLAG_SEND_FUA) ? NBDKIT_FUA_NATIVE : NBDKIT_FUA_NONE;
}
static int dedup_can_cache(void *h)
{
  return has(h, NBD_FLAG_SEND_CACHE) ? NBDKIT_CACHE_NATIVE : NBDKIT_CACHE_NONE;
}

static int dedup_block_size(void *h, uint32_t *min, uint32_t *pref, uint32_t *max)
{
  host_block_size(h, min, pref, max);
  return 0;
}

/* host_* return -1 with errno: hand that errno to nbdkit for the reply. */
static int ret(int rc)
{
  if (rc < 0) nbdkit_set_error(errno);
  return rc;
}

static int dedup_pread(void *h, void *buf, uint32_t count, uint64_t off, uint32_t flags)
{
  return ret(host_pread(h, buf, count, off));
}

static int dedup_pwrite(void *h, const void *buf, uint32_t count, uint64_t off,
                        uint32_t flags)
{
  return ret(host_pwrite(h, buf, count, off, flags & NBDKIT_FLAG_FUA));
}

static int dedup_flush(void *h, uint32_t flags) { return ret(host_flush(h)); }

static int dedup_trim(void *h, uint32_t count, uint64_t off, uint32_t flags)
{
  return ret(host_trim(h, count, off, flags & NBDKIT_FLAG_FUA));
}

static int dedup_zero(void *h, uint32_t count, uint64_t off, uint32_t flags)
{
  return ret(host_zero(h, count, off, flags & NBDKIT_FLAG_MAY_TRIM,
                       flags & NBDKIT_FLAG_FUA, flags & NBDKIT_FLAG_FAST_ZERO));
}

static int dedup_cache(void *h, uint32_t count, uint64_t off, uint32_t flags)
{
  return ret(host_cache(h, count, off));
}

static int add_extent(void *opaque, uint64_t off, uint64_t len, uint32_t flags)
{
  uint32_t t = (flags & NBD_STATE_HOLE ? NBDKIT_EXTENT_HOLE : 0) |
               (flags & NBD_STATE_ZERO ? NBDKIT_EXTENT_ZERO : 0);
  return nbdkit_add_extent(opaque, off, len, t);
}

static int dedup_extents(void *h, uint32_t count, uint64_t off, uint32_t flags,
                         struct nbdkit_extents *ex)
{
  return ret(host_extents(h, count, off, flags & NBDKIT_FLAG_REQ_ONE, add_extent, ex));
}

static struct nbdkit_plugin plugin = {
  .name = "dedup",
  .longname = "xnbd migration engine (nbdkit-dedup-plugin)",
  .version = XNBD_VERSION,
  .description = "Serve a remote NBD export locally while migrating it",
  .load = dedup_load,
  .unload = dedup_unload,
  .config = dedup_config,
  .config_complete = dedup_config_complete,
  .config_help = dedup_config_help,
  .magic_config_key = NULL,
  .get_ready = dedup_get_ready,
  .after_fork = dedup_after_fork,
  .cleanup = dedup_cleanup,
  .open = dedup_open,
  .get_size = dedup_get_size,
  .block_size = dedup_block_size,
  .can_write = dedup_can_write,
  .can_flush = dedup_can_flush,
  .can_trim = dedup_can_trim,
  .can_zero = dedup_can_zero,
  .can_fast_zero = dedup_can_fast_zero,
  .can_fua = dedup_can_fua,
  .can_multi_conn = dedup_can_multi_conn,
  .can_extents = dedup_can_extents,
  .can_cache = dedup_can_cache,
  .pread = dedup_pread,
  .pwrite = dedup_pwrite,
  .flush = dedup_flush,
  .trim = dedup_trim,
  .zero = dedup_zero,
  .cache = dedup_cache,
  .extents = dedup_extents,
  .errno_is_preserved = 1,
};

NBDKIT_REGISTER_PLUGIN(plugin)
