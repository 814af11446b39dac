/* xnbd-proxy: the destination-site caching proxy.  Serves the source's
 * export over NBD at once, fetching missing blocks on demand, keeping
 * writes local, copying the rest in the background, then detaching. */
#include "server.h"
#include "engine.h"
#include "workq.h"
#include "wan.h"
#include "ctl-server.h"
#include "daemon.h"
#include "cli.h"
#include "target.h"
#include "log.h"
#include "util.h"

#include <errno.h>
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <unistd.h>

#include <event2/event.h>

#define MAX_LISTEN 16

static void usage(FILE *f)
{
  fprintf(f,
"Usage: xnbd-proxy --target URI|HOST:PORT --cache FILE --bitmap FILE\n"
"                  --control SOCK [OPTIONS]\n"
"Serve a remote NBD export locally while migrating it: missing blocks are\n"
"fetched on demand and kept, writes stay local, the rest is copied in the\n"
"background, then the proxy detaches from the source.\n"
"\n"
"Source:\n"
"  -t, --target T            source: xnbd://HOST[:PORT]/EXPORT (xnbd-server's\n"
"                            WAN transport, zstd; xnbds:// adds TLS),\n"
"                            nbd://HOST[:PORT]/EXPORT, nbds://... (TLS),\n"
"                            nbd+unix:///EXPORT?socket=PATH, or HOST:PORT\n"
"      --compress=off|LEVEL  zstd level on xnbd:// links (default 3)\n"
"      --tls-psk FILE        TLS pre-shared keys (USER:HEXKEY lines)\n"
"      --tls-certificates DIR  TLS CA (ca-cert.pem) and client certificates\n"
"      --tls-username NAME   TLS identity (PSK user)\n"
"      --no-tls-verify       do not verify the server certificate\n"
"      --target-export NAME  export name for a HOST:PORT target (default \"\")\n"
"      --source-id ID        identity recorded in the bitmap (default: the\n"
"                            source's export name and size)\n"
"      --connections N       source connections (default 2; one is kept for\n"
"                            on-demand reads)\n"
"      --source-timeout S    how long client reads wait for a lost source\n"
"                            before failing with EIO (default 60)\n"
"Local state:\n"
"  -c, --cache FILE          cache image (created sparse if absent)\n"
"  -b, --bitmap FILE         persistent cached-block bitmap\n"
"      --block-size N        cache block size, a power of two from 4K to 32M\n"
"                            (default 4096)\n"
"      --clear-bitmap        start over: forget which blocks are cached\n"
"      --persist-interval MS persist the bitmap this often (default 1000)\n"
"Background copy:\n"
"      --cache-all           start copying every block at once (with\n"
"                            --standby: at the switch-over)\n"
"      --bg-rate RATE        cap, e.g. 50mbit or 20M (bytes/s); 0 = none\n"
"      --bg-window SIZE      background bytes in flight (default: sized from\n"
"                            measured RTT x throughput, 2M to 256M)\n"
"      --max-fetch SIZE      largest single fetch (default 4M)\n"
"      --detach-when-complete  detach from the source once every block is here\n"
"      --standby             live migration: until 'xnbd-ctl activate' or the\n"
"                            first write here, reads of missing blocks pass\n"
"                            through from the source and are not kept\n"
"Serving:\n"
"  -l, --listen ADDR:PORT    NBD listener (repeatable; default 127.0.0.1:10809)\n"
"  -u, --unix PATH           NBD unix socket (repeatable)\n"
"  -e, --export NAME         export name served (default \"\")\n"
"  -r, --readonly            refuse client writes\n"
"  -C, --control SOCK        control socket for xnbd-ctl (mode 0600)\n"
"      --port-file FILE      write the first TCP listener's port to FILE\n"
"  -p, --pidfile FILE        write the PID once ready\n"
"  -d, --daemon              run in the background, log to syslog\n"
"      --threads N           local I/O threads (default 8)\n"
"      --handshake-timeout S seconds a client may take to negotiate (default 30)\n"
"  -v, --verbose / -q, --quiet / -h, --help / -V, --version\n");
}







int main(int argc, char **argv)
{
  enum { O_TEXPORT = 256, O_SRCID, O_CONNS, O_SRCTMO, O_BS, O_CLEAR, O_PERSIST,
         O_CACHEALL, O_BGRATE, O_BGWIN, O_MAXFETCH, O_DETACH, O_PORTFILE,
         O_THREADS, O_HSTMO, O_COMPRESS, O_TLSPSK, O_TLSCERTS, O_TLSUSER,
         O_NOVERIFY, O_STANDBY };
  static const struct option longopts[] = {
    { "target", required_argument, 0, 't' },
    { "target-export", required_argument, 0, O_TEXPORT },
    { "compress", required_argument, 0, O_COMPRESS },
    { "tls-psk", required_argument, 0, O_TLSPSK },
    { "tls-certificates", required_argument, 0, O_TLSCERTS },
    { "tls-username", required_argument, 0, O_TLSUSER },
    { "no-tls-verify", no_argument, 0, O_NOVERIFY },
    { "source-id", required_argument, 0, O_SRCID },
    { "connections", required_argument, 0, O_CONNS },
    { "source-timeout", required_argument, 0, O_SRCTMO },
    { "cache", required_argument, 0, 'c' },
    { "bitmap", required_argument, 0, 'b' },
    { "block-size", required_argument, 0, O_BS },
    { "clear-bitmap", no_argument, 0, O_CLEAR },
    { "persist-interval", required_argument, 0, O_PERSIST },
    { "cache-all", no_argument, 0, O_CACHEALL },
    { "bg-rate", required_argument, 0, O_BGRATE },
    { "bg-window", required_argument, 0, O_BGWIN },
    { "max-fetch", required_argument, 0, O_MAXFETCH },
    { "detach-when-complete", no_argument, 0, O_DETACH },
    { "standby", no_argument, 0, O_STANDBY },
    { "listen", required_argument, 0, 'l' },
    { "unix", required_argument, 0, 'u' },
    { "export", required_argument, 0, 'e' },
    { "readonly", no_argument, 0, 'r' },
    { "control", required_argument, 0, 'C' },
    { "port-file", required_argument, 0, O_PORTFILE },
    { "pidfile", required_argument, 0, 'p' },
    { "daemon", no_argument, 0, 'd' },
    { "threads", required_argument, 0, O_THREADS },
    { "handshake-timeout", required_argument, 0, O_HSTMO },
    { "verbose", no_argument, 0, 'v' },
    { "quiet", no_argument, 0, 'q' },
    { "help", no_argument, 0, 'h' },
    { "version", no_argument, 0, 'V' },
    { 0, 0, 0, 0 }
  };
  struct engine_config ec = { 0 };
  struct xnbd_server_config sc = { 0 };
  const char *tcp[MAX_LISTEN], *unixp[MAX_LISTEN];
  unsigned ntcp = 0, nunix = 0, threads = 8;
  const char *export_name = "", *control_path = NULL, *pidfile = NULL, *portfile = NULL;
  bool daemonize = false;
  struct cli_signals *sigs;
  struct event_base *base;
  struct xnbd_server *srv;
  struct ctl_server *ctl = NULL;
  struct engine *eng;
  char err[4096];
  int c;

  log_init(argv[0], LOG_LVL_INFO);
  ec.tls_verify = true;
  while ((c = getopt_long(argc, argv, "t:c:b:l:u:e:rC:p:dvqhV", longopts, NULL)) != -1) {
    const char *why;
    switch (c) {
    case 't': ec.target = optarg; break;
    case O_TEXPORT: ec.target_export = optarg; break;
    case O_COMPRESS:
      if (strcmp(optarg, "off") == 0) ec.compress_level = -1;
      else ec.compress_level = cli_uint("--compress", optarg, 1, 19);
      break;
    case O_TLSPSK: ec.tls_psk = optarg; break;
    case O_TLSCERTS: ec.tls_certificates = optarg; break;
    case O_TLSUSER: ec.tls_username = optarg; break;
    case O_NOVERIFY: ec.tls_verify = false; break;
    case O_SRCID: ec.source_id = optarg; break;
    case O_CONNS: ec.connections = cli_uint("--connections", optarg, 1, 16); break;
    case O_SRCTMO: ec.source_timeout_s = cli_uint("--source-timeout", optarg, 1, 86400 * 7); break;
    case 'c': ec.cache_path = optarg; break;
    case 'b': ec.bitmap_path = optarg; break;
    case O_BS:
      if (util_parse_block_size(optarg, &ec.block_size, &why) < 0)
        fatal("--block-size %s: %s", optarg, why);
      break;
    case O_CLEAR: ec.clear_bitmap = true; break;
    case O_PERSIST: ec.persist_interval_ms = cli_uint("--persist-interval", optarg, 10, 3600000); break;
    case O_CACHEALL: ec.cache_all = true; break;
    case O_BGRATE:
      if (parse_rate(optarg, &ec.bg_rate, &why) < 0) fatal("--bg-rate '%s': %s", optarg, why);
      break;
    case O_BGWIN: ec.bg_window = cli_size("--bg-window", optarg); break;
    case O_MAXFETCH: {
      uint64_t v = cli_size("--max-fetch", optarg);
      if (v < 4096 || v > (32u << 20)) fatal("--max-fetch %s: must be from 4K to 32M", optarg);
      ec.max_fetch = v;
      break;
    }
    case O_DETACH: ec.detach_when_complete = true; break;
    case O_STANDBY: ec.standby = true; break;
    case 'l':
      if (ntcp >= MAX_LISTEN) fatal("too many --listen addresses");
      tcp[ntcp++] = optarg;
      break;
    case 'u':
      if (nunix >= MAX_LISTEN) fatal("too many --unix sockets");
      unixp[nunix++] = optarg;
      break;
    case 'e': export_name = optarg; break;
    case 'r': ec.readonly = true; break;
    case 'C': control_path = optarg; break;
    case O_PORTFILE: portfile = optarg; break;
    case 'p': pidfile = optarg; break;
    case 'd': daemonize = true; break;
    case O_THREADS: threads = cli_uint("--threads", optarg, 1, 256); break;
    case O_HSTMO: sc.handshake_timeout_s = cli_uint("--handshake-timeout", optarg, 1, 86400); break;
    case 'v': log_set_level(LOG_LVL_DEBUG); break;
    case 'q': log_set_level(LOG_LVL_ERROR); break;
    case 'h': usage(stdout); return 0;
    case 'V': printf("xnbd-proxy %s\n", XNBD_VERSION); return 0;
    default:
      fprintf(stderr, "Try 'xnbd-proxy --help' for the options.\n");
      return 1;
    }
  }
  if (optind < argc)
    fatal("unexpected argument '%s' (see --help)", argv[optind]);
  if (!ec.cache_path || !ec.bitmap_path)
    fatal("--cache FILE and --bitmap FILE are required (the local copy and "
          "the record of which blocks it holds)");
  if (ec.target) {
    struct target t;
    if (target_parse(ec.target, ec.target_export, &t, err, sizeof err) < 0)
      fatal("--target: %s", err);
    if (ec.target_export && t.kind != TARGET_HOST_PORT)
      fatal("--target-export goes with a HOST:PORT target only; a URI names "
            "its export itself (e.g. nbd://HOST/EXPORT)");
    target_free(&t);
  }
  if (!control_path)
    fatal("--control SOCK is required: it is how xnbd-ctl starts the "
          "background copy and detaches");
  if (ntcp == 0 && nunix == 0) tcp[ntcp++] = "127.0.0.1:10809";

  if (daemonize) {
    /* Fork before any thread exists; the parent exits when we are ready. */
    daemon_start();
  }
  signal(SIGPIPE, SIG_IGN);
  signal(SIGHUP, SIG_IGN);
  ec.wq = workq_new(threads, "io");
  if (!ec.wq) fatal("cannot start I/O threads: %s", strerror(errno));
  eng = engine_open(&ec, err, sizeof err);
  if (!eng) fatal("%s", err);

  base = xnbd_event_base_new();
  if (!base) fatal("cannot create the event loop");
  srv = xnbd_server_new(base, &sc);
  if (!srv || xnbd_server_add_export(srv, export_name, NULL, &engine_backend_ops, eng) < 0)
    fatal("cannot set up the NBD server");
  for (unsigned i = 0; i < ntcp; i++)
    if (xnbd_server_listen_tcp(srv, tcp[i]) < 0) return 1;
  for (unsigned i = 0; i < nunix; i++)
    if (xnbd_server_listen_unix(srv, unixp[i]) < 0) return 1;
  ctl = ctl_server_start(control_path, eng, "xnbd-proxy", err, sizeof err);
  if (!ctl) fatal("%s", err);

  /* Signals first: once the pidfile exists, SIGTERM must be graceful. */
  sigs = cli_signals_install(base, srv);
  if (portfile && xnbd_server_tcp_port(srv) >= 0 &&
      cli_write_number(portfile, xnbd_server_tcp_port(srv)) < 0)
    return 1;
  if (pidfile && cli_write_number(pidfile, (long) getpid()) < 0)
    return 1;
  if (daemonize) daemon_ready();


  event_base_dispatch(base);

  ctl_server_stop(ctl);     /* waits for engine calls it runs */
  xnbd_server_free(srv);
  engine_close(eng);        /* stops the fetcher, persists the bitmap */
  wan_wait_idle(3000);      /* WAN pumps end once their NBD side closed */
  workq_free(ec.wq);
  cli_signals_free(sigs);
  event_base_free(base);
  if (pidfile) unlink(pidfile);
  log_info("stopped");
  return 0;
}
