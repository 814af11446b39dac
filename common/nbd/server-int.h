/* server-int.h: internals of the NBD server core shared by server.c
 * (listeners, lifecycle), conn.c (connection I/O), negotiate.c (option
 * haggling) and transmit.c (requests and replies).  Not for backends.
 *
 * Everything here is touched only on the loop thread, except the done
 * queue (done_lock). */
#ifndef XNBD_SERVER_INT_H
#define XNBD_SERVER_INT_H

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>

#include <event2/event.h>
#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/listener.h>

#include "backend.h"
#include "server.h"

#define XNBD_MAX_OPTION_LEN (64 * 1024)
#define XNBD_MAX_LISTENERS 16

struct xnbd_export {
  char *name;
  char *description;
  const struct xnbd_backend_ops *ops;
  void *handle;
  bool unlisted;                 /* left out of NBD_OPT_LIST replies */
  void (*on_read)(void *arg, uint64_t off, uint64_t len);   /* or NULL */
  void *on_read_arg;
  struct xnbd_export *next;
};

/* Named connection states (logged on close). */
enum nbd_conn_state {
  CONN_WAIT_CLIENT_FLAGS,
  CONN_OPTIONS,
  CONN_TRANSMISSION,
  CONN_DRAINING,     /* DISC, ABORT or shutdown: no more input; close when idle */
};

struct nbd_conn {
  struct xnbd_server *srv;
  struct bufferevent *bev;       /* NULL once the socket is closed */
  struct event *hs_timer;        /* negotiation deadline */
  enum nbd_conn_state state;
  uint64_t id;
  char peer[80];

  /* Negotiated state. */
  bool fixed_newstyle, no_zeroes, structured, meta_base_alloc;
  bool copier;                   /* asked XNBD_META_COPIER: reads not noted */
  bool tls;                      /* STARTTLS done (bev is a TLS filter), or
                                  * the transport in front secures it */
  bool tls_filter;               /* bev is a TLS filter: no raw socket reads */
  char *meta_export;             /* export named by SET_META_CONTEXT */
  struct xnbd_export *exp;       /* chosen export (transmission) */
  uint16_t tflags;
  uint64_t size;
  uint32_t min_bs, pref_bs, max_bs;

  uint64_t skip;                 /* payload bytes still to discard */
  uint32_t skip_reply_opt;       /* option to answer TOO_BIG once skipped */
  bool skip_then_reply;

  /* Requests handed to the backend and not yet replied. */
  unsigned inflight;
  uint64_t inflight_bytes;
  bool read_paused;              /* over budget: not reading the socket */
  bool in_input;                 /* inside nbd_conn_process_input */
  unsigned busy;                 /* callbacks on the stack using this conn:
                                  * it is freed only when this is 0 */

  /* A large WRITE payload is read straight from the socket into the
   * request's buffer (no evbuffer copy) while the bufferevent's reading is
   * off: the request, bytes received so far, and the read event. */
  struct xreq *direct;
  uint64_t direct_got;
  struct event *direct_ev;

  uint64_t nreq, nerr;
  struct nbd_conn *prev, *next;
};

/* What the layers below server.c call up into (set by xnbd_server_new):
 * conn.c knows sockets only; the protocol and the server's bookkeeping
 * reach it through these, so calls between the files go down only:
 * server.c -> negotiate.c, transmit.c -> conn.c. */
struct nbd_upcalls {
  void (*greet)(struct nbd_conn *c);              /* negotiate.c */
  bool (*negotiate)(struct nbd_conn *c);          /* negotiate.c */
  bool (*transmit)(struct nbd_conn *c);           /* transmit.c */
  void (*reply)(struct nbd_conn *c, struct xreq *r, int err);   /* transmit.c */
  void (*free_req)(struct xreq *r);               /* transmit.c */
  void (*closed)(struct xnbd_server *srv);        /* server.c */
  struct xnbd_export *(*find_export)(struct xnbd_server *srv,
                                     const char *name, size_t len);  /* server.c */
};

struct xnbd_server {
  struct event_base *base;
  struct nbd_upcalls up;
  struct xnbd_server_config cfg;
  pthread_t loop_thread;
  struct xnbd_export *exports;
  struct evconnlistener *listeners[XNBD_MAX_LISTENERS];
  char *unix_paths[XNBD_MAX_LISTENERS];
  int (*hooks[XNBD_MAX_LISTENERS])(int fd, void *arg);
  void *hook_args[XNBD_MAX_LISTENERS];
  unsigned nlisteners;
  int first_tcp_port;
  int last_tcp_port;             /* of the latest listen_tcp call */
  struct nbd_conn *conns;
  unsigned nconns;
  uint64_t next_conn_id;
  bool accept_paused;
  struct event *accept_retry;

  bool shutting_down;
  void (*shutdown_done)(void *);
  void *shutdown_arg;
  struct event *shutdown_ev;

  pthread_mutex_t done_lock;     /* protects done_head/done_tail */
  struct xreq *done_head, *done_tail;
  struct event *done_ev;
};

/* conn.c */
/* secured: the transport in front (the WAN transport) already applies the
 * TLS policy, so NBD_OPT_STARTTLS is neither needed nor offered. */
void nbd_conn_new(struct xnbd_server *srv, int fd, const char *peer, bool secured);
void nbd_conn_close(struct nbd_conn *c, const char *reason);
void nbd_conn_process_input(struct nbd_conn *c);
void nbd_conn_request_done(struct nbd_conn *c, struct xreq *r, int err);
void nbd_conn_check_idle(struct nbd_conn *c);
/* Frees a closed connection once no request and no callback uses it. */
void nbd_conn_maybe_free(struct nbd_conn *c);
bool nbd_conn_is_open(const struct nbd_conn *c);
void nbd_conn_send(struct nbd_conn *c, const void *data, size_t len);
/* Replaces the connection's bufferevent by a TLS filter over it. */
int nbd_conn_start_tls(struct nbd_conn *c);
/* The completion function of every request (backend.h): hands it to the
 * loop thread, where nbd_conn_done_cb (the server's done event) replies. */
void nbd_req_done(struct xreq *r, int err);
void nbd_conn_done_cb(evutil_socket_t fd, short what, void *arg);

/* negotiate.c: returns false when it needs more input or the conn closed. */
void nego_send_greeting(struct nbd_conn *c);
bool nego_step(struct nbd_conn *c);

/* transmit.c */
bool trans_step(struct nbd_conn *c);
void trans_reply(struct nbd_conn *c, struct xreq *r, int err);
void trans_free_req(struct xreq *r);
void trans_direct_read(struct nbd_conn *c);

/* server.c */
struct xnbd_export *server_find_export(struct xnbd_server *srv,
                                       const char *name, size_t len);
void server_conn_closed(struct xnbd_server *srv);

#endif
