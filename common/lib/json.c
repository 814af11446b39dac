/* json.c: escaping writer and a small tree-building reader (json.h). */
#include "json.h"

#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

struct json {
  enum json_type type;
  bool b;
  char *text;              /* string value, or a number's text */
  size_t n;                /* array/object: number of items */
  char **keys;             /* object: member names */
  struct json **items;     /* array/object: values */
};

/* ---- writing ---------------------------------------------------------- */

/* Length of the valid UTF-8 sequence at s (1-4), or 0 if invalid. */
static size_t utf8_len(const unsigned char *s)
{
  unsigned char c = s[0];
  size_t n;
  uint32_t cp;
  if (c < 0x80) return 1;
  if (c >= 0xc2 && c <= 0xdf) { n = 2; cp = c & 0x1f; }
  else if (c >= 0xe0 && c <= 0xef) { n = 3; cp = c & 0x0f; }
  else if (c >= 0xf0 && c <= 0xf4) { n = 4; cp = c & 0x07; }
  else return 0;
  for (size_t i = 1; i < n; i++) {
    if ((s[i] & 0xc0) != 0x80) return 0;   /* also stops at the NUL */
    cp = cp << 6 | (s[i] & 0x3f);
  }
  if ((n == 3 && cp < 0x800) || (n == 4 && (cp < 0x10000 || cp > 0x10ffff)) ||
      (cp >= 0xd800 && cp <= 0xdfff))
    return 0;                             /* overlong or surrogate */
  return n;
}

void json_fput_string(FILE *f, const char *str)
{
  const unsigned char *s = (const unsigned char *) (str ? str : "");
  putc('"', f);
  while (*s) {
    unsigned char c = *s;
    size_t n;
    switch (c) {
    case '"':  fputs("\\\"", f); s++; continue;
    case '\\': fputs("\\\\", f); s++; continue;
    case '\n': fputs("\\n", f); s++; continue;
    case '\r': fputs("\\r", f); s++; continue;
    case '\t': fputs("\\t", f); s++; continue;
    case '\b': fputs("\\b", f); s++; continue;
    case '\f': fputs("\\f", f); s++; continue;
    }
    if (c < 0x20 || c == 0x7f) {
      fprintf(f, "\\u%04x", c);
      s++;
    } else if ((n = utf8_len(s)) == 0) {
      fputs("\\ufffd", f);               /* not UTF-8: replacement char */
      s++;
    } else {
      fwrite(s, 1, n, f);
      s += n;
    }
  }
  putc('"', f);
}

/* ---- reading ---------------------------------------------------------- */

struct parser {
  const char *start, *p, *end;
  char *err;
  size_t errlen;
  bool failed;
};

static void perr(struct parser *ps, const char *fmt, ...)
  __attribute__((format(printf, 2, 3)));
static void perr(struct parser *ps, const char *fmt, ...)
{
  va_list ap;
  char msg[128];
  if (ps->failed) return;
  ps->failed = true;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  if (ps->err && ps->errlen)
    snprintf(ps->err, ps->errlen, "%s at byte %zu", msg, (size_t) (ps->p - ps->start));
}

static void skip_ws(struct parser *ps)
{
  while (ps->p < ps->end &&
         (*ps->p == ' ' || *ps->p == '\t' || *ps->p == '\n' || *ps->p == '\r'))
    ps->p++;
}

static struct json *new_value(enum json_type t)
{
  struct json *v = calloc(1, sizeof *v);
  if (v) v->type = t;
  return v;
}

void json_free(struct json *v)
{
  if (!v) return;
  for (size_t i = 0; i < v->n; i++) {
    if (v->keys) free(v->keys[i]);
    json_free(v->items[i]);
  }
  free(v->keys);
  free(v->items);
  free(v->text);
  free(v);
}

static int hex4(struct parser *ps, uint32_t *out)
{
  uint32_t v = 0;
  if (ps->end - ps->p < 4) { perr(ps, "truncated \\u escape"); return -1; }
  for (int i = 0; i < 4; i++) {
    char c = *ps->p++;
    v <<= 4;
    if (c >= '0' && c <= '9') v |= c - '0';
    else if (c >= 'a' && c <= 'f') v |= c - 'a' + 10;
    else if (c >= 'A' && c <= 'F') v |= c - 'A' + 10;
    else { perr(ps, "bad hex digit in \\u escape"); return -1; }
  }
  *out = v;
  return 0;
}

static size_t put_utf8(char *d, uint32_t cp)
{
  if (cp < 0x80) { d[0] = cp; return 1; }
  if (cp < 0x800) { d[0] = 0xc0 | cp >> 6; d[1] = 0x80 | (cp & 0x3f); return 2; }
  if (cp < 0x10000) {
    d[0] = 0xe0 | cp >> 12; d[1] = 0x80 | ((cp >> 6) & 0x3f);
    d[2] = 0x80 | (cp & 0x3f); return 3;
  }
  d[0] = 0xf0 | cp >> 18; d[1] = 0x80 | ((cp >> 12) & 0x3f);
  d[2] = 0x80 | ((cp >> 6) & 0x3f); d[3] = 0x80 | (cp & 0x3f);
  return 4;
}

/* Parses a string at ps->p (which is at the opening quote) into a new
 * NUL-terminated buffer.  The decoded form is never longer than the
 * escaped one, so one allocation of the remaining length bounds it. */
static char *parse_string(struct parser *ps)
{
  const char *q;
  char *out, *d;
  ps->p++;                                /* opening quote */
  for (q = ps->p; q < ps->end && *q != '"'; q++)
    if (*q == '\\') q++;
  if (q >= ps->end) { perr(ps, "unterminated string"); return NULL; }
  out = d = malloc(q - ps->p + 1);
  if (!out) { perr(ps, "out of memory"); return NULL; }
  while (ps->p < ps->end && *ps->p != '"') {
    unsigned char c = *ps->p;
    if (c < 0x20) { perr(ps, "control character in string"); goto fail; }
    if (c != '\\') { *d++ = c; ps->p++; continue; }
    ps->p++;
    switch (*ps->p++) {
    case '"': *d++ = '"'; break;
    case '\\': *d++ = '\\'; break;
    case '/': *d++ = '/'; break;
    case 'b': *d++ = '\b'; break;
    case 'f': *d++ = '\f'; break;
    case 'n': *d++ = '\n'; break;
    case 'r': *d++ = '\r'; break;
    case 't': *d++ = '\t'; break;
    case 'u': {
      uint32_t cp, lo;
      if (hex4(ps, &cp) < 0) goto fail;
      if (cp >= 0xd800 && cp <= 0xdbff) {   /* surrogate pair */
        if (ps->end - ps->p < 6 || ps->p[0] != '\\' || ps->p[1] != 'u') {
          perr(ps, "unpaired surrogate in \\u escape"); goto fail;
        }
        ps->p += 2;
        if (hex4(ps, &lo) < 0) goto fail;
        if (lo < 0xdc00 || lo > 0xdfff) { perr(ps, "unpaired surrogate in \\u escape"); goto fail; }
        cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
      } else if (cp >= 0xdc00 && cp <= 0xdfff) {
        perr(ps, "unpaired surrogate in \\u escape"); goto fail;
      } else if (cp == 0) {
        perr(ps, "\\u0000 is not supported in strings"); goto fail;
      }
      d += put_utf8(d, cp);
      break;
    }
    default:
      ps->p--;
      perr(ps, "bad escape in string"); goto fail;
    }
  }
  ps->p++;                                /* closing quote */
  *d = '\0';
  return out;
 fail:
  free(out);
  return NULL;
}

static struct json *parse_value(struct parser *ps, int depth);

static int add_item(struct parser *ps, struct json *v, char *key, struct json *item)
{
  struct json **items = realloc(v->items, (v->n + 1) * sizeof *items);
  if (!items) goto oom;
  v->items = items;
  if (v->type == JSON_OBJECT) {
    char **keys = realloc(v->keys, (v->n + 1) * sizeof *keys);
    if (!keys) goto oom;
    v->keys = keys;
    keys[v->n] = key;
  }
  items[v->n++] = item;
  return 0;
 oom:
  perr(ps, "out of memory");
  free(key);
  json_free(item);
  return -1;
}

static struct json *parse_container(struct parser *ps, int depth, bool object)
{
  char close = object ? '}' : ']';
  struct json *v = new_value(object ? JSON_OBJECT : JSON_ARRAY);
  if (!v) { perr(ps, "out of memory"); return NULL; }
  if (depth >= JSON_MAX_DEPTH) { perr(ps, "nested too deeply"); goto fail; }
  ps->p++;
  skip_ws(ps);
  if (ps->p < ps->end && *ps->p == close) { ps->p++; return v; }
  for (;;) {
    char *key = NULL;
    struct json *item;
    skip_ws(ps);
    if (object) {
      if (ps->p >= ps->end || *ps->p != '"') { perr(ps, "expected a member name"); goto fail; }
      if (!(key = parse_string(ps))) goto fail;
      skip_ws(ps);
      if (ps->p >= ps->end || *ps->p != ':') { free(key); perr(ps, "expected ':'"); goto fail; }
      ps->p++;
    }
    if (!(item = parse_value(ps, depth + 1))) { free(key); goto fail; }
    if (add_item(ps, v, key, item) < 0) goto fail;
    skip_ws(ps);
    if (ps->p < ps->end && *ps->p == ',') { ps->p++; continue; }
    if (ps->p < ps->end && *ps->p == close) { ps->p++; return v; }
    perr(ps, object ? "expected ',' or '}'" : "expected ',' or ']'");
    goto fail;
  }
 fail:
  json_free(v);
  return NULL;
}

static struct json *parse_number(struct parser *ps)
{
  const char *s = ps->p;
  struct json *v;
  if (ps->p < ps->end && *ps->p == '-') ps->p++;
  if (ps->p < ps->end && *ps->p == '0') ps->p++;
  else if (ps->p < ps->end && *ps->p >= '1' && *ps->p <= '9')
    while (ps->p < ps->end && *ps->p >= '0' && *ps->p <= '9') ps->p++;
  else { perr(ps, "bad number"); return NULL; }
  if (ps->p < ps->end && *ps->p == '.') {
    ps->p++;
    if (ps->p >= ps->end || *ps->p < '0' || *ps->p > '9') { perr(ps, "bad number"); return NULL; }
    while (ps->p < ps->end && *ps->p >= '0' && *ps->p <= '9') ps->p++;
  }
  if (ps->p < ps->end && (*ps->p == 'e' || *ps->p == 'E')) {
    ps->p++;
    if (ps->p < ps->end && (*ps->p == '+' || *ps->p == '-')) ps->p++;
    if (ps->p >= ps->end || *ps->p < '0' || *ps->p > '9') { perr(ps, "bad number"); return NULL; }
    while (ps->p < ps->end && *ps->p >= '0' && *ps->p <= '9') ps->p++;
  }
  v = new_value(JSON_NUMBER);
  if (!v || !(v->text = strndup(s, ps->p - s))) {
    free(v);
    perr(ps, "out of memory");
    return NULL;
  }
  return v;
}

static bool literal(struct parser *ps, const char *word)
{
  size_t n = strlen(word);
  if ((size_t) (ps->end - ps->p) >= n && memcmp(ps->p, word, n) == 0) {
    ps->p += n;
    return true;
  }
  return false;
}

static struct json *parse_value(struct parser *ps, int depth)
{
  struct json *v;
  skip_ws(ps);
  if (ps->p >= ps->end) { perr(ps, "unexpected end of text"); return NULL; }
  switch (*ps->p) {
  case '{': return parse_container(ps, depth, true);
  case '[': return parse_container(ps, depth, false);
  case '"':
    if (!(v = new_value(JSON_STRING))) { perr(ps, "out of memory"); return NULL; }
    if (!(v->text = parse_string(ps))) { free(v); return NULL; }
    return v;
  case 't': case 'f': case 'n':
    if (literal(ps, "true")) { v = new_value(JSON_BOOL); if (v) v->b = true; }
    else if (literal(ps, "false")) v = new_value(JSON_BOOL);
    else if (literal(ps, "null")) v = new_value(JSON_NULL);
    else { perr(ps, "unexpected word"); return NULL; }
    if (!v) perr(ps, "out of memory");
    return v;
  default:
    if (*ps->p == '-' || (*ps->p >= '0' && *ps->p <= '9'))
      return parse_number(ps);
    perr(ps, "unexpected character 0x%02x", (unsigned char) *ps->p);
    return NULL;
  }
}

struct json *json_parse(const char *text, size_t len, char *err, size_t errlen)
{
  struct parser ps = { text, text, text + len, err, errlen, false };
  struct json *v = parse_value(&ps, 0);
  if (!v) return NULL;
  skip_ws(&ps);
  if (ps.p != ps.end) {
    perr(&ps, "trailing characters after the value");
    json_free(v);
    return NULL;
  }
  return v;
}

/* ---- access ----------------------------------------------------------- */

const struct json *json_get(const struct json *v, const char *path)
{
  while (v && path && *path) {
    const char *dot = strchr(path, '.');
    size_t n = dot ? (size_t) (dot - path) : strlen(path);
    const struct json *found = NULL;
    if (v->type != JSON_OBJECT) return NULL;
    /* Last duplicate wins, as in most readers. */
    for (size_t i = 0; i < v->n; i++)
      if (strlen(v->keys[i]) == n && memcmp(v->keys[i], path, n) == 0)
        found = v->items[i];
    v = found;
    path = dot ? dot + 1 : NULL;
  }
  return v;
}

enum json_type json_type(const struct json *v) { return v ? v->type : JSON_NULL; }

size_t json_length(const struct json *v)
{
  return v && (v->type == JSON_ARRAY || v->type == JSON_OBJECT) ? v->n : 0;
}

const struct json *json_index(const struct json *v, size_t i)
{
  return v && v->type == JSON_ARRAY && i < v->n ? v->items[i] : NULL;
}

bool json_bool(const struct json *v, bool *out)
{
  if (!v || v->type != JSON_BOOL) return false;
  *out = v->b;
  return true;
}

bool json_u64(const struct json *v, uint64_t *out)
{
  char *end;
  unsigned long long n;
  if (!v || v->type != JSON_NUMBER || v->text[0] == '-') return false;
  errno = 0;
  n = strtoull(v->text, &end, 10);
  if (errno || *end) return false;       /* too large, or has '.'/exponent */
  *out = n;
  return true;
}

bool json_double(const struct json *v, double *out)
{
  if (!v || v->type != JSON_NUMBER) return false;
  *out = strtod(v->text, NULL);
  return true;
}

const char *json_str(const struct json *v)
{
  return v && v->type == JSON_STRING ? v->text : NULL;
}
