# shellcheck shell=bash
# Sourced by the data scripts: bench_cache_dir prints (and makes) the cache
# directory: BENCH_CACHE, else /var/cache/xnbd-bench when it can be made,
# else ${TMPDIR:-/tmp}/xnbd-bench-cache.
bench_cache_dir() {
    local d
    if [[ -n ${BENCH_CACHE:-} ]]; then
        d=$BENCH_CACHE
    elif mkdir -p /var/cache/xnbd-bench 2>/dev/null && [[ -w /var/cache/xnbd-bench ]]; then
        d=/var/cache/xnbd-bench
    else
        d=${TMPDIR:-/tmp}/xnbd-bench-cache
    fi
    mkdir -p "$d" || { echo "cannot make the bench cache directory $d (set BENCH_CACHE)" >&2; return 1; }
    echo "$d"
}
