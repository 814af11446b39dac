/* read-map.h: which parts of an image its clients read most recently.
 *
 * A VM that moves keeps reading what it read last before the move.
 * xnbd-server notes every read (and NBD_CMD_CACHE) of an export in a map of
 * 1 MiB regions and serves the map as the unlisted, read-only export
 * NAME READ_MAP_SUFFIX; xnbd-proxy reads it once its copy may start (after
 * 'activate' in --standby: the VM at the source has stopped) and copies the
 * regions read most recently first.
 *
 * Copiers are left out: a client that asks the meta context
 * XNBD_META_COPIER (xnbd-proxy does, on every connection; the server never
 * selects it, so the handshake is otherwise unchanged) is not noted, so a
 * proxy's own fetches, a pre-copy or another proxy's copy do not pass for
 * the VM's reads.
 *
 * THE EXPORT (all numbers big endian)
 *   bytes 0-7    "XNBDREAD"
 *   bytes 8-11   log2 of the region size (20: 1 MiB)
 *   bytes 12-15  0
 *   then 4 bytes per region, ceil(image size / region size) of them:
 *   0 if no client read the region since the server started, else 1 +
 *   the number of reads the server noted (in the whole export) since the
 *   region's last read, saturated at 0xffffffff.  Smaller non-zero: read
 *   more recently.  Computed when read; a map read in several requests
 *   while clients read may shift by those reads between its parts. */
#ifndef XNBD_READ_MAP_H
#define XNBD_READ_MAP_H

#include <stddef.h>
#include <stdint.h>

#include "backend.h"
#include "nbd-proto.h"      /* XNBD_META_COPIER */

#define READ_MAP_SUFFIX "@xnbd-reads"
#define READ_MAP_MAGIC "XNBDREAD"
#define READ_MAP_HEADER 16u
#define READ_MAP_SHIFT 20u

/* ---- the server's side ---- */

struct read_map;

/* NULL with errno (ENOMEM). */
struct read_map *read_map_new(uint64_t image_size);
void read_map_free(struct read_map *m);
/* A client read [off, off + len) (any thread). */
void read_map_note(struct read_map *m, uint64_t off, uint64_t len);
/* The map's export size for an image of image_size bytes. */
uint64_t read_map_export_size(uint64_t image_size);
/* The export over m (handle: m). */
extern const struct xnbd_backend_ops read_map_ops;

/* ---- the reader's side ---- */

/* A map read from an export (len bytes at buf) for an image of image_size
 * bytes, checked: the regions any client read, most recently read first,
 * as a malloc'd array of region numbers (*regions, *n; NULL and 0 when
 * none was read), and the region size's log2 (*shift).  -1 with a message
 * in err when the bytes are not such a map. */
int read_map_order(const uint8_t *buf, uint64_t len, uint64_t image_size,
                   uint64_t **regions, uint64_t *n, unsigned *shift,
                   char *err, size_t errlen);

#endif
