#include "daemon.h"
#include "log.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static int ready_fd = -1;

void daemon_start(void)
{
  int p[2];
  pid_t pid;
  char c;

  if (pipe(p) < 0) fatal("cannot daemonize: pipe: %s", strerror(errno));
  pid = fork();
  if (pid < 0) fatal("cannot daemonize: fork: %s", strerror(errno));
  if (pid > 0) {
    close(p[1]);
    ssize_t n;
    while ((n = read(p[0], &c, 1)) < 0 && errno == EINTR) ;
    _exit(n == 1 ? 0 : 1);
  }
  close(p[0]);
  ready_fd = p[1];
  if (setsid() < 0) fatal("cannot daemonize: setsid: %s", strerror(errno));
}

void daemon_ready(void)
{
  int fd;
  if (ready_fd < 0) return;
  /* No chdir("/"): the pidfile and sockets may be relative paths that
   * are unlinked at exit. */
  fd = open("/dev/null", O_RDWR);
  if (fd >= 0) {
    dup2(fd, 0); dup2(fd, 1); dup2(fd, 2);
    if (fd > 2) close(fd);
  }
  log_to_syslog();
  if (write(ready_fd, "1", 1) < 0) { /* parent gone: nothing to tell */ }
  close(ready_fd);
  ready_fd = -1;
}
