# xnbd top-level GNU Makefile.
#   make            build everything into $(BUILDDIR) (default: build/)
#   make check      install missing Debian packages, build, run every test,
#                   then rebuild with ASan+UBSan into build-asan/ and run again
#   make bench      benchmarks (not tests)
#   make fuzz       build the libFuzzer targets (clang) into $(FUZZDIR) and run
#                   each for FUZZ_SECONDS from its seed corpus (tests/fuzz/)
#   make soak       long soak run, as root (SOAK_MINUTES, default 30; scripts/soak.sh)
#   make install    PREFIX=/usr/local DESTDIR=
VERSION   := 0.1.0
PREFIX    ?= /usr/local
DESTDIR   ?=
BUILDDIR  ?= build
SAN       ?=
FUZZ      ?=
FUZZDIR   ?= build-fuzz
FUZZ_CC   ?= clang
FUZZ_SECONDS ?= 60
FUZZ_SMOKE_SECONDS ?= 4
FUZZ_ARGS ?=

# One folder per layer (common/README); headers are included by name.
COMMON_INC := $(patsubst %,-I%,$(sort $(dir $(wildcard common/*/*.h))))
PKGS      := libevent libevent_pthreads libevent_openssl libnbd libzstd openssl
CC        ?= cc
CFLAGS    ?= -O2 -g
CFLAGS    += -std=gnu11 -Wall -Wextra -Werror -Wno-unused-parameter \
             -D_GNU_SOURCE -DXNBD_VERSION='"$(VERSION)"' -pthread \
             $(COMMON_INC) -Iproxy $(shell pkg-config --cflags $(PKGS) 2>/dev/null)
LDLIBS    += $(shell pkg-config --libs $(PKGS) 2>/dev/null) -pthread
ifneq ($(SAN),)
CFLAGS    += -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined
LDFLAGS   += -fsanitize=address,undefined
endif
# The fuzz build (make fuzz): every object gets libFuzzer's coverage hooks.
ifneq ($(FUZZ),)
CFLAGS    += -fsanitize=fuzzer-no-link
endif

COMMON_SRC := $(wildcard common/*/*.c)
COMMON_OBJ := $(COMMON_SRC:%.c=$(BUILDDIR)/%.o)
LIBCOMMON  := $(BUILDDIR)/libxnbd-common.a

# Every program is one directory's main file plus the common library.
PROGRAMS   := $(BUILDDIR)/xnbd-server $(BUILDDIR)/xnbd-digest
PROGRAMS   += $(if $(wildcard proxy/xnbd-proxy.c),$(BUILDDIR)/xnbd-proxy)
PROGRAMS   += $(if $(wildcard proxy/xnbd-ctl.c),$(BUILDDIR)/xnbd-ctl)
PROGRAMS   += $(if $(wildcard scripts/wan-emu/wan-relay.c),$(BUILDDIR)/wan-relay)
# Test helper programs: tests/tools/NAME.c -> build/tests/NAME, except
# LD_PRELOAD shims: tests/tools/preload-NAME.c -> build/tests/preload-NAME.so
PRELOAD_SRC := $(wildcard tests/tools/preload-*.c)
TOOLS      := $(patsubst tests/tools/%.c,$(BUILDDIR)/tests/%,$(filter-out $(PRELOAD_SRC),$(wildcard tests/tools/*.c)))
TOOLS      += $(patsubst tests/tools/%.c,$(BUILDDIR)/tests/%.so,$(PRELOAD_SRC))
# Criterion unit tests: tests/unit/test-NAME.c -> build/tests/unit-NAME
UNITS      := $(patsubst tests/unit/test-%.c,$(BUILDDIR)/tests/unit-%,$(wildcard tests/unit/test-*.c))
MANPAGES   := $(wildcard man/*.[18])
# libFuzzer targets: tests/fuzz/fuzz-NAME.c -> BUILDDIR/fuzz/fuzz-NAME.
FUZZ_NAMES := $(patsubst tests/fuzz/fuzz-%.c,%,$(wildcard tests/fuzz/fuzz-*.c))
FUZZERS    := $(FUZZ_NAMES:%=$(BUILDDIR)/fuzz/fuzz-%)
.SECONDARY: $(FUZZ_NAMES:%=$(BUILDDIR)/tests/fuzz/fuzz-%.o)
# The nbdkit plugin: plugins/nbdkit-dedup/*.c plus a position-independent
# copy of the common library (hidden symbols: only nbdkit's entry points
# are exported), built when nbdkit's plugin header is installed.
PLUGIN     := $(if $(wildcard /usr/include/nbdkit-plugin.h),$(BUILDDIR)/plugins/nbdkit-dedup-plugin.so)
PLUGIN_SRC := $(wildcard plugins/nbdkit-dedup/*.c)
PIC_OBJ    := $(COMMON_SRC:%.c=$(BUILDDIR)/pic/%.o) $(PLUGIN_SRC:%.c=$(BUILDDIR)/pic/%.o)
NBDKIT_PLUGINDIR ?= $(shell nbdkit --dump-config 2>/dev/null | sed -n 's/^plugindir=//p')

.PHONY: all check check-build unit e2e bench soak install clean deps
.PHONY: fuzz fuzz-build fuzz-smoke
all: $(PROGRAMS) $(TOOLS) $(PLUGIN)

$(BUILDDIR)/%.o: %.c $(wildcard common/*/*.h)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -c -o $@ $<

$(LIBCOMMON): $(COMMON_OBJ)
	rm -f $@ && ar rcs $@ $^

SERVER_EXTRA := $(filter-out server/xnbd-server.c server/xnbd-digest.c,$(wildcard server/*.c))
$(BUILDDIR)/xnbd-server: $(BUILDDIR)/server/xnbd-server.o $(patsubst %.c,$(BUILDDIR)/%.o,$(SERVER_EXTRA)) $(LIBCOMMON)
	$(CC) $(LDFLAGS) -o $@ $^ $(LDLIBS)
$(BUILDDIR)/xnbd-digest: $(BUILDDIR)/server/xnbd-digest.o $(LIBCOMMON)
	$(CC) $(LDFLAGS) -o $@ $^ $(LDLIBS)
$(BUILDDIR)/pic/%.o: %.c $(wildcard common/*/*.h)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS) -fPIC -fvisibility=hidden -c -o $@ $<
$(BUILDDIR)/pic/libxnbd-common.a: $(filter $(BUILDDIR)/pic/common/%,$(PIC_OBJ))
	rm -f $@ && ar rcs $@ $^
# nbdkit_* symbols are resolved by nbdkit when it loads the plugin.
$(BUILDDIR)/plugins/nbdkit-dedup-plugin.so: $(filter $(BUILDDIR)/pic/plugins/%,$(PIC_OBJ)) $(BUILDDIR)/pic/libxnbd-common.a
	@mkdir -p $(dir $@)
	$(CC) $(LDFLAGS) -shared -o $@ $^ $(LDLIBS)
PROXY_OBJ := $(patsubst %.c,$(BUILDDIR)/%.o,$(filter-out proxy/xnbd-ctl.c,$(wildcard proxy/*.c)))
$(BUILDDIR)/xnbd-proxy: $(PROXY_OBJ) $(LIBCOMMON)
	$(CC) $(LDFLAGS) -o $@ $^ $(LDLIBS)
$(BUILDDIR)/xnbd-ctl: $(BUILDDIR)/proxy/xnbd-ctl.o $(LIBCOMMON)
	$(CC) $(LDFLAGS) -o $@ $^ $(LDLIBS)
$(BUILDDIR)/wan-relay: $(BUILDDIR)/scripts/wan-emu/wan-relay.o $(LIBCOMMON)
	$(CC) $(LDFLAGS) -o $@ $^ $(LDLIBS)
$(BUILDDIR)/tests/%: $(BUILDDIR)/tests/tools/%.o $(LIBCOMMON)
	@mkdir -p $(dir $@)
	$(CC) $(LDFLAGS) -o $@ $^ $(LDLIBS)
# Shims go into programs that may be ASan-built: never instrumented
# themselves (an ASan binary loads libasan first; see the shim's test).
$(BUILDDIR)/tests/preload-%.so: tests/tools/preload-%.c
	@mkdir -p $(dir $@)
	$(CC) -O2 -g -std=gnu11 -Wall -Wextra -Werror -D_GNU_SOURCE -pthread \
	  -fPIC -shared -o $@ $< -ldl
$(BUILDDIR)/tests/unit-%: $(BUILDDIR)/tests/unit/test-%.o $(LIBCOMMON)
	@mkdir -p $(dir $@)
	$(CC) $(LDFLAGS) -o $@ $^ $(LDLIBS) -lcriterion

$(BUILDDIR)/fuzz/fuzz-%: $(BUILDDIR)/tests/fuzz/fuzz-%.o $(LIBCOMMON)
	@mkdir -p $(dir $@)
	$(CC) $(LDFLAGS) -fsanitize=fuzzer -o $@ $^ $(LDLIBS)

$(FUZZ_NAMES:%=$(BUILDDIR)/tests/fuzz/fuzz-%.o): tests/fuzz/fuzz-common.h

deps:
	@scripts/install-deps.sh

# The full test run: plain build, then the sanitizer build, same tests,
# then a few seconds of each fuzz target.  The sanitizer pass crashes the
# proxy 12 times in test-proxy-crash-i2 (30 in the plain pass): same code.
check: deps
	$(MAKE) check-build BUILDDIR=build
	CRASH_RUNS=12 $(MAKE) check-build BUILDDIR=build-asan SAN=1 ENGINE_VIA_NBDKIT=0
	$(MAKE) fuzz-smoke
	@echo "make check: all suites passed (build, build-asan, fuzz smoke)"

ENGINE_VIA_NBDKIT ?= 1
check-build: all $(UNITS)
	@ENGINE_VIA_NBDKIT=$(ENGINE_VIA_NBDKIT) tests/run-tests.sh $(BUILDDIR)

unit: all $(UNITS)
	@tests/run-tests.sh $(BUILDDIR) unit
e2e: all
	@tests/run-tests.sh $(BUILDDIR) e2e

# Fuzzing (libFuzzer needs clang).  Objects are built with coverage hooks
# and ASan+UBSan into FUZZDIR; a run's new inputs and crash files stay in
# FUZZDIR/corpus and FUZZDIR/crashes (the committed seeds are read only).
fuzz-build: $(FUZZERS)
fuzz: deps
	$(MAKE) fuzz-build BUILDDIR=$(FUZZDIR) CC=$(FUZZ_CC) SAN=1 FUZZ=1
	FUZZ_ARGS='$(FUZZ_ARGS)' tests/fuzz/run-fuzz.sh $(FUZZDIR) $(FUZZ_SECONDS) $(FUZZ_NAMES)
fuzz-smoke: deps
	$(MAKE) fuzz-build BUILDDIR=$(FUZZDIR) CC=$(FUZZ_CC) SAN=1 FUZZ=1
	FUZZ_ARGS='$(FUZZ_ARGS)' tests/fuzz/run-fuzz.sh $(FUZZDIR) $(FUZZ_SMOKE_SECONDS) $(FUZZ_NAMES)

bench: deps all
	scripts/bench/run-all.sh $(BUILDDIR)

# A long mixed run with faults (not part of check): scripts/soak.sh.
SOAK_MINUTES ?= 30
soak: deps all
	SOAK_MINUTES=$(SOAK_MINUTES) scripts/soak.sh $(BUILDDIR)

install: all
	install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(PREFIX)/share/man/man1 $(DESTDIR)$(PREFIX)/share/man/man8
	install -m 755 $(filter-out $(BUILDDIR)/wan-relay,$(PROGRAMS)) $(DESTDIR)$(PREFIX)/bin/
	install -d $(DESTDIR)$(PREFIX)/lib/xnbd
	install -m 755 scripts/vm-migrate $(DESTDIR)$(PREFIX)/bin/xnbd-vm-migrate
	install -m 755 scripts/vm/qmp.py $(DESTDIR)$(PREFIX)/lib/xnbd/qmp.py
	for m in $(MANPAGES); do \
	  s=$${m##*.}; install -m 644 $$m $(DESTDIR)$(PREFIX)/share/man/man$$s/; done
ifneq ($(PLUGIN),)
	@[ -n "$(NBDKIT_PLUGINDIR)" ] || { echo "install: cannot find nbdkit's plugin directory ('nbdkit --dump-config'); set NBDKIT_PLUGINDIR=DIR" >&2; exit 1; }
	install -d $(DESTDIR)$(NBDKIT_PLUGINDIR)
	install -m 755 $(PLUGIN) $(DESTDIR)$(NBDKIT_PLUGINDIR)/
endif

clean:
	rm -rf build build-asan $(FUZZDIR)
