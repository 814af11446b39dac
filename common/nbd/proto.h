/* proto.h: decoding and validation of NBD messages, with no I/O, so the
 * rules can be unit-tested.  Errors returned are NBD error numbers. */
#ifndef XNBD_PROTO_H
#define XNBD_PROTO_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct nbd_request {
  uint16_t flags;
  uint16_t type;
  uint64_t cookie;
  uint64_t offset;
  uint32_t length;
};

/* What a request is checked against: the state of one session. */
struct nbd_session_caps {
  uint64_t size;          /* export size */
  uint16_t tflags;        /* transmission flags sent to the client */
  bool structured;        /* structured replies negotiated */
  bool meta_context;      /* base:allocation selected */
  uint32_t max_payload;   /* maximum READ/WRITE length */
};

/* Decodes a 28-byte request header.  Returns false on a bad magic. */
bool nbd_request_decode(const uint8_t hdr[28], struct nbd_request *rq);

/* Returns 0 if the request may be executed, else the NBD error to send. */
uint32_t nbd_request_check(const struct nbd_request *rq,
                           const struct nbd_session_caps *caps);

/* Human-readable names for logs. */
const char *nbd_cmd_name(uint16_t type);
const char *nbd_opt_name(uint32_t opt);

/* NBD_OPT_INFO / NBD_OPT_GO payload. */
struct nbd_info_request {
  const char *name;        /* points into the payload, not NUL-terminated */
  uint32_t name_len;
  uint16_t n_infos;
  const uint8_t *infos;    /* n_infos big-endian 16-bit item types */
};
/* Returns 0 or NBD_REP_ERR_INVALID (message in *why). */
uint32_t nbd_parse_info_request(const uint8_t *p, uint32_t len,
                                struct nbd_info_request *out,
                                const char **why);

/* NBD_OPT_LIST/SET_META_CONTEXT payload: export name, then queries.
 * Call with an iterator; returns 0 or NBD_REP_ERR_INVALID. */
struct nbd_meta_request {
  const char *name;
  uint32_t name_len;
  uint32_t n_queries;
  const uint8_t *queries;  /* start of the query list */
  uint32_t queries_len;
};
uint32_t nbd_parse_meta_request(const uint8_t *p, uint32_t len,
                                struct nbd_meta_request *out,
                                const char **why);
/* Returns the i-th query (valid only after a successful parse). */
void nbd_meta_query(const struct nbd_meta_request *m, uint32_t i,
                    const char **q, uint32_t *qlen);

/* Whether a string from the wire is acceptable (no NUL, <= 4096 bytes). */
bool nbd_string_ok(const char *s, uint32_t len);

/* Maps a host errno to the NBD protocol's error number. */
uint32_t errno_to_nbd(int err);

#endif
