/* xnbd-server: serves image files over NBD (the source site of a
 * migration, or any NBD use). */
#include "server.h"
#include "file-backend.h"
#include "image-id.h"
#include "wan.h"
#include "workq.h"
#include "daemon.h"
#include "cli.h"
#include "log.h"
#include "util.h"

#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <sys/stat.h>
#include <unistd.h>

#include <event2/event.h>

#define MAX_EXPORTS 64
#define MAX_LISTEN 16

static void usage(FILE *f)
{
  fprintf(f,
"Usage: xnbd-server [OPTIONS] [FILE]\n"
"Serve image files over the NBD protocol.\n"
"\n"
"  FILE                      image served as the default export \"\" (see --name)\n"
"  -e, --export NAME=FILE    serve FILE as export NAME (repeatable)\n"
"  -n, --name NAME           export name for FILE (default: the empty name)\n"
"  -r, --readonly            serve every export read-only\n"
"  -l, --listen ADDR:PORT    listen on TCP (repeatable; default [::]:10809 and\n"
"                            0.0.0.0:10809); port 0 picks a free port\n"
"  -u, --unix PATH           listen on a unix socket (repeatable)\n"
"  -W, --wan-listen ADDR:PORT  accept the WAN transport of xnbd-proxy (NBD in\n"
"                            zstd, optionally in TLS) here (default port 10810)\n"
"      --wan-port-file FILE  write the WAN listener's port to FILE\n"
"      --compress=off        refuse compression on the WAN port\n"
"      --tls=off|on|require  TLS on the WAN port and NBD_OPT_STARTTLS on the NBD\n"
"                            listeners (require: refuse clients without TLS)\n"
"      --tls-certificates DIR  server-cert.pem and server-key.pem in DIR\n"
"      --tls-psk FILE        pre-shared keys, USER:HEXKEY lines (psktool)\n"
"      --port-file FILE      write the first TCP listener's port to FILE\n"
"  -p, --pidfile FILE        write the PID to FILE once listening\n"
"  -d, --daemon              run in the background, log to syslog\n"
"  -t, --threads N           I/O threads (default 8)\n"
"      --handshake-timeout S seconds a client may take to negotiate (default 30)\n"
"      --max-connections N   connections served at once (default 1024)\n"
"      --image-id=sidecar|stat|off  the identity published as each export's\n"
"                            description, which xnbd-proxy checks: kept in\n"
"                            IMAGE.xnbd-id (default), derived from the file's\n"
"                            metadata without writing anything, or none\n"
"  -v, --verbose             log each connection and refused request\n"
"  -q, --quiet               log errors only\n"
"  -h, --help                show this help\n"
"  -V, --version             show the version\n"
"\n"
"Examples:\n"
"  xnbd-server disk.img                     # nbd://HOST/ on port 10809\n"
"  xnbd-server -l 127.0.0.1:10809 -e vm1=vm1.img -e vm2=vm2.img\n"
"  xnbd-server -r -u /run/xnbd.sock base.img\n");
}

static struct wan_tls *wan_tls;
static bool wan_allow_zstd = true, wan_require_tls;
static unsigned wan_hs_timeout = 30;

static int wan_hook(int fd, void *arg)
{
  return wan_serve(fd, wan_tls, wan_require_tls, wan_allow_zstd, wan_hs_timeout);
}





int main(int argc, char **argv)
{
  enum { OPT_PORT_FILE = 256, OPT_HS_TIMEOUT, OPT_MAX_CONN, OPT_WAN_PORT_FILE,
         OPT_COMPRESS, OPT_TLS, OPT_TLS_CERTS, OPT_TLS_PSK, OPT_IMAGE_ID };
  static const struct option longopts[] = {
    { "export", required_argument, 0, 'e' },
    { "name", required_argument, 0, 'n' },
    { "readonly", no_argument, 0, 'r' },
    { "read-only", no_argument, 0, 'r' },
    { "listen", required_argument, 0, 'l' },
    { "unix", required_argument, 0, 'u' },
    { "port-file", required_argument, 0, OPT_PORT_FILE },
    { "wan-listen", required_argument, 0, 'W' },
    { "wan-port-file", required_argument, 0, OPT_WAN_PORT_FILE },
    { "compress", required_argument, 0, OPT_COMPRESS },
    { "tls", required_argument, 0, OPT_TLS },
    { "tls-certificates", required_argument, 0, OPT_TLS_CERTS },
    { "tls-psk", required_argument, 0, OPT_TLS_PSK },
    { "pidfile", required_argument, 0, 'p' },
    { "daemon", no_argument, 0, 'd' },
    { "threads", required_argument, 0, 't' },
    { "handshake-timeout", required_argument, 0, OPT_HS_TIMEOUT },
    { "max-connections", required_argument, 0, OPT_MAX_CONN },
    { "image-id", required_argument, 0, OPT_IMAGE_ID },
    { "verbose", no_argument, 0, 'v' },
    { "quiet", no_argument, 0, 'q' },
    { "help", no_argument, 0, 'h' },
    { "version", no_argument, 0, 'V' },
    { 0, 0, 0, 0 }
  };
  const char *export_files[MAX_EXPORTS];
  char *export_names[MAX_EXPORTS];
  const char *tcp[MAX_LISTEN], *unixp[MAX_LISTEN], *wanl[MAX_LISTEN];
  unsigned nwan = 0;
  const char *wan_portfile = NULL, *tls_mode = "off";
  struct wan_tls_config tlscfg = { 0 };
  struct file_backend *fbs[MAX_EXPORTS];
  struct image_id *ids[MAX_EXPORTS];
  int id_mode = IMAGE_ID_SIDECAR;       /* -1: off */
  unsigned nexp = 0, ntcp = 0, nunix = 0, threads = 8;
  const char *default_name = "", *pidfile = NULL, *portfile = NULL;
  bool readonly = false, daemonize = false;
  struct xnbd_server_config cfg = { 0 };
  struct workq *wq;
  struct cli_signals *sigs;
  struct event_base *base;
  struct xnbd_server *srv;
  int c;

  log_init(argv[0], LOG_LVL_INFO);
  while ((c = getopt_long(argc, argv, "e:n:rl:u:W:p:dt:vqhV", longopts, NULL)) != -1) {
    switch (c) {
    case 'e': {
      const char *eq = strchr(optarg, '=');
      if (!eq || eq == optarg || !eq[1])
        fatal("--export '%s': expected NAME=FILE", optarg);
      if (nexp >= MAX_EXPORTS) fatal("too many exports (at most %d)", MAX_EXPORTS);
      export_names[nexp] = strndup(optarg, eq - optarg);
      export_files[nexp++] = eq + 1;
      break;
    }
    case 'n': default_name = optarg; break;
    case 'r': readonly = true; break;
    case 'l':
      if (ntcp >= MAX_LISTEN) fatal("too many --listen addresses (at most %d)", MAX_LISTEN);
      tcp[ntcp++] = optarg;
      break;
    case 'u':
      if (nunix >= MAX_LISTEN) fatal("too many --unix sockets (at most %d)", MAX_LISTEN);
      unixp[nunix++] = optarg;
      break;
    case OPT_PORT_FILE: portfile = optarg; break;
    case 'W':
      if (nwan >= MAX_LISTEN) fatal("too many --wan-listen addresses");
      wanl[nwan++] = optarg;
      break;
    case OPT_WAN_PORT_FILE: wan_portfile = optarg; break;
    case OPT_COMPRESS:
      if (strcmp(optarg, "off") == 0) wan_allow_zstd = false;
      else if (strcmp(optarg, "on") == 0) wan_allow_zstd = true;
      else fatal("--compress=%s: use off or on (the proxy chooses the level)", optarg);
      break;
    case OPT_TLS:
      if (strcmp(optarg, "off") && strcmp(optarg, "on") && strcmp(optarg, "require"))
        fatal("--tls=%s: use off, on or require", optarg);
      tls_mode = optarg;
      break;
    case OPT_TLS_CERTS: tlscfg.cert_dir = optarg; break;
    case OPT_TLS_PSK: tlscfg.psk_file = optarg; break;
    case 'p': pidfile = optarg; break;
    case 'd': daemonize = true; break;
    case 't': threads = cli_uint("--threads", optarg, 1, 256); break;
    case OPT_HS_TIMEOUT:
      cfg.handshake_timeout_s = cli_uint("--handshake-timeout", optarg, 1, 86400);
      break;
    case OPT_MAX_CONN:
      cfg.max_connections = cli_uint("--max-connections", optarg, 1, 1000000);
      break;
    case OPT_IMAGE_ID:
      if (strcmp(optarg, "sidecar") == 0) id_mode = IMAGE_ID_SIDECAR;
      else if (strcmp(optarg, "stat") == 0) id_mode = IMAGE_ID_STAT;
      else if (strcmp(optarg, "off") == 0) id_mode = -1;
      else fatal("--image-id=%s: use sidecar, stat or off", optarg);
      break;
    case 'v': log_set_level(LOG_LVL_DEBUG); break;
    case 'q': log_set_level(LOG_LVL_ERROR); break;
    case 'h': usage(stdout); return 0;
    case 'V': printf("xnbd-server %s\n", XNBD_VERSION); return 0;
    default:
      fprintf(stderr, "Try 'xnbd-server --help' for the options.\n");
      return 1;
    }
  }
  if (optind < argc) {
    if (optind + 1 < argc)
      fatal("only one FILE may be given as an argument (use --export NAME=FILE for more)");
    if (nexp >= MAX_EXPORTS) fatal("too many exports");
    export_names[nexp] = strdup(default_name);
    export_files[nexp++] = argv[optind];
  }
  if (nexp == 0) {
    fprintf(stderr, "xnbd-server: nothing to serve: give an image FILE or "
            "--export NAME=FILE\nTry 'xnbd-server --help' for the options.\n");
    return 1;
  }
  if (ntcp == 0 && nunix == 0 && nwan == 0) {
    tcp[ntcp++] = ":10809";
  }

  if (daemonize) {
    /* Fork before any thread exists; the parent exits when we are ready. */
    daemon_start();
  }
  signal(SIGPIPE, SIG_IGN);
  signal(SIGHUP, SIG_IGN);
  wq = workq_new(threads, "io");
  if (!wq) fatal("cannot start I/O threads: %s", strerror(errno));
  base = xnbd_event_base_new();
  if (!base) fatal("cannot create the event loop");
  if (strcmp(tls_mode, "off") != 0) {
    /* Both the WAN port and NBD_OPT_STARTTLS on the NBD listeners. */
    char err[512];
    wan_tls = wan_tls_new(true, &tlscfg, err, sizeof err);
    if (!wan_tls) fatal("%s", err);
    wan_require_tls = strcmp(tls_mode, "require") == 0;
    cfg.ssl_ctx = wan_tls_ssl_ctx(wan_tls);
    cfg.tls_require = wan_require_tls;
  } else if (tlscfg.cert_dir || tlscfg.psk_file)
    fatal("--tls-certificates/--tls-psk given but --tls is off: add --tls=on or --tls=require");
  srv = xnbd_server_new(base, &cfg);
  if (!srv) fatal("out of memory");

  for (unsigned i = 0; i < nexp; i++) {
    char err[512];
    fbs[i] = file_backend_open(export_files[i], readonly, wq, err, sizeof err);
    if (!fbs[i]) fatal("%s", err);
    /* The identity xnbd-proxy records with its cache (I5), published as
     * the export's description. */
    ids[i] = id_mode < 0 ? NULL : image_id_open(export_files[i], file_backend_fd(fbs[i]),
                                                (enum image_id_mode) id_mode);
    if (xnbd_server_add_export(srv, export_names[i],
                               ids[i] ? image_id_description(ids[i]) : NULL,
                               &file_backend_ops, fbs[i]) < 0)
      return 1;
    log_info("export '%s': %s%s", export_names[i], export_files[i],
             readonly ? " (read-only)" : "");
  }
  for (unsigned i = 0; i < ntcp; i++)
    if (xnbd_server_listen_tcp(srv, tcp[i]) < 0) return 1;
  for (unsigned i = 0; i < nunix; i++)
    if (xnbd_server_listen_unix(srv, unixp[i]) < 0) return 1;
  if (cfg.handshake_timeout_s) wan_hs_timeout = cfg.handshake_timeout_s;
  for (unsigned i = 0; i < nwan; i++) {
    int port = xnbd_server_listen_tcp_hook(srv, wanl[i], WAN_DEFAULT_PORT, wan_hook, NULL);
    if (port < 0) return 1;
    if (i == 0 && wan_portfile && cli_write_number(wan_portfile, port) < 0) return 1;
  }

  /* Signals first: once the pidfile exists, SIGTERM must be graceful. */
  sigs = cli_signals_install(base, srv);
  if (portfile && xnbd_server_tcp_port(srv) >= 0 &&
      cli_write_number(portfile, xnbd_server_tcp_port(srv)) < 0)
    return 1;
  if (pidfile && cli_write_number(pidfile, (long) getpid()) < 0)
    return 1;
  if (daemonize) daemon_ready();


  event_base_dispatch(base);

  xnbd_server_free(srv);
  wan_wait_idle(3000);      /* WAN pumps end once their NBD side closed */
  /* Every request has completed; flush and close the images. */
  workq_free(wq);
  for (unsigned i = 0; i < nexp; i++) {
    /* Data durable first, then the stamp that says "our own writes". */
    bool synced = readonly || file_backend_sync(fbs[i]) == 0;
    image_id_close(ids[i], synced ? file_backend_fd(fbs[i]) : -1);
    file_backend_close(fbs[i]);
    free(export_names[i]);
  }
  cli_signals_free(sigs);
  event_base_free(base);
  wan_tls_free(wan_tls);
  if (pidfile) unlink(pidfile);
  log_info("stopped");
  return 0;
}
