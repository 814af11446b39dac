/* control.c: xnbd-proxy's control socket server (protocol in control.h).
 *
 * Each client is a bufferevent.  Input is bounded: the read high-water
 * mark stops reading at CONTROL_MAX_LINE + 2 bytes, and a line that does
 * not fit is answered with an error and skipped (client->discarding).
 * Output is bounded too: while a client has more than CLIENT_OUT_MAX bytes
 * of unread replies we stop reading its commands.
 *
 * Engine calls that may block (detach, reconnect, flush) run on a thread
 * of their own (struct control_job); the thread hands the finished job back
 * through a pipe, and the reply is sent from the loop.  While a client has
 * a job running, its later commands wait (replies stay in order). */
#include "control.h"
#include "engine.h"
#include "json.h"
#include "log.h"
#include "util.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <event2/buffer.h>
#include <event2/bufferevent.h>
#include <event2/event.h>
#include <event2/listener.h>

#define CLIENT_OUT_MAX (256 * 1024)  /* unread reply bytes before we stop reading */
#define MAX_WORDS      8             /* more words than any command takes */
#define ECHO_MAX       64            /* bytes of a bad command echoed back */

struct control_client;

enum job_kind { JOB_DETACH, JOB_RECONNECT, JOB_FLUSH };

/* One blocking engine call.  Created on the loop, run on its own thread,
 * finished (joined, replied, freed) on the loop by jobs_done_cb. */
struct control_job {
  struct control *ctl;
  struct control_client *client;  /* owner; stays allocated while busy */
  pthread_t thread;
  enum job_kind kind;
  bool force;                     /* detach --force */
  char *arg;                      /* reconnect URI (owned) */
  int rc;                         /* engine call's result */
  int saved_errno;
  char err[512];
  struct control_job *next;       /* ctl->jobs */
};

struct control_client {
  struct control *ctl;
  struct bufferevent *bev;        /* NULL once the connection is closed */
  unsigned id;
  bool discarding;                /* skipping the rest of an over-long line */
  bool busy;                      /* a job runs for this client */
  bool out_blocked;               /* reading paused: too many unread replies */
  bool eof;                       /* the client has half-closed */
  struct control_client *prev, *next;
};

struct control {
  struct event_base *base;
  struct engine *e;
  char *path;
  dev_t sock_dev;                 /* identity of our socket file, so */
  ino_t sock_ino;                 /* control_free unlinks only ours */
  struct evconnlistener *listener;
  struct event *accept_retry;     /* re-enables accepting after EMFILE */
  int wake[2];                    /* job threads -> loop: finished jobs */
  struct event *wake_ev;
  struct control_client *clients;
  unsigned nclients;
  unsigned next_id;
  struct control_job *jobs;       /* running or not yet reaped */
};

static void client_process(struct control_client *c);

/* ---- replies ---------------------------------------------------------- */

static void send_raw(struct control_client *c, const char *buf, size_t len)
{
  if (c->bev && bufferevent_write(c->bev, buf, len) < 0)
    log_warn("control client %u: cannot queue a reply (out of memory?)", c->id);
}

/* Sends {"ok":true<members>}\n; members is what a command wrote, either
 * empty or starting with a comma. */
static void send_ok(struct control_client *c, const char *members, size_t len)
{
  send_raw(c, "{\"ok\":true", 10);
  send_raw(c, members, len);
  send_raw(c, "}\n", 2);
}

static void send_error(struct control_client *c, const char *fmt, ...)
  __attribute__((format(printf, 2, 3)));
static void send_error(struct control_client *c, const char *fmt, ...)
{
  va_list ap;
  char msg[1024];
  char *buf = NULL;
  size_t len = 0;
  FILE *f;

  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  f = open_memstream(&buf, &len);
  if (!f) {
    static const char oom[] =
      "{\"ok\":false,\"error\":\"out of memory in xnbd-proxy\"}\n";
    send_raw(c, oom, sizeof oom - 1);
    return;
  }
  fputs("{\"ok\":false,\"error\":", f);
  json_fput_string(f, msg);
  fputs("}\n", f);
  fclose(f);
  send_raw(c, buf, len);
  free(buf);
}

/* ---- commands --------------------------------------------------------- */

/* A command writes its reply members into f (each starting with a comma)
 * and returns 0, or returns -1 with the error in err, or 1 when it started
 * a job (the reply comes when the job ends). */
typedef int cmd_fn(struct control_client *c, int argc, char **argv, FILE *f,
                   char *err, size_t errlen);

struct command {
  const char *name, *alias;
  int min_args, max_args;
  const char *usage, *description;
  cmd_fn *fn;
};

static cmd_fn cmd_status, cmd_cache_all, cmd_pause, cmd_resume, cmd_rate,
  cmd_detach, cmd_reconnect, cmd_flush, cmd_help, cmd_activate;

static const struct command commands[] = {
  { "status", "query", 0, 0, "status",
    "show the migration state and statistics (JSON)", cmd_status },
  { "cache-all", NULL, 0, 0, "cache-all",
    "start copying every missing block from the source in the background",
    cmd_cache_all },
  { "activate", NULL, 0, 0, "activate",
    "switch-over done: keep blocks from now on (leaves --standby)", cmd_activate },
  { "pause", NULL, 0, 0, "pause", "pause the background copy", cmd_pause },
  { "resume", NULL, 0, 0, "resume", "resume the background copy", cmd_resume },
  { "rate", NULL, 1, 1, "rate LIMIT",
    "limit the background copy to LIMIT: 100mbit, 12M (bytes/s), 0 = unlimited",
    cmd_rate },
  { "detach", "switch", 0, 1, "detach [--force]",
    "stop using the source; refused while blocks are missing unless --force",
    cmd_detach },
  { "reconnect", NULL, 1, 1, "reconnect URI",
    "use another address of the same source (nbd://, nbds://, nbd+unix://, HOST:PORT)",
    cmd_reconnect },
  { "flush", NULL, 0, 0, "flush",
    "make everything written so far durable (data, then bitmap)", cmd_flush },
  { "help", NULL, 0, 0, "help", "list the commands", cmd_help },
};

#define COMMAND_LIST "status, cache-all, activate, pause, resume, rate LIMIT, " \
  "detach [--force], reconnect URI, flush, help"

/* present/total rounded down to 4 decimals, so 1.0000 means complete. */
static void put_progress(FILE *f, uint64_t present, uint64_t total)
{
  uint64_t p = 10000;
  if (total)
    p = (uint64_t) ((unsigned __int128) MIN(present, total) * 10000 / total);
  fprintf(f, "%" PRIu64 ".%04" PRIu64, p / 10000, p % 10000);
}

static void put_member_str(FILE *f, const char *name, const char *value)
{
  fprintf(f, ",\"%s\":", name);
  json_fput_string(f, value);
}

static int cmd_status(struct control_client *c, int argc, char **argv, FILE *f,
                      char *err, size_t errlen)
{
  struct engine_stats st;
  memset(&st, 0, sizeof st);
  engine_get_stats(c->ctl->e, &st);
  /* The engine fills fixed arrays; make sure they are terminated. */
  st.target[sizeof st.target - 1] = '\0';
  st.source_id[sizeof st.source_id - 1] = '\0';
  st.last_error[sizeof st.last_error - 1] = '\0';

  put_member_str(f, "state", engine_state_name(st.state));
  fprintf(f, ",\"image_size\":%" PRIu64 ",\"block_size\":%" PRIu32,
          st.image_size, st.block_size);
  fprintf(f, ",\"blocks\":{\"total\":%" PRIu64 ",\"present\":%" PRIu64
          ",\"missing\":%" PRIu64 ",\"inflight\":%" PRIu64 "}",
          st.blocks_total, st.blocks_present, st.blocks_missing, st.blocks_inflight);
  fprintf(f, ",\"bytes\":{\"fetched\":%" PRIu64 ",\"zero_skipped\":%" PRIu64
          ",\"local_written\":%" PRIu64 ",\"bridged\":%" PRIu64 "}",
          st.bytes_fetched, st.bytes_zero_skipped, st.bytes_local_written,
          st.bytes_bridged);
  fprintf(f, ",\"fetches\":{\"ondemand\":%" PRIu64 ",\"background\":%" PRIu64
          ",\"errors\":%" PRIu64 "}",
          st.fetches_ondemand, st.fetches_background, st.fetch_errors);
  fprintf(f, ",\"fetch_rate\":%" PRIu64 ",\"ondemand_waiting\":%" PRIu64,
          st.fetch_rate, st.ondemand_waiting);
  fprintf(f, ",\"background\":{\"running\":%s,\"paused\":%s,\"rate\":%" PRIu64
          ",\"window\":%" PRIu64 "}",
          st.bg_running ? "true" : "false", st.bg_paused ? "true" : "false",
          st.bg_rate, st.bg_window);
  fprintf(f, ",\"connections\":{\"up\":%u,\"total\":%u}",
          st.connections_up, st.connections);
  fprintf(f, ",\"rtt_us\":%" PRIu64 ",\"standby\":%s", st.rtt_us,
          st.standby ? "true" : "false");
  /* WAN transport (xnbd://): bytes before and after zstd, both ways. */
  fprintf(f, ",\"wire\":{\"tx_raw\":%" PRIu64 ",\"tx\":%" PRIu64
          ",\"rx\":%" PRIu64 ",\"rx_raw\":%" PRIu64 "}",
          st.wire_tx_raw, st.wire_tx, st.wire_rx, st.wire_rx_raw);
  put_member_str(f, "target", st.target);
  put_member_str(f, "source_id", st.source_id);
  put_member_str(f, "last_error", st.last_error);
  fprintf(f, ",\"forced_missing\":%" PRIu64 ",\"progress\":", st.forced_missing);
  put_progress(f, st.blocks_present, st.blocks_total);
  return 0;
}

/* An engine call failed: pass its message on (it says what and why). */
static int engine_failed(const char *what, char *err, size_t errlen)
{
  if (err[0] == '\0')
    snprintf(err, errlen, "%s failed and the engine gave no reason; "
             "see xnbd-proxy's log", what);
  return -1;
}

static int cmd_cache_all(struct control_client *c, int argc, char **argv, FILE *f,
                         char *err, size_t errlen)
{
  log_info("control client %u: cache-all", c->id);
  if (engine_bg_start(c->ctl->e, err, errlen) < 0)
    return engine_failed("cache-all", err, errlen);
  return 0;
}

static int cmd_activate(struct control_client *c, int argc, char **argv, FILE *f,
                        char *err, size_t errlen)
{
  log_info("control client %u: activate", c->id);
  engine_activate(c->ctl->e, "xnbd-ctl activate");
  return 0;
}

static int cmd_pause(struct control_client *c, int argc, char **argv, FILE *f,
                     char *err, size_t errlen)
{
  log_info("control client %u: pause", c->id);
  if (engine_bg_pause(c->ctl->e, err, errlen) < 0)
    return engine_failed("pause", err, errlen);
  return 0;
}

static int cmd_resume(struct control_client *c, int argc, char **argv, FILE *f,
                      char *err, size_t errlen)
{
  log_info("control client %u: resume", c->id);
  if (engine_bg_resume(c->ctl->e, err, errlen) < 0)
    return engine_failed("resume", err, errlen);
  return 0;
}

static int cmd_rate(struct control_client *c, int argc, char **argv, FILE *f,
                    char *err, size_t errlen)
{
  uint64_t bps;
  const char *why = "not a rate";
  if (parse_rate(argv[1], &bps, &why) < 0) {
    snprintf(err, errlen, "rate: cannot parse \"%.*s\": %s; usage: rate LIMIT "
             "(e.g. 100mbit, 12M for bytes/s, 0 for unlimited)",
             ECHO_MAX, argv[1], why);
    return -1;
  }
  log_info("control client %u: rate %s (%" PRIu64 " bytes/s)", c->id, argv[1], bps);
  if (engine_set_bg_rate(c->ctl->e, bps) < 0) {
    snprintf(err, errlen, "rate: the engine refused %" PRIu64 " bytes/s; "
             "see xnbd-proxy's log", bps);
    return -1;
  }
  fprintf(f, ",\"rate\":%" PRIu64, bps);
  return 0;
}

static void *job_main(void *arg);

/* Starts a job for c; returns 1, or -1 with err. */
static int start_job(struct control_client *c, enum job_kind kind, bool force,
                     const char *arg, char *err, size_t errlen)
{
  static const char *names[] = { "detach", "reconnect", "flush" };
  struct control_job *j = calloc(1, sizeof *j);
  int r;
  if (!j || (arg && !(j->arg = strdup(arg)))) {
    free(j);
    snprintf(err, errlen, "%s: out of memory in xnbd-proxy", names[kind]);
    return -1;
  }
  j->ctl = c->ctl;
  j->client = c;
  j->kind = kind;
  j->force = force;
  r = pthread_create(&j->thread, NULL, job_main, j);
  if (r != 0) {
    snprintf(err, errlen, "%s: cannot start a thread: %s; try again",
             names[kind], strerror(r));
    free(j->arg);
    free(j);
    return -1;
  }
  j->next = c->ctl->jobs;
  c->ctl->jobs = j;
  c->busy = true;
  return 1;
}

static int cmd_detach(struct control_client *c, int argc, char **argv, FILE *f,
                      char *err, size_t errlen)
{
  bool force = false;
  if (argc == 2) {
    if (strcmp(argv[1], "--force") && strcmp(argv[1], "-f")) {
      snprintf(err, errlen, "%s: unknown argument \"%.*s\"; usage: detach [--force]",
               argv[0], ECHO_MAX, argv[1]);
      return -1;
    }
    force = true;
  }
  log_info("control client %u: detach%s", c->id, force ? " --force" : "");
  return start_job(c, JOB_DETACH, force, NULL, err, errlen);
}

static int cmd_reconnect(struct control_client *c, int argc, char **argv, FILE *f,
                         char *err, size_t errlen)
{
  log_info("control client %u: reconnect %s", c->id, argv[1]);
  return start_job(c, JOB_RECONNECT, false, argv[1], err, errlen);
}

static int cmd_flush(struct control_client *c, int argc, char **argv, FILE *f,
                     char *err, size_t errlen)
{
  log_debug("control client %u: flush", c->id);
  return start_job(c, JOB_FLUSH, false, NULL, err, errlen);
}

static int cmd_help(struct control_client *c, int argc, char **argv, FILE *f,
                    char *err, size_t errlen)
{
  fputs(",\"commands\":[", f);
  for (size_t i = 0; i < ARRAY_SIZE(commands); i++) {
    const struct command *cmd = &commands[i];
    fputs(i ? ",{\"command\":" : "{\"command\":", f);
    json_fput_string(f, cmd->name);
    fputs(",\"aliases\":[", f);
    if (cmd->alias)
      json_fput_string(f, cmd->alias);
    fputs("],\"usage\":", f);
    json_fput_string(f, cmd->usage);
    fputs(",\"description\":", f);
    json_fput_string(f, cmd->description);
    fputs("}", f);
  }
  fputs("]", f);
  return 0;
}

/* ---- jobs ------------------------------------------------------------- */

static void *job_main(void *arg)
{
  struct control_job *j = arg;
  struct engine *e = j->ctl->e;

  switch (j->kind) {
  case JOB_DETACH:
    j->rc = engine_detach(e, j->force, j->err, sizeof j->err);
    break;
  case JOB_RECONNECT:
    j->rc = engine_reconnect(e, j->arg, j->err, sizeof j->err);
    break;
  case JOB_FLUSH:
    errno = 0;
    j->rc = engine_flush(e);
    j->saved_errno = j->rc < -1 ? -j->rc : errno;
    break;
  }
  /* A pointer is far below PIPE_BUF: the write is atomic. */
  while (write(j->ctl->wake[1], &j, sizeof j) < 0 && errno == EINTR)
    ;
  return NULL;
}

static void client_free(struct control_client *c);

/* On the loop: reply for a finished job and let its client go on. */
static void job_finish(struct control_job *j)
{
  struct control_client *c = j->client;
  struct engine_stats st;
  char *buf = NULL;
  size_t len = 0;

  pthread_join(j->thread, NULL);
  c->busy = false;
  if (!c->bev) {                 /* the client left while we worked */
    client_free(c);
    goto out;
  }
  if (j->rc < 0) {
    switch (j->kind) {
    case JOB_DETACH:
      send_error(c, "%s", j->err[0] ? j->err :
                 "detach failed and the engine gave no reason; see xnbd-proxy's log");
      break;
    case JOB_RECONNECT:
      send_error(c, "%s", j->err[0] ? j->err :
                 "reconnect failed and the engine gave no reason; see xnbd-proxy's log");
      break;
    case JOB_FLUSH:
      if (j->saved_errno)
        send_error(c, "flush failed: %s; the cache could not be made durable: "
                   "check the cache disk and xnbd-proxy's log",
                   strerror(j->saved_errno));
      else
        send_error(c, "flush failed; the cache could not be made durable: "
                   "check the cache disk and xnbd-proxy's log");
      break;
    }
  } else {
    FILE *f = open_memstream(&buf, &len);
    if (f) {
      memset(&st, 0, sizeof st);
      engine_get_stats(j->ctl->e, &st);
      st.target[sizeof st.target - 1] = '\0';
      put_member_str(f, "state", engine_state_name(st.state));
      if (j->kind == JOB_DETACH)
        fprintf(f, ",\"forced_missing\":%" PRIu64, st.forced_missing);
      if (j->kind == JOB_RECONNECT)
        put_member_str(f, "target", st.target);
      fclose(f);
      send_ok(c, buf, len);
      free(buf);
    } else {
      send_ok(c, "", 0);
    }
  }
  client_process(c);
 out:
  free(j->arg);
  free(j);
}

static void jobs_done_cb(evutil_socket_t fd, short what, void *arg)
{
  struct control *ctl = arg;
  struct control_job *done[16];
  ssize_t n;

  while ((n = read(fd, done, sizeof done)) > 0) {
    for (size_t i = 0; i < (size_t) n / sizeof done[0]; i++) {
      struct control_job **pp = &ctl->jobs;
      while (*pp && *pp != done[i])
        pp = &(*pp)->next;
      if (*pp)
        *pp = done[i]->next;
      job_finish(done[i]);
    }
  }
}

/* ---- clients ---------------------------------------------------------- */

/* Releases the connection; the struct itself waits for a running job. */
static void client_close(struct control_client *c, const char *why)
{
  if (c->bev) {
    log_debug("control client %u: closed (%s)", c->id, why);
    bufferevent_free(c->bev);
    c->bev = NULL;
  }
  if (!c->busy)
    client_free(c);
}

static void client_free(struct control_client *c)
{
  struct control *ctl = c->ctl;
  if (c->bev)
    bufferevent_free(c->bev);
  if (c->prev) c->prev->next = c->next;
  else ctl->clients = c->next;
  if (c->next) c->next->prev = c->prev;
  ctl->nclients--;
  free(c);
}

/* Splits line into words (spaces and tabs); returns the count, which is
 * MAX_WORDS + 1 when there are too many. */
static int split_words(char *line, char **argv)
{
  int argc = 0;
  char *p = line;
  for (;;) {
    while (*p == ' ' || *p == '\t') *p++ = '\0';
    if (!*p) break;
    if (argc == MAX_WORDS) return MAX_WORDS + 1;
    argv[argc++] = p;
    while (*p && *p != ' ' && *p != '\t') p++;
  }
  return argc;
}

static void handle_line(struct control_client *c, char *line, size_t len)
{
  char *argv[MAX_WORDS];
  char err[1024] = "";
  const struct command *cmd = NULL;
  char *buf = NULL;
  size_t blen = 0;
  FILE *f;
  int argc, r;

  /* Control characters (including NUL) have no place in a command. */
  for (size_t i = 0; i < len; i++) {
    unsigned char ch = line[i];
    if ((ch < 0x20 && ch != '\t') || ch == 0x7f) {
      char first[ECHO_MAX + 1];
      size_t n = strcspn(line, " \t");
      n = MIN(n, MIN(i, (size_t) ECHO_MAX));
      memcpy(first, line, n);
      first[n] = '\0';
      send_error(c, "invalid command line%s%s%s: byte %zu is the control character "
                 "0x%02x; send plain text commands, one per line (send \"help\" "
                 "for the list)", n ? " \"" : "", first, n ? "\"" : "", i + 1, ch);
      return;
    }
  }
  argc = split_words(line, argv);
  if (argc == 0)
    return;                      /* empty line: no command, no reply */
  for (size_t i = 0; i < ARRAY_SIZE(commands); i++)
    if (strcmp(argv[0], commands[i].name) == 0 ||
        (commands[i].alias && strcmp(argv[0], commands[i].alias) == 0)) {
      cmd = &commands[i];
      break;
    }
  if (!cmd) {
    send_error(c, "unknown command \"%.*s\"; the commands are: " COMMAND_LIST
               " (send \"help\" for details)", ECHO_MAX, argv[0]);
    return;
  }
  if (argc - 1 < cmd->min_args || argc - 1 > cmd->max_args) {
    if (argc - 1 < cmd->min_args)
      send_error(c, "%s: missing argument; usage: %s (%s)",
                 argv[0], cmd->usage, cmd->description);
    else
      send_error(c, "%s: too many arguments (\"%.*s\" is extra); usage: %s (%s)",
                 argv[0], ECHO_MAX, argv[cmd->max_args + 1], cmd->usage,
                 cmd->description);
    return;
  }

  f = open_memstream(&buf, &blen);
  if (!f) {
    send_error(c, "%s: out of memory in xnbd-proxy", argv[0]);
    return;
  }
  r = cmd->fn(c, argc, argv, f, err, sizeof err);
  fclose(f);
  if (r == 0)
    send_ok(c, buf, blen);
  else if (r < 0)
    send_error(c, "%s", err);
  free(buf);
}

/* Runs every complete command in c's input, in order.  May free c. */
static void client_process(struct control_client *c)
{
  char line[CONTROL_MAX_LINE + 2];

  while (c->bev && !c->busy) {
    struct evbuffer *in = bufferevent_get_input(c->bev);
    struct evbuffer *out = bufferevent_get_output(c->bev);
    size_t avail = evbuffer_get_length(in);
    struct evbuffer_ptr eol;
    size_t len;

    if (evbuffer_get_length(out) > CLIENT_OUT_MAX) {
      /* Backpressure: read no more commands until it reads its replies. */
      if (!c->out_blocked)
        log_debug("control client %u: %zu reply bytes unread; reading no "
                  "more commands until it catches up", c->id,
                  evbuffer_get_length(out));
      c->out_blocked = true;
      bufferevent_disable(c->bev, EV_READ);
      return;
    }
    if (avail == 0)
      break;
    eol = evbuffer_search(in, "\n", 1, NULL);
    if (c->discarding) {
      if (eol.pos < 0) {
        evbuffer_drain(in, avail);
        break;
      }
      evbuffer_drain(in, eol.pos + 1);
      c->discarding = false;
      continue;
    }
    if (eol.pos < 0 && avail <= CONTROL_MAX_LINE + 1 && !c->eof)
      break;                     /* wait for the rest of the line */
    if (eol.pos < 0 && avail > CONTROL_MAX_LINE + 1) {
      evbuffer_drain(in, avail);
      c->discarding = !c->eof;
      send_error(c, "command line too long (more than %d bytes); it was "
                 "discarded: send one short command per line", CONTROL_MAX_LINE);
      continue;
    }
    len = eol.pos < 0 ? avail : (size_t) eol.pos;   /* EOF: a last line */
    if (len > CONTROL_MAX_LINE + 1) {
      evbuffer_drain(in, len + 1);
      send_error(c, "command line too long (more than %d bytes); it was "
                 "discarded: send one short command per line", CONTROL_MAX_LINE);
      continue;
    }
    evbuffer_remove(in, line, len);
    if (eol.pos >= 0)
      evbuffer_drain(in, 1);
    if (len > 0 && line[len - 1] == '\r')
      len--;
    if (len > CONTROL_MAX_LINE) {
      send_error(c, "command line too long (more than %d bytes); it was "
                 "discarded: send one short command per line", CONTROL_MAX_LINE);
      continue;
    }
    line[len] = '\0';
    handle_line(c, line, len);
  }

  /* After a half-close: close once every reply has been written. */
  if (c->bev && c->eof && !c->busy &&
      evbuffer_get_length(bufferevent_get_output(c->bev)) == 0)
    client_close(c, "client finished");
}

static void client_read_cb(struct bufferevent *bev, void *arg)
{
  client_process(arg);
}

static void client_write_cb(struct bufferevent *bev, void *arg)
{
  struct control_client *c = arg;
  if (c->out_blocked) {
    c->out_blocked = false;
    if (!c->eof)
      bufferevent_enable(bev, EV_READ);
    client_process(c);
  } else if (c->eof) {
    client_process(c);           /* closes once everything is answered */
  }
}

static void client_event_cb(struct bufferevent *bev, short what, void *arg)
{
  struct control_client *c = arg;
  if (what & BEV_EVENT_ERROR) {
    client_close(c, strerror(EVUTIL_SOCKET_ERROR()));
  } else if (what & BEV_EVENT_EOF) {
    c->eof = true;
    client_process(c);           /* answers a last line without LF */
  }
}

/* ---- accepting -------------------------------------------------------- */

static void accept_cb(struct evconnlistener *lis, evutil_socket_t fd,
                      struct sockaddr *sa, int salen, void *arg)
{
  struct control *ctl = arg;
  struct control_client *c;

  if (ctl->nclients >= CONTROL_MAX_CLIENTS) {
    static const char busy[] = "{\"ok\":false,\"error\":\"too many control "
      "clients (at most 64 at once); close idle xnbd-ctl or socat sessions "
      "and try again\"}\n";
    log_warn("control socket %s: refusing a client: %u clients already connected",
             ctl->path, ctl->nclients);
    if (send(fd, busy, sizeof busy - 1, MSG_NOSIGNAL | MSG_DONTWAIT) < 0)
      log_debug("control socket %s: cannot tell the refused client why: %s",
                ctl->path, strerror(errno));
    evutil_closesocket(fd);
    return;
  }
  c = calloc(1, sizeof *c);
  if (!c) {
    log_warn("control socket %s: out of memory accepting a client", ctl->path);
    evutil_closesocket(fd);
    return;
  }
  c->ctl = ctl;
  c->id = ++ctl->next_id;
  c->bev = bufferevent_socket_new(ctl->base, fd, BEV_OPT_CLOSE_ON_FREE);
  if (!c->bev) {
    log_warn("control socket %s: cannot set up a client connection", ctl->path);
    evutil_closesocket(fd);
    free(c);
    return;
  }
  c->next = ctl->clients;
  if (c->next) c->next->prev = c;
  ctl->clients = c;
  ctl->nclients++;
  bufferevent_setcb(c->bev, client_read_cb, client_write_cb, client_event_cb, c);
  /* Stop reading once a whole maximal line (plus CR LF) is buffered. */
  bufferevent_setwatermark(c->bev, EV_READ, 0, CONTROL_MAX_LINE + 2);
  bufferevent_enable(c->bev, EV_READ | EV_WRITE);
  log_debug("control client %u: connected", c->id);
}

static void accept_retry_cb(evutil_socket_t fd, short what, void *arg)
{
  struct control *ctl = arg;
  evconnlistener_enable(ctl->listener);
}

static void accept_error_cb(struct evconnlistener *lis, void *arg)
{
  struct control *ctl = arg;
  int err = EVUTIL_SOCKET_ERROR();
  struct timeval one_s = { 1, 0 };
  /* Out of descriptors (or similar): pause accepting instead of spinning. */
  log_warn("control socket %s: accept failed: %s; pausing new control "
           "connections for 1 s", ctl->path, strerror(err));
  evconnlistener_disable(lis);
  evtimer_add(ctl->accept_retry, &one_s);
}

/* ---- socket file ------------------------------------------------------ */

static int make_socket(struct control *ctl, const char *path, char *err, size_t errlen)
{
  struct sockaddr_un sa;
  struct stat st;
  mode_t old_mask;
  int fd, r, saved;

  memset(&sa, 0, sizeof sa);
  sa.sun_family = AF_UNIX;
  if (path[0] == '\0' || strlen(path) >= sizeof sa.sun_path) {
    snprintf(err, errlen, "control socket path \"%s\" is %s (a unix socket path "
             "has at most %zu bytes); choose another --control path", path,
             path[0] ? "too long" : "empty", sizeof sa.sun_path - 1);
    return -1;
  }
  strcpy(sa.sun_path, path);

  if (lstat(path, &st) == 0) {
    int probe;
    if (!S_ISSOCK(st.st_mode)) {
      snprintf(err, errlen, "%s exists and is not a socket; refusing to replace "
               "it: remove it or choose another --control path", path);
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
               "(another xnbd-proxy?); stop it or choose another --control path",
               path);
      return -1;
    }
    if (saved != ECONNREFUSED) {
      snprintf(err, errlen, "cannot check the existing socket %s: %s; remove it "
               "if no xnbd-proxy is using it", path, strerror(saved));
      return -1;
    }
    if (unlink(path) < 0) {
      snprintf(err, errlen, "cannot remove the stale control socket %s: %s; "
               "remove it by hand or choose another --control path",
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
             sa.sun_path, strerror(errno));
    unlink(path);
    close(fd);
    return -1;
  }
  ctl->sock_dev = st.st_dev;
  ctl->sock_ino = st.st_ino;
  return fd;
}

/* ---- life cycle ------------------------------------------------------- */

struct control *control_new(struct event_base *base, const char *path,
                            struct engine *e, char *err, size_t errlen)
{
  struct control *ctl = calloc(1, sizeof *ctl);
  int fd = -1;

  if (!ctl || !(ctl->path = strdup(path))) {
    free(ctl);
    snprintf(err, errlen, "out of memory");
    return NULL;
  }
  ctl->base = base;
  ctl->e = e;
  ctl->wake[0] = ctl->wake[1] = -1;
  if (pipe2(ctl->wake, O_CLOEXEC) < 0 ||
      fcntl(ctl->wake[0], F_SETFL, O_NONBLOCK) < 0) {
    snprintf(err, errlen, "cannot create a pipe: %s", strerror(errno));
    goto fail;
  }
  ctl->wake_ev = event_new(base, ctl->wake[0], EV_READ | EV_PERSIST, jobs_done_cb, ctl);
  ctl->accept_retry = evtimer_new(base, accept_retry_cb, ctl);
  if (!ctl->wake_ev || !ctl->accept_retry || event_add(ctl->wake_ev, NULL) < 0) {
    snprintf(err, errlen, "cannot set up control socket events (out of memory?)");
    goto fail;
  }
  if ((fd = make_socket(ctl, path, err, errlen)) < 0)
    goto fail;
  ctl->listener = evconnlistener_new(base, accept_cb, ctl,
                                     LEV_OPT_CLOSE_ON_FREE | LEV_OPT_CLOSE_ON_EXEC,
                                     0, fd);
  if (!ctl->listener) {
    snprintf(err, errlen, "cannot listen on the control socket %s", path);
    close(fd);
    unlink(path);
    goto fail;
  }
  evconnlistener_set_error_cb(ctl->listener, accept_error_cb);
  log_info("control socket listening on %s", path);
  return ctl;

 fail:
  if (ctl->wake_ev) event_free(ctl->wake_ev);
  if (ctl->accept_retry) event_free(ctl->accept_retry);
  if (ctl->wake[0] >= 0) close(ctl->wake[0]);
  if (ctl->wake[1] >= 0) close(ctl->wake[1]);
  free(ctl->path);
  free(ctl);
  return NULL;
}

void control_free(struct control *ctl)
{
  struct stat st;

  if (!ctl)
    return;
  if (ctl->listener)
    evconnlistener_free(ctl->listener);
  /* Let running engine calls end; they only touch their job. */
  while (ctl->jobs) {
    struct control_job *j = ctl->jobs;
    ctl->jobs = j->next;
    pthread_join(j->thread, NULL);
    j->client->busy = false;
    free(j->arg);
    free(j);
  }
  while (ctl->clients)
    client_free(ctl->clients);
  event_free(ctl->wake_ev);
  event_free(ctl->accept_retry);
  close(ctl->wake[0]);
  close(ctl->wake[1]);
  if (lstat(ctl->path, &st) == 0 && st.st_dev == ctl->sock_dev &&
      st.st_ino == ctl->sock_ino)
    unlink(ctl->path);
  free(ctl->path);
  free(ctl);
}
