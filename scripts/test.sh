#!/usr/bin/env bash
# The whole test suite: formatting, lints, every test, and (where a nightly
# toolchain is available) a short deterministic run of every fuzz target.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo fmt --all -- --check
cargo clippy --all-targets -q -- -D warnings
# --all-targets leaves out doctests: --doc runs them (the compile_fail ones
# prove that writing without the writer lock does not compile).
{ cargo test --all-targets 2>&1; cargo test --doc 2>&1; } | tee target/test.log |
  grep -E '^(test result|running|error|failures)|FAILED|panicked' || true
grep -q 'FAILED\|error\[' target/test.log && { echo "tests failed"; exit 1; }
# The single closing line CI reads.
passed=$(grep -o '[0-9]* passed' target/test.log | awk '{s+=$1} END {print s+0}')
failed=$(grep -o '[0-9]* failed' target/test.log | awk '{s+=$1} END {print s+0}')
if [ "${TPMSTATE_FUZZ_SECONDS:-20}" != 0 ] && rustup toolchain list 2>/dev/null | grep -q nightly; then
  command -v cargo-fuzz >/dev/null 2>&1 || cargo install -q cargo-fuzz --locked
  (cd fuzz && cargo +nightly fuzz build -O >/dev/null 2>&1)
  for t in qcow2_header slot directory key_file store_open store_fields qcow2_image; do
    seeds=()
    [ -d "fuzz/seeds/$t" ] && seeds=("$PWD/fuzz/seeds/$t")
    corpus=$(mktemp -d)
    if (cd fuzz && cargo +nightly fuzz run -O "$t" "$corpus" "${seeds[@]}" -- \
          -max_total_time="${TPMSTATE_FUZZ_SECONDS:-20}" -seed=1 -max_len=300000 >"$corpus.log" 2>&1); then
      echo "fuzz $t: $(grep -o 'Done [0-9]* runs' "$corpus.log" | tail -1), no crash"
      passed=$((passed + 1))
    else
      echo "fuzz $t: FAILED"; tail -30 "$corpus.log"; failed=$((failed + 1))
    fi
    rm -rf "$corpus" "$corpus.log"
  done
else
  echo "fuzz: skipped (no nightly toolchain); the parsers' proptests above still ran"
fi
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
