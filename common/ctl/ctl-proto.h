/* ctl-proto.h: the control protocol of the migration engine (what
 * xnbd-ctl talks to), independent of any event loop or host program.
 * The command table, request parsing, the JSON status and the reply lines
 * live here; ctl-server.h serves them on a unix socket.
 *
 * THE PROTOCOL (for operators and scripts; `socat - UNIX-CONNECT:SOCK` or
 * `nc -U SOCK` is a complete client)
 *
 *   A unix stream socket, mode 0600 (only the owner may connect).  The
 *   client sends one command per line: words separated by spaces or tabs,
 *   ended by LF (a CR before the LF is ignored).  Every command gets
 *   exactly one reply line: a JSON object ended by LF,
 *       {"ok":true, ...command-specific members...}
 *       {"ok":false,"error":"what failed, why, and what to do"}
 *   Replies come in the order the commands were sent; a client may send
 *   several commands on one connection, and may pipeline them.  Empty lines
 *   are ignored (no reply).  A line longer than CTL_MAX_LINE bytes gets the
 *   error "command line too long ..." and is discarded up to its LF; the
 *   connection stays usable.  A final line without LF before the client
 *   half-closes (shutdown(SHUT_WR), as socat does) is still answered.
 *
 *   status            (alias: query)  the engine's statistics:
 *       {"ok":true,"state":"proxying","image_size":N,"block_size":N,
 *        "blocks":{"total":N,"present":N,"missing":N,"inflight":N},
 *        "bytes":{"fetched":N,"zero_skipped":N,"local_written":N,
 *                 "bridged":N,"seeded":N,"digests":N},"dedup":B,
 *        "fetches":{"ondemand":N,"background":N,"prepaged":N,"recent":N,
 *                   "joined":N,"errors":N,"seed_stale":N},
 *        "fetch_rate":N,"ondemand_waiting":N,
 *        "background":{"running":B,"paused":B,"rate":N,"window":N,
 *                      "inflight":N,"seeding":N,"queue_us":N,
 *                      "recent_regions":N,"recent_done":N},
 *        "connections":{"up":N,"total":N},
 *        "rtt_us":N,"standby":B,
 *        "wire":{"tx_raw":N,"tx":N,"rx":N,"rx_raw":N},
 *        "target":"S","source_id":"S","last_error":"S","forced_missing":N,
 *        "progress":0.4200}
 *     state is one of connecting, proxying, source-lost, complete,
 *     detached (engine_state_name()); sizes and rates are bytes and
 *     bytes/s; rate 0 means unlimited; bytes.bridged counts zero bytes
 *     read again inside larger background reads; bytes.seeded counts
 *     bytes copied from local seeds (xnbd-proxy --seed) instead of
 *     fetched, each block verified against the source's digest, and
 *     bytes.digests the digest bytes read from the source; dedup is true
 *     while seeds are in use (the source publishes digests);
 *     fetches.prepaged counts the background fetches made next to a
 *     client's miss (also in fetches.background), fetches.recent those
 *     of regions the source's clients read last (its read map, also in
 *     fetches.background; background.recent_regions is how many regions
 *     the map named, background.recent_done how many are copied),
 *     fetches.joined the
 *     client reads that waited for a background fetch already on its way
 *     (no fetch of their own), fetches.seed_stale the seed jobs fetched
 *     instead because a block no longer matched the source's digest (the
 *     seed changed after it was indexed, I4); background.inflight is the bytes of
 *     background fetches on their way (at most window), background.seeding
 *     the bytes of copies from seeds under way; background.queue_us is
 *     the queueing delay on the path at the last round-trip sample (that
 *     round trip minus the smallest recent one); rtt_us is the measured
 *     round trip to the source in microseconds (0: not measured yet);
 *     standby is true until the switch-over (xnbd-proxy --standby, see
 *     activate); wire counts the bytes of the xnbd:// WAN transport, both
 *     directions, before (tx_raw, rx_raw) and after (tx, rx) zstd (all 0
 *     for other targets); last_error "" means none; forced_missing counts
 *     the blocks that were missing at a forced detach; progress is
 *     present/total rounded down to 4 decimals (1.0000 only when every
 *     block is present).
 *   cache-all         start the background copy of every missing block
 *   activate          the switch-over is done (the VM now runs here): leave
 *                     standby, keep the blocks read from now on and let the
 *                     background copy run.  Harmless when not in standby.
 *   pause             pause the background copy
 *   resume            resume it
 *   rate LIMIT        cap the background copy: "100mbit", "12M" (bytes/s),
 *                     "0" (unlimited).  Reply: {"ok":true,"rate":BYTES_PER_S}
 *   detach [--force]  (alias: switch) stop using the source; refused while
 *                     blocks are missing unless --force (they then read as
 *                     I/O errors).  Clients stay connected.
 *                     Reply: {"ok":true,"state":"S","forced_missing":N}
 *   reconnect URI     use another address of the same source.
 *                     Reply: {"ok":true,"state":"S","target":"S"}
 *   flush             make everything written so far durable.
 *                     Reply: {"ok":true,"state":"S"}
 *   help              {"ok":true,"commands":[{"command":"status",
 *                     "aliases":["query"],"usage":"status",
 *                     "description":"..."}, ...]}
 *
 *   Unknown commands, wrong argument counts, over-long lines and bytes that
 *   are control characters get {"ok":false,"error":...} naming the command
 *   and its usage.  At most CTL_MAX_CLIENTS connections at once; one more
 *   gets an error line and is closed.
 *
 * USE
 *   A host reads a line, calls ctl_parse(), and for CTL_PARSE_OK calls
 *   ctl_run() (which calls the engine; commands marked may_block wait for
 *   the source or the disk), then sends the reply.  Every function here is
 *   thread-safe; none keeps state between calls.  The command table is
 *   the one list of commands: xnbd-ctl takes its names, usage and help
 *   from it too. */
#ifndef XNBD_CTL_PROTO_H
#define XNBD_CTL_PROTO_H

#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>

struct engine;
struct engine_stats;

#define CTL_MAX_LINE    4096  /* bytes per command line, without CR LF */
#define CTL_MAX_CLIENTS 64    /* connections at once (per socket) */

enum ctl_cmd_id {
  CTL_STATUS, CTL_CACHE_ALL, CTL_ACTIVATE, CTL_PAUSE, CTL_RESUME, CTL_RATE,
  CTL_DETACH, CTL_RECONNECT, CTL_FLUSH, CTL_HELP,
  CTL_NCOMMANDS
};

/* One command.  ctl_run() dispatches on id to the engine call. */
struct ctl_command {
  enum ctl_cmd_id id;
  const char *name;
  const char *alias;          /* another name, or NULL */
  const char *arg;            /* the one positional argument ("LIMIT"), or NULL */
  const char *flag;           /* an optional flag word ("--force"), or NULL */
  const char *flag_short;     /* its short form ("-f"), or NULL */
  const char *usage;          /* "detach [--force]" */
  const char *description;    /* one line, for help */
  bool may_block;             /* the engine call may wait for the source or
                               * the disk: keep it off an event loop */
};

/* The table, in help order; ctl_commands[i].id == i. */
extern const struct ctl_command ctl_commands[CTL_NCOMMANDS];

/* The command named (or aliased) word, or NULL. */
const struct ctl_command *ctl_command_find(const char *word);

/* A parsed request.  arg points into the line given to ctl_parse(). */
struct ctl_request {
  const struct ctl_command *cmd;
  const char *arg;            /* the positional argument, or NULL */
  bool flag;                  /* the optional flag was given */
};

enum ctl_parse_result {
  CTL_PARSE_EMPTY,            /* blank line: no reply is due */
  CTL_PARSE_BAD,              /* *reply holds the error reply */
  CTL_PARSE_OK,               /* *req is ready for ctl_run() */
};

/* Parses one request line: len bytes (may hold NUL bytes) without its LF;
 * a trailing CR is ignored.  The buffer must have room for len + 1 bytes:
 * the line is modified (terminated and split into words).
 * For CTL_PARSE_BAD, *reply is a malloc'd reply line (ending in LF), or
 * NULL when out of memory (send ctl_reply_oom then). */
enum ctl_parse_result ctl_parse(char *line, size_t len, struct ctl_request *req,
                                char **reply);

/* Runs a parsed request against the engine and returns its malloc'd reply
 * line (ending in LF), or NULL when out of memory (send ctl_reply_oom).
 * program names the host in messages ("see xnbd-proxy's log"); who names
 * the client in log lines ("control client 3"). */
char *ctl_run(struct engine *e, const struct ctl_request *req,
              const char *program, const char *who);

/* Parse and run in one call: NULL for a blank line or when out of memory
 * (*empty tells which). */
char *ctl_handle_line(struct engine *e, char *line, size_t len,
                      const char *program, const char *who, bool *empty);

/* {"ok":false,"error":MSG}\n, malloc'd (NULL when out of memory). */
char *ctl_reply_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* Fixed reply lines (ending in LF) for the host's own refusals. */
extern const char ctl_reply_too_long[];   /* line over CTL_MAX_LINE */
extern const char ctl_reply_busy[];       /* over CTL_MAX_CLIENTS */
extern const char ctl_reply_oom[];        /* out of memory */

/* Writes the members of the status reply (each starting with a comma,
 * documented above) for st into f. */
void ctl_put_status(FILE *f, const struct engine_stats *st);

/* Writes the members of the help reply (the command table) into f. */
void ctl_put_help(FILE *f);

#endif
