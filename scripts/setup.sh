#!/usr/bin/env bash
# Installs what tpmstate's build, demo and tests need and a fresh Debian
# machine with Rust may lack: qemu-utils (qemu-img, qemu-io, qemu-nbd).
set -euo pipefail
need=()
for tool in qemu-img qemu-io qemu-nbd; do
  command -v "$tool" >/dev/null 2>&1 || need+=(qemu-utils)
done
if [ ${#need[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "setup: installing qemu-utils"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq qemu-utils >/dev/null
fi
command -v cargo >/dev/null 2>&1 || { echo "setup: cargo not found; install Rust (rustup) first" >&2; exit 1; }
