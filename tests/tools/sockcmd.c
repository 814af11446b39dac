/* sockcmd: sends one command to a unix socket and prints the reply, for
 * test scripts (bash cannot open unix sockets).
 *
 *   sockcmd [-t SECONDS] SOCKET LINE [PATH...]
 *       Sends LINE plus a newline, reads one reply line.  Without PATHs the
 *       line is printed as it is.  With PATHs the reply is parsed as JSON
 *       (xnbd-proxy's control protocol) and the value of each dotted PATH
 *       (e.g. blocks.inflight) is printed, separated by spaces; it fails if
 *       the reply is not JSON, has "ok":false or lacks a PATH.
 *
 *   sockcmd -n BYTES [-t SECONDS] SOCKET TEXT
 *       Sends TEXT as it is (no newline) and prints exactly BYTES bytes of
 *       reply, e.g. nbdkit-pause-filter: "sockcmd -n 1 SOCK p" prints P
 *       once every request the source had received before is finished.
 *
 * Every wait is bounded by -t (default 30 s).  Exit status 0 on success,
 * 1 on any failure (the reason on stderr), 2 for a usage error. */
#include "json.h"
#include "util.h"

#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <stdio.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#define MAX_REPLY (1u << 20)

static void usage(void)
{
  fprintf(stderr, "usage: sockcmd [-t SECONDS] SOCKET LINE [PATH...]\n"
                  "       sockcmd -n BYTES [-t SECONDS] SOCKET TEXT\n");
  exit(2);
}

static int connect_unix(const char *path)
{
  struct sockaddr_un sun = { .sun_family = AF_UNIX };
  int fd;
  if (strlen(path) >= sizeof sun.sun_path) {
    fprintf(stderr, "sockcmd: socket path too long: %s\n", path);
    return -1;
  }
  strcpy(sun.sun_path, path);
  fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0 || connect(fd, (struct sockaddr *) &sun, sizeof sun) < 0) {
    fprintf(stderr, "sockcmd: cannot connect to %s: %s\n", path, strerror(errno));
    if (fd >= 0) close(fd);
    return -1;
  }
  return fd;
}

/* Reads until want bytes (want > 0) or a newline (want == 0), EOF or the
 * deadline.  Returns the number of bytes in buf, -1 on error/timeout. */
static ssize_t read_reply(int fd, char *buf, size_t cap, size_t want,
                          uint64_t deadline)
{
  size_t n = 0;
  for (;;) {
    if (want ? n >= want : (n > 0 && memchr(buf, '\n', n))) return n;
    if (n >= cap) {
      fprintf(stderr, "sockcmd: reply longer than %zu bytes\n", cap);
      return -1;
    }
    uint64_t now = now_ns();
    if (now >= deadline) {
      fprintf(stderr, "sockcmd: no %s reply before the timeout (got %zu bytes)\n",
              want ? "complete" : "line", n);
      return -1;
    }
    struct pollfd p = { .fd = fd, .events = POLLIN };
    int r = poll(&p, 1, (int) MIN((deadline - now) / 1000000 + 1, 1000u));
    if (r < 0 && errno != EINTR) {
      fprintf(stderr, "sockcmd: poll: %s\n", strerror(errno));
      return -1;
    }
    if (r <= 0) continue;
    ssize_t k = read(fd, buf + n, MIN(cap - n, want ? want - n : cap - n));
    if (k < 0 && errno == EINTR) continue;
    if (k < 0) {
      fprintf(stderr, "sockcmd: read: %s\n", strerror(errno));
      return -1;
    }
    if (k == 0) {
      if (n == 0 || want) {
        fprintf(stderr, "sockcmd: the peer closed the connection after %zu bytes\n", n);
        return -1;
      }
      return n;
    }
    n += k;
  }
}

static int print_paths(const char *line, size_t len, char **paths, int npaths)
{
  char err[256];
  struct json *v = json_parse(line, len, err, sizeof err);
  bool ok;
  if (!v) {
    fprintf(stderr, "sockcmd: reply is not JSON (%s): %.*s\n", err, (int) len, line);
    return -1;
  }
  if (json_bool(json_get(v, "ok"), &ok) && !ok) {
    fprintf(stderr, "sockcmd: command failed: %.*s\n", (int) len, line);
    json_free(v);
    return -1;
  }
  for (int i = 0; i < npaths; i++) {
    const struct json *m = json_get(v, paths[i]);
    const char *s;
    uint64_t u;
    bool b;
    double d;
    if (!m) {
      fprintf(stderr, "sockcmd: reply has no member %s: %.*s\n", paths[i], (int) len, line);
      json_free(v);
      return -1;
    }
    if (i) putchar(' ');
    if (json_u64(m, &u)) printf("%" PRIu64, u);
    else if (json_bool(m, &b)) fputs(b ? "true" : "false", stdout);
    else if (json_double(m, &d)) printf("%g", d);
    else if ((s = json_str(m))) fputs(s, stdout);
    else fputs("null", stdout);
  }
  putchar('\n');
  json_free(v);
  return 0;
}

int main(int argc, char **argv)
{
  unsigned timeout_s = 30;
  size_t nbytes = 0;
  int c, fd;
  char *buf;
  ssize_t n;

  while ((c = getopt(argc, argv, "n:t:")) != -1) {
    switch (c) {
    case 'n': nbytes = strtoul(optarg, NULL, 10); if (!nbytes) usage(); break;
    case 't': timeout_s = strtoul(optarg, NULL, 10); if (!timeout_s) usage(); break;
    default: usage();
    }
  }
  if (argc - optind < 2 || (nbytes && argc - optind != 2)) usage();
  const char *path = argv[optind], *text = argv[optind + 1];
  uint64_t deadline = now_ns() + (uint64_t) timeout_s * 1000000000u;

  if ((fd = connect_unix(path)) < 0) return 1;
  if (write_all(fd, text, strlen(text)) < 0 ||
      (!nbytes && write_all(fd, "\n", 1) < 0)) {
    fprintf(stderr, "sockcmd: cannot send to %s: %s\n", path, strerror(errno));
    return 1;
  }
  buf = malloc(MAX_REPLY);
  if (!buf) return 1;
  n = read_reply(fd, buf, MAX_REPLY, nbytes, deadline);
  close(fd);
  int rc = 0;
  if (n < 0)
    rc = 1;
  else if (nbytes) {
    fwrite(buf, 1, n, stdout);
    putchar('\n');
  } else {
    char *nl = memchr(buf, '\n', n);
    size_t len = nl ? (size_t) (nl - buf) : (size_t) n;
    if (argc - optind == 2)
      printf("%.*s\n", (int) len, buf);
    else if (print_paths(buf, len, argv + optind + 2, argc - optind - 2) < 0)
      rc = 1;
  }
  free(buf);
  return rc;
}
