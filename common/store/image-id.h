/* image-id.h: a per-image identity that xnbd-server publishes to its NBD
 * clients, so that a caching proxy can tell "the same image, unchanged"
 * from "another image of the same size" or "this image, edited while no
 * server was serving it" (invariant I5).
 *
 * WHAT IS PUBLISHED
 *
 *   The export description (NBD_INFO_DESCRIPTION, also in NBD_OPT_LIST):
 *
 *     xnbd-image-id=<32 lowercase hex> gen=<decimal>
 *
 *   optionally followed by more space-separated KEY=VALUE words (today only
 *   "id-from=stat", see FALLBACK).  Readers must ignore words they do not
 *   know.  The id names the image file; gen counts the changes made to it
 *   while no xnbd-server was serving it.  Same id and gen: same content as
 *   far as the server can tell.
 *
 * WHERE THE ID IS KEPT: a sidecar file next to the image
 *
 *   IMAGE.xnbd-id, in the directory of the image's real path (symlinks
 *   resolved), a few KEY=VALUE text lines: id, gen, and the image's inode
 *   number, size, mtime and ctime (nanoseconds) when it was last recorded,
 *   and whether the server that wrote it is still running ("open") or
 *   stopped cleanly ("clean").  Written to a temporary file, synced and
 *   renamed over the old one, so a crash leaves either record whole.
 *
 *   Why not an extended attribute on the image (user.xnbd.id)?  The record
 *   holds the image's ctime, and setting an xattr changes the ctime, so a
 *   record kept in the image itself could never match it.  A sidecar also
 *   works on filesystems without user xattrs (tmpfs before Linux 6.6, NFS
 *   v3), is not carried along by `cp --preserve=all`/`rsync -X` to a copy
 *   that then diverges, and is visible: deleting it gives the image a new
 *   identity.
 *
 * WHEN THE GENERATION CHANGES
 *
 *   At start-up the image's size, mtime and ctime are compared with the
 *   record.  Any difference means someone changed the image since the last
 *   server stopped (dd, qemu-img, a VM run from the file, a restore...):
 *   gen becomes gen + 1 and is recorded before it is published.  ctime
 *   cannot be set by tools that restore mtime, so `touch -r` does not hide
 *   an edit.  At a clean stop the server records the image's new stamp, so
 *   the writes that came THROUGH the server (a VM's own writes during a
 *   live migration's standby phase, before the proxy takes over) do not
 *   change gen: they are the content the proxy must follow.  Changes made
 *   by other programs WHILE a server runs are not detected (they are
 *   indistinguishable from its own writes); serve an image from one
 *   xnbd-server at a time and edit it only while none runs.
 *
 *   After a crash of the server (record still "open"), a changed stamp
 *   also bumps gen: it may have been the server's own writes, but it
 *   cannot tell, and a false alarm (the proxy refuses, the operator checks)
 *   is better than stale data.
 *
 *   Timestamps have a coarse granularity (a kernel tick, or a second on
 *   some filesystems): an edit in the same tick as the stamp recorded at a
 *   clean stop would not change mtime/ctime.  image_id_close therefore
 *   waits (at most ~1 s) until the clock has moved past the recorded
 *   ctime, so any later write gets a newer timestamp.
 *
 *   The inode number is recorded too: a record whose inode differs belongs
 *   to another file (the image was replaced by a rename, restored from a
 *   backup, or copied together with its sidecar): the image gets a NEW id.
 *
 * FALLBACK (id-from=stat)
 *
 *   When the sidecar cannot be read or a needed record cannot be written
 *   (read-only directory or filesystem, no space, ...), the id is derived
 *   from (st_dev, st_ino, size, mtime, ctime), gen is 0 and the
 *   description carries " id-from=stat"; a log line says so.  Any change
 *   to the image -- including writes through the server -- then changes
 *   the id, and so can a reboot (st_dev of LVM/btrfs volumes is not
 *   stable): safe, but prone to false alarms.
 *
 * BLOCK DEVICES get no identity (a device node has no place for a sidecar
 *   and no change time for its content): image_id_open returns NULL and
 *   the proxy falls back to sampling blocks (common/source/identity.h).
 *
 * OWNERSHIP: image_id_open returns a handle freed by image_id_close. */
#ifndef XNBD_IMAGE_ID_H
#define XNBD_IMAGE_ID_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define IMAGE_ID_SUFFIX ".xnbd-id"
/* The description's first word; also what clients look for. */
#define IMAGE_ID_KEY    "xnbd-image-id="

struct image_id;

enum image_id_mode {
  IMAGE_ID_SIDECAR,   /* the default: sidecar, FALLBACK when it cannot be */
  IMAGE_ID_STAT,      /* only the FALLBACK id: nothing is written */
};

/* The identity of the image at path, open as fd (regular file).  Loads or
 * creates the sidecar, bumps the generation when the image changed since
 * it was recorded, and marks the record "open".  Logs (info) where the id
 * comes from and (warn) why gen changed or why the fallback is used.
 * Returns NULL for a block device (no identity; logged). */
struct image_id *image_id_open(const char *path, int fd, enum image_id_mode mode);

/* The text to publish as the export description (owned by id). */
const char *image_id_description(const struct image_id *id);
const char *image_id_hex(const struct image_id *id);
uint64_t image_id_gen(const struct image_id *id);
bool image_id_derived(const struct image_id *id);

/* At a clean stop, after the image's last write was made durable: records
 * the image's stamp as of now (fstat of fd) with state "clean", so the
 * next start does not count the server's own writes as a change.  Frees
 * id; NULL is allowed.  fd < 0: only frees (e.g. on an error path). */
void image_id_close(struct image_id *id, int fd);

#endif
