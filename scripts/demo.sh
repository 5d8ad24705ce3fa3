#!/usr/bin/env bash
# The real flow, end to end: a blank NVRAM image made by qemu-img, the
# swtpm-compatible emulator tpmstate-emu keeping an encrypted TPM's state
# in it, TPM commands through tpm2-tools, QEMU's tools locked out while it
# runs, a kill -9 in the middle of a stream of NV writes and a restart that
# serves the last acknowledged one, then a live migration of a running VM
# between two QEMUs on the shared image and one that a target with the
# wrong key fails while the source keeps running; last, a TPM made by
# swtpm_setup (as libvirt has it made) imported at the emulator's first
# start with `--tpmstate dir=`, and exported back to swtpm. qemu-img check
# after each step; an online snapshot taken while the emulator runs and
# applied by qemu-img once it is off.
# Works wherever cargo puts its build (CARGO_TARGET_DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release -q --bins
target=$(cargo metadata --format-version 1 --no-deps |
  sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
T="$target/release/tpmstate"
E="$target/release/tpmstate-emu"
[ -x "$T" ] && [ -x "$E" ] || { echo "demo: no binaries in $target/release" >&2; exit 1; }
work=$(mktemp -d)
cleanup() {
  [ -s "$work/emu.pid" ] && kill -9 "$(cat "$work/emu.pid")" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
cd "$work"
step() { printf '\n== %s\n' "$*"; }
# Two free loopback ports N, N+1 (the swtpm TCTI's layout).
port=0
while :; do
  port=$((20000 + RANDOM % 20000))
  (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null || (exec 3<>"/dev/tcp/127.0.0.1/$((port + 1))") 2>/dev/null || break
done
export TPM2TOOLS_TCTI="swtpm:host=127.0.0.1,port=$port"
start_emulator() {
  rm -f emu.pid
  "$E" socket --tpm2 --daemon --server "type=tcp,port=$port" --ctrl "type=tcp,port=$((port + 1))" \
    --tpmstate "backend-uri=qcow2://$work/${1:-nvram.qcow2}" --key file=vtpm.key,mode=aes-256-cbc \
    --flags not-need-init,startup-clear --pid file=emu.pid --log file=emu.log
  for _ in $(seq 100); do [ -s emu.pid ] && return; sleep 0.05; done
  echo "demo: the emulator did not start:" >&2; cat emu.log >&2; exit 1
}
counter() { tpm2_nvread 0x1500017 -C o -s 8 | od -An -tx1 | tr -d ' \n' | { read -r hex; echo $((16#$hex)); }; }

step "qemu-img makes a blank NVRAM image; tpmstate-emu formats an encrypted store in it on first use"
qemu-img create -q -f qcow2 nvram.qcow2 4M
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > vtpm.key && chmod 600 vtpm.key
start_emulator
echo "tpmstate-emu runs as pid $(cat emu.pid) (swtpm's command line; the key is swtpm's --key option)"

step "TPM commands through tpm2-tools: random bytes, NV data, an NV counter, a persistent key"
tpm2_getrandom --hex 16; echo
tpm2_nvdefine 0x1500016 -C o -s 32 -a "ownerread|ownerwrite" >/dev/null
printf 'owner secret kept by tpmstate' > secret
tpm2_nvwrite 0x1500016 -C o -i secret
tpm2_nvdefine 0x1500017 -C o -s 8 -a "ownerread|ownerwrite|nt=counter|no_da" >/dev/null
for _ in 1 2 3; do tpm2_nvincrement 0x1500017 -C o; done
tpm2_createprimary -C o -c primary.ctx -Q
tpm2_evictcontrol -C o -c primary.ctx 0x81000001 >/dev/null
echo "NV counter: $(counter); persistent key 0x81000001: $(tpm2_readpublic -c 0x81000001 | sed -n 's/^name: //p')"

step "while the emulator runs, QEMU's tools are locked out; tpmstate reads beside it (-U)"
qemu-img info nvram.qcow2 2>&1 | head -2 || true
"$T" info -U nvram.qcow2 | sed -n '1,9p'
"$T" locks nvram.qcow2

step "a crash: kill -9 in the middle of a stream of NV writes, then a restart"
( n=0; while tpm2_nvincrement 0x1500017 -C o 2>/dev/null; do n=$((n + 1)); echo "$n" > acked.tmp && mv acked.tmp acked; done ) &
loop=$!
sleep 1.5
kill -9 "$(cat emu.pid)"
wait "$loop" || true
acked=$(( 3 + $(cat acked 2>/dev/null || echo 0) ))
qemu-img check -q nvram.qcow2 && echo "qemu-img check: clean"
start_emulator
now=$(counter)
echo "acknowledged before the kill: counter=$acked; after the restart the TPM holds counter=$now"
# The write in flight when the kill came either landed whole or not at all.
[ "$now" = "$acked" ] || [ "$now" = "$((acked + 1))" ]
tpm2_nvread 0x1500016 -C o -s 29 | cmp - secret && echo "NV data: intact"
tpm2_readpublic -c 0x81000001 >/dev/null && echo "persistent key 0x81000001: intact"

step "a snapshot while the emulator runs (it takes it between two commits), then more NV writes"
"$T" snapshot create nvram.qcow2 before-increments
at_snapshot=$(counter)
for _ in 1 2 3; do tpm2_nvincrement 0x1500017 -C o; done
echo "NV counter at the snapshot: $at_snapshot; now: $(counter)"
"$T" snapshot list nvram.qcow2

step "a clean stop (SIGTERM): the state is committed and the lock released"
stop_emulator() { pid=$(cat emu.pid); kill -TERM "$pid"; while kill -0 "$pid" 2>/dev/null; do sleep 0.05; done; }
stop_emulator
qemu-img check nvram.qcow2 | head -1
"$T" check nvram.qcow2 --key-file vtpm.key

step "VM off: qemu-img applies the snapshot (to a copy here); the TPM is back at the snapshot's counter"
cp nvram.qcow2 reverted.qcow2
qemu-img snapshot -a before-increments reverted.qcow2
start_emulator reverted.qcow2
echo "NV counter in the reverted image: $(counter) (the snapshot's: $at_snapshot)"
[ "$(counter)" = "$at_snapshot" ]
stop_emulator
qemu-img check -q reverted.qcow2 && echo "qemu-img check: clean"

# Live migration: two QEMUs (SeaBIOS, no disk) and two emulators on the one
# image; QMP over loopback TCP, spoken with bash's /dev/tcp.
free_port() { local p; while :; do p=$((20000 + RANDOM % 20000)); (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null || { echo "$p"; return; }; done; }
qmp_open() { # fd port name
  for _ in $(seq 300); do eval "exec $1<>/dev/tcp/127.0.0.1/$2" 2>/dev/null && break; sleep 0.1; done
  if ! { true >&"$1"; } 2>/dev/null; then
    echo "demo: QEMU $3 did not start:" >&2; cat "$3.qemu.err" "$3.log" >&2; exit 1
  fi
  local line; read -r -u "$1" line; qmp "$1" '{"execute":"qmp_capabilities"}' >/dev/null
}
qmp() { # fd json: prints the answer's line, skipping events
  local line; echo "$2" >&"$1"
  while read -r -u "$1" line; do case "$line" in *'"return"'*|*'"error"'*) echo "$line"; return;; esac; done
}
migration_status() { qmp "$1" '{"execute":"query-migrate"}' | sed -n 's/.*"status": *"\([a-z-]*\)".*/\1/p'; }
start_side() { # name qmp-port emulator-args... ; QEMU with -incoming defer when the name is b
  local name=$1 port=$2; shift 2
  "$E" socket --tpm2 --terminate --ctrl "type=unixio,path=$work/$name.sock" \
    --tpmstate "backend-uri=qcow2://$work/nvram.qcow2" --log "file=$name.log,level=1" "$@" >/dev/null 2>&1 5>&- 6>&- &
  for _ in $(seq 200); do [ -S "$name.sock" ] && break; sleep 0.05; done
  local incoming=(); [ "$name" = b ] && incoming=(-incoming defer)
  qemu-system-x86_64 -machine q35,accel=tcg -nodefaults -m 128 -display none -serial none -monitor none \
    -qmp "tcp:127.0.0.1:$port,server=on,wait=off" -chardev "socket,id=chrtpm,path=$work/$name.sock" \
    -tpmdev emulator,id=tpm0,chardev=chrtpm -device tpm-tis,tpmdev=tpm0 "${incoming[@]}" >/dev/null 2>"$name.qemu.err" 5>&- 6>&- &
}
migrate() { # target-key-option: migrates VM a to b; sets $status to QEMU's outcome
  local qa qb mp
  qa=$(free_port); start_side a "$qa" --migration release-lock-outgoing --key file=vtpm.key,mode=aes-256-cbc
  qmp_open 5 "$qa" a; sleep 2   # SeaBIOS starts the TPM and extends PCRs
  qb=$(free_port); start_side b "$qb" --migration incoming --key "$1"
  qmp_open 6 "$qb" b
  for fd in 5 6; do qmp $fd '{"execute":"migrate-set-capabilities","arguments":{"capabilities":[{"capability":"return-path","state":true}]}}' >/dev/null; done
  mp=$(free_port)
  qmp 6 "{\"execute\":\"migrate-incoming\",\"arguments\":{\"uri\":\"tcp:127.0.0.1:$mp\"}}" >/dev/null
  qmp 5 "{\"execute\":\"migrate\",\"arguments\":{\"uri\":\"tcp:127.0.0.1:$mp\"}}" >/dev/null
  for _ in $(seq 300); do status=$(migration_status 5); case $status in completed|failed) break;; esac; sleep 0.1; done
}
quit_side() { qmp "$1" '{"execute":"quit"}' >/dev/null 2>&1 || true; eval "exec $1>&-"; }

step "live migration: a running VM moves to a second QEMU; the target claims the shared image"
migrate file=vtpm.key,mode=aes-256-cbc
echo "migration: $status"
sed -n 's/^tpmstate-emu: //p' a.log | grep -E "handed over|taken back" || true
sed -n 's/^tpmstate-emu: //p' b.log | grep -E "claimed for" || true
"$T" locks nvram.qcow2
before=$(sha256sum nvram.qcow2)
quit_side 5; sleep 0.5
[ "$before" = "$(sha256sum nvram.qcow2)" ] && echo "the source quit and never wrote the image again"
quit_side 6; wait

step "a target with the wrong key: the migration fails and the source VM keeps running"
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > wrong.key && chmod 600 wrong.key
migrate file=wrong.key,mode=aes-256-cbc
echo "migration: $status"
sed -n 's/^tpmstate-emu: error: //p' b.log | tail -1
echo "source VM: $(qmp 5 '{"execute":"query-status"}' | sed -n 's/.*"status": *"\([a-z-]*\)".*/\1/p')"
sleep 0.5
sed -n 's/^tpmstate-emu: //p' a.log | grep -E "taken back" || true
"$T" locks nvram.qcow2
quit_side 5; quit_side 6; wait
start_emulator
tpm2_nvread 0x1500016 -C o -s 29 | cmp - secret && echo "NV data after both migrations: intact"
pid=$(cat emu.pid); kill -TERM "$pid"
while kill -0 "$pid" 2>/dev/null; do sleep 0.05; done

step "a TPM swtpm_setup made, as libvirt has it made, moves into tpmstate at its first start, and back out"
mkdir swtpm-state && printf 'vm passphrase' > vtpm.pass && chmod 600 vtpm.pass
swtpm_setup --tpm2 --tpm-state swtpm-state --createek --create-ek-cert --create-platform-cert \
  --pwdfile vtpm.pass --cipher aes-256-cbc --overwrite --logfile setup.log >/dev/null
ek_cert() { tpm2_nvread 0x1c00002 -C o 2>/dev/null | sha256sum | cut -c1-16; }
"$E" socket --tpm2 --daemon --server "type=tcp,port=$port" --ctrl "type=tcp,port=$((port + 1))" \
  --tpmstate "dir=$work/swtpm-state" --key pwdfile=vtpm.pass,mode=aes-256-cbc \
  --flags not-need-init,startup-clear --pid file=emu.pid --log file=dir.log
for _ in $(seq 100); do [ -s emu.pid ] && break; sleep 0.05; done
sed -n 's/^tpmstate-emu: //p' dir.log | grep -E "imported|moved" || true
echo "EK certificate from tpmstate-emu: sha256 $(ek_cert)..."
pid=$(cat emu.pid); kill -TERM "$pid"
while kill -0 "$pid" 2>/dev/null; do sleep 0.05; done
"$T" export-swtpm swtpm-state/tpmstate.qcow2 swtpm-back --passphrase-file vtpm.pass \
  --swtpm-pwdfile vtpm.pass,mode=aes-256-cbc
swtpm socket --tpm2 --daemon --server "type=tcp,port=$port" --ctrl "type=tcp,port=$((port + 1))" \
  --tpmstate "dir=$work/swtpm-back" --key pwdfile=vtpm.pass,mode=aes-256-cbc \
  --flags not-need-init,startup-clear --pid file=swtpm.pid
for _ in $(seq 100); do [ -s swtpm.pid ] && break; sleep 0.05; done
echo "EK certificate from swtpm 0.7.1 on the export: sha256 $(ek_cert)..."
kill -TERM "$(cat swtpm.pid)"

step "final check"
qemu-img check nvram.qcow2
qemu-img check -q swtpm-state/tpmstate.qcow2 && echo "swtpm-state/tpmstate.qcow2: clean"
