/* target.h: the one parser of a source address (xnbd-proxy --target,
 * xnbd-ctl reconnect, the engine): which transport it names, and for the
 * ones we connect ourselves, host, port and export.
 *
 *   xnbd://HOST[:PORT]/[EXPORT]    our WAN transport (zstd), port 10810
 *   xnbds://HOST[:PORT]/[EXPORT]   the same inside TLS
 *   nbd://, nbds://, nbd+unix://, nbds+unix://, nbd+vsock://, nbds+vsock://
 *                                  an NBD URI, connected by libnbd (which
 *                                  parses the rest)
 *   HOST:PORT, [V6]:PORT, HOST     plain NBD over TCP, port 10809 */
#ifndef XNBD_TARGET_H
#define XNBD_TARGET_H

#include <stdbool.h>
#include <stddef.h>

#define TARGET_NBD_PORT  "10809"
#define TARGET_XNBD_PORT "10810"

enum target_kind {
  TARGET_XNBD,        /* xnbd:// or xnbds:// (tls) */
  TARGET_NBD_URI,     /* an NBD URI for libnbd (tls for nbds...) */
  TARGET_HOST_PORT,   /* HOST:PORT */
};

struct target {
  enum target_kind kind;
  bool tls;           /* xnbds://, nbds://, nbds+unix://, nbds+vsock:// */
  char *host;         /* TARGET_XNBD, TARGET_HOST_PORT; else NULL */
  char *port;
  char *export_name;  /* TARGET_XNBD: from the URI; TARGET_HOST_PORT: the
                       * export_name given to target_parse(); else NULL */
};

/* Parses s.  export_name is the export for a HOST:PORT target (NULL: "").
 * Returns 0 with t filled (free it with target_free), or -1 with the
 * cause and the accepted forms in err (t is then empty). */
int target_parse(const char *s, const char *export_name, struct target *t,
                 char *err, size_t errlen);

/* Frees what target_parse() allocated; t may be empty. */
void target_free(struct target *t);

#endif
