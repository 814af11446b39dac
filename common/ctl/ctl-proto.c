/* ctl-proto.c: the control command table, request parsing and reply lines
 * (protocol in ctl-proto.h).  Nothing here calls the engine, so xnbd-ctl
 * links this file for the command table without the engine; ctl-run.c
 * runs the commands. */
#include "ctl-proto.h"
#include "json.h"
#include "util.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_WORDS 8              /* more words than any command takes */
#define ECHO_MAX  64             /* bytes of a bad word echoed back */

const struct ctl_command ctl_commands[CTL_NCOMMANDS] = {
  { CTL_STATUS, "status", "query", NULL, NULL, NULL, "status",
    "show the migration state and statistics", false },
  { CTL_CACHE_ALL, "cache-all", NULL, NULL, NULL, NULL, "cache-all",
    "start copying every missing block from the source in the background", false },
  { CTL_ACTIVATE, "activate", NULL, NULL, NULL, NULL, "activate",
    "switch-over done: keep blocks from now on (leaves --standby)", false },
  { CTL_PAUSE, "pause", NULL, NULL, NULL, NULL, "pause",
    "pause the background copy", false },
  { CTL_RESUME, "resume", NULL, NULL, NULL, NULL, "resume",
    "resume the background copy", false },
  { CTL_RATE, "rate", NULL, "LIMIT", NULL, NULL, "rate LIMIT",
    "limit the background copy to LIMIT: 100mbit, 12M (bytes/s), 0 = unlimited",
    false },
  { CTL_DETACH, "detach", "switch", NULL, "--force", "-f", "detach [--force]",
    "stop using the source; refused while blocks are missing unless --force "
    "(they then read as I/O errors)", true },
  { CTL_RECONNECT, "reconnect", NULL, "URI", NULL, NULL, "reconnect URI",
    "use another address of the same source (xnbd://, xnbds://, nbd://, "
    "nbds://, nbd+unix://, HOST:PORT)", true },
  { CTL_FLUSH, "flush", NULL, NULL, NULL, NULL, "flush",
    "make everything written so far durable (data, then bitmap)", true },
  { CTL_HELP, "help", NULL, NULL, NULL, NULL, "help", "list the commands", false },
};

const char ctl_reply_too_long[] =
  "{\"ok\":false,\"error\":\"command line too long (more than 4096 bytes); it "
  "was discarded: send one short command per line\"}\n";
const char ctl_reply_busy[] =
  "{\"ok\":false,\"error\":\"too many control clients (at most 64 at once); "
  "close idle xnbd-ctl or socat sessions and try again\"}\n";
const char ctl_reply_oom[] =
  "{\"ok\":false,\"error\":\"out of memory in the control server; see its log\"}\n";

_Static_assert(CTL_MAX_LINE == 4096 && CTL_MAX_CLIENTS == 64,
               "update the numbers in ctl_reply_too_long and ctl_reply_busy");

const struct ctl_command *ctl_command_find(const char *word)
{
  for (size_t i = 0; i < CTL_NCOMMANDS; i++)
    if (strcmp(word, ctl_commands[i].name) == 0 ||
        (ctl_commands[i].alias && strcmp(word, ctl_commands[i].alias) == 0))
      return &ctl_commands[i];
  return NULL;
}

static char *vreply_error(const char *fmt, va_list ap)
{
  char msg[1024];
  char *buf = NULL;
  size_t len = 0;
  FILE *f;

  vsnprintf(msg, sizeof msg, fmt, ap);
  f = open_memstream(&buf, &len);
  if (!f)
    return NULL;
  fputs("{\"ok\":false,\"error\":", f);
  json_fput_string(f, msg);
  fputs("}\n", f);
  if (fclose(f) != 0) {
    free(buf);
    return NULL;
  }
  return buf;
}

char *ctl_reply_error(const char *fmt, ...)
{
  va_list ap;
  char *r;
  va_start(ap, fmt);
  r = vreply_error(fmt, ap);
  va_end(ap);
  return r;
}

/* "status, cache-all, ..., rate LIMIT, detach [--force], ..." */
static void put_command_list(char *buf, size_t len)
{
  size_t n = 0;
  buf[0] = '\0';
  for (size_t i = 0; i < CTL_NCOMMANDS && n < len; i++)
    n += snprintf(buf + n, len - n, "%s%s", i ? ", " : "", ctl_commands[i].usage);
}

/* Splits line into words (spaces and tabs); returns the count, which is
 * MAX_WORDS + 1 when there are too many. */
static int split_words(char *line, char **argv)
{
  int argc = 0;
  char *p = line;
  for (;;) {
    while (*p == ' ' || *p == '\t') *p++ = '\0';
    if (!*p) break;
    if (argc == MAX_WORDS) return MAX_WORDS + 1;
    argv[argc++] = p;
    while (*p && *p != ' ' && *p != '\t') p++;
  }
  return argc;
}

enum ctl_parse_result ctl_parse(char *line, size_t len, struct ctl_request *req,
                                char **reply)
{
  char *argv[MAX_WORDS];
  const struct ctl_command *cmd;
  int argc, nargs = 0;
  char list[512];

  memset(req, 0, sizeof *req);
  *reply = NULL;
  if (len > 0 && line[len - 1] == '\r')
    line[--len] = '\0';
  if (len > CTL_MAX_LINE) {
    *reply = strdup(ctl_reply_too_long);
    return CTL_PARSE_BAD;
  }
  /* Control characters (including NUL) have no place in a command. */
  for (size_t i = 0; i < len; i++) {
    unsigned char ch = line[i];
    if ((ch < 0x20 && ch != '\t') || ch == 0x7f) {
      char first[ECHO_MAX + 1];
      size_t n = strcspn(line, " \t");
      n = MIN(n, MIN(i, (size_t) ECHO_MAX));
      memcpy(first, line, n);
      first[n] = '\0';
      *reply = ctl_reply_error("invalid command line%s%s%s: byte %zu is the "
                               "control character 0x%02x; send plain text "
                               "commands, one per line (send \"help\" for the "
                               "list)", n ? " \"" : "", first, n ? "\"" : "",
                               i + 1, ch);
      return CTL_PARSE_BAD;
    }
  }
  line[len] = '\0';
  argc = split_words(line, argv);
  argc = MIN(argc, MAX_WORDS);   /* the words past MAX_WORDS are extra anyway */
  if (argc == 0)
    return CTL_PARSE_EMPTY;
  cmd = ctl_command_find(argv[0]);
  if (!cmd) {
    put_command_list(list, sizeof list);
    *reply = ctl_reply_error("unknown command \"%.*s\"; the commands are: %s "
                             "(send \"help\" for details)", ECHO_MAX, argv[0], list);
    return CTL_PARSE_BAD;
  }
  for (int i = 1; i < argc; i++) {
    const char *w = argv[i];
    if (cmd->flag && !req->flag && (strcmp(w, cmd->flag) == 0 ||
                                    (cmd->flag_short && strcmp(w, cmd->flag_short) == 0))) {
      req->flag = true;
    } else if (cmd->flag && w[0] == '-' && (!cmd->arg || req->arg)) {
      *reply = ctl_reply_error("%s: unknown argument \"%.*s\"; usage: %s",
                               argv[0], ECHO_MAX, w, cmd->usage);
      return CTL_PARSE_BAD;
    } else if (cmd->arg && !req->arg) {
      req->arg = w;
      nargs++;
    } else {
      *reply = ctl_reply_error("%s: too many arguments (\"%.*s\" is extra); "
                               "usage: %s (%s)", argv[0], ECHO_MAX, w,
                               cmd->usage, cmd->description);
      return CTL_PARSE_BAD;
    }
  }
  if (cmd->arg && nargs == 0) {
    *reply = ctl_reply_error("%s: missing argument; usage: %s (%s)", argv[0],
                             cmd->usage, cmd->description);
    return CTL_PARSE_BAD;
  }
  req->cmd = cmd;
  return CTL_PARSE_OK;
}

void ctl_put_help(FILE *f)
{
  fputs(",\"commands\":[", f);
  for (size_t i = 0; i < CTL_NCOMMANDS; i++) {
    const struct ctl_command *cmd = &ctl_commands[i];
    fputs(i ? ",{\"command\":" : "{\"command\":", f);
    json_fput_string(f, cmd->name);
    fputs(",\"aliases\":[", f);
    if (cmd->alias)
      json_fput_string(f, cmd->alias);
    fputs("],\"usage\":", f);
    json_fput_string(f, cmd->usage);
    fputs(",\"description\":", f);
    json_fput_string(f, cmd->description);
    fputs("}", f);
  }
  fputs("]", f);
}
