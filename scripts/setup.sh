#!/usr/bin/env bash
# Installs what tpmstate's build, demo and tests need and a fresh Debian
# machine with Rust may lack:
# - qemu-utils (qemu-img, qemu-io, qemu-nbd);
# - for the emulator: libtpms0, and to test it tpm2-tools with the swtpm
#   TCTI, swtpm 0.7.1 (for comparison), and qemu-system-x86 7.2 with
#   SeaBIOS. Debian's qemu-system-x86 conflicts with a newer qemu-utils, so
#   qemu-utils is named in the same command, at QEMU's version;
# - for the C ABI's tests: a C and a C++ compiler, and valgrind;
# - for the shared-storage tests: GlusterFS's server and client, and
#   iproute2 for the network namespaces the tests make.
set -euo pipefail
command -v cargo >/dev/null 2>&1 || { echo "setup: cargo not found; install Rust (rustup) first" >&2; exit 1; }
# ldconfig lives in /sbin, which a user's PATH may lack.
# grep reads all of ldconfig's output (no -q): with pipefail, an early exit
# would kill ldconfig with SIGPIPE and fail the check for a library present.
have_lib() { PATH="$PATH:/sbin:/usr/sbin" ldconfig -p 2>/dev/null | grep "$1" >/dev/null; }
need=()
command -v qemu-img >/dev/null 2>&1 && command -v qemu-io >/dev/null 2>&1 && command -v qemu-nbd >/dev/null 2>&1 || need+=(qemu-utils)
have_lib libtpms.so.0 || need+=(libtpms0)
command -v swtpm >/dev/null 2>&1 && command -v swtpm_setup >/dev/null 2>&1 || need+=(swtpm swtpm-tools)
command -v tpm2_startup >/dev/null 2>&1 || need+=(tpm2-tools)
have_lib libtss2-tcti-swtpm.so.0 || need+=(libtss2-tcti-swtpm0)
command -v qemu-system-x86_64 >/dev/null 2>&1 || need+=(qemu-system-x86 seabios)
command -v cc >/dev/null 2>&1 || need+=(gcc libc6-dev)
command -v c++ >/dev/null 2>&1 || need+=(g++)
command -v valgrind >/dev/null 2>&1 || need+=(valgrind)
[ -x /usr/sbin/glusterd ] || need+=(glusterfs-server)
[ -x /usr/sbin/glusterfs ] || need+=(glusterfs-client)
[ -x /usr/sbin/ip ] || [ -x /sbin/ip ] || need+=(iproute2)
[ ${#need[@]} -eq 0 ] && exit 0
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "setup: installing ${need[*]}"
$sudo apt-get update -qq
pkgs=()
for p in "${need[@]}"; do [ "$p" = qemu-utils ] || pkgs+=("$p"); done
if printf '%s\n' "${need[@]}" | grep -q '^qemu-system-x86$'; then
  # qemu-utils at qemu-system-x86's own version (a downgrade if a newer one is installed).
  v=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/ {print $2}')
  pkgs+=("qemu-utils=$v")
elif printf '%s\n' "${need[@]}" | grep -q '^qemu-utils$'; then
  pkgs+=(qemu-utils)
fi
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends --allow-downgrades "${pkgs[@]}" >/dev/null
