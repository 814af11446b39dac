/* control.h: xnbd-proxy's control socket (what xnbd-ctl talks to).
 *
 * THE PROTOCOL (for operators and scripts; `socat - UNIX-CONNECT:SOCK` or
 * `nc -U SOCK` is a complete client)
 *
 *   A unix stream socket, mode 0600 (only the proxy's user may connect).
 *   The client sends one command per line: words separated by spaces or
 *   tabs, ended by LF (a CR before the LF is ignored).  Every command gets
 *   exactly one reply line: a JSON object ended by LF,
 *       {"ok":true, ...command-specific members...}
 *       {"ok":false,"error":"what failed, why, and what to do"}
 *   Replies come in the order the commands were sent; a client may send
 *   several commands on one connection, and may pipeline them.  Empty lines
 *   are ignored (no reply).  A line longer than CONTROL_MAX_LINE bytes gets
 *   the error "command line too long ..." and is discarded up to its LF;
 *   the connection stays usable.  A final line without LF before the client
 *   half-closes (shutdown(SHUT_WR), as socat does) is still answered.
 *
 *   status            (alias: query)  the engine's statistics:
 *       {"ok":true,"state":"proxying","image_size":N,"block_size":N,
 *        "blocks":{"total":N,"present":N,"missing":N,"inflight":N},
 *        "bytes":{"fetched":N,"zero_skipped":N,"local_written":N},
 *        "fetches":{"ondemand":N,"background":N,"errors":N},
 *        "fetch_rate":N,"ondemand_waiting":N,
 *        "background":{"running":B,"paused":B,"rate":N,"window":N},
 *        "connections":{"up":N,"total":N},
 *        "target":"S","source_id":"S","last_error":"S","forced_missing":N,
 *        "progress":0.4200}
 *     state is one of connecting, proxying, source-lost, complete,
 *     detached (engine_state_name()); sizes and rates are bytes and
 *     bytes/s; rate 0 means unlimited; last_error "" means none; progress
 *     is present/total rounded down to 4 decimals (1.0000 only when every
 *     block is present).
 *   cache-all         start the background copy of every missing block
 *   pause             pause the background copy
 *   resume            resume it
 *   rate LIMIT        cap the background copy: "100mbit", "12M" (bytes/s),
 *                     "0" (unlimited).  Reply: {"ok":true,"rate":BYTES_PER_S}
 *   detach [--force]  (alias: switch) stop using the source; refused while
 *                     blocks are missing unless --force (they then read as
 *                     I/O errors).  Clients stay connected.
 *   reconnect URI     use another address of the same source
 *   flush             make everything written so far durable
 *   help              {"ok":true,"commands":[{"command":"status",
 *                     "aliases":["query"],"usage":"status",
 *                     "description":"..."}, ...]}
 *
 *   Unknown commands, wrong argument counts, over-long lines and bytes that
 *   are control characters get {"ok":false,"error":...} naming the command
 *   and its usage.  At most CONTROL_MAX_CLIENTS connections at once; one
 *   more gets an error line and is closed.
 *
 * THREADING AND OWNERSHIP
 *   Everything runs on the thread that drives the event_base given to
 *   control_new() (the proxy's NBD loop); call control_free() from there.
 *   Commands that may block (detach, reconnect, flush) run the engine call
 *   on a short-lived thread so the NBD loop never waits for the source or
 *   the disk; that client's later commands wait for the reply, other
 *   clients are served meanwhile.  control_free() waits for such calls, so
 *   free the control before engine_close().  The engine belongs to the
 *   caller. */
#ifndef XNBD_CONTROL_H
#define XNBD_CONTROL_H

#include <stddef.h>

struct event_base;
struct engine;
struct control;

#define CONTROL_MAX_LINE    4096  /* bytes per command line, without CR LF */
#define CONTROL_MAX_CLIENTS 64

/* Creates the socket at path (mode 0600) and starts accepting.  A stale
 * socket left by a dead proxy is replaced; a live one (another proxy
 * answers) or a file that is not a socket is refused.  Returns NULL with
 * the cause and fix in err. */
struct control *control_new(struct event_base *base, const char *path,
                            struct engine *e, char *err, size_t errlen);

/* Closes every client, waits for running engine calls, removes the socket
 * (if it is still ours) and frees.  NULL is ignored. */
void control_free(struct control *ctl);

#endif
