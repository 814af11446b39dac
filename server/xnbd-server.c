/* xnbd-server: serves image files over NBD (the source site of a
 * migration, or any NBD use). */
#include "server.h"
#include "file-backend.h"
#include "digest.h"
#include "digest-backend.h"
#include "read-map.h"
#include "image-id.h"
#include "wan.h"
#include "workq.h"
#include "serve.h"
#include "cli.h"
#include "log.h"
#include "util.h"

#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <stdio.h>
#include <sys/stat.h>
#include <unistd.h>


#define MAX_EXPORTS 64

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
"      --no-digests          do not serve NAME@xnbd-sha256, the SHA-256 of each\n"
"                            4 KiB block of export NAME (for deduplication)\n"
"      --no-read-map         do not serve NAME@xnbd-reads, which 1 MiB regions of\n"
"                            export NAME clients read most recently (xnbd-proxy\n"
"                            copies those first)\n"
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





struct server_opts {
  struct serve sv;
  struct xnbd_server_config cfg;
  const char *export_files[MAX_EXPORTS];
  char *export_names[MAX_EXPORTS];
  unsigned nexp;
  const char *wanl[SERVE_MAX_LISTEN];
  unsigned nwan;
  const char *wan_portfile, *tls_mode, *default_name;
  struct wan_tls_config tlscfg;
  int id_mode;                          /* enum image_id_mode, or -1: off */
  bool readonly;
  bool no_digests;
  bool no_read_map;
};

enum { OPT_HS_TIMEOUT = 256, OPT_MAX_CONN, OPT_WAN_PORT_FILE, OPT_COMPRESS, OPT_TLS,
       OPT_TLS_CERTS, OPT_TLS_PSK, OPT_IMAGE_ID, OPT_NO_DIGESTS,
       OPT_NO_READ_MAP };

static const struct option longopts[] = {
  { "export", required_argument, 0, 'e' },
  { "name", required_argument, 0, 'n' },
  { "readonly", no_argument, 0, 'r' },
  { "read-only", no_argument, 0, 'r' },
  { "wan-listen", required_argument, 0, 'W' },
  { "wan-port-file", required_argument, 0, OPT_WAN_PORT_FILE },
  { "compress", required_argument, 0, OPT_COMPRESS },
  { "tls", required_argument, 0, OPT_TLS },
  { "tls-certificates", required_argument, 0, OPT_TLS_CERTS },
  { "tls-psk", required_argument, 0, OPT_TLS_PSK },
  { "handshake-timeout", required_argument, 0, OPT_HS_TIMEOUT },
  { "max-connections", required_argument, 0, OPT_MAX_CONN },
  { "image-id", required_argument, 0, OPT_IMAGE_ID },
  { "no-digests", no_argument, 0, OPT_NO_DIGESTS },
  { "no-read-map", no_argument, 0, OPT_NO_READ_MAP },
  SERVE_LONGOPTS,
  { "help", no_argument, 0, 'h' },
  { "version", no_argument, 0, 'V' },
  { 0, 0, 0, 0 }
};

/* One of the server's own options; false if c is not one. */
static bool server_option(struct server_opts *o, int c, const char *arg)
{
  switch (c) {
  case 'e': {
    const char *eq = strchr(arg, '=');
    if (!eq || eq == arg || !eq[1])
      fatal("--export '%s': expected NAME=FILE", arg);
    if (o->nexp >= MAX_EXPORTS) fatal("too many exports (at most %d)", MAX_EXPORTS);
    o->export_names[o->nexp] = strndup(arg, eq - arg);
    o->export_files[o->nexp++] = eq + 1;
    return true;
  }
  case 'n': o->default_name = arg; return true;
  case 'r': o->readonly = true; return true;
  case 't': serve_option(&o->sv, SERVE_OPT_THREADS, arg); return true;
  case 'W':
    if (o->nwan >= SERVE_MAX_LISTEN) fatal("too many --wan-listen addresses");
    o->wanl[o->nwan++] = arg;
    return true;
  case OPT_WAN_PORT_FILE: o->wan_portfile = arg; return true;
  case OPT_COMPRESS:
    if (strcmp(arg, "off") == 0) wan_allow_zstd = false;
    else if (strcmp(arg, "on") == 0) wan_allow_zstd = true;
    else fatal("--compress=%s: use off or on (the proxy chooses the level)", arg);
    return true;
  case OPT_TLS:
    if (strcmp(arg, "off") && strcmp(arg, "on") && strcmp(arg, "require"))
      fatal("--tls=%s: use off, on or require", arg);
    o->tls_mode = arg;
    return true;
  case OPT_TLS_CERTS: o->tlscfg.cert_dir = arg; return true;
  case OPT_TLS_PSK: o->tlscfg.psk_file = arg; return true;
  case OPT_HS_TIMEOUT:
    o->cfg.handshake_timeout_s = cli_uint("--handshake-timeout", arg, 1, 86400);
    return true;
  case OPT_MAX_CONN:
    o->cfg.max_connections = cli_uint("--max-connections", arg, 1, 1000000);
    return true;
  case OPT_NO_DIGESTS: o->no_digests = true; return true;
  case OPT_NO_READ_MAP: o->no_read_map = true; return true;
  case OPT_IMAGE_ID:
    if (strcmp(arg, "sidecar") == 0) o->id_mode = IMAGE_ID_SIDECAR;
    else if (strcmp(arg, "stat") == 0) o->id_mode = IMAGE_ID_STAT;
    else if (strcmp(arg, "off") == 0) o->id_mode = -1;
    else fatal("--image-id=%s: use sidecar, stat or off", arg);
    return true;
  }
  return false;
}

/* Returns -1 to go on, or the exit status (--help, --version, errors). */
static int parse_args(int argc, char **argv, struct server_opts *o)
{
  int c;
  while ((c = getopt_long(argc, argv, "e:n:rl:u:W:p:dt:vqhV", longopts, NULL)) != -1) {
    if (server_option(o, c, optarg) || serve_option(&o->sv, c, optarg)) continue;
    switch (c) {
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
    if (o->nexp >= MAX_EXPORTS) fatal("too many exports");
    o->export_names[o->nexp] = strdup(o->default_name);
    o->export_files[o->nexp++] = argv[optind];
  }
  if (o->nexp == 0) {
    fprintf(stderr, "xnbd-server: nothing to serve: give an image FILE or "
            "--export NAME=FILE\nTry 'xnbd-server --help' for the options.\n");
    return 1;
  }
  return -1;
}

/* TLS for both the WAN port and NBD_OPT_STARTTLS on the NBD listeners. */
static void setup_tls(struct server_opts *o)
{
  char err[512];
  if (strcmp(o->tls_mode, "off") == 0) {
    if (o->tlscfg.cert_dir || o->tlscfg.psk_file)
      fatal("--tls-certificates/--tls-psk given but --tls is off: add --tls=on or --tls=require");
    return;
  }
  wan_tls = wan_tls_new(true, &o->tlscfg, err, sizeof err);
  if (!wan_tls) fatal("%s", err);
  wan_require_tls = strcmp(o->tls_mode, "require") == 0;
  o->cfg.ssl_ctx = wan_tls_ssl_ctx(wan_tls);
  o->cfg.tls_require = wan_require_tls;
}

/* The digests of export i's blocks: computed on their own threads (hashing
 * a large request takes a while and must not hold up the data exports'
 * I/O), kept in the image's digest sidecar when it has a recorded identity
 * (digest-sidecar.h). */
static void open_digests(struct server_opts *o, struct file_backend *fb, unsigned i,
                         const struct image_id *id, struct digest_backend **dbs,
                         struct workq **dwq)
{
  if (!*dwq) {
    /* One request at a time, hashed over every core (digest_file's
     * threads): the chunks a copy asks ahead come back in its order, the
     * one it waits on first, rather than all together at the end. */
    *dwq = workq_new(1, "digest");
    if (!*dwq) fatal("cannot start the digest threads: %s", strerror(errno));
  }
  dbs[i] = digest_backend_open(file_backend_fd(fb), file_backend_ops.get_size(fb), *dwq);
  if (!dbs[i]) fatal("out of memory");
  if (id && !image_id_derived(id))
    digest_backend_use_sidecar(dbs[i], o->export_files[i], image_id_hex(id), image_id_gen(id));
  else
    log_info("export '%s': no digest sidecar (the image has no recorded identity): "
             "digests are computed at each read", o->export_names[i]);
}

/* Export i's companion NAME+suffix (ops, h), left out of export lists;
 * what names the option that turns it off. */
static int add_companion(struct server_opts *o, struct xnbd_server *srv, unsigned i,
                         const char *suffix, const struct xnbd_backend_ops *ops, void *h,
                         const char *what, const char *off_option)
{
  char name[4096];
  if (snprintf(name, sizeof name, "%s%s", o->export_names[i], suffix) >= (int) sizeof name)
    fatal("export name '%.64s...' is too long", o->export_names[i]);
  if (xnbd_server_add_export(srv, name, NULL, ops, h) < 0) {
    log_error("export '%s' is also the name of the %s of '%s': rename the export, "
              "or serve without it (%s)", name, what, o->export_names[i], off_option);
    return -1;
  }
  xnbd_server_unlist_export(srv, name);
  log_debug("export '%s': the %s of '%s'", name, what, o->export_names[i]);
  return 0;
}

static void note_read(void *m, uint64_t off, uint64_t len) { read_map_note(m, off, len); }

/* Export NAME@xnbd-reads: which regions of export i its clients (not
 * copiers) read most recently. */
static int add_read_map(struct server_opts *o, struct xnbd_server *srv, unsigned i,
                        uint64_t size, struct read_map **rms)
{
  rms[i] = read_map_new(size);
  if (!rms[i]) fatal("out of memory");
  if (add_companion(o, srv, i, READ_MAP_SUFFIX, &read_map_ops, rms[i], "read map",
                    "--no-read-map") < 0)
    return -1;
  xnbd_server_note_reads(srv, o->export_names[i], note_read, rms[i]);
  return 0;
}

/* The exports, each with the identity xnbd-proxy records with its cache
 * (I5), published as the export's description, and (unless --no-digests)
 * its digest export and (unless --no-read-map) its read map; then the
 * WAN listeners. */
static int setup_exports(struct server_opts *o, struct xnbd_server *srv,
                         struct file_backend **fbs, struct image_id **ids,
                         struct digest_backend **dbs, struct workq **dwq,
                         struct digest_guard **gs, struct read_map **rms)
{
  for (unsigned i = 0; i < o->nexp; i++) {
    const struct xnbd_backend_ops *ops = &file_backend_ops;
    void *h;
    char err[512];
    fbs[i] = file_backend_open(o->export_files[i], o->readonly, o->sv.wq, err, sizeof err);
    if (!fbs[i]) fatal("%s", err);
    ids[i] = o->id_mode < 0 ? NULL : image_id_open(o->export_files[i], file_backend_fd(fbs[i]),
                                                   (enum image_id_mode) o->id_mode);
    h = fbs[i];
    if (!o->no_digests) {
      open_digests(o, fbs[i], i, ids[i], dbs, dwq);
      if (!o->readonly) {       /* writes invalidate kept digests first */
        gs[i] = digest_guard_new(&file_backend_ops, fbs[i], dbs[i]);
        if (!gs[i]) fatal("out of memory");
        ops = digest_guard_ops(gs[i]);
        h = gs[i];
      }
    }
    if (xnbd_server_add_export(srv, o->export_names[i],
                               ids[i] ? image_id_description(ids[i]) : NULL, ops, h) < 0)
      return -1;
    log_info("export '%s': %s%s", o->export_names[i], o->export_files[i],
             o->readonly ? " (read-only)" : "");
  }
  for (unsigned i = 0; i < o->nexp && !o->no_digests; i++)
    if (add_companion(o, srv, i, DIGEST_EXPORT_SUFFIX, &digest_backend_ops, dbs[i],
                      "digest export", "--no-digests") < 0)
      return -1;
  for (unsigned i = 0; i < o->nexp && !o->no_read_map; i++)
    if (add_read_map(o, srv, i, file_backend_ops.get_size(fbs[i]), rms) < 0) return -1;
  if (o->cfg.handshake_timeout_s) wan_hs_timeout = o->cfg.handshake_timeout_s;
  for (unsigned i = 0; i < o->nwan; i++) {
    int port = xnbd_server_listen_tcp_hook(srv, o->wanl[i], WAN_DEFAULT_PORT, wan_hook, NULL);
    if (port < 0) return -1;
    if (i == 0 && o->wan_portfile && cli_write_number(o->wan_portfile, port) < 0) return -1;
  }
  return 0;
}

int main(int argc, char **argv)
{
  struct server_opts o = { .sv = SERVE_INIT, .tls_mode = "off", .default_name = "",
                           .id_mode = IMAGE_ID_SIDECAR };
  struct file_backend *fbs[MAX_EXPORTS] = { 0 };
  struct image_id *ids[MAX_EXPORTS] = { 0 };
  struct digest_backend *dbs[MAX_EXPORTS] = { 0 };
  struct digest_guard *gs[MAX_EXPORTS] = { 0 };
  struct read_map *rms[MAX_EXPORTS] = { 0 };
  struct workq *dwq = NULL;
  struct xnbd_server *srv;
  int rc;

  log_init(argv[0], LOG_LVL_INFO);
  if ((rc = parse_args(argc, argv, &o)) >= 0) return rc;
  serve_begin(&o.sv, o.nwan ? NULL : ":10809");
  setup_tls(&o);
  srv = xnbd_server_new(o.sv.base, &o.cfg);
  if (!srv) fatal("out of memory");
  rc = setup_exports(&o, srv, fbs, ids, dbs, &dwq, gs, rms) < 0 ? 1 : serve_run(&o.sv, srv);

  xnbd_server_free(srv);
  wan_wait_idle(3000);      /* WAN pumps end once their NBD side closed */
  /* Every request has completed; flush and close the images. */
  workq_free(o.sv.wq);
  o.sv.wq = NULL;
  workq_free(dwq);
  /* Kept digests synced before the identity records a clean stop. */
  for (unsigned i = 0; i < o.nexp; i++) digest_backend_close(dbs[i]);
  for (unsigned i = 0; i < o.nexp; i++) digest_guard_free(gs[i]);
  for (unsigned i = 0; i < o.nexp; i++) read_map_free(rms[i]);
  for (unsigned i = 0; i < o.nexp; i++) {
    if (!fbs[i]) continue;
    /* Data durable first, then the stamp that says "our own writes". */
    bool synced = o.readonly || file_backend_sync(fbs[i]) == 0;
    image_id_close(ids[i], synced ? file_backend_fd(fbs[i]) : -1);
    file_backend_close(fbs[i]);
  }
  for (unsigned i = 0; i < o.nexp; i++) free(o.export_names[i]);
  serve_end(&o.sv);
  wan_tls_free(wan_tls);
  return rc;
}
