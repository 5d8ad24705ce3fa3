//! QEMU's image-locking protocol on the image's one file descriptor, with
//! counted acquisitions (`docs/locking.md`).
//!
//! An [`ImageLock`] owns the protocol state of one open file description. Each
//! [`ImageLock::acquire`] returns a [`LockGuard`]; the fcntl locks change only
//! when the strongest mode held changes: the first guard takes them, nested
//! guards of the same or a weaker mode only count, a stronger guard upgrades
//! through the protocol (and on conflict leaves the held mode as it was), and
//! dropping guards steps back down to the strongest mode still held, down to
//! nothing. Counts live in the handle and only guards decrement them, so an
//! unbalanced release cannot be written.

mod holders;
mod protocol;

pub use holders::{file_key, scan as scan_holders, Holder};
pub use protocol::Flavour;

use nix::errno::Errno;
use protocol::Conflict;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// One of QEMU's block permissions, in bit order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Perm {
    /// "consistent read" (bytes 100/200).
    ConsistentRead,
    /// "write" (101/201).
    Write,
    /// "write unchanged" (102/202).
    WriteUnchanged,
    /// "resize" (103/203).
    Resize,
}

impl Perm {
    /// All permissions, in byte order.
    pub const ALL: [Perm; 4] = [
        Perm::ConsistentRead,
        Perm::Write,
        Perm::WriteUnchanged,
        Perm::Resize,
    ];
    /// Offset from the base byte (100 or 200).
    pub fn index(self) -> u64 {
        self as u64
    }
    /// The name QEMU prints.
    pub fn name(self) -> &'static str {
        ["consistent read", "write", "write unchanged", "resize"][self as usize]
    }
    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

/// A set of permissions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Perms(u8);

impl Perms {
    /// Whether `p` is in the set.
    pub fn has(self, p: Perm) -> bool {
        self.0 & p.bit() != 0
    }
    fn of(list: &[Perm]) -> Perms {
        Perms(list.iter().fold(0, |a, p| a | p.bit()))
    }
}

/// What a holder uses and what it refuses to share.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PermSet {
    /// Permissions used (bytes 100+i).
    pub uses: Perms,
    /// Permissions not shared with others (bytes 200+i).
    pub unshares: Perms,
}

/// Lock modes, weakest first; each one's bytes include the weaker ones'.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LockMode {
    /// Diagnostics with `-U`: uses read, unshares nothing.
    ForceShareRead,
    /// Read-only tools (`info`, `get`, `check`): uses read, unshares write and resize.
    Shared,
    /// A running emulator, `put`, `rm`: uses read, write, resize; unshares write, resize.
    Writer,
    /// Migration target while validating, `rekey`, `format`: unshares everything.
    Exclusive,
}

impl LockMode {
    /// All modes, weakest first.
    pub const ALL: [LockMode; 4] = [
        LockMode::ForceShareRead,
        LockMode::Shared,
        LockMode::Writer,
        LockMode::Exclusive,
    ];

    /// The permissions this mode holds.
    pub fn perms(self) -> PermSet {
        use Perm::*;
        let (uses, unshares): (&[Perm], &[Perm]) = match self {
            LockMode::ForceShareRead => (&[ConsistentRead], &[]),
            LockMode::Shared => (&[ConsistentRead], &[Write, Resize]),
            LockMode::Writer => (&[ConsistentRead, Write, Resize], &[Write, Resize]),
            LockMode::Exclusive => (&[ConsistentRead, Write, Resize], &Perm::ALL),
        };
        PermSet {
            uses: Perms::of(uses),
            unshares: Perms::of(unshares),
        }
    }
}

/// QEMU's `locking=` option.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Locking {
    /// OFD locks; POSIX locks with a warning where OFD locks are unavailable.
    #[default]
    Auto,
    /// OFD locks, or an error.
    On,
    /// No locks at all (counts are still kept).
    Off,
}

/// Errors of the lock layer.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another holder conflicts.
    #[error("{}: {}{}; is another process using the image?", path.display(), describe(*conflict), holders_text(holders))]
    Conflict {
        /// The image.
        path: PathBuf,
        /// What conflicts.
        conflict: ConflictKind,
        /// Who holds the conflicting bytes, where /proc shows it.
        holders: Vec<Holder>,
    },
    /// `locking=on` but OFD locks are not available.
    #[error("{}: OFD locks are not available on this file system (use locking=auto or off)", path.display())]
    Unavailable {
        /// The image.
        path: PathBuf,
    },
    /// The image file could not be opened.
    #[error(transparent)]
    Open(#[from] crate::file::FileError),
    /// fcntl failed for another reason.
    #[error("{}: fcntl lock call failed", path.display())]
    Io {
        /// The image.
        path: PathBuf,
        /// The errno.
        #[source]
        source: Errno,
    },
}

/// What kind of conflict blocked a lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConflictKind {
    /// Another holder unshares a permission this mode uses.
    UnsharedByOther(Perm),
    /// Another holder uses a permission this mode unshares.
    UsedByOther(Perm),
    /// A foreign write lock sits on a protocol byte.
    ByteLocked(u64),
}

fn describe(c: ConflictKind) -> String {
    match c {
        ConflictKind::UnsharedByOther(p) => {
            format!(
                "Failed to get \"{0}\" lock: another holder does not share \"{0}\"",
                p.name()
            )
        }
        ConflictKind::UsedByOther(p) => {
            format!(
                "Failed to get shared \"{0}\" lock: another holder uses \"{0}\"",
                p.name()
            )
        }
        ConflictKind::ByteLocked(b) => {
            format!("Failed to lock byte {b}: another holder has a write lock on it")
        }
    }
}

fn holders_text(h: &[Holder]) -> String {
    if h.is_empty() {
        return String::new();
    }
    let list: Vec<String> = h.iter().map(Holder::to_string).collect();
    format!(" (held by {})", list.join(", "))
}

impl LockError {
    /// The broad class of this error.
    pub fn kind(&self) -> crate::kind::ErrorKind {
        match self {
            LockError::Conflict { .. } => crate::kind::ErrorKind::Locked,
            LockError::Unavailable { .. } => crate::kind::ErrorKind::Unsupported,
            LockError::Open(e) => e.kind(),
            LockError::Io { .. } => crate::kind::ErrorKind::Io,
        }
    }
}

#[derive(Debug, Default)]
struct Counts {
    /// Live guards per mode.
    per_mode: [usize; 4],
    /// The mode whose bytes are set (the strongest with a live guard).
    held: Option<LockMode>,
}

impl Counts {
    fn strongest(&self) -> Option<LockMode> {
        LockMode::ALL
            .into_iter()
            .rev()
            .find(|m| self.per_mode[*m as usize] > 0)
    }
}

#[derive(Debug)]
struct Inner {
    path: PathBuf,
    /// `None` for a detached lock (a disk with no file behind it).
    file: Option<Arc<File>>,
    flavour: Option<Flavour>,
    counts: Mutex<Counts>,
}

/// The lock state of one open image. Cheap to clone; `Send + Sync`.
#[derive(Debug, Clone)]
pub struct ImageLock {
    inner: Arc<Inner>,
}

/// Proof of one acquisition; dropping it releases that acquisition.
#[derive(Debug)]
#[must_use = "the lock is released when the guard is dropped"]
pub struct LockGuard {
    inner: Arc<Inner>,
    mode: LockMode,
}

impl LockGuard {
    /// The mode this guard acquired.
    pub fn mode(&self) -> LockMode {
        self.mode
    }
}

fn perms_of(m: Option<LockMode>) -> PermSet {
    m.map(LockMode::perms).unwrap_or_default()
}

impl Inner {
    fn lock_counts(&self) -> MutexGuard<'_, Counts> {
        // A panic while holding this mutex cannot leave counts half-updated
        // (each update is one assignment), so a poisoned lock is still sound.
        self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn change(
        &self,
        old: Option<LockMode>,
        new: Option<LockMode>,
    ) -> Result<Result<(), Conflict>, Errno> {
        match (&self.file, self.flavour) {
            (Some(file), Some(f)) if old != new => {
                protocol::change(file, f, perms_of(old), perms_of(new))
            }
            _ => Ok(Ok(())),
        }
    }
}

impl ImageLock {
    /// Opens the image file at `path` (read-write when `writable`; a FIFO,
    /// socket or device is refused at once) and makes its lock state, for a
    /// caller that locks an image without opening a store in it
    /// (`tpmstate lock -- CMD`). Returns a warning as [`ImageLock::new`] does.
    pub fn open(
        path: &Path,
        writable: bool,
        locking: Locking,
    ) -> Result<(ImageLock, Option<String>), LockError> {
        let file = crate::file::open_regular(path, writable)?;
        ImageLock::new(path, Arc::new(file), locking)
    }

    /// Lock state with no file behind it: acquisitions are counted, nothing
    /// is locked. For a store on an in-memory disk, which the store owns
    /// alone, so that it gets the same handle types as an image.
    pub fn detached(path: &Path) -> ImageLock {
        let inner = Inner {
            path: path.to_path_buf(),
            file: None,
            flavour: None,
            counts: Mutex::default(),
        };
        ImageLock {
            inner: Arc::new(inner),
        }
    }

    /// Lock state for `file` (the image's only descriptor in this process).
    /// Returns a warning to show the user when POSIX locks are used.
    pub fn new(
        path: &Path,
        file: Arc<File>,
        locking: Locking,
    ) -> Result<(ImageLock, Option<String>), LockError> {
        let (flavour, warning) = match locking {
            Locking::Off => (None, None),
            _ if protocol::ofd_available(&file) => (Some(Flavour::Ofd), None),
            Locking::On => {
                return Err(LockError::Unavailable {
                    path: path.to_path_buf(),
                })
            }
            Locking::Auto => (
                Some(Flavour::Posix),
                Some(format!(
                    "{}: OFD locks unavailable, using POSIX locks, which can be lost unexpectedly",
                    path.display()
                )),
            ),
        };
        Ok((ImageLock::with_flavour(path, file, flavour), warning))
    }

    /// Lock state for `file` that uses `flavour` without probing (`None`: no
    /// locks at all). [`ImageLock::new`] chooses for QEMU's `locking=` option;
    /// this is for callers that know better, such as tests of the POSIX
    /// fallback on a kernel that has OFD locks.
    pub fn with_flavour(path: &Path, file: Arc<File>, flavour: Option<Flavour>) -> ImageLock {
        let inner = Inner {
            path: path.to_path_buf(),
            file: Some(file),
            flavour,
            counts: Mutex::default(),
        };
        ImageLock {
            inner: Arc::new(inner),
        }
    }

    /// Whether acquisitions take OFD locks on the file: locks no other
    /// descriptor's close can drop (false for POSIX locks, with
    /// `locking=off`, and for a detached lock, which only counts).
    pub fn has_ofd_locks(&self) -> bool {
        self.inner.file.is_some() && self.inner.flavour == Some(Flavour::Ofd)
    }

    /// The strongest mode currently held, if any.
    pub fn held(&self) -> Option<LockMode> {
        self.inner.lock_counts().held
    }

    /// Acquires `mode`. Without a timeout it tries once; with one it retries
    /// every 10 ms until the timeout passes.
    pub fn acquire(
        &self,
        mode: LockMode,
        timeout: Option<Duration>,
    ) -> Result<LockGuard, LockError> {
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            match self.try_acquire(mode)? {
                Ok(guard) => return Ok(guard),
                Err(conflict) => {
                    if deadline.is_none_or(|d| Instant::now() >= d) {
                        return Err(self.conflict_error(conflict));
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
    }

    fn try_acquire(&self, mode: LockMode) -> Result<Result<LockGuard, Conflict>, LockError> {
        let mut counts = self.inner.lock_counts();
        let target = counts.held.max(Some(mode));
        let outcome = self
            .inner
            .change(counts.held, target)
            .map_err(|source| LockError::Io {
                path: self.inner.path.clone(),
                source,
            })?;
        if let Err(c) = outcome {
            return Ok(Err(c));
        }
        counts.held = target;
        counts.per_mode[mode as usize] += 1;
        Ok(Ok(LockGuard {
            inner: self.inner.clone(),
            mode,
        }))
    }

    fn conflict_error(&self, c: Conflict) -> LockError {
        let conflict = match c {
            Conflict::Unshared(p) => ConflictKind::UnsharedByOther(p),
            Conflict::Used(p) => ConflictKind::UsedByOther(p),
            Conflict::Byte(b) => ConflictKind::ByteLocked(b),
        };
        LockError::Conflict {
            path: self.inner.path.clone(),
            conflict,
            holders: self.holders(),
        }
    }

    /// Other descriptors (in any process) holding protocol bytes on this image.
    pub fn holders(&self) -> Vec<Holder> {
        use std::os::fd::AsRawFd;
        let Some(file) = &self.inner.file else {
            return Vec::new();
        };
        let Some(key) = file_key(file) else {
            return Vec::new();
        };
        holders::scan(&key, Some((std::process::id() as i32, file.as_raw_fd())))
    }
}

/// Every process holding protocol bytes on the image at `path` (this one
/// included), from `/proc`. It opens and closes a descriptor of its own:
/// with POSIX locks (the `locking=auto` fallback) closing any descriptor of
/// a file drops all of this process's locks on it, so a process holding the
/// image that way must not call it (the CLI's `locks` command holds none).
pub fn holders_of(path: &Path) -> Result<Vec<Holder>, LockError> {
    let file = crate::file::open_regular(path, false)?;
    let key = file_key(&file).ok_or_else(|| crate::file::FileError::Io {
        path: path.to_path_buf(),
        op: "stat",
        source: std::io::Error::other("fstat failed"),
    })?;
    Ok(holders::scan(&key, None))
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        let mut counts = self.inner.lock_counts();
        counts.per_mode[self.mode as usize] -= 1;
        let next = counts.strongest();
        if next != counts.held {
            // Stepping down only unlocks bytes, which cannot conflict; the only
            // possible failure is EBADF on a closed descriptor, and then the
            // kernel has dropped the locks already.
            let _ = self.inner.change(counts.held, next);
            counts.held = next;
        }
    }
}
