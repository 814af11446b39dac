/* xnbd-proxy: the destination-site caching proxy.  Serves the source's
 * export over NBD at once, fetching missing blocks on demand, keeping
 * writes local, copying the rest in the background, then detaching. */
#include "server.h"
#include "engine.h"
#include "workq.h"
#include "wan.h"
#include "ctl-server.h"
#include "serve.h"
#include "cli.h"
#include "target.h"
#include "log.h"
#include "util.h"

#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <unistd.h>



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
"      --bg-window SIZE      background bytes in flight, 64K to 256M (default:\n"
"                            up to 2 x rate x round trip, 256K-256M)\n"
"      --max-fetch SIZE      largest single fetch (default 4M)\n"
"      --detach-when-complete  detach from the source once every block is here\n"
"      --standby             live migration: until 'xnbd-ctl activate' or the\n"
"                            first write here, reads of missing blocks pass\n"
"                            through from the source and are not kept\n"
"Deduplication:\n"
"      --seed FILE           a local image whose blocks are used instead of\n"
"                            fetching them, when the source (xnbd-server)\n"
"                            publishes block digests; read-only, verified by\n"
"                            SHA-256 before use (repeatable, up to 64)\n"
"      --index FILE          keep the seeds' index here (hashed once; default:\n"
"                            rebuilt at every start)\n"
"      --digests FILE        the source's block digests, made by xnbd-digest,\n"
"                            for a source that does not publish them\n"
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







#define MAX_SEEDS 64

struct proxy_opts {
  struct engine_config ec;
  const char *seeds[MAX_SEEDS];
  struct xnbd_server_config sc;
  struct serve sv;
  const char *export_name, *control_path;
};

enum { O_TEXPORT = 256, O_SRCID, O_CONNS, O_SRCTMO, O_BS, O_CLEAR, O_PERSIST,
       O_CACHEALL, O_BGRATE, O_BGWIN, O_MAXFETCH, O_DETACH, O_HSTMO, O_COMPRESS,
       O_TLSPSK, O_TLSCERTS, O_TLSUSER, O_NOVERIFY, O_STANDBY, O_SEED, O_INDEX, O_DIGESTS };

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
  { "seed", required_argument, 0, O_SEED },
  { "index", required_argument, 0, O_INDEX },
  { "digests", required_argument, 0, O_DIGESTS },
  { "export", required_argument, 0, 'e' },
  { "readonly", no_argument, 0, 'r' },
  { "control", required_argument, 0, 'C' },
  { "handshake-timeout", required_argument, 0, O_HSTMO },
  SERVE_LONGOPTS,
  { "help", no_argument, 0, 'h' },
  { "version", no_argument, 0, 'V' },
  { 0, 0, 0, 0 }
};

/* One option of the engine's; false if c is not one. */
static bool engine_option(struct engine_config *ec, int c, const char *arg)
{
  const char *why;
  uint64_t v;
  switch (c) {
  case 't': ec->target = arg; return true;
  case O_TEXPORT: ec->target_export = arg; return true;
  case O_COMPRESS:
    ec->compress_level = strcmp(arg, "off") == 0 ? -1 : (int) cli_uint("--compress", arg, 1, 19);
    return true;
  case O_TLSPSK: ec->tls_psk = arg; return true;
  case O_TLSCERTS: ec->tls_certificates = arg; return true;
  case O_TLSUSER: ec->tls_username = arg; return true;
  case O_NOVERIFY: ec->tls_verify = false; return true;
  case O_SRCID: ec->source_id = arg; return true;
  case O_CONNS: ec->connections = cli_uint("--connections", arg, 1, 16); return true;
  case O_SRCTMO: ec->source_timeout_s = cli_uint("--source-timeout", arg, 1, 86400 * 7); return true;
  case 'c': ec->cache_path = arg; return true;
  case 'b': ec->bitmap_path = arg; return true;
  case O_BS:
    if (util_parse_block_size(arg, &ec->block_size, &why) < 0)
      fatal("--block-size %s: %s", arg, why);
    return true;
  case O_CLEAR: ec->clear_bitmap = true; return true;
  case O_PERSIST: ec->persist_interval_ms = cli_uint("--persist-interval", arg, 10, 3600000); return true;
  case O_CACHEALL: ec->cache_all = true; return true;
  case O_BGRATE:
    if (parse_rate(arg, &ec->bg_rate, &why) < 0) fatal("--bg-rate '%s': %s", arg, why);
    return true;
  case O_BGWIN:
    v = cli_size("--bg-window", arg);
    if (v < (64u << 10) || v > (256u << 20)) fatal("--bg-window %s: must be from 64K to 256M", arg);
    ec->bg_window = v;
    return true;
  case O_MAXFETCH:
    v = cli_size("--max-fetch", arg);
    if (v < 4096 || v > (32u << 20)) fatal("--max-fetch %s: must be from 4K to 32M", arg);
    ec->max_fetch = v;
    return true;
  case O_DETACH: ec->detach_when_complete = true; return true;
  case O_STANDBY: ec->standby = true; return true;
  case 'r': ec->readonly = true; return true;
  }
  return false;
}

/* Returns -1 to go on, or the exit status (--help, --version, errors). */
static int parse_args(int argc, char **argv, struct proxy_opts *o)
{
  char err[4096];
  int c;
  o->ec.tls_verify = true;
  o->export_name = "";
  while ((c = getopt_long(argc, argv, "t:c:b:l:u:e:rC:p:dvqhV", longopts, NULL)) != -1) {
    if (engine_option(&o->ec, c, optarg) || serve_option(&o->sv, c, optarg)) continue;
    switch (c) {
    case 'e': o->export_name = optarg; break;
    case O_SEED:
      if (o->ec.nseeds >= MAX_SEEDS) fatal("too many --seed files (at most %d)", MAX_SEEDS);
      o->seeds[o->ec.nseeds++] = optarg;
      break;
    case O_INDEX: o->ec.index_path = optarg; break;
    case O_DIGESTS: o->ec.digests_path = optarg; break;
    case 'C': o->control_path = optarg; break;
    case O_HSTMO: o->sc.handshake_timeout_s = cli_uint("--handshake-timeout", optarg, 1, 86400); break;
    case 'h': usage(stdout); return 0;
    case 'V': printf("xnbd-proxy %s\n", XNBD_VERSION); return 0;
    default:
      fprintf(stderr, "Try 'xnbd-proxy --help' for the options.\n");
      return 1;
    }
  }
  if (optind < argc)
    fatal("unexpected argument '%s' (see --help)", argv[optind]);
  if (!o->ec.cache_path || !o->ec.bitmap_path)
    fatal("--cache FILE and --bitmap FILE are required (the local copy and "
          "the record of which blocks it holds)");
  if (o->ec.target) {
    struct target t;
    if (target_parse(o->ec.target, o->ec.target_export, &t, err, sizeof err) < 0)
      fatal("--target: %s", err);
    if (o->ec.target_export && t.kind != TARGET_HOST_PORT)
      fatal("--target-export goes with a HOST:PORT target only; a URI names "
            "its export itself (e.g. nbd://HOST/EXPORT)");
    target_free(&t);
  }
  o->ec.seeds = o->seeds;
  if ((o->ec.index_path || o->ec.digests_path) && !o->ec.nseeds)
    fatal("--index and --digests serve the --seed files: give at least one --seed");
  if (!o->control_path)
    fatal("--control SOCK is required: it is how xnbd-ctl starts the "
          "background copy and detaches");
  return -1;
}

int main(int argc, char **argv)
{
  struct proxy_opts o = { .sv = SERVE_INIT };
  struct xnbd_server *srv;
  struct ctl_server *ctl;
  struct engine *eng;
  char err[4096];
  int rc;

  log_init(argv[0], LOG_LVL_INFO);
  if ((rc = parse_args(argc, argv, &o)) >= 0) return rc;
  serve_begin(&o.sv, "127.0.0.1:10809");
  o.ec.wq = o.sv.wq;
  eng = engine_open(&o.ec, err, sizeof err);
  if (!eng) fatal("%s", err);
  srv = xnbd_server_new(o.sv.base, &o.sc);
  if (!srv || xnbd_server_add_export(srv, o.export_name, NULL, &engine_backend_ops, eng) < 0)
    fatal("cannot set up the NBD server");
  ctl = ctl_server_start(o.control_path, eng, "xnbd-proxy", err, sizeof err);
  if (!ctl) fatal("%s", err);

  rc = serve_run(&o.sv, srv);

  ctl_server_stop(ctl);     /* waits for engine calls it runs */
  xnbd_server_free(srv);
  engine_close(eng);        /* stops the source, persists the bitmap */
  serve_end(&o.sv);
  return rc;
}
