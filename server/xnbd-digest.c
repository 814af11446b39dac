/* xnbd-digest: writes the block digests of an image to a file, for a
 * source served by something other than xnbd-server (which serves them
 * itself as NAME@xnbd-sha256).  Format: common/dedup/digest-file.h. */
#include "digest.h"
#include "digest-file.h"
#include "identity.h"
#include "cli.h"
#include "util.h"

#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <libgen.h>
#include <stdarg.h>
#include <linux/fs.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <openssl/evp.h>

#define CHUNK_BLOCKS 16384u          /* 64 MiB of image per digest_file call */

static void usage(FILE *f)
{
  fprintf(f,
"Usage: xnbd-digest [OPTIONS] IMAGE -o FILE\n"
"Write the SHA-256 of each 4 KiB block of IMAGE to FILE, with IMAGE's size and\n"
"sampled identity, so that xnbd-proxy can deduplicate a migration from a source\n"
"that is not xnbd-server (nbdkit, qemu-nbd, nbd-server) serving IMAGE.\n"
"\n"
"  IMAGE                the raw image file or block device the source serves\n"
"  -o, --output FILE    the digest file to write (replaced atomically)\n"
"  -t, --threads N      hashing threads (default: one per online CPU)\n"
"  -q, --quiet          print nothing but errors\n"
"  -h, --help           show this help\n"
"  -V, --version        show the version\n"
"\n"
"Run it when IMAGE no longer changes (the VM stopped): digests of an image\n"
"that changes afterwards are wrong, and only edits of the 16 sampled blocks\n"
"are detected.\n");
}

static void die(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
static void die(const char *fmt, ...)
{
  va_list ap;
  va_start(ap, fmt);
  fputs("xnbd-digest: ", stderr);
  vfprintf(stderr, fmt, ap);
  fputc('\n', stderr);
  va_end(ap);
  exit(1);
}

static uint64_t image_size(int fd, const char *path)
{
  struct stat st;
  uint64_t size;
  if (fstat(fd, &st) < 0) die("cannot stat '%s': %s", path, strerror(errno));
  if (S_ISREG(st.st_mode)) return (uint64_t) st.st_size;
  if (S_ISBLK(st.st_mode)) {
    if (ioctl(fd, BLKGETSIZE64, &size) < 0)
      die("cannot get the size of block device '%s': %s", path, strerror(errno));
    return size;
  }
  die("'%s' is neither a regular file nor a block device", path);
}

/* The HEX of the "sample=HEX" identity xnbd-proxy records for a source
 * serving this image (common/source/identity.c). */
static void sample_identity(int fd, const char *path, uint64_t size, char hex[65])
{
  static unsigned char buf[SOURCE_ID_SAMPLES][SOURCE_ID_SAMPLE_LEN];
  uint64_t off[SOURCE_ID_SAMPLES];
  uint32_t len[SOURCE_ID_SAMPLES];
  unsigned n = source_sample_layout(size, off, len);
  for (unsigned i = 0; i < n; i++)
    if (pread_all(fd, buf[i], len[i], off[i]) < 0)
      die("reading '%s' at offset %" PRIu64 " failed: %s", path, off[i], strerror(errno));
  if (source_sample_hash(n, off, len, (const unsigned char (*)[SOURCE_ID_SAMPLE_LEN]) buf,
                         hex) < 0)
    die("SHA-256 failed (OpenSSL)");
}

/* Digests of every block of the image into fd (after the header space);
 * the SHA-256 of the array into sha. */
static void write_digests(int img, const char *path, uint64_t size, unsigned threads,
                          int out, const char *tmp, uint8_t sha[32])
{
  uint64_t blocks = size / DIGEST_BLOCK + (size % DIGEST_BLOCK != 0);
  uint8_t *d = malloc((size_t) CHUNK_BLOCKS * DIGEST_LEN);
  EVP_MD_CTX *c = EVP_MD_CTX_new();
  unsigned mdlen = 0;
  if (!d || !c || !EVP_DigestInit_ex(c, EVP_sha256(), NULL)) die("out of memory");
  for (uint64_t b = 0; b < blocks; b += CHUNK_BLOCKS) {
    uint64_t n = MIN((uint64_t) CHUNK_BLOCKS, blocks - b);
    if (digest_file(img, size, b, n, d, threads) < 0)
      die("reading '%s' failed: %s", path, strerror(errno));
    if (!EVP_DigestUpdate(c, d, n * DIGEST_LEN)) die("SHA-256 failed (OpenSSL)");
    if (pwrite_all(out, d, n * DIGEST_LEN, DIGEST_FILE_HDR + b * DIGEST_LEN) < 0)
      die("writing '%s' failed: %s", tmp, strerror(errno));
  }
  if (!EVP_DigestFinal_ex(c, sha, &mdlen) || mdlen != 32) die("SHA-256 failed (OpenSSL)");
  EVP_MD_CTX_free(c);
  free(d);
}

static void sync_dir_of(const char *file)
{
  char *copy = strdup(file);
  int fd = copy ? open(dirname(copy), O_RDONLY | O_DIRECTORY | O_CLOEXEC) : -1;
  if (fd >= 0) { fsync(fd); close(fd); }
  free(copy);
}

int main(int argc, char **argv)
{
  static const struct option longopts[] = {
    { "output", required_argument, 0, 'o' },
    { "threads", required_argument, 0, 't' },
    { "quiet", no_argument, 0, 'q' },
    { "help", no_argument, 0, 'h' },
    { "version", no_argument, 0, 'V' },
    { 0, 0, 0, 0 }
  };
  const char *output = NULL, *path;
  unsigned threads = 0;
  bool quiet = false;
  char hex[65], hex2[65], tmp[4200];
  uint8_t hdr[DIGEST_FILE_HDR], sha[32];
  uint64_t size;
  int c, img, out;

  while ((c = getopt_long(argc, argv, "o:t:qhV", longopts, NULL)) != -1) {
    switch (c) {
    case 'o': output = optarg; break;
    case 't': threads = cli_uint("--threads", optarg, 1, 1024); break;
    case 'q': quiet = true; break;
    case 'h': usage(stdout); return 0;
    case 'V': printf("xnbd-digest %s\n", XNBD_VERSION); return 0;
    default:
      fprintf(stderr, "Try 'xnbd-digest --help' for the options.\n");
      return 1;
    }
  }
  if (optind + 1 != argc || !output) {
    fprintf(stderr, "xnbd-digest: give one IMAGE and -o FILE, e.g. "
            "'xnbd-digest disk.img -o disk.img.xnbd-digests'\n"
            "Try 'xnbd-digest --help' for the options.\n");
    return 1;
  }
  path = argv[optind];
  img = open(path, O_RDONLY | O_CLOEXEC);
  if (img < 0) die("cannot open image '%s': %s", path, strerror(errno));
  size = image_size(img, path);
  sample_identity(img, path, size, hex);

  if (snprintf(tmp, sizeof tmp, "%s.tmp", output) >= (int) sizeof tmp)
    die("output path too long");
  out = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (out < 0) die("cannot create '%s': %s", tmp, strerror(errno));
  write_digests(img, path, size, threads, out, tmp, sha);

  /* The image must not have changed while it was read. */
  sample_identity(img, path, size, hex2);
  if (strcmp(hex, hex2) != 0 || image_size(img, path) != size) {
    unlink(tmp);
    die("'%s' changed while its digests were computed: stop whatever writes it "
        "(the VM) and run xnbd-digest again", path);
  }
  digest_file_header(hdr, size, hex, sha);
  if (pwrite_all(out, hdr, sizeof hdr, 0) < 0 || fsync(out) < 0 || close(out) < 0) {
    unlink(tmp);
    die("writing '%s' failed: %s", tmp, strerror(errno));
  }
  if (rename(tmp, output) < 0) {
    unlink(tmp);
    die("cannot rename '%s' to '%s': %s", tmp, output, strerror(errno));
  }
  sync_dir_of(output);
  close(img);
  if (!quiet)
    printf("%s: %" PRIu64 " blocks of %s (size=%" PRIu64 " sample=%s)\n",
           output, size / DIGEST_BLOCK + (size % DIGEST_BLOCK != 0), path, size, hex);
  return 0;
}
