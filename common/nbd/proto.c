#include "proto.h"
#include "nbd-proto.h"
#include "util.h"

#include <errno.h>

bool nbd_request_decode(const uint8_t hdr[28], struct nbd_request *rq)
{
  if (get_be32(hdr) != NBD_REQUEST_MAGIC)
    return false;
  rq->flags = get_be16(hdr + 4);
  rq->type = get_be16(hdr + 6);
  rq->cookie = get_be64(hdr + 8);
  rq->offset = get_be64(hdr + 16);
  rq->length = get_be32(hdr + 24);
  return true;
}

uint32_t nbd_request_check(const struct nbd_request *rq,
                           const struct nbd_session_caps *caps)
{
  uint16_t allowed = 0;
  bool needs_range = true, writes = false;
  uint16_t tf = caps->tflags;

  switch (rq->type) {
  case NBD_CMD_READ:
    if (tf & NBD_FLAG_SEND_DF) allowed |= NBD_CMD_FLAG_DF;
    break;
  case NBD_CMD_WRITE:
    writes = true;
    break;
  case NBD_CMD_FLUSH:
    if (!(tf & NBD_FLAG_SEND_FLUSH)) return NBD_EINVAL;
    needs_range = false;
    break;
  case NBD_CMD_TRIM:
    if (!(tf & NBD_FLAG_SEND_TRIM)) return NBD_EINVAL;
    writes = true;
    break;
  case NBD_CMD_CACHE:
    if (!(tf & NBD_FLAG_SEND_CACHE)) return NBD_EINVAL;
    break;
  case NBD_CMD_WRITE_ZEROES:
    if (!(tf & NBD_FLAG_SEND_WRITE_ZEROES)) return NBD_EINVAL;
    allowed |= NBD_CMD_FLAG_NO_HOLE;
    if (tf & NBD_FLAG_SEND_FAST_ZERO) allowed |= NBD_CMD_FLAG_FAST_ZERO;
    writes = true;
    break;
  case NBD_CMD_BLOCK_STATUS:
    if (!caps->structured || !caps->meta_context) return NBD_EINVAL;
    allowed |= NBD_CMD_FLAG_REQ_ONE;
    break;
  default:
    return NBD_EINVAL;       /* unknown command (DISC is handled earlier) */
  }
  /* FUA is valid on every command once advertised. */
  if (tf & NBD_FLAG_SEND_FUA) allowed |= NBD_CMD_FLAG_FUA;
  if (rq->flags & ~allowed)
    return NBD_EINVAL;
  if (writes && (tf & NBD_FLAG_READ_ONLY))
    return NBD_EPERM;
  if (!needs_range)
    return 0;
  if (rq->length == 0)
    return NBD_EINVAL;
  if ((rq->type == NBD_CMD_READ || rq->type == NBD_CMD_WRITE) &&
      rq->length > caps->max_payload)
    return NBD_EOVERFLOW;
  if (rq->offset > caps->size || rq->length > caps->size - rq->offset)
    return writes ? NBD_ENOSPC : NBD_EINVAL;
  return 0;
}

const char *nbd_cmd_name(uint16_t type)
{
  static const char *n[] = { "READ", "WRITE", "DISC", "FLUSH", "TRIM",
                             "CACHE", "WRITE_ZEROES", "BLOCK_STATUS" };
  return type < ARRAY_SIZE(n) ? n[type] : "UNKNOWN";
}

const char *nbd_opt_name(uint32_t opt)
{
  switch (opt) {
  case NBD_OPT_EXPORT_NAME: return "EXPORT_NAME";
  case NBD_OPT_ABORT: return "ABORT";
  case NBD_OPT_LIST: return "LIST";
  case NBD_OPT_STARTTLS: return "STARTTLS";
  case NBD_OPT_INFO: return "INFO";
  case NBD_OPT_GO: return "GO";
  case NBD_OPT_STRUCTURED_REPLY: return "STRUCTURED_REPLY";
  case NBD_OPT_LIST_META_CONTEXT: return "LIST_META_CONTEXT";
  case NBD_OPT_SET_META_CONTEXT: return "SET_META_CONTEXT";
  default: return "UNKNOWN";
  }
}

bool nbd_string_ok(const char *s, uint32_t len)
{
  /* An empty option payload may come as a NULL pointer. */
  return len == 0 || (len <= NBD_MAX_STRING && memchr(s, '\0', len) == NULL);
}

uint32_t nbd_parse_info_request(const uint8_t *p, uint32_t len,
                                struct nbd_info_request *out,
                                const char **why)
{
  uint32_t nlen;
  if (len < 6) { *why = "option too short"; return NBD_REP_ERR_INVALID; }
  nlen = get_be32(p);
  if (nlen > len - 6) { *why = "export name length exceeds option length"; return NBD_REP_ERR_INVALID; }
  out->name = (const char *) p + 4;
  out->name_len = nlen;
  if (!nbd_string_ok(out->name, nlen)) { *why = "export name is too long or contains NUL"; return NBD_REP_ERR_INVALID; }
  out->n_infos = get_be16(p + 4 + nlen);
  if ((uint64_t) 4 + nlen + 2 + 2u * out->n_infos != len) {
    *why = "number of information requests does not match option length";
    return NBD_REP_ERR_INVALID;
  }
  out->infos = p + 4 + nlen + 2;
  return 0;
}

uint32_t nbd_parse_meta_request(const uint8_t *p, uint32_t len,
                                struct nbd_meta_request *out,
                                const char **why)
{
  uint32_t nlen, pos, i;
  if (len < 8) { *why = "option too short"; return NBD_REP_ERR_INVALID; }
  nlen = get_be32(p);
  if (nlen > len - 8) { *why = "export name length exceeds option length"; return NBD_REP_ERR_INVALID; }
  out->name = (const char *) p + 4;
  out->name_len = nlen;
  if (!nbd_string_ok(out->name, nlen)) { *why = "export name is too long or contains NUL"; return NBD_REP_ERR_INVALID; }
  out->n_queries = get_be32(p + 4 + nlen);
  pos = 8 + nlen;
  out->queries = p + pos;
  out->queries_len = len - pos;
  for (i = 0; i < out->n_queries; i++) {
    uint32_t qlen;
    if (len - pos < 4) { *why = "query list truncated"; return NBD_REP_ERR_INVALID; }
    qlen = get_be32(p + pos);
    pos += 4;
    if (qlen > len - pos) { *why = "query length exceeds option length"; return NBD_REP_ERR_INVALID; }
    if (!nbd_string_ok((const char *) p + pos, qlen)) { *why = "query is too long or contains NUL"; return NBD_REP_ERR_INVALID; }
    pos += qlen;
  }
  if (pos != len) { *why = "trailing bytes after the query list"; return NBD_REP_ERR_INVALID; }
  return 0;
}

void nbd_meta_query(const struct nbd_meta_request *m, uint32_t i,
                    const char **q, uint32_t *qlen)
{
  const uint8_t *p = m->queries;
  for (;;) {
    uint32_t l = get_be32(p);
    if (i-- == 0) { *q = (const char *) p + 4; *qlen = l; return; }
    p += 4 + l;
  }
}

uint32_t errno_to_nbd(int err)
{
  switch (err) {
  case 0: return NBD_SUCCESS;
  case EROFS: case EPERM: case EACCES: return NBD_EPERM;
  case ENOMEM: return NBD_ENOMEM;
  case EINVAL: return NBD_EINVAL;
  case ENOSPC: case EDQUOT: case EFBIG: return NBD_ENOSPC;
  case EOVERFLOW: return NBD_EOVERFLOW;
  case ENOTSUP: return NBD_ENOTSUP;
  case ESHUTDOWN: return NBD_ESHUTDOWN;
  default: return NBD_EIO;
  }
}
