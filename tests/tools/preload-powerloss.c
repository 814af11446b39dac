/* preload-powerloss.c: an LD_PRELOAD shim that journals every change a
 * process makes to chosen files, so that a test can rebuild those files "as
 * after a power cut": what a completed fsync/fdatasync covered is there, the
 * rest may or may not be (tests/tools/powerloss-replay does the rebuilding;
 * tests/test-proxy-powerloss-i2.sh is the test).  Built as
 * build/tests/preload-powerloss.so, without sanitizers.
 *
 * Environment:
 *   XNBD_PL_FILES=PATH[:PATH...]  the files to watch (at most 8).  A file is
 *       matched by device and inode: an fd is watched when, right after it
 *       was opened, it refers to the file one of these paths names.
 *   XNBD_PL_JOURNAL=PATH          the journal, created (truncated) at start.
 *   XNBD_PL_CRASH=FIFO            optional: a thread reads this FIFO; when a
 *       byte arrives it takes the journal lock (so no watched change is half
 *       done: every change made is journalled, and nothing else changes),
 *       appends an END record and kills the process with SIGKILL.  The files
 *       the kernel holds then are exactly "every journalled change applied",
 *       which the test checks, so a change the shim missed (an unwrapped
 *       syscall, io_uring, a writable shared mapping) is found.
 *   XNBD_PL_CRASH_AFTER=I:K       optional: the thread whose sync makes the
 *       K-th completed sync of watched file number I (0 = the first in
 *       XNBD_PL_FILES) crashes the process the same way, right after
 *       journalling that sync: the instant a sync just made something
 *       durable (e.g. bitmap bits) is when a missing earlier sync shows.
 *   Without XNBD_PL_FILES and XNBD_PL_JOURNAL the shim does nothing.  The
 *   shim acts in the FIRST process that loads it: it removes these variables
 *   from the environment, so that programs it starts do not truncate the
 *   journal.  Start the program itself under the shim (env VAR=... PROGRAM),
 *   not a wrapper script (the shell would be that process).
 *
 * What is wrapped (glibc entry points; each 64 variant too):
 *   open, openat, creat, __open_2, __openat_2  -- watch the fd; CREATE when
 *       O_CREAT made the file, TRUNC 0 for O_TRUNC; an fd of a watched file's
 *       directory is remembered (its fsync makes the file's name durable).
 *   dup, dup2, dup3, fcntl(F_DUPFD[_CLOEXEC]), close, close_range
 *   write, writev, pwrite, pwritev, pwritev2  -- WRITE with the bytes written
 *       (O_SYNC/O_DSYNC fds and RWF_SYNC/RWF_DSYNC writes are durable WRITEs).
 *   fallocate, posix_fallocate  -- PUNCH_HOLE and ZERO_RANGE are ZERO
 *       records; plain allocation and any mode without KEEP_SIZE record the
 *       new size; COLLAPSE/INSERT_RANGE are UNSUPPORTED.
 *   ftruncate, truncate  -- TRUNC.
 *   copy_file_range into a watched fd -- the bytes copied are read back from
 *       the file and journalled as a WRITE.
 *   fsync, fdatasync  -- SYNC of the file (or, on a directory fd, DIRSYNC of
 *       the watched files in it), written when the call RETURNS 0, covering
 *       every record journalled before the call STARTED (a change made while
 *       a sync runs may or may not be covered; the replay treats it as not).
 *   syncfs, sync  -- SYNC and DIRSYNC of every watched file.
 *   sync_file_range -- a NOTE only: it flushes neither metadata nor the
 *       disk's cache, so it makes nothing durable across a power cut.
 *   mmap (MAP_SHARED with PROT_WRITE), sendfile, splice into a watched fd,
 *       rename/unlink/link of a watched path -- UNSUPPORTED: the replay
 *       refuses a journal holding one.
 * Not wrapped: raw syscall(), io_uring, libaio; fopen (glibc opens
 * internally) -- the END-time check above is what catches those.
 *
 * Journal format (host byte order; every record is one write() under one
 * mutex, fd opened with O_APPEND, never fsync'd: the test kills the process,
 * not the machine; a record cut short by the kill is ignored by the replay):
 *   struct pl_rec (32 bytes) followed by `len` payload bytes.
 *   type 'F' file declaration: file = index, payload = the path.
 *   'C' CREATE (O_CREAT made it; size 0)   'T' TRUNC to a = size
 *   'W' WRITE at a, payload   'w' the same, durable when it returned
 *   'Z' ZERO a..a+b (size unchanged)   'X' extend size to a (zeros)
 *   'S' SYNC: mask = files, a = first seq NOT covered
 *   'D' DIRSYNC: mask = files whose names are durable, a as for 'S'
 *   'N' NOTE (text)   'U' UNSUPPORTED (text)   'E' END (crash point)
 * seq numbers every record, from 0, in journal order, which is also the
 * order the changes happened in (each change and its record are made under
 * the lock). */
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/sendfile.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#define MAX_FILES 8
#define MAX_FD    65536
#define ALL_FILES ((1u << nfiles) - 1)

struct pl_rec {
  char magic[2];               /* "PL" */
  uint8_t type;
  uint8_t file;
  uint32_t mask;
  uint64_t seq;
  uint64_t a;
  uint64_t len;                /* payload bytes (for 'Z': the range length) */
};

static pthread_once_t once = PTHREAD_ONCE_INIT;
static pthread_mutex_t jlock = PTHREAD_MUTEX_INITIALIZER;
static bool active;
static int jfd = -1;
static uint64_t next_seq;
static unsigned nfiles;
static char *paths[MAX_FILES];
static char *dirs[MAX_FILES];
/* Per fd: 1 + file index, or 0.  dirmask: the watched files in the
 * directory the fd refers to.  syncfd: opened with O_SYNC / O_DSYNC. */
static uint8_t fdfile[MAX_FD];
static uint8_t fdsync[MAX_FD];
static uint32_t fddir[MAX_FD];
/* The inode a watched fd had when tracked: an fd closed behind the shim's
 * back (fclose, a raw syscall) and reused by a socket must not be taken
 * for the file. */
static dev_t fddev[MAX_FD];
static ino_t fdino[MAX_FD];
/* XNBD_PL_CRASH_AFTER: crash after crash_after completed syncs of file
 * crash_file (0: never). */
static unsigned crash_file;
static uint64_t crash_after, syncs_seen;

/* ---- the real functions ---- */

#define REAL(ret, name, ...)                                            \
  static ret (*real_##name)(__VA_ARGS__);                               \
  static ret (*get_##name(void))(__VA_ARGS__)                           \
  {                                                                     \
    if (!real_##name) real_##name = dlsym(RTLD_NEXT, #name);            \
    return real_##name;                                                 \
  }
REAL(int, open, const char *, int, ...)
REAL(int, open64, const char *, int, ...)
REAL(int, openat, int, const char *, int, ...)
REAL(int, openat64, int, const char *, int, ...)
REAL(int, __open_2, const char *, int)
REAL(int, __open64_2, const char *, int)
REAL(int, __openat_2, int, const char *, int)
REAL(int, __openat64_2, int, const char *, int)
REAL(int, creat, const char *, mode_t)
REAL(int, creat64, const char *, mode_t)
REAL(int, dup, int)
REAL(int, dup2, int, int)
REAL(int, dup3, int, int, int)
REAL(int, fcntl, int, int, ...)
REAL(int, fcntl64, int, int, ...)
REAL(int, close, int)
REAL(int, close_range, unsigned, unsigned, int)
REAL(ssize_t, write, int, const void *, size_t)
REAL(ssize_t, writev, int, const struct iovec *, int)
REAL(ssize_t, pwrite, int, const void *, size_t, off_t)
REAL(ssize_t, pwrite64, int, const void *, size_t, off_t)
REAL(ssize_t, pwritev, int, const struct iovec *, int, off_t)
REAL(ssize_t, pwritev64, int, const struct iovec *, int, off_t)
REAL(ssize_t, pwritev2, int, const struct iovec *, int, off_t, int)
REAL(ssize_t, pwritev64v2, int, const struct iovec *, int, off_t, int)
REAL(int, fallocate, int, int, off_t, off_t)
REAL(int, fallocate64, int, int, off_t, off_t)
REAL(int, posix_fallocate, int, off_t, off_t)
REAL(int, posix_fallocate64, int, off_t, off_t)
REAL(int, ftruncate, int, off_t)
REAL(int, ftruncate64, int, off_t)
REAL(int, truncate, const char *, off_t)
REAL(int, truncate64, const char *, off_t)
REAL(ssize_t, copy_file_range, int, off_t *, int, off_t *, size_t, unsigned)
REAL(int, fsync, int)
REAL(int, fdatasync, int)
REAL(int, syncfs, int)
REAL(void, sync, void)
REAL(int, sync_file_range, int, off_t, off_t, unsigned)
REAL(void *, mmap, void *, size_t, int, int, int, off_t)
REAL(void *, mmap64, void *, size_t, int, int, int, off_t)
REAL(ssize_t, sendfile, int, int, off_t *, size_t)
REAL(ssize_t, sendfile64, int, int, off_t *, size_t)
REAL(ssize_t, splice, int, off_t *, int, off_t *, size_t, unsigned)
REAL(int, rename, const char *, const char *)
REAL(int, renameat, int, const char *, int, const char *)
REAL(int, renameat2, int, const char *, int, const char *, unsigned)
REAL(int, unlink, const char *)
REAL(int, unlinkat, int, const char *, int)
REAL(int, link, const char *, const char *)
REAL(int, linkat, int, const char *, int, const char *, int)

/* ---- journal ---- */

static void die(const char *what)
{
  char msg[512];
  int n = snprintf(msg, sizeof msg, "preload-powerloss: %s: %s (pid %d)\n",
                   what, strerror(errno), (int) getpid());
  if (n > 0) syscall(SYS_write, 2, msg, (size_t) n);
  abort();
}

static void raw_write_all(const void *buf, size_t len)
{
  const char *p = buf;
  while (len) {
    long n = syscall(SYS_write, jfd, p, len);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) die("writing the journal");
    p += n;
    len -= (size_t) n;
  }
}

/* Appends one record; jlock held.  The payload is an iovec list. */
static void jrec_iov(uint8_t type, int file, uint32_t mask, uint64_t a,
                     uint64_t len, const struct iovec *iov, int iovcnt)
{
  struct pl_rec r = { { 'P', 'L' }, type, (uint8_t) (file < 0 ? 0xff : file),
                      mask, next_seq++, a, len };
  /* Header and payload in one buffer when small, so one write() keeps a
   * record whole unless the kill lands in it. */
  char small[4096];
  uint64_t plen = 0;
  for (int i = 0; i < iovcnt; i++) plen += iov[i].iov_len;
  if (type == 'Z') plen = 0;
  if (sizeof r + plen <= sizeof small) {
    memcpy(small, &r, sizeof r);
    size_t o = sizeof r;
    for (int i = 0; i < iovcnt && plen; i++) {
      memcpy(small + o, iov[i].iov_base, iov[i].iov_len);
      o += iov[i].iov_len;
    }
    raw_write_all(small, o);
    return;
  }
  raw_write_all(&r, sizeof r);
  for (int i = 0; i < iovcnt; i++) raw_write_all(iov[i].iov_base, iov[i].iov_len);
}

static void jrec(uint8_t type, int file, uint32_t mask, uint64_t a, uint64_t len,
                 const void *payload)
{
  struct iovec v = { (void *) payload, payload ? len : 0 };
  jrec_iov(type, file, mask, a, len, &v, payload ? 1 : 0);
}

static void jtext(uint8_t type, int file, const char *fmt, ...)
  __attribute__((format(printf, 3, 4)));
static void jtext(uint8_t type, int file, const char *fmt, ...)
{
  char t[512];
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(t, sizeof t, fmt, ap);
  va_end(ap);
  if (n < 0) n = 0;
  if ((size_t) n >= sizeof t) n = sizeof t - 1;
  jrec(type, file, 0, 0, (uint64_t) n, t);
}

/* ---- which fds are watched ---- */

/* jlock held: the END record, then SIGKILL; nothing else changes. */
static void crash_now(void)
{
  jrec('E', -1, 0, 0, 0, NULL);
  syscall(SYS_kill, getpid(), SIGKILL);
  for (;;) pause();
}

static void *crash_thread(void *arg)
{
  const char *fifo = arg;
  char c;
  int fd = (int) syscall(SYS_openat, AT_FDCWD, fifo, O_RDONLY | O_CLOEXEC);
  if (fd < 0) die("opening XNBD_PL_CRASH");
  for (;;) {
    long n = syscall(SYS_read, fd, &c, 1);
    if (n == 1) break;
    if (n < 0 && errno == EINTR) continue;
    if (n == 0) {     /* a writer opened and closed without a byte: wait again */
      syscall(SYS_close, fd);
      fd = (int) syscall(SYS_openat, AT_FDCWD, fifo, O_RDONLY | O_CLOEXEC);
      if (fd < 0) die("reopening XNBD_PL_CRASH");
      continue;
    }
    die("reading XNBD_PL_CRASH");
  }
  pthread_mutex_lock(&jlock);
  crash_now();
  return NULL;
}

static void init(void)
{
  const char *files = getenv("XNBD_PL_FILES");
  const char *journal = getenv("XNBD_PL_JOURNAL");
  const char *fifo = getenv("XNBD_PL_CRASH");
  if (!files || !*files || !journal || !*journal) return;
  /* Children (if any) must not truncate the journal or steal the FIFO. */
  char *fifo_copy = fifo && *fifo ? strdup(fifo) : NULL;
  const char *after = getenv("XNBD_PL_CRASH_AFTER");
  if (after && *after) {
    unsigned long long k;
    char junk;
    if (sscanf(after, "%u:%llu%c", &crash_file, &k, &junk) != 2 || k == 0) {
      errno = EINVAL;
      die("XNBD_PL_CRASH_AFTER must be FILE-INDEX:COUNT, COUNT > 0");
    }
    crash_after = k;
  }
  char *list = strdup(files);
  if (!list) die("strdup");
  for (char *save = NULL, *p = strtok_r(list, ":", &save); p;
       p = strtok_r(NULL, ":", &save)) {
    if (nfiles == MAX_FILES) { errno = E2BIG; die("XNBD_PL_FILES names more than 8 files"); }
    char *d = strdup(p);
    if (!d || !(paths[nfiles] = strdup(p)) || !(dirs[nfiles] = strdup(dirname(d))))
      die("strdup");
    free(d);
    nfiles++;
  }
  jfd = (int) syscall(SYS_openat, AT_FDCWD, journal,
                      O_WRONLY | O_CREAT | O_TRUNC | O_APPEND | O_CLOEXEC, 0644);
  if (jfd < 0) die("creating XNBD_PL_JOURNAL");
  if (jfd < MAX_FD) fdfile[jfd] = 0;
  for (unsigned i = 0; i < nfiles; i++)
    jrec('F', (int) i, 0, 0, strlen(paths[i]), paths[i]);
  active = true;
  unsetenv("XNBD_PL_FILES");
  unsetenv("XNBD_PL_JOURNAL");
  unsetenv("XNBD_PL_CRASH");
  unsetenv("XNBD_PL_CRASH_AFTER");
  if (crash_after && crash_file >= nfiles) {
    errno = EINVAL;
    die("XNBD_PL_CRASH_AFTER names a file index beyond XNBD_PL_FILES");
  }
  if (fifo_copy) {
    pthread_t t;
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);   /* signals are the process's */
    if ((errno = pthread_create(&t, NULL, crash_thread, fifo_copy)))
      die("starting the crash thread");
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    pthread_detach(t);
  }
}

__attribute__((constructor)) static void pl_ctor(void) { pthread_once(&once, init); }

static bool on(void)
{
  pthread_once(&once, init);
  return active;
}

/* The watched file FD refers to (index), or -1. */
static int fd_file(int fd)
{
  struct stat st;
  if (fd < 0 || fd >= MAX_FD || !on() || !fdfile[fd]) return -1;
  if (fstat(fd, &st) < 0 || st.st_dev != fddev[fd] || st.st_ino != fdino[fd])
    return -1;
  return (int) fdfile[fd] - 1;
}

static int path_file(const char *path)
{
  struct stat a, b;
  if (!on() || stat(path, &a) < 0) return -1;
  for (unsigned i = 0; i < nfiles; i++)
    if (stat(paths[i], &b) == 0 && a.st_dev == b.st_dev && a.st_ino == b.st_ino)
      return (int) i;
  return -1;
}

/* After an open that returned FD; jlock held.  existed: the path existed
 * before the call. */
static void track_open(int fd, int flags, bool existed)
{
  struct stat st, b;
  if (fd < 0) return;
  if (fd >= MAX_FD) { errno = EMFILE; die("fd above the shim's table"); }
  fdfile[fd] = 0;
  fdsync[fd] = 0;
  fddir[fd] = 0;
  if (fstat(fd, &st) < 0) return;
  for (unsigned i = 0; i < nfiles; i++) {
    if (S_ISDIR(st.st_mode)) {
      if (stat(dirs[i], &b) == 0 && st.st_dev == b.st_dev && st.st_ino == b.st_ino)
        fddir[fd] |= 1u << i;
    } else if (stat(paths[i], &b) == 0 && st.st_dev == b.st_dev && st.st_ino == b.st_ino) {
      fdfile[fd] = (uint8_t) (i + 1);
      fddev[fd] = st.st_dev;
      fdino[fd] = st.st_ino;
      fdsync[fd] = (flags & (O_SYNC | O_DSYNC)) != 0;
      if ((flags & O_CREAT) && !existed)
        jrec('C', (int) i, 0, 0, 0, NULL);
      else if ((flags & O_TRUNC) && (flags & O_ACCMODE) != O_RDONLY)
        jrec('T', (int) i, 0, 0, 0, NULL);
      break;
    }
  }
}

static void track_dup(int from, int to)
{
  if (to < 0 || from < 0 || from >= MAX_FD) return;
  if (to >= MAX_FD) { errno = EMFILE; die("fd above the shim's table"); }
  fdfile[to] = fdfile[from];
  fddev[to] = fddev[from];
  fdino[to] = fdino[from];
  fdsync[to] = fdsync[from];  /* O_SYNC belongs to the open file description */
  fddir[to] = fddir[from];
}

static void untrack(int fd)
{
  if (fd < 0 || fd >= MAX_FD) return;
  fdfile[fd] = 0;
  fdsync[fd] = 0;
  fddir[fd] = 0;
}

/* ---- open ---- */

static bool creates(int flags) { return (flags & O_CREAT) || (flags & O_TMPFILE) == O_TMPFILE; }

#define OPEN_BODY(call, dirfd, path)                                        \
  if (!on()) return call;                                               \
  struct stat pre_;                                                     \
  pthread_mutex_lock(&jlock);                                           \
  bool existed_ = fstatat(dirfd, path, &pre_, 0) == 0;                  \
  int fd_ = call;                                                       \
  int e_ = errno;                                                       \
  if (fd_ >= 0) track_open(fd_, flags, existed_);                       \
  pthread_mutex_unlock(&jlock);                                         \
  errno = e_;                                                           \
  return fd_;

static mode_t open_mode(int flags, va_list ap)
{
  return creates(flags) ? (mode_t) va_arg(ap, int) : 0;
}

int open(const char *path, int flags, ...)
{
  va_list ap; va_start(ap, flags); mode_t m = open_mode(flags, ap); va_end(ap);
  OPEN_BODY(get_open()(path, flags, m), AT_FDCWD, path)
}
int open64(const char *path, int flags, ...)
{
  va_list ap; va_start(ap, flags); mode_t m = open_mode(flags, ap); va_end(ap);
  OPEN_BODY(get_open64()(path, flags, m), AT_FDCWD, path)
}
int openat(int dfd, const char *path, int flags, ...)
{
  va_list ap; va_start(ap, flags); mode_t m = open_mode(flags, ap); va_end(ap);
  OPEN_BODY(get_openat()(dfd, path, flags, m), dfd, path)
}
int openat64(int dfd, const char *path, int flags, ...)
{
  va_list ap; va_start(ap, flags); mode_t m = open_mode(flags, ap); va_end(ap);
  OPEN_BODY(get_openat64()(dfd, path, flags, m), dfd, path)
}
int __open_2(const char *path, int flags) { OPEN_BODY(get___open_2()(path, flags), AT_FDCWD, path) }
int __open64_2(const char *path, int flags) { OPEN_BODY(get___open64_2()(path, flags), AT_FDCWD, path) }
int __openat_2(int dfd, const char *path, int flags) { OPEN_BODY(get___openat_2()(dfd, path, flags), dfd, path) }
int __openat64_2(int dfd, const char *path, int flags) { OPEN_BODY(get___openat64_2()(dfd, path, flags), dfd, path) }
int creat(const char *path, mode_t m)
{
  int flags = O_CREAT | O_WRONLY | O_TRUNC;
  OPEN_BODY(get_creat()(path, m), AT_FDCWD, path)
}
int creat64(const char *path, mode_t m)
{
  int flags = O_CREAT | O_WRONLY | O_TRUNC;
  OPEN_BODY(get_creat64()(path, m), AT_FDCWD, path)
}

/* ---- dup / close ---- */

#define DUP_BODY(call, from)                                              \
  if (!on()) return call;                                               \
  pthread_mutex_lock(&jlock);                                           \
  int r_ = call;                                                        \
  int e_ = errno;                                                       \
  if (r_ >= 0) track_dup(from, r_);                                     \
  pthread_mutex_unlock(&jlock);                                         \
  errno = e_;                                                           \
  return r_;

int dup(int fd) { DUP_BODY(get_dup()(fd), fd) }
int dup2(int fd, int to) { DUP_BODY(get_dup2()(fd, to), fd) }
int dup3(int fd, int to, int fl) { DUP_BODY(get_dup3()(fd, to, fl), fd) }

static int fcntl_common(int (*real)(int, int, ...), int fd, int cmd, void *arg)
{
  if (cmd != F_DUPFD && cmd != F_DUPFD_CLOEXEC) return real(fd, cmd, arg);
  DUP_BODY(real(fd, cmd, arg), fd)
}
int fcntl(int fd, int cmd, ...)
{
  va_list ap; va_start(ap, cmd); void *arg = va_arg(ap, void *); va_end(ap);
  return fcntl_common(get_fcntl(), fd, cmd, arg);
}
int fcntl64(int fd, int cmd, ...)
{
  va_list ap; va_start(ap, cmd); void *arg = va_arg(ap, void *); va_end(ap);
  return fcntl_common(get_fcntl64() ? get_fcntl64() : get_fcntl(), fd, cmd, arg);
}

int close(int fd)
{
  if (!on() || fd < 0 || fd >= MAX_FD || (!fdfile[fd] && !fddir[fd]))
    return get_close()(fd);
  pthread_mutex_lock(&jlock);
  untrack(fd);
  int r = get_close()(fd);
  int e = errno;
  pthread_mutex_unlock(&jlock);
  errno = e;
  return r;
}

int close_range(unsigned first, unsigned last, int flags)
{
  if (!on()) return get_close_range()(first, last, flags);
  pthread_mutex_lock(&jlock);
  int r = get_close_range()(first, last, flags);
  int e = errno;
  if (r == 0 && !(flags & CLOSE_RANGE_CLOEXEC))
    for (unsigned fd = first; fd <= last && fd < MAX_FD; fd++) untrack((int) fd);
  pthread_mutex_unlock(&jlock);
  errno = e;
  return r;
}

/* ---- writes ---- */

/* Journals N bytes written at OFF (from the iovecs) to file F; jlock held. */
static void note_write(int fd, int f, uint64_t off, const struct iovec *iov,
                       int iovcnt, ssize_t n, bool durable)
{
  struct iovec v[64];
  int k = 0;
  size_t left = (size_t) n;
  if (n <= 0) return;
  for (int i = 0; i < iovcnt && left; i++) {
    size_t l = iov[i].iov_len < left ? iov[i].iov_len : left;
    if (!l) continue;
    if (k == 64) {          /* flush what we have as one record, go on */
      size_t done = 0;
      for (int j = 0; j < k; j++) done += v[j].iov_len;
      jrec_iov(durable ? 'w' : 'W', f, 0, off, done, v, k);
      off += done;
      k = 0;
    }
    v[k++] = (struct iovec) { iov[i].iov_base, l };
    left -= l;
  }
  size_t rest = 0;
  for (int j = 0; j < k; j++) rest += v[j].iov_len;
  if (rest) jrec_iov(durable || fdsync[fd] ? 'w' : 'W', f, 0, off, rest, v, k);
}

/* pos < 0: the write used (and moved) the file position. */
static ssize_t do_write(int fd, int f, const struct iovec *iov, int iovcnt,
                        off_t pos, bool durable, ssize_t (*call)(void *), void *ctx)
{
  pthread_mutex_lock(&jlock);
  ssize_t n = call(ctx);
  int e = errno;
  if (n > 0) {
    uint64_t off;
    if (pos >= 0)
      off = (uint64_t) pos;
    else {
      off_t end = lseek(fd, 0, SEEK_CUR);
      if (end < 0) die("lseek on a watched fd");
      off = (uint64_t) end - (uint64_t) n;
    }
    note_write(fd, f, off, iov, iovcnt, n, durable || fdsync[fd]);
  }
  pthread_mutex_unlock(&jlock);
  errno = e;
  return n;
}

struct wctx { int fd; const void *buf; size_t len; const struct iovec *iov; int cnt; off_t off; int flags; };

static ssize_t c_write(void *p) { struct wctx *c = p; return get_write()(c->fd, c->buf, c->len); }
static ssize_t c_writev(void *p) { struct wctx *c = p; return get_writev()(c->fd, c->iov, c->cnt); }
static ssize_t c_pwrite(void *p) { struct wctx *c = p; return get_pwrite()(c->fd, c->buf, c->len, c->off); }
static ssize_t c_pwrite64(void *p) { struct wctx *c = p; return get_pwrite64()(c->fd, c->buf, c->len, c->off); }
static ssize_t c_pwritev(void *p) { struct wctx *c = p; return get_pwritev()(c->fd, c->iov, c->cnt, c->off); }
static ssize_t c_pwritev64(void *p) { struct wctx *c = p; return get_pwritev64()(c->fd, c->iov, c->cnt, c->off); }
static ssize_t c_pwritev2(void *p) { struct wctx *c = p; return get_pwritev2()(c->fd, c->iov, c->cnt, c->off, c->flags); }
static ssize_t c_pwritev64v2(void *p) { struct wctx *c = p; return get_pwritev64v2()(c->fd, c->iov, c->cnt, c->off, c->flags); }

ssize_t write(int fd, const void *buf, size_t len)
{
  int f = fd_file(fd);
  if (f < 0) return get_write()(fd, buf, len);
  struct wctx c = { .fd = fd, .buf = buf, .len = len };
  struct iovec v = { (void *) buf, len };
  return do_write(fd, f, &v, 1, -1, false, c_write, &c);
}
ssize_t writev(int fd, const struct iovec *iov, int cnt)
{
  int f = fd_file(fd);
  if (f < 0) return get_writev()(fd, iov, cnt);
  struct wctx c = { .fd = fd, .iov = iov, .cnt = cnt };
  return do_write(fd, f, iov, cnt, -1, false, c_writev, &c);
}
ssize_t pwrite(int fd, const void *buf, size_t len, off_t off)
{
  int f = fd_file(fd);
  if (f < 0) return get_pwrite()(fd, buf, len, off);
  struct wctx c = { .fd = fd, .buf = buf, .len = len, .off = off };
  struct iovec v = { (void *) buf, len };
  return do_write(fd, f, &v, 1, off, false, c_pwrite, &c);
}
ssize_t pwrite64(int fd, const void *buf, size_t len, off_t off)
{
  int f = fd_file(fd);
  if (f < 0) return get_pwrite64()(fd, buf, len, off);
  struct wctx c = { .fd = fd, .buf = buf, .len = len, .off = off };
  struct iovec v = { (void *) buf, len };
  return do_write(fd, f, &v, 1, off, false, c_pwrite64, &c);
}
ssize_t pwritev(int fd, const struct iovec *iov, int cnt, off_t off)
{
  int f = fd_file(fd);
  if (f < 0) return get_pwritev()(fd, iov, cnt, off);
  struct wctx c = { .fd = fd, .iov = iov, .cnt = cnt, .off = off };
  return do_write(fd, f, iov, cnt, off, false, c_pwritev, &c);
}
ssize_t pwritev64(int fd, const struct iovec *iov, int cnt, off_t off)
{
  int f = fd_file(fd);
  if (f < 0) return get_pwritev64()(fd, iov, cnt, off);
  struct wctx c = { .fd = fd, .iov = iov, .cnt = cnt, .off = off };
  return do_write(fd, f, iov, cnt, off, false, c_pwritev64, &c);
}
ssize_t pwritev2(int fd, const struct iovec *iov, int cnt, off_t off, int flags)
{
  int f = fd_file(fd);
  if (f < 0) return get_pwritev2()(fd, iov, cnt, off, flags);
  if (flags & RWF_APPEND) {
    pthread_mutex_lock(&jlock);
    jtext('U', f, "pwritev2 with RWF_APPEND");
    pthread_mutex_unlock(&jlock);
  }
  struct wctx c = { .fd = fd, .iov = iov, .cnt = cnt, .off = off, .flags = flags };
  return do_write(fd, f, iov, cnt, off, (flags & (RWF_SYNC | RWF_DSYNC)) != 0,
                  c_pwritev2, &c);
}
ssize_t pwritev64v2(int fd, const struct iovec *iov, int cnt, off_t off, int flags)
{
  int f = fd_file(fd);
  if (f < 0) return get_pwritev64v2()(fd, iov, cnt, off, flags);
  if (flags & RWF_APPEND) {
    pthread_mutex_lock(&jlock);
    jtext('U', f, "pwritev64v2 with RWF_APPEND");
    pthread_mutex_unlock(&jlock);
  }
  struct wctx c = { .fd = fd, .iov = iov, .cnt = cnt, .off = off, .flags = flags };
  return do_write(fd, f, iov, cnt, off, (flags & (RWF_SYNC | RWF_DSYNC)) != 0,
                  c_pwritev64v2, &c);
}

/* ---- fallocate / truncate ---- */

static int do_fallocate(int (*real)(int, int, off_t, off_t), int fd, int mode,
                        off_t off, off_t len)
{
  int f = fd_file(fd);
  if (f < 0) return real(fd, mode, off, len);
  pthread_mutex_lock(&jlock);
  int r = real(fd, mode, off, len);
  int e = errno;
  if (r == 0) {
    if (mode & (FALLOC_FL_COLLAPSE_RANGE | FALLOC_FL_INSERT_RANGE))
      jtext('U', f, "fallocate mode %#x", (unsigned) mode);
    else {
      if (mode & (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE))
        jrec('Z', f, 0, (uint64_t) off, (uint64_t) len, NULL);
      if (!(mode & FALLOC_FL_KEEP_SIZE))
        jrec('X', f, 0, (uint64_t) off + (uint64_t) len, 0, NULL);
    }
  }
  pthread_mutex_unlock(&jlock);
  errno = e;
  return r;
}
int fallocate(int fd, int mode, off_t off, off_t len) { return do_fallocate(get_fallocate(), fd, mode, off, len); }
int fallocate64(int fd, int mode, off_t off, off_t len) { return do_fallocate(get_fallocate64(), fd, mode, off, len); }

static int do_posix_fallocate(int (*real)(int, off_t, off_t), int fd, off_t off, off_t len)
{
  int f = fd_file(fd);
  if (f < 0) return real(fd, off, len);
  pthread_mutex_lock(&jlock);
  int r = real(fd, off, len);      /* returns an errno value */
  if (r == 0) jrec('X', f, 0, (uint64_t) off + (uint64_t) len, 0, NULL);
  pthread_mutex_unlock(&jlock);
  return r;
}
int posix_fallocate(int fd, off_t off, off_t len) { return do_posix_fallocate(get_posix_fallocate(), fd, off, len); }
int posix_fallocate64(int fd, off_t off, off_t len) { return do_posix_fallocate(get_posix_fallocate64(), fd, off, len); }

static int do_ftruncate(int (*real)(int, off_t), int fd, off_t size)
{
  int f = fd_file(fd);
  if (f < 0) return real(fd, size);
  pthread_mutex_lock(&jlock);
  int r = real(fd, size);
  int e = errno;
  if (r == 0) jrec('T', f, 0, (uint64_t) size, 0, NULL);
  pthread_mutex_unlock(&jlock);
  errno = e;
  return r;
}
int ftruncate(int fd, off_t size) { return do_ftruncate(get_ftruncate(), fd, size); }
int ftruncate64(int fd, off_t size) { return do_ftruncate(get_ftruncate64(), fd, size); }

static int do_truncate(int (*real)(const char *, off_t), const char *path, off_t size)
{
  if (!on()) return real(path, size);
  pthread_mutex_lock(&jlock);
  int f = path_file(path);
  int r = real(path, size);
  int e = errno;
  if (r == 0 && f >= 0) jrec('T', f, 0, (uint64_t) size, 0, NULL);
  pthread_mutex_unlock(&jlock);
  errno = e;
  return r;
}
int truncate(const char *path, off_t size) { return do_truncate(get_truncate(), path, size); }
int truncate64(const char *path, off_t size) { return do_truncate(get_truncate64(), path, size); }

/* ---- copies into a watched file ---- */

ssize_t copy_file_range(int in, off_t *in_off, int out, off_t *out_off, size_t len, unsigned flags)
{
  int f = fd_file(out);
  if (f < 0) return get_copy_file_range()(in, in_off, out, out_off, len, flags);
  pthread_mutex_lock(&jlock);
  off_t start = out_off ? *out_off : lseek(out, 0, SEEK_CUR);
  ssize_t n = get_copy_file_range()(in, in_off, out, out_off, len, flags);
  int e = errno;
  if (n > 0) {
    /* The bytes copied: read them back from the file itself. */
    char *buf = malloc((size_t) n);
    if (!buf) die("malloc");
    if (pread(out, buf, (size_t) n, start) != n) die("reading back a copy_file_range");
    struct iovec v = { buf, (size_t) n };
    note_write(out, f, (uint64_t) start, &v, 1, n, false);
    free(buf);
  }
  pthread_mutex_unlock(&jlock);
  errno = e;
  return n;
}

static void unsupported_fd(int fd, const char *what)
{
  int f = fd_file(fd);
  if (f < 0) return;
  pthread_mutex_lock(&jlock);
  jtext('U', f, "%s", what);
  pthread_mutex_unlock(&jlock);
}

ssize_t sendfile(int out, int in, off_t *off, size_t n)
{
  unsupported_fd(out, "sendfile into the file");
  return get_sendfile()(out, in, off, n);
}
ssize_t sendfile64(int out, int in, off_t *off, size_t n)
{
  unsupported_fd(out, "sendfile64 into the file");
  return get_sendfile64()(out, in, off, n);
}
ssize_t splice(int in, off_t *in_off, int out, off_t *out_off, size_t n, unsigned fl)
{
  unsupported_fd(out, "splice into the file");
  return get_splice()(in, in_off, out, out_off, n, fl);
}

void *mmap(void *addr, size_t len, int prot, int flags, int fd, off_t off)
{
  if ((prot & PROT_WRITE) && (flags & MAP_SHARED)) unsupported_fd(fd, "writable shared mmap");
  return get_mmap()(addr, len, prot, flags, fd, off);
}
void *mmap64(void *addr, size_t len, int prot, int flags, int fd, off_t off)
{
  if ((prot & PROT_WRITE) && (flags & MAP_SHARED)) unsupported_fd(fd, "writable shared mmap64");
  return get_mmap64()(addr, len, prot, flags, fd, off);
}

/* ---- names ---- */

static void unsupported_path(int dfd, const char *path, const char *what)
{
  struct stat a, b;
  if (!on() || fstatat(dfd, path, &a, AT_SYMLINK_NOFOLLOW) < 0) return;
  for (unsigned i = 0; i < nfiles; i++)
    if (stat(paths[i], &b) == 0 && a.st_dev == b.st_dev && a.st_ino == b.st_ino) {
      pthread_mutex_lock(&jlock);
      jtext('U', (int) i, "%s %s", what, path);
      pthread_mutex_unlock(&jlock);
    }
}
/* A rename onto a watched path replaces it: name the target too (checked
 * by path, as the target may not be the watched inode). */
static void unsupported_target(const char *path, const char *what)
{
  if (!on()) return;
  for (unsigned i = 0; i < nfiles; i++)
    if (strcmp(paths[i], path) == 0) {
      pthread_mutex_lock(&jlock);
      jtext('U', (int) i, "%s onto %s", what, path);
      pthread_mutex_unlock(&jlock);
    }
}

int rename(const char *a, const char *b)
{
  unsupported_path(AT_FDCWD, a, "rename"); unsupported_target(b, "rename");
  return get_rename()(a, b);
}
int renameat(int da, const char *a, int db, const char *b)
{
  unsupported_path(da, a, "renameat"); unsupported_target(b, "renameat");
  return get_renameat()(da, a, db, b);
}
int renameat2(int da, const char *a, int db, const char *b, unsigned fl)
{
  unsupported_path(da, a, "renameat2"); unsupported_target(b, "renameat2");
  return get_renameat2()(da, a, db, b, fl);
}
int unlink(const char *p) { unsupported_path(AT_FDCWD, p, "unlink"); return get_unlink()(p); }
int unlinkat(int d, const char *p, int fl) { unsupported_path(d, p, "unlinkat"); return get_unlinkat()(d, p, fl); }
int link(const char *a, const char *b)
{
  unsupported_path(AT_FDCWD, a, "link"); unsupported_target(b, "link");
  return get_link()(a, b);
}
int linkat(int da, const char *a, int db, const char *b, int fl)
{
  unsupported_path(da, a, "linkat"); unsupported_target(b, "linkat");
  return get_linkat()(da, a, db, b, fl);
}

/* ---- syncs ---- */

/* Runs a sync; when it succeeds, journals type/mask covering every record
 * journalled before it started. */
static int do_sync(uint8_t type, uint32_t mask, uint8_t type2, uint32_t mask2,
                   int (*call)(int), int fd)
{
  pthread_mutex_lock(&jlock);
  uint64_t start = next_seq;
  pthread_mutex_unlock(&jlock);
  int r = call(fd);
  int e = errno;
  if (r == 0) {
    pthread_mutex_lock(&jlock);
    if (mask) jrec(type, -1, mask, start, 0, NULL);
    if (mask2) jrec(type2, -1, mask2, start, 0, NULL);
    if (crash_after && type == 'S' && (mask >> crash_file & 1) &&
        ++syncs_seen == crash_after)
      crash_now();
    pthread_mutex_unlock(&jlock);
  }
  errno = e;
  return r;
}

static int sync_fd(int (*real)(int), int fd)
{
  int f = fd_file(fd);
  uint32_t dm = (fd >= 0 && fd < MAX_FD && active) ? fddir[fd] : 0;
  if (f < 0 && !dm) return real(fd);
  return do_sync('S', f >= 0 ? 1u << f : 0, 'D', dm, real, fd);
}
int fsync(int fd) { return sync_fd(get_fsync(), fd); }
int fdatasync(int fd) { return sync_fd(get_fdatasync(), fd); }
int syncfs(int fd)
{
  if (!on()) return get_syncfs()(fd);
  return do_sync('S', ALL_FILES, 'D', ALL_FILES, get_syncfs(), fd);
}
static int call_sync(int unused) { (void) unused; get_sync()(); return 0; }
void sync(void)
{
  if (!on()) { get_sync()(); return; }
  do_sync('S', ALL_FILES, 'D', ALL_FILES, call_sync, -1);
}

int sync_file_range(int fd, off_t off, off_t n, unsigned flags)
{
  int f = fd_file(fd);
  if (f >= 0) {
    pthread_mutex_lock(&jlock);
    jtext('N', f, "sync_file_range %lld+%lld flags %#x (not a sync)",
          (long long) off, (long long) n, flags);
    pthread_mutex_unlock(&jlock);
  }
  return get_sync_file_range()(fd, off, n, flags);
}
