//! File descriptors handed to the process by its parent (`--key fd=`,
//! `--log fd=`, `--pid fd=`, `--server fd=`, `--ctrl fd=|clientfd=`) or by
//! QEMU over the control socket (SET_DATAFD). Taking ownership of a bare
//! descriptor number is the one unsafe step outside libtpms; it happens
//! here only, once per number, and only for numbers that were open when
//! the process started: a number the emulator opened itself (the image,
//! a log) can never be taken for an option.
#![allow(unsafe_code)]

use std::collections::HashSet;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::sync::Mutex;

/// Numbers open at start (`None` until [`record_inherited`]), less those taken.
static INHERITED: Mutex<Option<HashSet<RawFd>>> = Mutex::new(None);

/// Records the descriptors open at start. Call first thing in `main`,
/// before anything opens a file.
pub fn record_inherited() {
    // Listing the directory opens a descriptor of its own: leave it out.
    let listing = std::path::PathBuf::from(format!("/proc/{}/fd", std::process::id()));
    let open: HashSet<RawFd> = std::fs::read_dir("/proc/self/fd")
        .map(|dir| {
            dir.filter_map(|e| {
                let e = e.ok()?;
                let fd: RawFd = e.file_name().to_str()?.parse().ok()?;
                (fd > 2 && std::fs::read_link(e.path()).ok()? != listing).then_some(fd)
            })
            .collect()
        })
        .unwrap_or_default();
    *INHERITED.lock().unwrap_or_else(|p| p.into_inner()) = Some(open);
}

/// Takes ownership of inherited descriptor `fd`: it must have been open
/// when the process started, and not taken by another option.
pub fn take(fd: RawFd) -> Result<OwnedFd, String> {
    if (0..=2).contains(&fd) {
        return Err(format!(
            "fd={fd} is standard input, output or error, not a descriptor handed over"
        ));
    }
    let mut inherited = INHERITED.lock().unwrap_or_else(|p| p.into_inner());
    let set = inherited.get_or_insert_with(HashSet::new);
    if !set.remove(&fd) {
        return Err(format!(
            "fd={fd} was not open when tpmstate-emu started, or another option took it"
        ));
    }
    // The listing at start may still hold a descriptor closed since (the
    // one that listed /proc/self/fd itself): check it is open now.
    nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD)
        .map_err(|e| format!("fd={fd} is not an open file descriptor ({e})"))?;
    // SAFETY: `fd` was open when the process started, before it opened
    // anything itself, so it was handed over by the parent; it is open now
    // (F_GETFD); and it has been removed from the set, so this OwnedFd is
    // its only owner and closes it exactly once.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Reads from socket `sock` into `buf` with the descriptors passed along
/// (SCM_RIGHTS), each owned by the caller.
pub fn recv_with_fds(sock: RawFd, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    let mut iov = [io::IoSliceMut::new(buf)];
    let mut space = nix::cmsg_space!([RawFd; 4]);
    let msg = recvmsg::<()>(sock, &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)
        .map_err(io::Error::from)?;
    let mut fds = Vec::new();
    for cmsg in msg.cmsgs().map_err(io::Error::from)? {
        if let ControlMessageOwned::ScmRights(received) = cmsg {
            // SAFETY: recvmsg() just installed each of these descriptors in
            // this process's table for this message; nothing else knows
            // their numbers, so each OwnedFd is the only owner.
            fds.extend(
                received
                    .into_iter()
                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
            );
        }
    }
    Ok((msg.bytes, fds))
}
