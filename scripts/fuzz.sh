#!/usr/bin/env bash
# Runs every cargo-fuzz target of the engine for a fixed number of executions.
#
#   scripts/fuzz.sh                 # 1,000,000 executions per target (the recorded runs)
#   RUNS=20000 scripts/fuzz.sh      # a quick pass
#   scripts/fuzz.sh index_from_bytes index_checksummed   # only these targets
#
# Needs cargo-fuzz (`cargo install cargo-fuzz`). On a stable toolchain it runs with
# RUSTC_BOOTSTRAP=1 (cargo-fuzz passes nightly-only flags: -Zsanitizer=address). Targets:
#   index_from_bytes    raw bytes -> Index::from_bytes (header, checksums, keys, scales)
#   index_checksummed   bytes patched into a plausible file with valid checksums, so the fuzzer
#                       reaches the structural checks and the search kernels on crafted vectors
#   index_load_file     bytes written to a file -> Index::load read / mmap verified / mmap lazy,
#                       which must agree with from_bytes; verify() on the lazy map likewise
#   index_changed_file  bytes written to a file, opened with mmap, then the file is truncated,
#                       extended, rewritten in place or replaced by rename: every call must
#                       answer or raise Error::File (a SIGBUS is a finding); once per run, a
#                       device and a FIFO must be refused
#   ivf_from_bytes      raw bytes -> IvfIndex file reader (header, checksums, lists, key map);
#                       shares its checks with rust/engine/tests/ivf_mutations.rs
#   ivf_changed_file    bytes (checksums patched when the first byte is odd) written to a file,
#                       opened with mmap: an accepted file must answer search (single and batch),
#                       get, keys and save's image as from_bytes does; then the file is truncated,
#                       extended, rewritten in place or replaced by rename, and search, batch
#                       search, get, keys, verify and save must answer or raise Error::File (a
#                       SIGBUS is a finding); once per run, a device and a FIFO must be refused
#   kernels             every SIMD kernel at every level the CPU has (scalar/AVX2/AVX-512) vs the
#                       scalar reference, lengths 0..5000 and unaligned slices, under ASan
# The index targets start from the committed seeds in rust/engine/fuzz/corpus/index/ (real saved
# index files of every dtype and metric, = tests/data/golden/v1/), kernels from corpus/kernels/
# (lengths 1..4097 incl. 1, 3, 7, 15, 17, 31, 33, 511, 513). Each grows a scratch corpus in
# rust/engine/fuzz/work/<target>/ (ignored by git). A finding is written to
# rust/engine/fuzz/artifacts/<target>/ and the script stops with a non-zero status; reproduce
# it with `RUSTC_BOOTSTRAP=1 cargo fuzz run <target> <artifact>` in rust/engine/fuzz.
# Do not pause a run (SIGSTOP): libFuzzer's -timeout watchdog keeps counting and reports the
# paused input as a timeout (seen once here; the "timeout" input then ran in 22 ms).
set -euo pipefail
cd "$(dirname "$0")/../rust/engine/fuzz"
RUNS="${RUNS:-1000000}"
TARGETS=("$@")
if [ ${#TARGETS[@]} -eq 0 ]; then
  TARGETS=(index_from_bytes index_checksummed index_load_file index_changed_file ivf_from_bytes ivf_changed_file kernels)
fi
export RUSTC_BOOTSTRAP=1
# Shared machines: stay out of the way of interactive work.
NICE="nice -n ${FUZZ_NICE:-10}"
$NICE cargo fuzz build "${TARGETS[@]:0:1}" >/dev/null 2>&1 || true  # warm build (quiet)
for t in "${TARGETS[@]}"; do
  mkdir -p "work/$t"
  echo "== $t: $RUNS executions"
  start=$(date +%s)
  seeds=corpus/index
  [ "$t" = kernels ] && seeds=corpus/kernels
  [ "$t" = ivf_from_bytes ] && seeds=corpus/ivf
  [ "$t" = ivf_changed_file ] && seeds=corpus/ivf
  status=0
  $NICE cargo fuzz run "$t" "work/$t" "$seeds" -- \
    -runs="$RUNS" -max_len=8192 -rss_limit_mb=1024 -timeout=10 -print_final_stats=1 \
    >"work/$t.log" 2>&1 || status=$?
  grep -E "^(Done|stat::number_of_executed_units|stat::peak_rss_mb|SUMMARY)|panicked" "work/$t.log" || true
  echo "   exit $status, $(( $(date +%s) - start )) s (log: rust/engine/fuzz/work/$t.log)"
  if [ "$status" -ne 0 ]; then
    echo "FINDING in $t: see rust/engine/fuzz/artifacts/$t/" >&2
    exit "$status"
  fi
done
