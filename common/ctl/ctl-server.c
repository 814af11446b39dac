/* ctl-server.c: the control socket on threads (see ctl-server.h).
 *
 * Every thread polls its socket together with stop_pipe, which becomes
 * readable (and stays so) when ctl_server_stop() begins; sockets are
 * non-blocking, so no thread sleeps where the stop cannot reach it, except
 * inside an engine call.  A client thread ends by itself (the client
 * closed, an error, or the stop); the accept thread joins the finished
 * ones, and ctl_server_stop() joins the rest.
 *
 * Lock: s->lock protects s->conns, s->nclients and each conn's done flag. */
#include "ctl-server.h"
#include "ctl-proto.h"
#include "log.h"
#include "util.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#define LINE_BUF (CTL_MAX_LINE + 2)  /* a maximal line with its CR LF */

/* One control client and its thread. */
struct ctl_conn {
  struct ctl_server *srv;
  int fd;
  unsigned id;
  char who[32];                   /* "control client 3", for logs */
  pthread_t thread;
  bool done;                      /* the thread has ended: join it */
  bool discarding;                /* skipping the rest of an over-long line */
  size_t len;                     /* bytes in buf */
  char buf[LINE_BUF + 1];         /* +1: ctl_parse terminates the line */
  struct ctl_conn *next;          /* srv->conns */
};

struct ctl_server {
  struct engine *e;
  char *path;
  char *program;
  dev_t sock_dev;                 /* identity of our socket file, so */
  ino_t sock_ino;                 /* stop unlinks only ours */
  int listen_fd;
  int stop_pipe[2];
  pthread_t accept_thread;
  pthread_mutex_t lock;
  struct ctl_conn *conns;
  unsigned nclients;              /* conns whose thread still runs */
  unsigned next_id;
};

/* Waits until fd is ready for events, or the stop.  Returns 1 ready, 0
 * after timeout_ms (-1: none), -1 stopping. */
static int wait_fd(struct ctl_server *s, int fd, short events, int timeout_ms)
{
  struct pollfd p[2] = { { fd, events, 0 }, { s->stop_pipe[0], POLLIN, 0 } };
  for (;;) {
    int r = poll(p, 2, timeout_ms);
    if (r < 0 && errno == EINTR)
      continue;
    if (r < 0) {
      log_warn("control socket %s: poll: %s", s->path, strerror(errno));
      return -1;
    }
    if (p[1].revents)
      return -1;
    return r > 0;
  }
}

/* ---- one client --------------------------------------------------------- */

/* Returns 0, or -1 when the client is gone or we are stopping. */
static int send_all(struct ctl_conn *c, const char *buf, size_t len)
{
  while (len > 0) {
    ssize_t n = send(c->fd, buf, len, MSG_NOSIGNAL);
    if (n > 0) {
      buf += n;
      len -= n;
    } else if (n < 0 && errno == EINTR) {
      continue;
    } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
      /* The client does not read its replies: we read none of its
       * commands meanwhile (backpressure), and the stop still works. */
      if (wait_fd(c->srv, c->fd, POLLOUT, -1) <= 0)
        return -1;
    } else {
      log_debug("%s: cannot send a reply: %s", c->who, strerror(errno));
      return -1;
    }
  }
  return 0;
}

static int send_reply(struct ctl_conn *c, char *reply)
{
  int r;
  if (!reply)
    return send_all(c, ctl_reply_oom, strlen(ctl_reply_oom));
  r = send_all(c, reply, strlen(reply));
  free(reply);
  return r;
}

/* Answers one line of len bytes at line (without its LF). */
static int handle_line(struct ctl_conn *c, char *line, size_t len)
{
  bool empty;
  char *reply = ctl_handle_line(c->srv->e, line, len, c->srv->program, c->who,
                                &empty);
  if (empty)
    return 0;
  return send_reply(c, reply);
}

/* Answers every complete line in c->buf; at eof also a last line without
 * LF.  Returns -1 when the client is gone. */
static int process(struct ctl_conn *c, bool eof)
{
  for (;;) {
    char *nl = memchr(c->buf, '\n', c->len);
    size_t len;

    if (c->discarding) {
      if (!nl) {
        c->len = 0;
        return 0;
      }
      c->discarding = false;
    } else if (nl) {
      len = nl - c->buf;
      /* ctl_parse drops a CR and refuses over CTL_MAX_LINE. */
      if (handle_line(c, c->buf, len) < 0)
        return -1;
    } else if (c->len == LINE_BUF) {
      /* Full without an LF: too long even if its last byte is a CR. */
      c->len = 0;
      c->discarding = !eof;
      return send_all(c, ctl_reply_too_long, strlen(ctl_reply_too_long));
    } else if (eof && c->len > 0) {
      len = c->len;
      c->len = 0;
      return handle_line(c, c->buf, len);
    } else {
      return 0;
    }
    /* Drop the line and its LF. */
    len = nl + 1 - c->buf;
    memmove(c->buf, nl + 1, c->len - len);
    c->len -= len;
  }
}

static void *conn_main(void *arg)
{
  struct ctl_conn *c = arg;
  struct ctl_server *s = c->srv;
  const char *why = "client finished";

  log_debug("%s: connected", c->who);
  for (;;) {
    ssize_t n;
    int r = wait_fd(s, c->fd, POLLIN, -1);
    if (r < 0) {
      why = "stopping";
      break;
    }
    n = recv(c->fd, c->buf + c->len, LINE_BUF - c->len, 0);
    if (n < 0 && (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK))
      continue;
    if (n < 0) {
      why = strerror(errno);
      break;
    }
    c->len += n;
    if (process(c, n == 0) < 0) {
      why = "cannot reply";
      break;
    }
    if (n == 0)
      break;                      /* half-closed, every line answered */
  }
  log_debug("%s: closed (%s)", c->who, why);
  close(c->fd);
  c->fd = -1;
  pthread_mutex_lock(&s->lock);
  c->done = true;
  s->nclients--;
  pthread_mutex_unlock(&s->lock);
  return NULL;
}

/* Joins and frees the clients whose thread has ended (all with all). */
static void reap(struct ctl_server *s, bool all)
{
  struct ctl_conn **pp = &s->conns, *c;
  for (;;) {
    pthread_mutex_lock(&s->lock);
    while (*pp && !(*pp)->done && !all)
      pp = &(*pp)->next;
    c = *pp;
    if (c)
      *pp = c->next;
    pthread_mutex_unlock(&s->lock);
    if (!c)
      return;
    pthread_join(c->thread, NULL);
    free(c);
  }
}

/* ---- accepting -------------------------------------------------------- */

static void add_client(struct ctl_server *s, int fd)
{
  struct ctl_conn *c;
  int r;

  pthread_mutex_lock(&s->lock);
  if (s->nclients >= CTL_MAX_CLIENTS) {
    unsigned n = s->nclients;
    pthread_mutex_unlock(&s->lock);
    log_warn("control socket %s: refusing a client: %u clients already "
             "connected", s->path, n);
    if (send(fd, ctl_reply_busy, strlen(ctl_reply_busy), MSG_NOSIGNAL | MSG_DONTWAIT) < 0)
      log_debug("control socket %s: cannot tell the refused client why: %s",
                s->path, strerror(errno));
    close(fd);
    return;
  }
  pthread_mutex_unlock(&s->lock);

  c = calloc(1, sizeof *c);
  if (!c) {
    log_warn("control socket %s: out of memory accepting a client", s->path);
    close(fd);
    return;
  }
  c->srv = s;
  c->fd = fd;
  c->id = ++s->next_id;
  snprintf(c->who, sizeof c->who, "control client %u", c->id);
  pthread_mutex_lock(&s->lock);
  s->nclients++;
  c->next = s->conns;
  s->conns = c;
  /* Under the lock: reap() must not see c before its thread exists. */
  r = pthread_create(&c->thread, NULL, conn_main, c);
  if (r != 0) {
    s->conns = c->next;
    s->nclients--;
  }
  pthread_mutex_unlock(&s->lock);
  if (r != 0) {
    log_warn("control socket %s: cannot start a thread for a client: %s",
             s->path, strerror(r));
    if (send(fd, ctl_reply_oom, strlen(ctl_reply_oom), MSG_NOSIGNAL | MSG_DONTWAIT) < 0)
      log_debug("control socket %s: cannot tell the refused client why: %s",
                s->path, strerror(errno));
    close(fd);
    free(c);
  }
}

static void *accept_main(void *arg)
{
  struct ctl_server *s = arg;

  for (;;) {
    int fd, r = wait_fd(s, s->listen_fd, POLLIN, -1);
    if (r < 0)
      break;
    reap(s, false);
    fd = accept4(s->listen_fd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
    if (fd >= 0) {
      add_client(s, fd);
    } else if (errno != EINTR && errno != EAGAIN && errno != EWOULDBLOCK &&
               errno != ECONNABORTED) {
      /* Out of descriptors (or similar): pause instead of spinning. */
      log_warn("control socket %s: accept failed: %s; pausing new control "
               "connections for 1 s", s->path, strerror(errno));
      if (wait_fd(s, -1, 0, 1000) < 0)
        break;
    }
  }
  return NULL;
}

/* ---- socket file ------------------------------------------------------ */

static int make_socket(struct ctl_server *s, const char *path, char *err, size_t errlen)
{
  struct sockaddr_un sa;
  struct stat st;
  mode_t old_mask;
  int fd, r, saved;

  memset(&sa, 0, sizeof sa);
  sa.sun_family = AF_UNIX;
  if (path[0] == '\0' || strlen(path) >= sizeof sa.sun_path) {
    snprintf(err, errlen, "control socket path \"%s\" is %s (a unix socket path "
             "has at most %zu bytes); choose another control socket path", path,
             path[0] ? "too long" : "empty", sizeof sa.sun_path - 1);
    return -1;
  }
  strcpy(sa.sun_path, path);

  if (lstat(path, &st) == 0) {
    int probe;
    if (!S_ISSOCK(st.st_mode)) {
      snprintf(err, errlen, "%s exists and is not a socket; refusing to replace "
               "it: remove it or choose another control socket path", path);
      return -1;
    }
    /* A socket: is a live process behind it, or is it left over? */
    probe = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (probe < 0) {
      snprintf(err, errlen, "cannot create a socket: %s", strerror(errno));
      return -1;
    }
    r = connect(probe, (struct sockaddr *) &sa, sizeof sa);
    saved = errno;
    close(probe);
    if (r == 0 || saved == EAGAIN || saved == EINPROGRESS) {
      snprintf(err, errlen, "control socket %s is in use by a running process "
               "(another %s?); stop it or choose another control socket path",
               path, s->program);
      return -1;
    }
    if (saved != ECONNREFUSED) {
      snprintf(err, errlen, "cannot check the existing socket %s: %s; remove it "
               "if no %s is using it", path, strerror(saved), s->program);
      return -1;
    }
    if (unlink(path) < 0) {
      snprintf(err, errlen, "cannot remove the stale control socket %s: %s; "
               "remove it by hand or choose another control socket path",
               path, strerror(errno));
      return -1;
    }
    log_info("removed stale control socket %s", path);
  } else if (errno != ENOENT) {
    snprintf(err, errlen, "cannot use %s as the control socket: %s", path,
             strerror(errno));
    return -1;
  }

  fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0) {
    snprintf(err, errlen, "cannot create a socket: %s", strerror(errno));
    return -1;
  }
  /* No moment where others could connect: create it 0600 already. */
  old_mask = umask(0177);
  r = bind(fd, (struct sockaddr *) &sa, sizeof sa);
  saved = errno;
  umask(old_mask);
  if (r < 0) {
    snprintf(err, errlen, "cannot create the control socket %s: %s; check that "
             "its directory exists and is writable", path, strerror(saved));
    close(fd);
    return -1;
  }
  if (chmod(path, 0600) < 0 || listen(fd, 16) < 0 || stat(path, &st) < 0) {
    snprintf(err, errlen, "cannot set up the control socket %s: %s",
             path, strerror(errno));
    unlink(path);
    close(fd);
    return -1;
  }
  s->sock_dev = st.st_dev;
  s->sock_ino = st.st_ino;
  return fd;
}

/* ---- life cycle ------------------------------------------------------- */

struct ctl_server *ctl_server_start(const char *path, struct engine *e,
                                    const char *program, char *err, size_t errlen)
{
  struct ctl_server *s = calloc(1, sizeof *s);
  sigset_t all, old;
  int r;

  if (!s || !(s->path = strdup(path)) ||
      !(s->program = strdup(program ? program : "the server"))) {
    if (s) free(s->path);
    free(s);
    snprintf(err, errlen, "out of memory");
    return NULL;
  }
  s->e = e;
  s->listen_fd = s->stop_pipe[0] = s->stop_pipe[1] = -1;
  pthread_mutex_init(&s->lock, NULL);
  if (pipe2(s->stop_pipe, O_CLOEXEC) < 0) {
    snprintf(err, errlen, "cannot create a pipe: %s", strerror(errno));
    goto fail;
  }
  if ((s->listen_fd = make_socket(s, path, err, errlen)) < 0)
    goto fail;
  /* The threads (and the client threads they start) block every signal:
   * signals stay with the host's own threads. */
  sigfillset(&all);
  pthread_sigmask(SIG_SETMASK, &all, &old);
  r = pthread_create(&s->accept_thread, NULL, accept_main, s);
  pthread_sigmask(SIG_SETMASK, &old, NULL);
  if (r != 0) {
    snprintf(err, errlen, "cannot start the control socket thread: %s", strerror(r));
    unlink(path);
    goto fail;
  }
  log_info("control socket listening on %s", path);
  return s;

 fail:
  if (s->listen_fd >= 0) close(s->listen_fd);
  if (s->stop_pipe[0] >= 0) close(s->stop_pipe[0]);
  if (s->stop_pipe[1] >= 0) close(s->stop_pipe[1]);
  pthread_mutex_destroy(&s->lock);
  free(s->program);
  free(s->path);
  free(s);
  return NULL;
}

void ctl_server_stop(struct ctl_server *s)
{
  struct stat st;
  char one = 1;

  if (!s)
    return;
  while (write(s->stop_pipe[1], &one, 1) < 0 && errno == EINTR)
    ;
  pthread_join(s->accept_thread, NULL);
  reap(s, true);                  /* each ends after its running command */
  close(s->listen_fd);
  close(s->stop_pipe[0]);
  close(s->stop_pipe[1]);
  if (lstat(s->path, &st) == 0 && st.st_dev == s->sock_dev &&
      st.st_ino == s->sock_ino)
    unlink(s->path);
  pthread_mutex_destroy(&s->lock);
  free(s->program);
  free(s->path);
  free(s);
}

unsigned ctl_server_clients(struct ctl_server *s)
{
  unsigned n;
  pthread_mutex_lock(&s->lock);
  n = s->nclients;
  pthread_mutex_unlock(&s->lock);
  return n;
}
