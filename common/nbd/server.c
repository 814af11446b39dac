/* server.c: listeners, accepting, the completion queue and shutdown. */
#include "server-int.h"
#include "log.h"
#include "util.h"

#include <errno.h>
#include <malloc.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>
#include <arpa/inet.h>

#include <event2/thread.h>

struct event_base *xnbd_event_base_new(void)
{
  static bool threads_on;
  if (!threads_on) {
    if (evthread_use_pthreads() < 0)
      return NULL;
    threads_on = true;
  }
  return event_base_new();
}




struct xnbd_server *xnbd_server_new(struct event_base *base,
                                    const struct xnbd_server_config *cfg)
{
  struct xnbd_server *srv;
  /* Request buffers up to 32 MiB come and go at a high rate: keep them on
   * the heap instead of mmap/munmap (and page faults) for each one.  The
   * per-connection budget bounds what the heap can hold. */
  mallopt(M_MMAP_THRESHOLD, 64 << 20);
  mallopt(M_TRIM_THRESHOLD, 256 << 20);
  srv = calloc(1, sizeof *srv);
  if (!srv) return NULL;
  srv->base = base;
  if (cfg) srv->cfg = *cfg;
  if (!srv->cfg.handshake_timeout_s) srv->cfg.handshake_timeout_s = 30;
  if (!srv->cfg.max_connections) srv->cfg.max_connections = 1024;
  if (!srv->cfg.max_inflight_bytes) srv->cfg.max_inflight_bytes = 64 << 20;
  if (!srv->cfg.max_request) srv->cfg.max_request = 32 << 20;
  srv->loop_thread = pthread_self();
  srv->first_tcp_port = -1;
  srv->up = (struct nbd_upcalls) {
    .greet = nego_send_greeting, .negotiate = nego_step, .transmit = trans_step,
    .reply = trans_reply, .free_req = trans_free_req, .closed = server_conn_closed,
    .find_export = server_find_export,
  };
  pthread_mutex_init(&srv->done_lock, NULL);
  srv->done_ev = event_new(base, -1, 0, nbd_conn_done_cb, srv);
  if (!srv->done_ev) { free(srv); return NULL; }
  return srv;
}

int xnbd_server_add_export(struct xnbd_server *srv, const char *name,
                           const char *description,
                           const struct xnbd_backend_ops *ops, void *handle)
{
  struct xnbd_export *e, **tail = &srv->exports;
  if (server_find_export(srv, name, strlen(name))) {
    log_error("export '%s' is defined twice: each export needs a unique name", name);
    return -1;
  }
  e = calloc(1, sizeof *e);
  if (!e) return -1;
  e->name = strdup(name);
  e->description = description ? strdup(description) : NULL;
  e->ops = ops;
  e->handle = handle;
  while (*tail) tail = &(*tail)->next;
  *tail = e;
  return 0;
}

int xnbd_server_unlist_export(struct xnbd_server *srv, const char *name)
{
  struct xnbd_export *e = server_find_export(srv, name, strlen(name));
  if (!e) return -1;
  e->unlisted = true;
  return 0;
}

int xnbd_server_note_reads(struct xnbd_server *srv, const char *name,
                           void (*fn)(void *arg, uint64_t off, uint64_t len), void *arg)
{
  struct xnbd_export *e = server_find_export(srv, name, strlen(name));
  if (!e) return -1;
  e->on_read = fn;
  e->on_read_arg = arg;
  return 0;
}

struct xnbd_export *server_find_export(struct xnbd_server *srv,
                                       const char *name, size_t len)
{
  for (struct xnbd_export *e = srv->exports; e; e = e->next)
    if (strlen(e->name) == len && (len == 0 || memcmp(e->name, name, len) == 0))
      return e;
  return NULL;
}

static void format_peer(const struct sockaddr *sa, char *buf, size_t len)
{
  char host[INET6_ADDRSTRLEN] = "?";
  switch (sa->sa_family) {
  case AF_INET: {
    const struct sockaddr_in *in = (const void *) sa;
    inet_ntop(AF_INET, &in->sin_addr, host, sizeof host);
    snprintf(buf, len, "%s:%u", host, ntohs(in->sin_port));
    break;
  }
  case AF_INET6: {
    const struct sockaddr_in6 *in6 = (const void *) sa;
    inet_ntop(AF_INET6, &in6->sin6_addr, host, sizeof host);
    snprintf(buf, len, "[%s]:%u", host, ntohs(in6->sin6_port));
    break;
  }
  default:
    snprintf(buf, len, "unix");
  }
}

static void accept_retry_cb(evutil_socket_t fd, short what, void *arg)
{
  struct xnbd_server *srv = arg;
  if (srv->accept_paused && !srv->shutting_down) {
    srv->accept_paused = false;
    for (unsigned i = 0; i < srv->nlisteners; i++)
      evconnlistener_enable(srv->listeners[i]);
  }
}

static void pause_accepting(struct xnbd_server *srv, const char *why)
{
  struct timeval tv = { 1, 0 };
  if (srv->accept_paused) return;
  log_warn("not accepting new connections for now: %s", why);
  srv->accept_paused = true;
  for (unsigned i = 0; i < srv->nlisteners; i++)
    evconnlistener_disable(srv->listeners[i]);
  /* Resume when a connection closes, or after a second at the latest. */
  if (!srv->accept_retry)
    srv->accept_retry = evtimer_new(srv->base, accept_retry_cb, srv);
  evtimer_add(srv->accept_retry, &tv);
}

static void accept_cb(struct evconnlistener *l, evutil_socket_t fd,
                      struct sockaddr *sa, int salen, void *arg)
{
  struct xnbd_server *srv = arg;
  char peer[80];

  format_peer(sa, peer, sizeof peer);
  if (srv->shutting_down) { close(fd); return; }
  if (srv->nconns >= srv->cfg.max_connections) {
    log_warn("refusing connection from %s: %u connections already open "
             "(--max-connections)", peer, srv->nconns);
    close(fd);
    pause_accepting(srv, "connection limit reached");
    return;
  }
  if (sa->sa_family == AF_INET || sa->sa_family == AF_INET6) {
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  }
  bool secured = false;
  for (unsigned i = 0; i < srv->nlisteners; i++)
    if (srv->listeners[i] == l && srv->hooks[i]) {
      fd = srv->hooks[i](fd, srv->hook_args[i]);
      if (fd < 0) return;
      evutil_make_socket_nonblocking(fd);
      secured = true;
      break;
    }
  nbd_conn_new(srv, fd, peer, secured);
}

static void accept_error_cb(struct evconnlistener *l, void *arg)
{
  struct xnbd_server *srv = arg;
  int err = EVUTIL_SOCKET_ERROR();
  if (err == EMFILE || err == ENFILE || err == ENOBUFS || err == ENOMEM)
    pause_accepting(srv, evutil_socket_error_to_string(err));
  else
    log_warn("accept failed: %s", evutil_socket_error_to_string(err));
}

void server_conn_closed(struct xnbd_server *srv)
{
  if (srv->accept_paused && srv->nconns < srv->cfg.max_connections)
    accept_retry_cb(-1, 0, srv);
  if (srv->shutting_down && srv->nconns == 0)
    event_active(srv->shutdown_ev, EV_READ, 0);
}

static int add_listener(struct xnbd_server *srv, int fd, const char *what)
{
  struct evconnlistener *l;
  if (srv->nlisteners >= XNBD_MAX_LISTENERS) {
    log_error("too many listeners (at most %d)", XNBD_MAX_LISTENERS);
    close(fd);
    return -1;
  }
  evutil_make_socket_nonblocking(fd);
  l = evconnlistener_new(srv->base, accept_cb, srv,
                         LEV_OPT_CLOSE_ON_FREE | LEV_OPT_CLOSE_ON_EXEC, 1024, fd);
  if (!l) { log_error("cannot listen on %s", what); close(fd); return -1; }
  evconnlistener_set_error_cb(l, accept_error_cb);
  srv->listeners[srv->nlisteners++] = l;
  return 0;
}

static int listen_tcp(struct xnbd_server *srv, const char *addr,
                      const char *default_port)
{
  CLEANUP_FREE char *host = NULL;
  CLEANUP_FREE char *port = NULL;
  const char *why;
  struct addrinfo hints = { 0 }, *res, *ai;
  int e, bound = 0, want_port = -1, this_port = -1;

  if (parse_host_port(addr, default_port, &host, &port, &why) < 0) {
    log_error("bad listen address '%s': %s (expected HOST:PORT, [IPV6]:PORT or :PORT)", addr, why);
    return -1;
  }
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE | AI_ADDRCONFIG;
  e = getaddrinfo(host, port, &hints, &res);
  if (e) {
    log_error("cannot resolve listen address '%s': %s", addr, gai_strerror(e));
    return -1;
  }
  for (ai = res; ai; ai = ai->ai_next) {
    int one = 1, fd;
    fd = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, ai->ai_protocol);
    if (fd < 0) continue;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (ai->ai_family == AF_INET6 && host == NULL)
      setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof one);
    if (want_port >= 0) {
      if (ai->ai_family == AF_INET)
        ((struct sockaddr_in *) ai->ai_addr)->sin_port = htons(want_port);
      else if (ai->ai_family == AF_INET6)
        ((struct sockaddr_in6 *) ai->ai_addr)->sin6_port = htons(want_port);
    }
    if (bind(fd, ai->ai_addr, ai->ai_addrlen) < 0) {
      int err = errno;
      close(fd);
      if (err == EADDRINUSE) {
        log_error("cannot listen on %s: address already in use (another "
                  "server on that port? choose another with --listen)", addr);
        freeaddrinfo(res);
        return -1;
      }
      if (host == NULL && err == EADDRNOTAVAIL) continue;
      log_error("cannot listen on %s: %s", addr, strerror(err));
      freeaddrinfo(res);
      return -1;
    }
    if (listen(fd, 1024) < 0) {
      log_error("cannot listen on %s: %s", addr, strerror(errno));
      close(fd);
      freeaddrinfo(res);
      return -1;
    }
    struct sockaddr_storage ss;
    socklen_t sl = sizeof ss;
    getsockname(fd, (struct sockaddr *) &ss, &sl);
    this_port = ntohs(ss.ss_family == AF_INET
                      ? ((struct sockaddr_in *) &ss)->sin_port
                      : ((struct sockaddr_in6 *) &ss)->sin6_port);
    if (srv->first_tcp_port < 0)
      srv->first_tcp_port = this_port;
    /* With port 0 and several addresses, bind the rest to the same port. */
    if (want_port < 0 && strcmp(port, "0") == 0)
      want_port = this_port;
    if (add_listener(srv, fd, addr) < 0) { freeaddrinfo(res); return -1; }
    bound++;
  }
  freeaddrinfo(res);
  if (!bound) {
    log_error("cannot listen on %s: no usable address", addr);
    return -1;
  }
  srv->last_tcp_port = this_port;
  log_info("listening on %s (port %d)", addr, this_port);
  return 0;
}

int xnbd_server_listen_tcp(struct xnbd_server *srv, const char *addr)
{
  return listen_tcp(srv, addr, "10809");
}

int xnbd_server_listen_unix(struct xnbd_server *srv, const char *path)
{
  struct sockaddr_un sun = { .sun_family = AF_UNIX };
  int fd;
  struct stat st;

  if (strlen(path) >= sizeof sun.sun_path) {
    log_error("unix socket path '%s' is too long (at most %zu bytes)", path,
              sizeof sun.sun_path - 1);
    return -1;
  }
  strcpy(sun.sun_path, path);
  /* Remove a stale socket left by a previous run, but never a regular file. */
  if (lstat(path, &st) == 0) {
    if (!S_ISSOCK(st.st_mode)) {
      log_error("cannot listen on %s: it exists and is not a socket", path);
      return -1;
    }
    int probe = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (probe >= 0 && connect(probe, (struct sockaddr *) &sun, sizeof sun) == 0) {
      close(probe);
      log_error("cannot listen on %s: another server is using it", path);
      return -1;
    }
    if (probe >= 0) close(probe);
    unlink(path);
  }
  fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0 || bind(fd, (struct sockaddr *) &sun, sizeof sun) < 0 ||
      listen(fd, 1024) < 0) {
    log_error("cannot listen on %s: %s", path, strerror(errno));
    if (fd >= 0) close(fd);
    return -1;
  }
  if (add_listener(srv, fd, path) < 0) return -1;
  srv->unix_paths[srv->nlisteners - 1] = strdup(path);
  log_info("listening on unix socket %s", path);
  return 0;
}

int xnbd_server_listen_tcp_hook(struct xnbd_server *srv, const char *addr,
                                const char *default_port,
                                int (*hook)(int fd, void *arg), void *arg)
{
  unsigned first = srv->nlisteners;
  int port = srv->first_tcp_port;
  if (listen_tcp(srv, addr, default_port) < 0) return -1;
  for (unsigned i = first; i < srv->nlisteners; i++) {
    srv->hooks[i] = hook;
    srv->hook_args[i] = arg;
  }
  if (port < 0) srv->first_tcp_port = -1;   /* --port-file names the NBD port */
  return srv->last_tcp_port;
}

int xnbd_server_tcp_port(struct xnbd_server *srv) { return srv->first_tcp_port; }
unsigned xnbd_server_nconns(struct xnbd_server *srv) { return srv->nconns; }

static void shutdown_cb(evutil_socket_t fd, short what, void *arg)
{
  struct xnbd_server *srv = arg;
  if (srv->nconns == 0 && srv->shutdown_done) {
    void (*done)(void *) = srv->shutdown_done;
    srv->shutdown_done = NULL;
    done(srv->shutdown_arg);
  }
}

void xnbd_server_shutdown(struct xnbd_server *srv, void (*done)(void *), void *arg)
{
  if (srv->shutting_down) return;
  srv->shutting_down = true;
  srv->shutdown_done = done;
  srv->shutdown_arg = arg;
  srv->shutdown_ev = event_new(srv->base, -1, 0, shutdown_cb, srv);
  for (unsigned i = 0; i < srv->nlisteners; i++)
    evconnlistener_disable(srv->listeners[i]);
  /* Every connection stops reading and closes once its replies are out. */
  for (struct nbd_conn *c = srv->conns, *next; c; c = next) {
    next = c->next;
    if (c->state != CONN_TRANSMISSION) {
      nbd_conn_close(c, "server shutting down");
      continue;
    }
    c->state = CONN_DRAINING;
    nbd_conn_check_idle(c);
  }
  event_active(srv->shutdown_ev, EV_READ, 0);
}

void xnbd_server_free(struct xnbd_server *srv)
{
  if (!srv) return;
  while (srv->conns)
    nbd_conn_close(srv->conns, "server stopped");
  for (unsigned i = 0; i < srv->nlisteners; i++) {
    evconnlistener_free(srv->listeners[i]);
    if (srv->unix_paths[i]) { unlink(srv->unix_paths[i]); free(srv->unix_paths[i]); }
  }
  for (struct xnbd_export *e = srv->exports, *n; e; e = n) {
    n = e->next;
    free(e->name); free(e->description); free(e);
  }
  if (srv->accept_retry) event_free(srv->accept_retry);
  if (srv->shutdown_ev) event_free(srv->shutdown_ev);
  event_free(srv->done_ev);
  pthread_mutex_destroy(&srv->done_lock);
  free(srv);
}
