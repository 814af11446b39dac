/* json.h: the little JSON the control protocol needs.
 *
 * Writing: json_fput_string() writes a quoted, escaped string (quotes,
 * backslashes, control characters; bytes that are not valid UTF-8 become
 * U+FFFD, so any C string gives a valid JSON text).  Numbers, booleans and
 * punctuation are written by the caller with fprintf (open_memstream makes
 * a growable buffer a FILE *).
 *
 * Reading: json_parse() builds a tree from one JSON text (RFC 8259, nesting
 * at most JSON_MAX_DEPTH deep); json_get() finds a member by a dotted path
 * ("blocks.present").  The tree is owned by the caller and freed with
 * json_free(); pointers returned by the accessors live as long as the tree.
 * Numbers are kept as their text, so 64-bit integers read back exactly. */
#ifndef XNBD_JSON_H
#define XNBD_JSON_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#define JSON_MAX_DEPTH 32

enum json_type { JSON_NULL, JSON_BOOL, JSON_NUMBER, JSON_STRING, JSON_ARRAY, JSON_OBJECT };

struct json;

void json_fput_string(FILE *f, const char *s);

/* Parses len bytes (no NUL needed).  Returns NULL with the reason and byte
 * offset in err when the text is not one valid JSON value. */
struct json *json_parse(const char *text, size_t len, char *err, size_t errlen);
void json_free(struct json *v);

/* Member of an object by dotted path; NULL if v is not an object or a
 * member on the path is missing. */
const struct json *json_get(const struct json *v, const char *path);

enum json_type json_type(const struct json *v);   /* JSON_NULL for NULL */
size_t json_length(const struct json *v);          /* array/object size */
const struct json *json_index(const struct json *v, size_t i); /* array */

/* Typed reads.  Return false (leaving *out alone) if v is NULL or of
 * another type; json_u64 also fails for negative, fractional or
 * out-of-range numbers. */
bool json_bool(const struct json *v, bool *out);
bool json_u64(const struct json *v, uint64_t *out);
bool json_double(const struct json *v, double *out);
const char *json_str(const struct json *v);        /* NULL if not a string */

#endif
