#!/usr/bin/env bash
# The long fuzzing campaign (not part of CI, which runs 20 s per target):
# every cargo-fuzz target for TPMSTATE_FUZZ_MINUTES minutes (default 10),
# TPMSTATE_FUZZ_JOBS at a time (default 2), from the seeds in fuzz/seeds and
# a corpus kept in TPMSTATE_FUZZ_CORPUS (default fuzz/corpus, not committed).
# Prints one line per target: executions, coverage (libFuzzer's cov and ft
# counters) and the outcome; docs/testing.md records a run. A crash leaves
# its input in fuzz/artifacts/TARGET/; keep it as a seed once fixed.
set -euo pipefail
cd "$(dirname "$0")/.."
minutes=${TPMSTATE_FUZZ_MINUTES:-10}
jobs=${TPMSTATE_FUZZ_JOBS:-2}
corpus_root=${TPMSTATE_FUZZ_CORPUS:-$PWD/fuzz/corpus}
targets=$(sed -n 's/^name = "\(.*\)"$/\1/p' fuzz/Cargo.toml | grep -v '^tpmstate-fuzz$')
(cd fuzz && cargo +nightly fuzz build -O >/dev/null 2>&1)
run_one() {
  local t=$1 log corpus seeds=()
  corpus="$corpus_root/$t"; mkdir -p "$corpus"
  [ -d "fuzz/seeds/$t" ] && seeds=("$PWD/fuzz/seeds/$t")
  log=$(mktemp)
  if (cd fuzz && cargo +nightly fuzz run -O "$t" "$corpus" "${seeds[@]}" -- \
        -max_total_time=$((minutes * 60)) -max_len=300000 -print_final_stats=1 >"$log" 2>&1); then
    outcome="no crash"
  else
    outcome="CRASH (see fuzz/artifacts/$t)"
  fi
  local runs cov ft
  runs=$(grep -o 'Done [0-9]* runs' "$log" | tail -1 | grep -o '[0-9]*')
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | grep -o '[0-9]*')
  ft=$(grep -o 'ft: [0-9]*' "$log" | tail -1 | grep -o '[0-9]*')
  printf '%-16s %12s execs  cov %6s  ft %7s  %s\n' "$t" "${runs:-?}" "${cov:-?}" "${ft:-?}" "$outcome"
  rm -f "$log"
}
export -f run_one
export minutes corpus_root
printf '%s\n' $targets | xargs -P "$jobs" -I{} bash -c 'run_one {}'
