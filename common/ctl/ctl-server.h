/* ctl-server.h: the control socket server (protocol in ctl-proto.h) on
 * threads of its own, so any host can offer the xnbd-ctl commands: the
 * proxy next to its libevent loop, the nbdkit plugin without one.
 *
 * THREADING AND OWNERSHIP
 *   One thread accepts; each client gets a thread that reads a line, runs
 *   it (ctl_run(), which may wait for the source or the disk), and writes
 *   the reply, so a slow command delays only its own client, and a client
 *   that does not read its replies only stops its own thread.  At most
 *   CTL_MAX_CLIENTS clients at once.  The threads block every signal.
 *   The engine belongs to the caller and must outlive the server: call
 *   ctl_server_stop() before engine_close(); it waits for engine calls in
 *   progress. */
#ifndef XNBD_CTL_SERVER_H
#define XNBD_CTL_SERVER_H

#include <stddef.h>

struct engine;
struct ctl_server;

/* Creates the socket at path (mode 0600 from the start) and starts
 * accepting.  A stale socket left by a dead process is replaced; a live
 * one (another process answers) or a file that is not a socket is
 * refused.  program names the host in messages ("xnbd-proxy").  Returns
 * NULL with the cause and fix in err. */
struct ctl_server *ctl_server_start(const char *path, struct engine *e,
                                    const char *program, char *err, size_t errlen);

/* Closes every client (after the command it is running, if any), stops
 * the threads, removes the socket (if it is still ours) and frees.  NULL
 * is ignored.  Call it from a thread other than the server's. */
void ctl_server_stop(struct ctl_server *s);

/* Clients connected now (for tests and logs). */
unsigned ctl_server_clients(struct ctl_server *s);

#endif
