#!/bin/sh
# Installed as `swtpm` ahead of Debian's /usr/bin/swtpm in PATH (for
# example as /usr/local/bin/swtpm), this makes libvirt start tpmstate-emu
# for its VMs' TPMs without any change to libvirt:
#   install -m 755 scripts/swtpm-wrapper.sh /usr/local/bin/swtpm
# libvirt probes `swtpm --print-capabilities` and starts `swtpm socket
# --tpm2 --tpmstate dir=D ...`: both go to tpmstate-emu, which keeps the
# TPM in D/tpmstate.qcow2 and imports swtpm's files found in D once.
# swtpm_setup, which manufactures a new TPM (EK, certificates) in swtpm's
# files, runs the real swtpm: its probes come from swtpm_setup itself, and
# the TPM it manufactures (started through a double fork, so its parent is
# no longer swtpm_setup) is the only caller that passes the control channel
# as `clientfd=` or asks `--print-states`; libvirt does neither.
# TPMSTATE_EMU and TPMSTATE_REAL_SWTPM override the two programs' paths.
real=${TPMSTATE_REAL_SWTPM:-/usr/bin/swtpm}
emu=${TPMSTATE_EMU:-tpmstate-emu}
if [ "$(cat "/proc/$PPID/comm" 2>/dev/null)" = swtpm_setup ]; then
    exec "$real" "$@"
fi
for arg in "$@"; do
    case $arg in
        --print-states | *clientfd=*) exec "$real" "$@" ;;
    esac
done
exec "$emu" "$@"
