#!/usr/bin/env bash
# The real flow, end to end: an NVRAM image made by qemu-img, an encrypted
# store in it, TPM state blobs committed, a kill -9 in the middle of a stream
# of commits, a live migration hand-over (the source releases, the target
# claims and validates under an exclusive lock), a failed claim that changes
# nothing, and qemu-img check after each step. Works wherever cargo puts its
# build (CARGO_TARGET_DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release -q
target=$(cargo metadata --format-version 1 --no-deps |
  sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
T="$target/release/tpmstate"
[ -x "$T" ] || { echo "demo: no tpmstate binary at $T" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
step() { printf '\n== %s\n' "$*"; }

step "qemu-img creates the NVRAM image; tpmstate formats an encrypted store in it"
qemu-img create -q -f qcow2 nvram.qcow2 4M
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > vtpm.key && chmod 600 vtpm.key
"$T" format nvram.qcow2 --key-file vtpm.key
qemu-img check -q nvram.qcow2 && echo "qemu-img check: clean"

step "the emulator commits its state blobs (each commit atomic, one fdatasync)"
head -c 65536 /dev/urandom > permall
head -c 4096 /dev/urandom > volatilestate
"$T" put nvram.qcow2 permall permall --key-file vtpm.key
"$T" put nvram.qcow2 volatilestate volatilestate --key-file vtpm.key
"$T" info nvram.qcow2
"$T" get nvram.qcow2 permall --key-file vtpm.key | cmp - permall && echo "permall reads back identical"

step "a crash: kill -9 in the middle of a stream of commits; the store opens at the last acknowledged one"
(
  n=0
  while :; do
    n=$((n + 1))
    printf '%d' "$n" > counter
    # The committer's pid is on file before it starts writing.
    ( echo "$BASHPID" > committer.pid; exec "$T" put nvram.qcow2 counter counter --key-file vtpm.key 2>/dev/null ) &
    wait $! || exit 0
    # Atomically: a kill between truncating and writing must not lose it.
    echo "$n" > acked.tmp && mv acked.tmp acked
  done
) &
loop=$!
sleep 1.5
kill -9 "$loop"
{ wait "$loop"; } 2>/dev/null || true
sleep 0.1
kill -9 "$(cat committer.pid)" 2>/dev/null || true
# Nothing may hold the image any more (a committer started just before the
# kill has finished or been killed by now).
"$T" lock nvram.qcow2 --timeout-ms 5000 -- true
acked=$(cat acked)
# A commit the kill tore is refused by default; a restart accepts exactly that.
on_disk=$("$T" get nvram.qcow2 counter --key-file vtpm.key --accept-torn-commit)
echo "last commit acknowledged before the kill: counter=$acked; the store now holds counter=$on_disk"
# The commit being written when the kill came either landed whole or not at all.
[ "$on_disk" = "$acked" ] || [ "$on_disk" = "$((acked + 1))" ]
qemu-img check -q nvram.qcow2 && echo "qemu-img check: clean"
"$T" put nvram.qcow2 volatilestate volatilestate --key-file vtpm.key --accept-torn-commit
echo "(the emulator's next commit after a restart settles any commit the kill tore)"

step "while a writer holds the image, QEMU's tools are kept out (QEMU's lock protocol)"
"$T" lock nvram.qcow2 --mode writer -- sh -c 'qemu-img info nvram.qcow2 2>&1 | head -1; true'

step "migration: the target claims under an exclusive lock and validates + decrypts everything"
"$T" validate-incoming nvram.qcow2 --key-file vtpm.key --require permall,volatilestate

step "a target with the wrong key fails cleanly: exit code 5, image untouched, no lock left"
head -c 32 /dev/urandom > wrong.key && chmod 600 wrong.key
before=$(sha256sum nvram.qcow2)
set +e; "$T" validate-incoming nvram.qcow2 --key-file wrong.key; code=$?; set -e
echo "exit code: $code"
[ "$before" = "$(sha256sum nvram.qcow2)" ] && echo "image unchanged"
"$T" locks nvram.qcow2

step "final checks"
"$T" check nvram.qcow2 --key-file vtpm.key
qemu-img check nvram.qcow2
