//! The byte-level part of QEMU's protocol: read-lock bytes, test for conflicts
//! with a write-lock probe, roll back. One call moves the held set from one
//! permission state to another exactly as QEMU's `raw_handle_perm_lock` does.

use super::{Perm, PermSet};
use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg};
use std::fs::File;
use std::os::fd::AsRawFd;

/// Which fcntl flavour carries the locks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavour {
    /// Open-file-description locks (per open(), survive other closes).
    Ofd,
    /// Classic POSIX locks (per process; lost when any descriptor of the file closes).
    Posix,
}

/// A conflict found while changing permissions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Conflict {
    /// Somebody else unshares a permission we want to use.
    Unshared(Perm),
    /// Somebody else uses a permission we want to unshare.
    Used(Perm),
    /// A byte could not even be read-locked (a foreign write lock on it).
    Byte(u64),
}

fn flock(kind: i32, byte: u64) -> libc::flock {
    // l_pid must be 0 for OFD locks.
    libc::flock {
        l_type: kind as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: byte as libc::off_t,
        l_len: 1,
        l_pid: 0,
    }
}

fn set(file: &File, flavour: Flavour, kind: i32, byte: u64) -> Result<(), Errno> {
    let fl = flock(kind, byte);
    let arg = match flavour {
        Flavour::Ofd => FcntlArg::F_OFD_SETLK(&fl),
        Flavour::Posix => FcntlArg::F_SETLK(&fl),
    };
    fcntl(file.as_raw_fd(), arg).map(|_| ())
}

/// Whether another description holds a lock on `byte` (a write-lock probe).
fn taken(file: &File, flavour: Flavour, byte: u64) -> Result<bool, Errno> {
    let mut fl = flock(libc::F_WRLCK, byte);
    let arg = match flavour {
        Flavour::Ofd => FcntlArg::F_OFD_GETLK(&mut fl),
        Flavour::Posix => FcntlArg::F_GETLK(&mut fl),
    };
    fcntl(file.as_raw_fd(), arg)?;
    Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
}

/// Whether OFD locks work here (probed on the file itself).
pub fn ofd_available(file: &File) -> bool {
    let mut fl = flock(libc::F_WRLCK, 0);
    fcntl(file.as_raw_fd(), FcntlArg::F_OFD_GETLK(&mut fl)).is_ok()
}

fn bytes(p: PermSet) -> Vec<u64> {
    let mut v: Vec<u64> = Perm::ALL
        .iter()
        .filter(|x| p.uses.has(**x))
        .map(|x| 100 + x.index())
        .collect();
    v.extend(
        Perm::ALL
            .iter()
            .filter(|x| p.unshares.has(**x))
            .map(|x| 200 + x.index()),
    );
    v
}

/// Moves the held bytes from `old` to `new`: lock the union, check, then drop
/// to exactly `new`; on a conflict drop back to exactly `old`.
pub fn change(
    file: &File,
    flavour: Flavour,
    old: PermSet,
    new: PermSet,
) -> Result<Result<(), Conflict>, Errno> {
    let old_bytes = bytes(old);
    let new_bytes = bytes(new);
    let mut union = old_bytes.clone();
    union.extend(new_bytes.iter().filter(|b| !old_bytes.contains(b)));
    let restore = |keep: &[u64]| -> Result<(), Errno> {
        for b in union.iter().filter(|b| !keep.contains(b)) {
            set(file, flavour, libc::F_UNLCK, *b)?;
        }
        Ok(())
    };
    for b in &union {
        match set(file, flavour, libc::F_RDLCK, *b) {
            Ok(()) => {}
            Err(Errno::EAGAIN) | Err(Errno::EACCES) => {
                restore(&old_bytes)?;
                return Ok(Err(Conflict::Byte(*b)));
            }
            Err(e) => {
                restore(&old_bytes)?;
                return Err(e);
            }
        }
    }
    // QEMU's order: first every permission we use, then every one we unshare.
    let mut conflict = None;
    for p in Perm::ALL {
        if new.uses.has(p) && taken(file, flavour, 200 + p.index())? {
            conflict = Some(Conflict::Unshared(p));
            break;
        }
    }
    for p in Perm::ALL {
        if conflict.is_none() && new.unshares.has(p) && taken(file, flavour, 100 + p.index())? {
            conflict = Some(Conflict::Used(p));
        }
    }
    match conflict {
        Some(c) => {
            restore(&old_bytes)?;
            Ok(Err(c))
        }
        None => {
            restore(&new_bytes)?;
            Ok(Ok(()))
        }
    }
}
