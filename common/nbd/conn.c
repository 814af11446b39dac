/* conn.c: one client connection: socket I/O through a bufferevent, the
 * per-connection memory budget (backpressure by not reading), and the one
 * close path.  A connection whose socket is gone stays allocated until the
 * backend has completed every request it was handed. */
#include "server-int.h"
#include "log.h"
#include "util.h"

#include <event2/bufferevent_ssl.h>
#include <openssl/ssl.h>

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <unistd.h>

#define OUTPUT_HIGH (64u << 20)    /* stop reading requests above this */
#define OUTPUT_LOW  (8u << 20)     /* resume at or below this */

bool nbd_conn_is_open(const struct nbd_conn *c) { return c->bev != NULL; }

void nbd_conn_send(struct nbd_conn *c, const void *data, size_t len)
{
  if (c->bev)
    evbuffer_add(bufferevent_get_output(c->bev), data, len);
}

static void nbd_conn_free(struct nbd_conn *c)
{
  struct xnbd_server *srv = c->srv;
  if (c->prev) c->prev->next = c->next;
  else srv->conns = c->next;
  if (c->next) c->next->prev = c->prev;
  srv->nconns--;
  free(c->meta_export);
  free(c);
  srv->up.closed(srv);
}

void nbd_conn_maybe_free(struct nbd_conn *c)
{
  if (!c->bev && c->inflight == 0 && c->busy == 0)
    nbd_conn_free(c);
}

static const char *state_name(enum nbd_conn_state s)
{
  switch (s) {
  case CONN_WAIT_CLIENT_FLAGS: return "waiting for client flags";
  case CONN_OPTIONS: return "negotiating";
  case CONN_TRANSMISSION: return "transmission";
  case CONN_DRAINING: return "disconnecting";
  }
  return "?";
}

void nbd_conn_close(struct nbd_conn *c, const char *reason)
{
  if (!c->bev) return;
  if (c->state == CONN_DRAINING || c->state == CONN_TRANSMISSION)
    log_debug("connection %" PRIu64 " from %s closed (%s) after %" PRIu64
              " requests, %" PRIu64 " errors", c->id, c->peer, reason,
              c->nreq, c->nerr);
  else
    log_info("connection %" PRIu64 " from %s closed while %s: %s", c->id,
             c->peer, state_name(c->state), reason);
  if (c->direct_ev) { event_free(c->direct_ev); c->direct_ev = NULL; }
  if (c->direct) { c->srv->up.free_req(c->direct); c->direct = NULL; }
  bufferevent_free(c->bev);
  c->bev = NULL;
  if (c->hs_timer) { event_free(c->hs_timer); c->hs_timer = NULL; }
  nbd_conn_maybe_free(c);
}

/* Under budget again: read (and parse what is already buffered). */
static void nbd_conn_maybe_resume(struct nbd_conn *c)
{
  if (!c->bev || !c->read_paused || c->state != CONN_TRANSMISSION)
    return;
  if (c->inflight_bytes > c->srv->cfg.max_inflight_bytes / 2 ||
      evbuffer_get_length(bufferevent_get_output(c->bev)) > OUTPUT_LOW)
    return;
  c->read_paused = false;
  if (!c->direct)
    bufferevent_enable(c->bev, EV_READ);
  nbd_conn_process_input(c);
}

/* Over budget: stop reading the socket.  Returns true if paused. */
static bool nbd_conn_check_budget(struct nbd_conn *c)
{
  if (!c->bev) return true;
  if (c->inflight_bytes > c->srv->cfg.max_inflight_bytes ||
      evbuffer_get_length(bufferevent_get_output(c->bev)) > OUTPUT_HIGH) {
    if (!c->read_paused) {
      c->read_paused = true;
      bufferevent_disable(c->bev, EV_READ);
    }
    return true;
  }
  return false;
}

void nbd_conn_check_idle(struct nbd_conn *c)
{
  if (!c->bev || c->state != CONN_DRAINING || c->inflight > 0)
    return;
  bufferevent_disable(c->bev, EV_READ);
  if (evbuffer_get_length(bufferevent_get_output(c->bev)) == 0)
    nbd_conn_close(c, c->srv->shutting_down ? "server shutting down"
                                        : "client disconnected");
}

void nbd_conn_process_input(struct nbd_conn *c)
{
  if (c->in_input) return;
  c->in_input = true;
  c->busy++;
  while (c->bev && !c->read_paused && !c->direct) {
    bool more;
    switch (c->state) {
    case CONN_WAIT_CLIENT_FLAGS:
    case CONN_OPTIONS:
      more = c->srv->up.negotiate(c);
      break;
    case CONN_TRANSMISSION:
      more = c->srv->up.transmit(c);
      if (more) nbd_conn_check_budget(c);
      break;
    default:
      more = false;
    }
    if (!more) break;
  }
  c->in_input = false;
  nbd_conn_check_idle(c);
  c->busy--;
  nbd_conn_maybe_free(c);
}

void nbd_conn_request_done(struct nbd_conn *c, struct xreq *r, int err)
{
  c->busy++;
  c->inflight--;
  if (r->type == XREQ_READ || r->type == XREQ_WRITE)
    c->inflight_bytes -= r->length;
  if (c->bev)
    c->srv->up.reply(c, r, err);
  c->srv->up.free_req(r);
  nbd_conn_check_idle(c);
  if (c->bev && !c->in_input)
    nbd_conn_maybe_resume(c);
  c->busy--;
  nbd_conn_maybe_free(c);
}

static void read_cb(struct bufferevent *bev, void *arg)
{
  nbd_conn_process_input(arg);
}

static void write_cb(struct bufferevent *bev, void *arg)
{
  struct nbd_conn *c = arg;
  c->busy++;
  nbd_conn_check_idle(c);
  if (c->bev) nbd_conn_maybe_resume(c);
  c->busy--;
  nbd_conn_maybe_free(c);
}

static void event_cb(struct bufferevent *bev, short what, void *arg)
{
  struct nbd_conn *c = arg;
  char why[128];
  if (what & BEV_EVENT_EOF)
    snprintf(why, sizeof why, "client hung up%s",
             c->inflight ? " with requests in flight" : "");
  else if (what & BEV_EVENT_ERROR)
    snprintf(why, sizeof why, "socket error: %s",
             evutil_socket_error_to_string(EVUTIL_SOCKET_ERROR()));
  else
    return;
  nbd_conn_close(c, why);
}

static void hs_timeout_cb(evutil_socket_t fd, short what, void *arg)
{
  struct nbd_conn *c = arg;
  char why[96];
  if (c->state == CONN_TRANSMISSION) return;
  snprintf(why, sizeof why, "negotiation not finished within %u s "
           "(--handshake-timeout)", c->srv->cfg.handshake_timeout_s);
  nbd_conn_close(c, why);
}

static void setup_bev(struct nbd_conn *c)
{
  bufferevent_setcb(c->bev, read_cb, write_cb, event_cb, c);
  /* Large single reads and writes: 1 MiB sequential I/O at GB/s. */
  bufferevent_set_max_single_read(c->bev, 1 << 20);
  bufferevent_set_max_single_write(c->bev, 4 << 20);
  /* Never buffer more than one maximal request (plus headers). */
  bufferevent_setwatermark(c->bev, EV_READ, 0,
                           (size_t) c->srv->cfg.max_request + XNBD_MAX_OPTION_LEN);
  bufferevent_setwatermark(c->bev, EV_WRITE, OUTPUT_LOW, 0);
}

int nbd_conn_start_tls(struct nbd_conn *c)
{
  SSL *ssl = SSL_new(c->srv->cfg.ssl_ctx);
  struct bufferevent *f;
  if (!ssl) return -1;
  /* The ACK already queued on the plain bufferevent goes out first. */
  f = bufferevent_openssl_filter_new(c->srv->base, c->bev, ssl,
                                     BUFFEREVENT_SSL_ACCEPTING,
                                     BEV_OPT_CLOSE_ON_FREE);
  if (!f) { SSL_free(ssl); return -1; }
  c->bev = f;
  c->tls = true;
  c->tls_filter = true;
  setup_bev(c);
  bufferevent_enable(c->bev, EV_READ | EV_WRITE);
  return 0;
}

void nbd_conn_new(struct xnbd_server *srv, int fd, const char *peer, bool secured)
{
  struct nbd_conn *c = calloc(1, sizeof *c);
  struct timeval tv = { srv->cfg.handshake_timeout_s, 0 };

  if (!c) { close(fd); return; }
  c->bev = bufferevent_socket_new(srv->base, fd, BEV_OPT_CLOSE_ON_FREE);
  if (!c->bev) { close(fd); free(c); return; }
  c->srv = srv;
  c->id = ++srv->next_conn_id;
  snprintf(c->peer, sizeof c->peer, "%s", peer);
  c->state = CONN_WAIT_CLIENT_FLAGS;
  c->tls = secured;
  c->next = srv->conns;
  if (srv->conns) srv->conns->prev = c;
  srv->conns = c;
  srv->nconns++;

  setup_bev(c);
  c->hs_timer = evtimer_new(srv->base, hs_timeout_cb, c);
  evtimer_add(c->hs_timer, &tv);
  log_debug("connection %" PRIu64 " from %s", c->id, peer);
  srv->up.greet(c);
  bufferevent_enable(c->bev, EV_READ | EV_WRITE);
}

/* Completions from backend threads land here and are replied on the loop. */
void nbd_conn_done_cb(evutil_socket_t fd, short what, void *arg)
{
  struct xnbd_server *srv = arg;
  struct xreq *list;

  pthread_mutex_lock(&srv->done_lock);
  list = srv->done_head;
  srv->done_head = srv->done_tail = NULL;
  pthread_mutex_unlock(&srv->done_lock);

  while (list) {
    struct xreq *r = list;
    list = r->fe_next;
    nbd_conn_request_done(r->fe_priv, r, (int) r->be_u64);
  }
}

/* The completion function given to every request (backend.h). */
void nbd_req_done(struct xreq *r, int err)
{
  struct nbd_conn *c = r->fe_priv;
  struct xnbd_server *srv = c->srv;

  if (pthread_equal(pthread_self(), srv->loop_thread)) {
    nbd_conn_request_done(c, r, err);
    return;
  }
  r->be_u64 = (uint64_t) err;
  r->fe_next = NULL;
  pthread_mutex_lock(&srv->done_lock);
  bool was_empty = srv->done_head == NULL;
  if (srv->done_tail) srv->done_tail->fe_next = r;
  else srv->done_head = r;
  srv->done_tail = r;
  pthread_mutex_unlock(&srv->done_lock);
  if (was_empty)
    event_active(srv->done_ev, EV_READ, 0);
}
