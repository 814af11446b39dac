/* ctl-run.c: runs parsed control requests against the engine's public API
 * (engine.h) and renders their replies (protocol in ctl-proto.h).  Pure
 * request -> reply functions: no sockets, no event loop, no state. */
#include "ctl-proto.h"
#include "engine.h"
#include "json.h"
#include "log.h"
#include "target.h"
#include "util.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define ECHO_MAX 64              /* bytes of a bad argument echoed back */

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

/* The engine fills fixed arrays; never trust them to be terminated. */
static void get_stats(struct engine *e, struct engine_stats *st)
{
  memset(st, 0, sizeof *st);
  engine_get_stats(e, st);
  st->target[sizeof st->target - 1] = '\0';
  st->source_id[sizeof st->source_id - 1] = '\0';
  st->last_error[sizeof st->last_error - 1] = '\0';
}

void ctl_put_status(FILE *f, const struct engine_stats *st)
{
  put_member_str(f, "state", engine_state_name(st->state));
  fprintf(f, ",\"image_size\":%" PRIu64 ",\"block_size\":%" PRIu32,
          st->image_size, st->block_size);
  fprintf(f, ",\"blocks\":{\"total\":%" PRIu64 ",\"present\":%" PRIu64
          ",\"missing\":%" PRIu64 ",\"inflight\":%" PRIu64 "}",
          st->blocks_total, st->blocks_present, st->blocks_missing,
          st->blocks_inflight);
  fprintf(f, ",\"bytes\":{\"fetched\":%" PRIu64 ",\"zero_skipped\":%" PRIu64
          ",\"local_written\":%" PRIu64 ",\"bridged\":%" PRIu64
          ",\"seeded\":%" PRIu64 ",\"digests\":%" PRIu64 "}",
          st->bytes_fetched, st->bytes_zero_skipped, st->bytes_local_written,
          st->bytes_bridged, st->bytes_seeded, st->bytes_digests);
  fprintf(f, ",\"dedup\":%s", st->digests ? "true" : "false");
  fprintf(f, ",\"fetches\":{\"ondemand\":%" PRIu64 ",\"background\":%" PRIu64
          ",\"prepaged\":%" PRIu64 ",\"recent\":%" PRIu64 ",\"joined\":%" PRIu64
          ",\"errors\":%" PRIu64 ",\"seed_stale\":%" PRIu64 "}",
          st->fetches_ondemand, st->fetches_background, st->fetches_prepaged,
          st->fetches_recent, st->fetches_joined, st->fetch_errors, st->fetches_seed_stale);
  fprintf(f, ",\"fetch_rate\":%" PRIu64 ",\"ondemand_waiting\":%" PRIu64,
          st->fetch_rate, st->ondemand_waiting);
  fprintf(f, ",\"background\":{\"running\":%s,\"paused\":%s,\"rate\":%" PRIu64
          ",\"window\":%" PRIu64 ",\"inflight\":%" PRIu64 ",\"seeding\":%" PRIu64
          ",\"queue_us\":%" PRIu64 ",\"recent_regions\":%" PRIu64
          ",\"recent_done\":%" PRIu64 "}",
          st->bg_running ? "true" : "false", st->bg_paused ? "true" : "false",
          st->bg_rate, st->bg_window, st->bg_inflight, st->bg_seeding, st->bg_queue_us,
          st->bg_recent_regions, st->bg_recent_done);
  fprintf(f, ",\"connections\":{\"up\":%u,\"total\":%u}",
          st->connections_up, st->connections);
  fprintf(f, ",\"rtt_us\":%" PRIu64 ",\"standby\":%s", st->rtt_us,
          st->standby ? "true" : "false");
  fprintf(f, ",\"wire\":{\"tx_raw\":%" PRIu64 ",\"tx\":%" PRIu64
          ",\"rx\":%" PRIu64 ",\"rx_raw\":%" PRIu64 "}",
          st->wire_tx_raw, st->wire_tx, st->wire_rx, st->wire_rx_raw);
  put_member_str(f, "target", st->target);
  put_member_str(f, "source_id", st->source_id);
  put_member_str(f, "last_error", st->last_error);
  fprintf(f, ",\"forced_missing\":%" PRIu64, st->forced_missing);
  if (st->completed_unix_us)      /* seconds since the epoch, to the us */
    fprintf(f, ",\"completed_at\":%" PRIu64 ".%06" PRIu64,
            st->completed_unix_us / 1000000, st->completed_unix_us % 1000000);
  fprintf(f, ",\"progress\":");
  put_progress(f, st->blocks_present, st->blocks_total);
}

/* An engine call failed: its message says what and why. */
static char *engine_failed(const char *what, const char *err, const char *program)
{
  if (err[0])
    return ctl_reply_error("%s", err);
  return ctl_reply_error("%s failed and the engine gave no reason; see %s's log",
                         what, program);
}

/* Runs the command; writes the members of an ok reply into f and returns
 * 0, or returns -1 with the error reply in *error (malloc'd; NULL when out
 * of memory). */
static int run(struct engine *e, const struct ctl_request *req,
               const char *program, const char *who, FILE *f, char **error)
{
  const char *name = req->cmd->name;
  char err[1024] = "";
  struct engine_stats st;
  struct target target;
  uint64_t bps;
  const char *why = "not a rate";
  int rc;

  switch (req->cmd->id) {
  case CTL_STATUS:
    get_stats(e, &st);
    ctl_put_status(f, &st);
    return 0;
  case CTL_HELP:
    ctl_put_help(f);
    return 0;
  case CTL_CACHE_ALL:
    log_info("%s: cache-all", who);
    if (engine_bg_start(e, err, sizeof err) < 0) {
      *error = engine_failed(name, err, program);
      return -1;
    }
    return 0;
  case CTL_ACTIVATE:
    log_info("%s: activate", who);
    engine_activate(e, "xnbd-ctl activate");
    return 0;
  case CTL_PAUSE:
    log_info("%s: pause", who);
    if (engine_bg_pause(e, err, sizeof err) < 0) {
      *error = engine_failed(name, err, program);
      return -1;
    }
    return 0;
  case CTL_RESUME:
    log_info("%s: resume", who);
    if (engine_bg_resume(e, err, sizeof err) < 0) {
      *error = engine_failed(name, err, program);
      return -1;
    }
    return 0;
  case CTL_RATE:
    if (parse_rate(req->arg, &bps, &why) < 0) {
      *error = ctl_reply_error("rate: cannot parse \"%.*s\": %s; usage: rate "
                               "LIMIT (e.g. 100mbit, 12M for bytes/s, 0 for "
                               "unlimited)", ECHO_MAX, req->arg, why);
      return -1;
    }
    log_info("%s: rate %s (%" PRIu64 " bytes/s)", who, req->arg, bps);
    if (engine_set_bg_rate(e, bps) < 0) {
      *error = ctl_reply_error("rate: the engine refused %" PRIu64 " bytes/s; "
                               "see %s's log", bps, program);
      return -1;
    }
    fprintf(f, ",\"rate\":%" PRIu64, bps);
    return 0;
  case CTL_DETACH:
    log_info("%s: detach%s", who, req->flag ? " --force" : "");
    if (engine_detach(e, req->flag, err, sizeof err) < 0) {
      *error = engine_failed(name, err, program);
      return -1;
    }
    get_stats(e, &st);
    put_member_str(f, "state", engine_state_name(st.state));
    fprintf(f, ",\"forced_missing\":%" PRIu64, st.forced_missing);
    return 0;
  case CTL_RECONNECT:
    if (target_parse(req->arg, NULL, &target, err, sizeof err) < 0) {
      *error = ctl_reply_error("reconnect: %s", err);
      return -1;
    }
    target_free(&target);
    log_info("%s: reconnect %s", who, req->arg);
    if (engine_reconnect(e, req->arg, err, sizeof err) < 0) {
      *error = engine_failed(name, err, program);
      return -1;
    }
    get_stats(e, &st);
    put_member_str(f, "state", engine_state_name(st.state));
    put_member_str(f, "target", st.target);
    return 0;
  case CTL_FLUSH:
    log_debug("%s: flush", who);
    errno = 0;
    rc = engine_flush(e);
    if (rc < 0) {
      int saved = rc < -1 ? -rc : errno;
      *error = ctl_reply_error("flush failed%s%s; the cache could not be made "
                               "durable: check the cache disk and %s's log",
                               saved ? ": " : "", saved ? strerror(saved) : "",
                               program);
      return -1;
    }
    get_stats(e, &st);
    put_member_str(f, "state", engine_state_name(st.state));
    return 0;
  case CTL_NCOMMANDS:
    break;
  }
  *error = ctl_reply_error("%s: not implemented in %s", name, program);
  return -1;
}

char *ctl_run(struct engine *e, const struct ctl_request *req,
              const char *program, const char *who)
{
  char *buf = NULL, *error = NULL;
  size_t len = 0;
  FILE *f = open_memstream(&buf, &len);
  int rc;

  if (!f)
    return NULL;
  fputs("{\"ok\":true", f);
  rc = run(e, req, program, who, f, &error);
  fputs("}\n", f);
  if (fclose(f) != 0 || rc < 0) {
    free(buf);
    return error;              /* NULL when out of memory */
  }
  return buf;
}

char *ctl_handle_line(struct engine *e, char *line, size_t len,
                      const char *program, const char *who, bool *empty)
{
  struct ctl_request req;
  char *reply = NULL;

  *empty = false;
  switch (ctl_parse(line, len, &req, &reply)) {
  case CTL_PARSE_EMPTY:
    *empty = true;
    return NULL;
  case CTL_PARSE_BAD:
    return reply;
  case CTL_PARSE_OK:
    break;
  }
  return ctl_run(e, &req, program, who);
}
