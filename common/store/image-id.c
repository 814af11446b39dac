/* image-id.c: the per-image identity xnbd-server publishes (image-id.h). */
#include "image-id.h"
#include "log.h"
#include "util.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <libgen.h>
#include <limits.h>
#include <stdio.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <openssl/sha.h>

#define RECORD_MAX 1024

/* What the sidecar holds. */
struct record {
  char hex[33];
  uint64_t gen, ino, size;
  int64_t mtime_ns, ctime_ns;
  bool open;                    /* written by a server still running */
};

struct image_id {
  struct record r;
  bool derived;
  char *sidecar;                /* NULL when derived */
  char desc[128];
};

static int64_t ts_ns(struct timespec t) { return (int64_t) t.tv_sec * 1000000000 + t.tv_nsec; }

static void stamp_from(struct record *r, const struct stat *st)
{
  r->ino = st->st_ino;
  r->size = st->st_size;
  r->mtime_ns = ts_ns(st->st_mtim);
  r->ctime_ns = ts_ns(st->st_ctim);
}

static bool same_stamp(const struct record *a, const struct record *b)
{
  return a->size == b->size && a->mtime_ns == b->mtime_ns &&
         a->ctime_ns == b->ctime_ns;
}

static void to_hex(const unsigned char *b, size_t n, char *out)
{
  for (size_t i = 0; i < n; i++)
    sprintf(out + 2 * i, "%02x", b[i]);
}

static bool is_hex32(const char *s)
{
  if (strlen(s) != 32) return false;
  for (; *s; s++)
    if (!((*s >= '0' && *s <= '9') || (*s >= 'a' && *s <= 'f'))) return false;
  return true;
}

static bool parse_u64(const char *s, uint64_t *v)
{
  char *end;
  if (*s < '0' || *s > '9') return false;
  errno = 0;
  unsigned long long x = strtoull(s, &end, 10);
  if (errno || *end) return false;
  *v = x;
  return true;
}

static bool parse_i64(const char *s, int64_t *v)
{
  char *end;
  if (!*s) return false;
  errno = 0;
  long long x = strtoll(s, &end, 10);
  if (errno || *end) return false;
  *v = x;
  return true;
}

/* Parses the sidecar text.  Returns 0, or -1 with a reason in *why. */
static int parse_record(char *text, struct record *r, const char **why)
{
  unsigned seen = 0;   /* bits: version id gen ino size mtime ctime state */
  memset(r, 0, sizeof *r);
  for (char *line = strtok(text, "\n"); line; line = strtok(NULL, "\n")) {
    char *eq = strchr(line, '=');
    uint64_t v;
    if (line[0] == '#' || line[0] == '\0') continue;
    if (!eq) { *why = "a line is not KEY=VALUE"; return -1; }
    *eq = '\0';
    const char *k = line, *val = eq + 1;
    if (strcmp(k, "version") == 0) {
      if (strcmp(val, "1") != 0) { *why = "unknown version"; return -1; }
      seen |= 1;
    } else if (strcmp(k, "id") == 0) {
      if (!is_hex32(val)) { *why = "id is not 32 lowercase hex digits"; return -1; }
      memcpy(r->hex, val, 33);
      seen |= 2;
    } else if (strcmp(k, "gen") == 0) {
      if (!parse_u64(val, &r->gen)) { *why = "bad gen"; return -1; }
      seen |= 4;
    } else if (strcmp(k, "ino") == 0) {
      if (!parse_u64(val, &r->ino)) { *why = "bad ino"; return -1; }
      seen |= 8;
    } else if (strcmp(k, "size") == 0) {
      if (!parse_u64(val, &v)) { *why = "bad size"; return -1; }
      r->size = v;
      seen |= 16;
    } else if (strcmp(k, "mtime_ns") == 0) {
      if (!parse_i64(val, &r->mtime_ns)) { *why = "bad mtime_ns"; return -1; }
      seen |= 32;
    } else if (strcmp(k, "ctime_ns") == 0) {
      if (!parse_i64(val, &r->ctime_ns)) { *why = "bad ctime_ns"; return -1; }
      seen |= 64;
    } else if (strcmp(k, "state") == 0) {
      if (strcmp(val, "open") == 0) r->open = true;
      else if (strcmp(val, "clean") == 0) r->open = false;
      else { *why = "state is neither open nor clean"; return -1; }
      seen |= 128;
    }
    /* Unknown keys: ignored (a later version may add some). */
  }
  if (seen != 255) { *why = "a required line is missing"; return -1; }
  return 0;
}

/* Reads the sidecar: 0 (record in *r), 1 (no sidecar), -1 (cannot be
 * used; logged). */
static int read_record(const char *sidecar, struct record *r)
{
  char buf[RECORD_MAX + 1];
  const char *why;
  int fd = open(sidecar, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
  ssize_t n;
  if (fd < 0) {
    if (errno == ENOENT) return 1;
    log_warn("image identity: cannot open %s: %s", sidecar, strerror(errno));
    return -1;
  }
  n = read(fd, buf, RECORD_MAX + 1);
  if (n < 0) {
    log_warn("image identity: cannot read %s: %s", sidecar, strerror(errno));
    close(fd);
    return -1;
  }
  close(fd);
  if (n > RECORD_MAX) {
    log_warn("image identity: %s is larger than %d bytes: not an xnbd-server "
             "identity record", sidecar, RECORD_MAX);
    return -1;
  }
  buf[n] = '\0';
  if (strlen(buf) != (size_t) n) why = "it contains a NUL byte";
  if (strlen(buf) != (size_t) n || parse_record(buf, r, &why) < 0) {
    log_warn("image identity: %s is damaged (%s): the image gets a new "
             "identity (delete the file to silence this)", sidecar, why);
    return 2;
  }
  return 0;
}

static int fsync_dir_of(const char *path)
{
  CLEANUP_FREE char *copy = strdup(path);
  int fd, rc;
  if (!copy) return -1;
  fd = open(dirname(copy), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return -1;
  rc = fsync(fd);
  close(fd);
  return rc;
}

/* Writes the record: to a temporary file, synced, then renamed over the
 * sidecar (create: linked, so a sidecar made meanwhile by another server
 * is not replaced).  Returns 0, 1 (create lost a race: re-read), or -1
 * with errno. */
static int write_record(const char *sidecar, const struct record *r, bool create)
{
  char text[RECORD_MAX], tmp[PATH_MAX];
  int len = snprintf(text, sizeof text,
    "# xnbd-server image identity, see xnbd-server(8).  Delete this file to\n"
    "# give the image a new identity; never copy it along with the image.\n"
    "version=1\nid=%s\ngen=%" PRIu64 "\nino=%" PRIu64 "\nsize=%" PRIu64 "\n"
    "mtime_ns=%" PRId64 "\nctime_ns=%" PRId64 "\nstate=%s\n",
    r->hex, r->gen, r->ino, r->size, r->mtime_ns, r->ctime_ns,
    r->open ? "open" : "clean");
  int fd, e, rc = 0;
  if (snprintf(tmp, sizeof tmp, "%s.tmp.%ld", sidecar, (long) getpid()) >= (int) sizeof tmp) {
    errno = ENAMETOOLONG;
    return -1;
  }
  fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0644);
  if (fd < 0) return -1;
  if (write_all(fd, text, len) < 0 || fsync(fd) < 0) {
    e = errno;
    close(fd);
    unlink(tmp);
    errno = e;
    return -1;
  }
  close(fd);
  if (create) {
    if (link(tmp, sidecar) < 0) rc = errno == EEXIST ? 1 : -1;
  } else if (rename(tmp, sidecar) < 0) {
    rc = -1;
  }
  e = errno;
  unlink(tmp);              /* after link; a no-op after rename */
  if (rc == 0 && fsync_dir_of(sidecar) < 0)
    log_warn("image identity: syncing the directory of %s: %s", sidecar, strerror(errno));
  errno = e;
  return rc;
}

static void describe(struct image_id *id)
{
  snprintf(id->desc, sizeof id->desc, IMAGE_ID_KEY "%s gen=%" PRIu64 "%s",
           id->r.hex, id->r.gen, id->derived ? " id-from=stat" : "");
}

static void derive(struct image_id *id, const struct stat *st)
{
  unsigned char md[SHA256_DIGEST_LENGTH];
  char in[160];
  int n = snprintf(in, sizeof in, "xnbd derived image id dev=%" PRIu64 " ino=%" PRIu64
                   " size=%" PRIu64 " mtime=%" PRId64 " ctime=%" PRId64,
                   (uint64_t) st->st_dev, (uint64_t) st->st_ino,
                   (uint64_t) st->st_size, ts_ns(st->st_mtim), ts_ns(st->st_ctim));
  SHA256((const unsigned char *) in, n, md);
  to_hex(md, 16, id->r.hex);
  id->r.gen = 0;
  id->derived = true;
  free(id->sidecar);
  id->sidecar = NULL;
  describe(id);
}

static int new_hex(char *hex)
{
  unsigned char b[16];
  size_t got = 0;
  while (got < sizeof b) {
    ssize_t n = getrandom(b + got, sizeof b - got, 0);
    if (n < 0) {
      if (errno == EINTR) continue;
      return -1;
    }
    got += n;
  }
  to_hex(b, sizeof b, hex);
  return 0;
}

struct image_id *image_id_open(const char *path, int fd, enum image_id_mode mode)
{
  struct image_id *id;
  struct record now = { 0 }, old;
  struct stat st;
  char *real;
  int rc;

  if (fstat(fd, &st) < 0) {
    log_warn("image identity: cannot stat %s: %s; no identity is published "
             "(xnbd-proxy will compare sampled blocks instead)", path, strerror(errno));
    return NULL;
  }
  if (!S_ISREG(st.st_mode)) {
    log_info("image identity: %s is not a regular file: no identity is "
             "published (xnbd-proxy will compare sampled blocks instead)", path);
    return NULL;
  }
  id = calloc(1, sizeof *id);
  if (!id) return NULL;
  stamp_from(&now, &st);
  if (mode == IMAGE_ID_STAT) {
    derive(id, &st);
    log_info("image identity of %s: %s (--image-id=stat: derived from the "
             "file's device, inode, size and times; any change to the image "
             "changes it)", path, id->desc);
    return id;
  }
  real = realpath(path, NULL);
  if (!real || asprintf(&id->sidecar, "%s" IMAGE_ID_SUFFIX, real) < 0) {
    log_warn("image identity: cannot resolve the path of %s: %s", path, strerror(errno));
    id->sidecar = NULL;
    free(real);
    goto fallback;
  }
  free(real);

  for (int attempt = 0; attempt < 3; attempt++) {
    rc = read_record(id->sidecar, &old);
    if (rc < 0) goto fallback;
    if (rc == 0 && old.ino != now.ino) {
      log_warn("image identity: %s was recorded for inode %" PRIu64 " but the "
               "image is inode %" PRIu64 " (replaced, restored or copied): it "
               "gets a new identity", id->sidecar, old.ino, now.ino);
      rc = 2;
    }
    if (rc == 0) {
      id->r = now;
      memcpy(id->r.hex, old.hex, sizeof old.hex);
      id->r.gen = old.gen;
      if (!same_stamp(&old, &now)) {
        char what[64] = "";
        if (old.size != now.size) strcat(what, ", size");
        if (old.mtime_ns != now.mtime_ns) strcat(what, ", mtime");
        if (old.ctime_ns != now.ctime_ns) strcat(what, ", ctime");
        id->r.gen = old.gen + 1;
        log_warn("image identity: %s changed since it was last recorded (%s "
                 "differ%s): generation %" PRIu64 " -> %" PRIu64 "; a proxy "
                 "holding a cache of the old content will refuse it", path,
                 what + 2, old.open ? "; the last server did not stop cleanly, "
                 "so its own writes may be the change" : "", old.gen, id->r.gen);
      }
      id->r.open = true;
      if (write_record(id->sidecar, &id->r, false) < 0) {
        if (id->r.gen != old.gen) {
          /* Publishing gen + 1 unrecorded could repeat it after a second
           * edit; fall back instead. */
          log_warn("image identity: cannot record the new generation in %s: %s",
                   id->sidecar, strerror(errno));
          goto fallback;
        }
        log_info("image identity: cannot mark %s as in use (%s); the id is "
                 "still valid", id->sidecar, strerror(errno));
      }
      break;
    }
    /* No (usable) record: a new identity. */
    id->r = now;
    id->r.gen = 0;
    id->r.open = true;
    if (new_hex(id->r.hex) < 0) {
      log_warn("image identity: no random numbers: %s", strerror(errno));
      goto fallback;
    }
    rc = write_record(id->sidecar, &id->r, rc == 1);
    if (rc == 1) continue;           /* another server made one meanwhile */
    if (rc < 0) {
      log_warn("image identity: cannot create %s: %s", id->sidecar, strerror(errno));
      goto fallback;
    }
    log_info("image identity: %s gets the new identity %s (kept in %s)",
             path, id->r.hex, id->sidecar);
    break;
  }
  if (!id->r.hex[0]) goto fallback;   /* three lost races: give up */
  describe(id);
  log_info("image identity of %s: %s", path, id->desc);
  return id;

fallback:
  derive(id, &st);
  log_warn("image identity of %s: %s, derived from the file's device, inode, "
           "size and times because no identity record can be kept next to it "
           "(read-only directory?): any change to the image, even a write "
           "through this server, changes it", path, id->desc);
  return id;
}

const char *image_id_description(const struct image_id *id) { return id->desc; }
const char *image_id_hex(const struct image_id *id) { return id->r.hex; }
uint64_t image_id_gen(const struct image_id *id) { return id->r.gen; }
bool image_id_derived(const struct image_id *id) { return id->derived; }

/* Waits (bounded) until a write now would get a timestamp newer than
 * ctime: the coarse clock has passed it (a second on filesystems whose
 * times have no sub-second part). */
static void wait_clock_past(const struct record *r)
{
  bool seconds = r->mtime_ns % 1000000000 == 0 && r->ctime_ns % 1000000000 == 0;
  int64_t limit = seconds ? (r->ctime_ns / 1000000000 + 1) * 1000000000 : r->ctime_ns + 1;
  for (int i = 0; i < 1100; i++) {
    struct timespec t, ms = { 0, 1000000 };
    clock_gettime(CLOCK_REALTIME_COARSE, &t);
    if (ts_ns(t) >= limit) return;
    nanosleep(&ms, NULL);
  }
}

void image_id_close(struct image_id *id, int fd)
{
  struct stat st;
  if (!id) return;
  if (fd >= 0 && !id->derived && id->sidecar) {
    if (fstat(fd, &st) < 0) {
      log_warn("image identity: cannot stat the image at stop (%s): the next "
               "start will count it as changed", strerror(errno));
    } else {
      stamp_from(&id->r, &st);
      id->r.open = false;
      wait_clock_past(&id->r);
      if (write_record(id->sidecar, &id->r, false) < 0)
        log_warn("image identity: cannot record the clean stop in %s: %s; the "
                 "next start will count the image as changed if this server "
                 "wrote to it", id->sidecar, strerror(errno));
    }
  }
  free(id->sidecar);
  free(id);
}
