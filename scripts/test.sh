#!/usr/bin/env bash
# The whole test suite: formatting, lints, every test (doctests included),
# and (where a nightly toolchain is available) a short deterministic run of
# every fuzz target. Works wherever cargo puts its build (CARGO_TARGET_DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
log=$(mktemp)
trap 'rm -f "$log"' EXIT

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy --workspace --all-targets -D warnings"
cargo clippy --workspace --all-targets -q -- -D warnings
echo "== cargo test: every test binary, then the doctests"
# One line per suite: its name beside its counts; failures in full.
{ cargo test --workspace --all-targets --no-fail-fast 2>&1 || true; cargo test --workspace --doc 2>&1 || true; } |
  tee "$log" |
  awk '/^     Running unittests /  { suite = $3 " (unit tests)"; next }
       /^     Running /            { suite = $2; next }
       /^   Doc-tests /            { suite = "doctests"; next }
       /^test result:/             { sub(/^test result: /, ""); sub(/; finished in.*/, "");
                                     printf "  %-32s %s\n", suite, $0; next }
       /FAILED|panicked|^error/    { print }'
if grep -q 'FAILED\|^error' "$log"; then
  echo "tests failed"
  exit 1
fi
# The single closing line CI reads.
passed=$(grep -o '[0-9]* passed' "$log" | awk '{s+=$1} END {print s+0}')
failed=$(grep -o '[0-9]* failed' "$log" | awk '{s+=$1} END {print s+0}')
if [ "${TPMSTATE_FUZZ_SECONDS:-20}" != 0 ] && rustup toolchain list 2>/dev/null | grep -q nightly; then
  echo "== fuzz: ${TPMSTATE_FUZZ_SECONDS:-20} s per target"
  command -v cargo-fuzz >/dev/null 2>&1 || cargo install -q cargo-fuzz --locked
  (cd fuzz && cargo +nightly fuzz build -O >/dev/null 2>&1)
  for t in qcow2_header slot directory key_file store_open store_fields qcow2_image swtpm_ctrl swtpm_import; do
    seeds=()
    [ -d "fuzz/seeds/$t" ] && seeds=("$PWD/fuzz/seeds/$t")
    corpus=$(mktemp -d)
    if (cd fuzz && cargo +nightly fuzz run -O "$t" "$corpus" "${seeds[@]}" -- \
          -max_total_time="${TPMSTATE_FUZZ_SECONDS:-20}" -seed=1 -max_len=300000 >"$corpus.log" 2>&1); then
      echo "  fuzz $t: $(grep -o 'Done [0-9]* runs' "$corpus.log" | tail -1), no crash"
      passed=$((passed + 1))
    else
      echo "  fuzz $t: FAILED"; tail -30 "$corpus.log"; failed=$((failed + 1))
    fi
    rm -rf "$corpus" "$corpus.log"
  done
else
  echo "fuzz: skipped (no nightly toolchain); the parsers' proptests above still ran"
fi
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
