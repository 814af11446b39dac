/* target.c: the source address parser (see target.h). */
#include "target.h"
#include "util.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define FORMS "xnbd://HOST[:PORT]/EXPORT, xnbds://..., nbd://HOST[:PORT]/EXPORT, " \
  "nbds://..., nbd+unix:///EXPORT?socket=PATH, or HOST:PORT"

/* libnbd's URI schemes (nbd_connect_uri(3)). */
static const struct { const char *scheme; bool tls; } nbd_schemes[] = {
  { "nbd", false }, { "nbds", true }, { "nbd+unix", false }, { "nbds+unix", true },
  { "nbd+vsock", false }, { "nbds+vsock", true },
};

void target_free(struct target *t)
{
  free(t->host);
  free(t->port);
  free(t->export_name);
  memset(t, 0, sizeof *t);
}

static int host_port(const char *s, const char *what, const char *hp,
                     const char *default_port, struct target *t,
                     char *err, size_t errlen)
{
  const char *why = "missing host";
  if (!*hp || parse_host_port(hp, default_port, &t->host, &t->port, &why) < 0 ||
      !t->host) {
    snprintf(err, errlen, "bad target \"%s\": %s in %s (expected %s)", s,
             why, what, FORMS);
    return -1;
  }
  if (strcmp(t->port, "0") == 0) {
    snprintf(err, errlen, "bad target \"%s\": port 0 is not a port to connect to", s);
    return -1;
  }
  return 0;
}

int target_parse(const char *s, const char *export_name, struct target *t,
                 char *err, size_t errlen)
{
  const char *sep = s ? strstr(s, "://") : NULL;

  memset(t, 0, sizeof *t);
  if (!s || !*s) {
    snprintf(err, errlen, "empty target (expected %s)", FORMS);
    return -1;
  }
  if (sep) {
    size_t n = sep - s;
    if (n == 4 && strncmp(s, "xnbd", 4) == 0)
      t->tls = false;
    else if (n == 5 && strncmp(s, "xnbds", 5) == 0)
      t->tls = true;
    else {
      for (size_t i = 0; i < ARRAY_SIZE(nbd_schemes); i++)
        if (strlen(nbd_schemes[i].scheme) == n &&
            strncmp(s, nbd_schemes[i].scheme, n) == 0) {
          t->kind = TARGET_NBD_URI;
          t->tls = nbd_schemes[i].tls;
          return 0;
        }
      snprintf(err, errlen, "bad target \"%s\": unknown scheme \"%.*s://\" "
               "(expected %s)", s, (int) MIN(n, (size_t) 32), s, FORMS);
      return -1;
    }
    /* xnbd://HOST[:PORT]/[EXPORT] */
    const char *rest = sep + 3, *slash = strchr(rest, '/');
    char *hp = slash ? strndup(rest, slash - rest) : strdup(rest);
    t->kind = TARGET_XNBD;
    if (!hp || !(t->export_name = strdup(slash ? slash + 1 : ""))) {
      free(hp);
      target_free(t);
      snprintf(err, errlen, "out of memory");
      return -1;
    }
    int r = host_port(s, "the xnbd:// address", hp, TARGET_XNBD_PORT, t, err, errlen);
    free(hp);
    if (r < 0)
      target_free(t);
    return r;
  }
  t->kind = TARGET_HOST_PORT;
  if (host_port(s, "HOST:PORT", s, TARGET_NBD_PORT, t, err, errlen) < 0) {
    target_free(t);
    return -1;
  }
  if (!(t->export_name = strdup(export_name ? export_name : ""))) {
    target_free(t);
    snprintf(err, errlen, "out of memory");
    return -1;
  }
  return 0;
}
