/* nbd-op: one NBD request that qemu-io cannot send, for the tests.
 *
 *   nbd-op URI cache OFFSET LENGTH       NBD_CMD_CACHE
 *   nbd-op URI fast-zero OFFSET LENGTH   NBD_CMD_WRITE_ZEROES with FAST_ZERO
 *
 * Prints "ok", or "error ERRNO-NAME: MESSAGE" and exits 1 when the server
 * refused the request; exits 2 when the request could not be sent (bad
 * arguments, no connection, the server does not offer the command). */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <libnbd.h>

static uint64_t number(const char *s)
{
  char *end;
  errno = 0;
  unsigned long long v = strtoull(s, &end, 0);
  if (errno || *end || !*s || *s == '-') {
    fprintf(stderr, "nbd-op: '%s' is not a number\n", s);
    exit(2);
  }
  return v;
}

int main(int argc, char **argv)
{
  if (argc != 5) {
    fprintf(stderr, "usage: nbd-op URI cache|fast-zero OFFSET LENGTH\n");
    return 2;
  }
  uint64_t off = number(argv[3]), len = number(argv[4]);
  struct nbd_handle *h = nbd_create();
  if (!h || nbd_connect_uri(h, argv[1]) < 0) {
    fprintf(stderr, "nbd-op: %s: %s\n", argv[1], nbd_get_error());
    return 2;
  }
  int rc;
  if (strcmp(argv[2], "cache") == 0) {
    if (nbd_can_cache(h) != 1) { fprintf(stderr, "nbd-op: no NBD_CMD_CACHE\n"); return 2; }
    rc = nbd_cache(h, len, off, 0);
  } else if (strcmp(argv[2], "fast-zero") == 0) {
    if (nbd_can_fast_zero(h) != 1) { fprintf(stderr, "nbd-op: no fast zero\n"); return 2; }
    rc = nbd_zero(h, len, off, LIBNBD_CMD_FLAG_FAST_ZERO);
  } else {
    fprintf(stderr, "nbd-op: unknown operation '%s'\n", argv[2]);
    return 2;
  }
  if (rc < 0) {
    int e = nbd_get_errno();
    printf("error %s: %s\n", e ? strerrorname_np(e) : "none", nbd_get_error());
    nbd_close(h);
    return 1;
  }
  printf("ok\n");
  nbd_shutdown(h, 0);
  nbd_close(h);
  return 0;
}
