/* server.h: the NBD server core.  Event-driven (libevent), front end for any
 * backend (backend.h).  Serves any number of exports on any number of TCP
 * and unix listeners; many requests in flight per connection, replies sent
 * as each completes.
 *
 * Threading: the server runs on the thread that drives its event_base; all
 * calls below must be made from that thread.  Backends may complete
 * requests from any thread (the completion is handed to the loop). */
#ifndef XNBD_SERVER_H
#define XNBD_SERVER_H

#include <stdbool.h>
#include <stdint.h>

#include "backend.h"

struct event_base;
struct xnbd_server;

struct xnbd_server_config {
  unsigned handshake_timeout_s;  /* 0: default (30 s) */
  unsigned max_connections;      /* 0: default (1024) */
  uint64_t max_inflight_bytes;   /* per connection; 0: default (64 MiB) */
  uint32_t max_request;          /* largest READ/WRITE; 0: default (32 MiB) */
  void *ssl_ctx;                 /* OpenSSL SSL_CTX for NBD_OPT_STARTTLS, or NULL */
  bool tls_require;              /* refuse everything but STARTTLS before TLS */
};

/* Creates an event_base with threading support enabled (so backends can
 * complete requests from their own threads). */
struct event_base *xnbd_event_base_new(void);

struct xnbd_server *xnbd_server_new(struct event_base *base,
                                    const struct xnbd_server_config *cfg);

/* Adds an export.  name is copied; handle belongs to the caller and must
 * outlive the server.  Returns 0 or -1 (duplicate name). */
int xnbd_server_add_export(struct xnbd_server *srv, const char *name,
                           const char *description,
                           const struct xnbd_backend_ops *ops, void *handle);

/* Leaves an export added above out of NBD_OPT_LIST replies (it is still
 * served to clients that name it).  Returns 0, or -1 (no such export). */
int xnbd_server_unlist_export(struct xnbd_server *srv, const char *name);

/* Calls fn(arg, offset, length) on the event loop for each read and
 * NBD_CMD_CACHE of the export, except on connections of copiers (clients
 * that asked the meta context XNBD_META_COPIER, read-map.h).  Returns 0, or
 * -1 (no such export). */
int xnbd_server_note_reads(struct xnbd_server *srv, const char *name,
                           void (*fn)(void *arg, uint64_t off, uint64_t len), void *arg);

/* Listeners.  "HOST:PORT", "[V6]:PORT", ":PORT" (all addresses).  Port 0
 * picks a free port; xnbd_server_tcp_port() tells which.  Return 0, or -1
 * with a message already logged. */
int xnbd_server_listen_tcp(struct xnbd_server *srv, const char *addr);
int xnbd_server_listen_unix(struct xnbd_server *srv, const char *path);
/* A TCP listener whose accepted sockets pass through hook first: it
 * returns the fd to speak NBD on (e.g. one end of a transport's
 * socketpair) or -1 to drop the connection (hook owns fd either way).
 * Returns the bound port, or -1. */
int xnbd_server_listen_tcp_hook(struct xnbd_server *srv, const char *addr,
                                const char *default_port,
                                int (*hook)(int fd, void *arg), void *arg);
int xnbd_server_tcp_port(struct xnbd_server *srv); /* first TCP listener */

/* Graceful shutdown: stop accepting, answer new requests with ESHUTDOWN,
 * let in-flight requests finish and their replies drain, then close every
 * connection and call done(arg).  Safe to call more than once. */
void xnbd_server_shutdown(struct xnbd_server *srv,
                          void (*done)(void *arg), void *arg);

/* Number of open client connections. */
unsigned xnbd_server_nconns(struct xnbd_server *srv);

void xnbd_server_free(struct xnbd_server *srv);

#endif
