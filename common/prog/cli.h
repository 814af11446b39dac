/* cli.h: what every xnbd program's main() needs: option values checked
 * with a clear message, pid/port files, and graceful shutdown of an NBD
 * server on SIGTERM/SIGINT. */
#ifndef XNBD_CLI_H
#define XNBD_CLI_H

#include <stdint.h>

struct event_base;
struct xnbd_server;

/* Parse an option's value or exit(1) naming the option and the range. */
unsigned cli_uint(const char *opt, const char *s, unsigned min, unsigned max);
uint64_t cli_size(const char *opt, const char *s);

/* Writes "N\n" to path; returns 0, or -1 after logging why. */
int cli_write_number(const char *path, long v);

/* SIGTERM/SIGINT: finish requests in flight, then leave the event loop.
 * Install before the pidfile is written; free after the loop. */
struct cli_signals;
struct cli_signals *cli_signals_install(struct event_base *base,
                                        struct xnbd_server *srv);
void cli_signals_free(struct cli_signals *s);

#endif
