/* Unit tests for common/source/identity.c: matching the source identity
 * recorded in a bitmap against the source's current one (I5). */
#include <criterion/criterion.h>

#include <stdio.h>
#include <string.h>

#include <openssl/sha.h>

#include "identity.h"

#define IDA "0123456789abcdef0123456789abcdef"
#define IDB "fedcba9876543210fedcba9876543210"
#define S1 "1111111111111111111111111111111111111111111111111111111111111111"
#define S2 "2222222222222222222222222222222222222222222222222222222222222222"

static char why[1024];

static bool match(const char *rec, const char *cur)
{
  memset(why, 'x', sizeof why);
  why[sizeof why - 1] = '\0';
  return source_identity_match(rec, cur, why, sizeof why);
}

static void why_has(const char *needle)
{
  cr_assert(strstr(why, needle), "the explanation \"%s\" does not contain \"%s\"",
            why, needle);
}

TestSuite(identity, .timeout = 30);

Test(identity, same_string_matches_silently)
{
  const char *ids[] = {
    "export=vm1 size=1048576 xnbd-id=" IDA " gen=3",
    "export=vm1 size=1048576 sample=" S1,
    "export=vm1 size=1048576",
    "my own id from --source-id",
  };
  for (size_t i = 0; i < sizeof ids / sizeof ids[0]; i++) {
    cr_assert(match(ids[i], ids[i]), "\"%s\" does not match itself: %s", ids[i], why);
    cr_assert_str_eq(why, "");
  }
}

Test(identity, legacy_recorded_accepted_with_warning_on_same_export_and_size)
{
  cr_assert(match("export=vm1 size=1048576", "export=vm1 size=1048576 xnbd-id=" IDA " gen=0"));
  why_has("older xnbd-proxy");
  cr_assert(match("export= size=1048576", "export= size=1048576 sample=" S1));
  why_has("name and size alone");
}

Test(identity, legacy_recorded_with_a_spaced_name_matches_its_hashed_form)
{
  /* New identities record such a name as its SHA-256; the legacy one held
   * it raw.  They are the same export. */
  unsigned char md[SHA256_DIGEST_LENGTH];
  char cur[256];
  int n = sprintf(cur, "export-sha256=");
  SHA256((const unsigned char *) "my disk", 7, md);
  for (int i = 0; i < SHA256_DIGEST_LENGTH; i++) n += sprintf(cur + n, "%02x", md[i]);
  sprintf(cur + n, " size=4096 sample=" S1);
  cr_assert(match("export=my disk size=4096", cur), "%s", why);
  why_has("older xnbd-proxy");
  cr_assert_not(match("export=my disc size=4096", cur));
  why_has("another export");
}

Test(identity, legacy_recorded_refused_for_another_export)
{
  cr_assert_not(match("export=vm1 size=1048576", "export=vm2 size=1048576 sample=" S1));
  why_has("another export");
  why_has("export=vm1");
  why_has("export=vm2");
}

Test(identity, size_differs_names_both_sizes)
{
  cr_assert_not(match("export=vm1 size=1048576 xnbd-id=" IDA " gen=0",
                      "export=vm1 size=2097152 xnbd-id=" IDA " gen=0"));
  why_has("size differs");
  why_has("1048576");
  why_has("2097152");
  cr_assert_not(match("export=vm1 size=1048576", "export=vm1 size=4096 sample=" S1));
  why_has("size differs");
}

Test(identity, different_image_id_refused)
{
  cr_assert_not(match("export=vm1 size=1048576 xnbd-id=" IDA " gen=0",
                      "export=vm1 size=1048576 xnbd-id=" IDB " gen=0"));
  why_has("different image");
  why_has(IDA);
  why_has(IDB);
  cr_assert_null(strstr(why, "id-from=stat"), "a sidecar id gets no stat note: %s", why);
}

Test(identity, derived_image_id_mismatch_explains_the_fallback)
{
  cr_assert_not(match("export=vm1 size=1048576 xnbd-id=" IDA " gen=0 id-from=stat",
                      "export=vm1 size=1048576 xnbd-id=" IDB " gen=0 id-from=stat"));
  why_has("different image");
  why_has("id-from=stat");
}

Test(identity, same_image_new_generation_refused_as_edited_behind_the_server)
{
  cr_assert_not(match("export=vm1 size=1048576 xnbd-id=" IDA " gen=2",
                      "export=vm1 size=1048576 xnbd-id=" IDA " gen=3"));
  why_has("same image");
  why_has("from 2 to 3");
  why_has("behind the server");
}

Test(identity, same_image_under_another_export_accepted_with_a_note)
{
  cr_assert(match("export=vm1 size=1048576 xnbd-id=" IDA " gen=2",
                  "export=disk size=1048576 xnbd-id=" IDA " gen=2"));
  why_has("now served as export=disk");
}

Test(identity, sampled_blocks_differ_refused)
{
  cr_assert_not(match("export=vm1 size=1048576 sample=" S1,
                      "export=vm1 size=1048576 sample=" S2));
  why_has("sampled blocks differ");
}

Test(identity, sampled_same_blocks_but_another_export_refused)
{
  cr_assert_not(match("export=vm1 size=1048576 sample=" S1,
                      "export=vm2 size=1048576 sample=" S1));
  why_has("another export");
}

Test(identity, kinds_differ_refused_both_ways)
{
  cr_assert_not(match("export=vm1 size=1048576 xnbd-id=" IDA " gen=0",
                      "export=vm1 size=1048576 sample=" S1));
  why_has("publishes no image id");
  why_has(IDA);
  cr_assert_not(match("export=vm1 size=1048576 sample=" S1,
                      "export=vm1 size=1048576 xnbd-id=" IDB " gen=0"));
  why_has("published no image id");
  why_has(IDB);
  /* A full recorded identity against a bare current one. */
  cr_assert_not(match("export=vm1 size=1048576 sample=" S1, "export=vm1 size=1048576"));
  why_has("names only its export and size");
}

Test(identity, operator_identity_compared_byte_for_byte)
{
  cr_assert_not(match("site A vm1", "site A vm2"));
  why_has("\"site A vm1\"");
  why_has("\"site A vm2\"");
  /* A recorded full identity against an operator's --source-id. */
  cr_assert_not(match("export=vm1 size=1048576 sample=" S1, "vm1"));
  why_has("\"vm1\"");
}

Test(identity, malformed_words_are_not_parsed_as_ours)
{
  /* 31 hex digits, uppercase hex, gen without id, id without gen, words
   * out of order: all "other", so compared byte for byte. */
  const char *bad[] = {
    "export=vm1 size=1 xnbd-id=0123456789abcdef0123456789abcde gen=0",
    "export=vm1 size=1 xnbd-id=0123456789ABCDEF0123456789ABCDEF gen=0",
    "export=vm1 size=1 gen=0",
    "export=vm1 size=1 xnbd-id=" IDA,
    "export=vm1 xnbd-id=" IDA " size=1 gen=0",
    "export=vm1 size=1 sample=" S1 " xnbd-id=" IDA " gen=0",
    "export=vm1 size=99999999999999999999999 sample=" S1,
    "export=vm1 size=-1 sample=" S1,
    "size=1 sample=" S1,
    "",
  };
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    cr_assert_eq(source_identity_kind(bad[i]), SOURCE_ID_OTHER, "\"%s\" parsed", bad[i]);
    /* Same size and export as a well-formed one, yet refused. */
    cr_assert_not(match(bad[i], "export=vm1 size=1 xnbd-id=" IDA " gen=0"), "\"%s\"", bad[i]);
  }
}

Test(identity, kinds)
{
  cr_assert_eq(source_identity_kind("export=a size=1"), SOURCE_ID_LEGACY);
  cr_assert_eq(source_identity_kind("export=a b size=1"), SOURCE_ID_LEGACY);
  cr_assert_eq(source_identity_kind("export= size=1 xnbd-id=" IDA " gen=7"), SOURCE_ID_XNBD);
  cr_assert_eq(source_identity_kind("export=a size=1 xnbd-id=" IDA " gen=7 id-from=stat"),
               SOURCE_ID_XNBD);
  cr_assert_eq(source_identity_kind("export=a size=1 sample=" S1), SOURCE_ID_SAMPLED);
  cr_assert_eq(source_identity_kind(NULL), SOURCE_ID_OTHER);
}

Test(identity, control_characters_are_not_echoed)
{
  cr_assert_not(match("id\x1b[2Jone", "id\ttwo"));
  cr_assert_null(strchr(why, '\x1b'), "an escape character reached the message");
  cr_assert_null(strchr(why, '\t'));
}

Test(identity, small_or_no_why_buffer)
{
  char small[16];
  memset(small, 'x', sizeof small);
  cr_assert_not(source_identity_match("export=a size=1 sample=" S1,
                                      "export=a size=1 sample=" S2, small, sizeof small));
  cr_assert_eq(strlen(small), sizeof small - 1);
  cr_assert_not(source_identity_match("a", "b", NULL, 0));
  cr_assert(source_identity_match("a", "a", NULL, 0));
  cr_assert_not(source_identity_match(NULL, "a", why, sizeof why));
}
