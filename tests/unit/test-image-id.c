/* Unit tests for common/store/image-id.c: the per-image identity
 * xnbd-server publishes (stable across restarts, a new generation when the
 * image changed while no server ran, a new id for another file). */
#include <criterion/criterion.h>

#include <dirent.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "image-id.h"
#include "util.h"

static char dir[64];

static const char *tpath(const char *name)
{
  static char buf[8][512];
  static int n;
  char *p = buf[n++ % 8];
  snprintf(p, 512, "%s/%s", dir, name);
  return p;
}

static void rm_tree(const char *d)
{
  DIR *dd = opendir(d);
  struct dirent *e;
  if (!dd) return;
  while ((e = readdir(dd)) != NULL) {
    char p[600];
    if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
    snprintf(p, sizeof p, "%s/%s", d, e->d_name);
    if (unlink(p) < 0) rm_tree(p);
  }
  closedir(dd);
  rmdir(d);
}

static void setup(void)
{
  strcpy(dir, "/tmp/xnbd-test-image-id.XXXXXX");
  cr_assert_not_null(mkdtemp(dir));
}

static void teardown(void) { rm_tree(dir); }

TestSuite(image_id, .init = setup, .fini = teardown, .timeout = 60);

/* An image of 1 MiB with its times an hour in the past, so a write now
 * always moves mtime (whatever the timestamp granularity). */
static void make_image(const char *name)
{
  char block[4096];
  int fd = open(tpath(name), O_RDWR | O_CREAT | O_TRUNC, 0644);
  struct timespec old[2];
  cr_assert(fd >= 0);
  memset(block, 0x5a, sizeof block);
  for (int i = 0; i < 256; i++)
    cr_assert_eq(pwrite(fd, block, sizeof block, (off_t) i * sizeof block), (ssize_t) sizeof block);
  clock_gettime(CLOCK_REALTIME, &old[0]);
  old[0].tv_sec -= 3600;
  old[1] = old[0];
  cr_assert_eq(futimens(fd, old), 0);
  close(fd);
}

struct opened { struct image_id *id; int fd; char hex[33]; uint64_t gen; bool derived; };

static struct opened open_img(const char *name, enum image_id_mode mode)
{
  struct opened o;
  o.fd = open(tpath(name), O_RDWR);
  cr_assert(o.fd >= 0, "open %s", name);
  o.id = image_id_open(tpath(name), o.fd, mode);
  cr_assert_not_null(o.id, "no identity for %s", name);
  snprintf(o.hex, sizeof o.hex, "%s", image_id_hex(o.id));
  o.gen = image_id_gen(o.id);
  o.derived = image_id_derived(o.id);
  return o;
}

static void close_clean(struct opened *o)
{
  image_id_close(o->id, o->fd);
  close(o->fd);
}

/* A crash: the record is never told about the stop. */
static void close_crash(struct opened *o)
{
  image_id_close(o->id, -1);
  close(o->fd);
}

static void write_at(int fd, off_t off, char c)
{
  cr_assert_eq(pwrite(fd, &c, 1, off), 1);
}

static void edit_behind(const char *name, off_t off)
{
  int fd = open(tpath(name), O_RDWR);
  cr_assert(fd >= 0);
  write_at(fd, off, 0x11);
  close(fd);
}

Test(image_id, new_image_gets_a_sidecar_and_a_description)
{
  char want[128];
  make_image("a.img");
  struct opened o = open_img("a.img", IMAGE_ID_SIDECAR);
  cr_assert_eq(strlen(o.hex), 32);
  cr_assert_eq(o.gen, 0);
  cr_assert_not(o.derived);
  snprintf(want, sizeof want, "xnbd-image-id=%s gen=0", o.hex);
  cr_assert_str_eq(image_id_description(o.id), want);
  cr_assert_eq(access(tpath("a.img.xnbd-id"), F_OK), 0, "no sidecar");
  close_clean(&o);
}

Test(image_id, stable_across_clean_restarts)
{
  make_image("a.img");
  struct opened a = open_img("a.img", IMAGE_ID_SIDECAR);
  close_clean(&a);
  struct opened b = open_img("a.img", IMAGE_ID_SIDECAR);
  cr_assert_str_eq(b.hex, a.hex);
  cr_assert_eq(b.gen, a.gen);
  close_clean(&b);
}

Test(image_id, writes_through_the_server_keep_the_generation)
{
  make_image("a.img");
  struct opened a = open_img("a.img", IMAGE_ID_SIDECAR);
  write_at(a.fd, 4096, 0x77);               /* the VM's write via the server */
  close_clean(&a);
  struct opened b = open_img("a.img", IMAGE_ID_SIDECAR);
  cr_assert_str_eq(b.hex, a.hex);
  cr_assert_eq(b.gen, a.gen, "gen %lu -> %lu after a write through the server",
               (unsigned long) a.gen, (unsigned long) b.gen);
  close_clean(&b);
}

Test(image_id, edit_behind_the_server_bumps_the_generation_once)
{
  make_image("a.img");
  struct opened a = open_img("a.img", IMAGE_ID_SIDECAR);
  write_at(a.fd, 4096, 0x44);     /* the image's times are now "this tick" */
  close_clean(&a);
  /* Right after the stop: the stop waited for the clock to move on, so
   * even this immediate edit changes the times. */
  edit_behind("a.img", 0);
  struct opened b = open_img("a.img", IMAGE_ID_SIDECAR);
  cr_assert_str_eq(b.hex, a.hex, "an edit must keep the id");
  cr_assert_eq(b.gen, a.gen + 1);
  cr_assert(strstr(image_id_description(b.id), " gen=1"));
  close_clean(&b);
  struct opened c = open_img("a.img", IMAGE_ID_SIDECAR);
  cr_assert_eq(c.gen, b.gen, "the new generation was not recorded");
  close_clean(&c);
}

Test(image_id, restored_mtime_does_not_hide_an_edit)
{
  struct stat st;
  make_image("a.img");
  struct opened a = open_img("a.img", IMAGE_ID_SIDECAR);
  close_clean(&a);
  cr_assert_eq(stat(tpath("a.img"), &st), 0);
  int fd = open(tpath("a.img"), O_RDWR);
  write_at(fd, 8192, 0x22);
  struct timespec t[2] = { st.st_atim, st.st_mtim };
  cr_assert_eq(futimens(fd, t), 0);          /* like touch -r / rsync -t */
  close(fd);
  struct opened b = open_img("a.img", IMAGE_ID_SIDECAR);
  cr_assert_eq(b.gen, a.gen + 1, "ctime must reveal the edit");
  close_clean(&b);
}

Test(image_id, crash_after_writes_bumps_crash_without_writes_does_not)
{
  make_image("a.img");
  struct opened a = open_img("a.img", IMAGE_ID_SIDECAR);
  close_crash(&a);
  struct opened b = open_img("a.img", IMAGE_ID_SIDECAR);
  cr_assert_eq(b.gen, a.gen, "a crash without writes changed gen");
  write_at(b.fd, 0, 0x33);
  close_crash(&b);
  struct opened c = open_img("a.img", IMAGE_ID_SIDECAR);
  cr_assert_str_eq(c.hex, a.hex);
  cr_assert_eq(c.gen, a.gen + 1, "after a crash a changed image must count as changed");
  close_clean(&c);
}

Test(image_id, copy_with_its_sidecar_gets_a_new_id)
{
  char cmd[1200];
  make_image("a.img");
  struct opened a = open_img("a.img", IMAGE_ID_SIDECAR);
  close_clean(&a);
  snprintf(cmd, sizeof cmd, "cp -p %s %s && cp -p %s %s", tpath("a.img"), tpath("b.img"),
           tpath("a.img.xnbd-id"), tpath("b.img.xnbd-id"));
  cr_assert_eq(system(cmd), 0);
  struct opened b = open_img("b.img", IMAGE_ID_SIDECAR);
  cr_assert_str_neq(b.hex, a.hex, "a copy kept the original's id");
  close_clean(&b);
  struct opened a2 = open_img("a.img", IMAGE_ID_SIDECAR);
  cr_assert_str_eq(a2.hex, a.hex);
  cr_assert_eq(a2.gen, a.gen);
  close_clean(&a2);
}

Test(image_id, image_replaced_by_rename_gets_a_new_id)
{
  make_image("a.img");
  struct opened a = open_img("a.img", IMAGE_ID_SIDECAR);
  close_clean(&a);
  make_image("new.img");
  cr_assert_eq(rename(tpath("new.img"), tpath("a.img")), 0);
  struct opened b = open_img("a.img", IMAGE_ID_SIDECAR);
  cr_assert_str_neq(b.hex, a.hex);
  cr_assert_eq(b.gen, 0);
  close_clean(&b);
}

Test(image_id, damaged_sidecar_gives_a_new_valid_id)
{
  make_image("a.img");
  struct opened a = open_img("a.img", IMAGE_ID_SIDECAR);
  close_clean(&a);
  FILE *f = fopen(tpath("a.img.xnbd-id"), "w");
  fputs("version=1\nid=nothex\n", f);
  fclose(f);
  struct opened b = open_img("a.img", IMAGE_ID_SIDECAR);
  cr_assert_not(b.derived);
  cr_assert_str_neq(b.hex, a.hex);
  close_clean(&b);
  struct opened c = open_img("a.img", IMAGE_ID_SIDECAR);
  cr_assert_str_eq(c.hex, b.hex, "the replacement record was not written");
  close_clean(&c);
}

Test(image_id, unwritable_sidecar_falls_back_to_a_derived_id)
{
  make_image("a.img");
  /* A directory where the sidecar should be: it can be neither read nor
   * replaced (as root, a read-only directory would not stop us). */
  cr_assert_eq(mkdir(tpath("a.img.xnbd-id"), 0755), 0);
  struct opened a = open_img("a.img", IMAGE_ID_SIDECAR);
  cr_assert(a.derived);
  cr_assert_eq(a.gen, 0);
  cr_assert(strstr(image_id_description(a.id), " id-from=stat"));
  close_clean(&a);
  struct opened b = open_img("a.img", IMAGE_ID_SIDECAR);
  cr_assert_str_eq(b.hex, a.hex, "a derived id must be stable while the image is unchanged");
  close_clean(&b);
  edit_behind("a.img", 0);
  struct opened c = open_img("a.img", IMAGE_ID_SIDECAR);
  cr_assert_str_neq(c.hex, a.hex, "a derived id must change with the image");
  close_clean(&c);
}

Test(image_id, stat_mode_writes_nothing)
{
  make_image("a.img");
  struct opened a = open_img("a.img", IMAGE_ID_STAT);
  cr_assert(a.derived);
  close_clean(&a);
  cr_assert_neq(access(tpath("a.img.xnbd-id"), F_OK), 0, "--image-id=stat wrote a sidecar");
}

Test(image_id, symlink_keeps_the_sidecar_next_to_the_real_file)
{
  make_image("a.img");
  cr_assert_eq(symlink(tpath("a.img"), tpath("link.img")), 0);
  struct opened a = open_img("link.img", IMAGE_ID_SIDECAR);
  close_clean(&a);
  cr_assert_eq(access(tpath("a.img.xnbd-id"), F_OK), 0);
  cr_assert_neq(access(tpath("link.img.xnbd-id"), F_OK), 0);
  struct opened b = open_img("a.img", IMAGE_ID_SIDECAR);
  cr_assert_str_eq(b.hex, a.hex);
  close_clean(&b);
}

Test(image_id, not_a_regular_file_has_no_identity)
{
  int fd = open("/dev/null", O_RDONLY);
  cr_assert(fd >= 0);
  cr_assert_null(image_id_open("/dev/null", fd, IMAGE_ID_SIDECAR));
  close(fd);
  cr_assert_neq(access("/dev/null.xnbd-id", F_OK), 0);
}
