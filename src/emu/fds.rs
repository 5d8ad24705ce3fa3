//! File descriptors handed to the process by its parent (`--key fd=`,
//! `--log fd=`, `--pid fd=`, `--server fd=`, `--ctrl fd=|clientfd=`) or by
//! QEMU over the control socket (SET_DATAFD). Taking ownership of a bare
//! descriptor number is the one unsafe step outside libtpms; it happens
//! here only, once per number.
#![allow(unsafe_code)]

use std::collections::HashSet;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::sync::Mutex;

/// Descriptor numbers already taken from the command line.
static TAKEN: Mutex<Option<HashSet<RawFd>>> = Mutex::new(None);

/// Takes ownership of inherited descriptor `fd`: it must be open, and no
/// other option may have taken the same number.
pub fn take(fd: RawFd) -> Result<OwnedFd, String> {
    if fd < 0 {
        return Err(format!("fd={fd} is not a file descriptor"));
    }
    if fd <= 2 {
        return Err(format!(
            "fd={fd} is standard input, output or error, not a descriptor handed over"
        ));
    }
    let mut taken = TAKEN
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if !taken.get_or_insert_with(HashSet::new).insert(fd) {
        return Err(format!("fd={fd} is named by two options"));
    }
    nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD)
        .map_err(|e| format!("fd={fd} is not an open file descriptor ({e})"))?;
    // SAFETY: `fd` is open (F_GETFD succeeded), was handed to this process
    // for this one use, and is taken at most once (the set above), so the
    // returned OwnedFd is its only owner and closes it exactly once.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Takes ownership of a descriptor the kernel just installed for this
/// process from an SCM_RIGHTS control message.
pub fn take_received(fd: RawFd) -> OwnedFd {
    // SAFETY: recvmsg() installed `fd` in this process's table for this
    // message only; nothing else knows its number, so this is its one owner.
    unsafe { OwnedFd::from_raw_fd(fd) }
}
