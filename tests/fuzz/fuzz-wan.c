/* fuzz-wan.c: libFuzzer target for the WAN transport (common/wan/wan.c):
 * the transport handshake and the zstd stream, on both ends.
 *
 * Input: byte 0 selects the run, the rest is what the peer on the WAN
 * link sends.
 *   bit 0   0: the harness is a WAN client and the code under test is
 *              the server end (wan_serve on one end of a socketpair);
 *           1: the harness is a WAN server on a loopback TCP port and the
 *              code under test is the client end (wan_connect)
 *   bit 1   server end: TLS required (none configured, so a client that
 *           asks for TLS is refused too)
 *   bit 2   server end: compression not allowed
 *           client end: ask for compression
 * The harness also plays the local NBD side: it sends a fixed blob into
 * the local socket (so the compressor runs too), half-closes it, and reads
 * both the local and the WAN socket until each reaches EOF; then it waits
 * for the pump thread to end.  A pump that never ends hangs the input
 * (libFuzzer reports a timeout). */
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "fuzz-common.h"
#include "util.h"
#include "wan.h"

static int listen_fd = -1;
static char listen_port[16];
static uint8_t blob[3000];

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
  struct sockaddr_in sin = { .sin_family = AF_INET,
                             .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
  socklen_t sl = sizeof sin;

  fuzz_quiet_logs("fuzz-wan");
  listen_fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  FUZZ_CHECK(listen_fd >= 0 && bind(listen_fd, (struct sockaddr *) &sin, sizeof sin) == 0 &&
             listen(listen_fd, 4) == 0 &&
             getsockname(listen_fd, (struct sockaddr *) &sin, &sl) == 0,
             "cannot listen on 127.0.0.1: %s", strerror(errno));
  snprintf(listen_port, sizeof listen_port, "%u", ntohs(sin.sin_port));
  /* What an NBD end would send: a greeting, then some compressible data. */
  memcpy(blob, "NBDMAGICIHAVEOPT\0\3", 18);
  for (size_t i = 18; i < sizeof blob; i++)
    blob[i] = (uint8_t) (i % 7 == 0 ? i : 0);
  return 0;
}

struct end {
  int fd;
  const uint8_t *out;            /* what the harness sends on it */
  size_t len, off;
  bool wr_done, eof;
};

/* Moves bytes both ways on the two ends until both read EOF, sending at
 * most FUZZ_CHUNK bytes a turn (so the pump also waits for input). */
static void exchange(struct end *e, int n)
{
  static uint8_t sink[64 * 1024];
  for (;;) {
    struct pollfd pf[2];
    bool open = false;
    for (int i = 0; i < n; i++) {
      pf[i] = (struct pollfd) { .fd = -1 };
      if (e[i].eof) continue;
      open = true;
      pf[i].fd = e[i].fd;
      pf[i].events = POLLIN | (e[i].wr_done ? 0 : POLLOUT);
    }
    if (!open) return;
    if (poll(pf, n, -1) < 0) {
      FUZZ_CHECK(errno == EINTR, "poll: %s", strerror(errno));
      continue;
    }
    for (int i = 0; i < n; i++) {
      if (pf[i].fd < 0) continue;
      if (!e[i].wr_done && (pf[i].revents & (POLLOUT | POLLERR | POLLHUP))) {
        ssize_t w = e[i].off < e[i].len
          ? send(e[i].fd, e[i].out + e[i].off, MIN(e[i].len - e[i].off, FUZZ_CHUNK),
                 MSG_NOSIGNAL | MSG_DONTWAIT) : 0;
        if (w > 0) e[i].off += w;
        else if (w < 0 && errno != EAGAIN && errno != EINTR) e[i].off = e[i].len;
        if (e[i].off == e[i].len) {
          shutdown(e[i].fd, SHUT_WR);
          e[i].wr_done = true;
        }
      }
      if (pf[i].revents & (POLLIN | POLLERR | POLLHUP)) {
        ssize_t r = recv(e[i].fd, sink, sizeof sink, MSG_DONTWAIT);
        if (r == 0 || (r < 0 && errno != EAGAIN && errno != EINTR)) {
          e[i].eof = true;
          e[i].wr_done = true;
        }
      }
    }
  }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
  struct end e[2];
  int wan_peer, local;
  unsigned mode;

  if (size < 1)
    return 0;
  mode = data[0];
  if (!(mode & 1)) {
    int sv[2];
    FUZZ_CHECK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0,
               "socketpair: %s", strerror(errno));
    local = wan_serve(sv[0], NULL, mode & 2, !(mode & 4), 10);
    FUZZ_CHECK(local >= 0, "wan_serve failed");
    wan_peer = sv[1];
  } else {
    char err[256];
    /* mode & 8: with the NBD handshake sent ahead (the server's bytes
     * then go through its parser first). */
    struct wan_nego_cfg nc = { .export_name = "x", .structured = true, .base_alloc = true };
    local = wan_connect("127.0.0.1", listen_port, (mode & 4) ? WAN_F_ZSTD : 0,
                        WAN_DEFAULT_LEVEL, NULL, 10, NULL, (mode & 8) ? &nc : NULL,
                        err, sizeof err);
    FUZZ_CHECK(local >= 0, "wan_connect: %s", err);
    do wan_peer = accept4(listen_fd, NULL, NULL, SOCK_CLOEXEC);
    while (wan_peer < 0 && errno == EINTR);
    FUZZ_CHECK(wan_peer >= 0, "accept: %s", strerror(errno));
  }
  e[0] = (struct end) { .fd = wan_peer, .out = data + 1, .len = size - 1 };
  e[1] = (struct end) { .fd = local, .out = blob, .len = sizeof blob };
  exchange(e, 2);
  close(wan_peer);
  close(local);
  /* The pump has closed its sockets and is freeing: wait for it finely
   * first (wan_wait_idle sleeps 10 ms a turn), then up to 10 s. */
  for (int i = 0; i < 2000 && wan_wait_idle(0); i++) {
    struct timespec ts = { 0, 20000 };
    nanosleep(&ts, NULL);
  }
  FUZZ_CHECK(wan_wait_idle(10000) == 0, "the pump thread did not end");
  return 0;
}
