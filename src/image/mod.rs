//! The storage under a store: a small [`Disk`] trait and its qcow2
//! implementation ([`Qcow2Disk`]); with the `testing` feature, also an
//! in-memory crash-simulating one for tests (`CrashDisk`).
//!
//! A disk is a byte-addressed area that starts at guest offset 0 of the image.
//! Its length is the part that is allocated and ready for in-place writes;
//! [`Disk::grow`] allocates more (a one-time, crash-safe qcow2 metadata change).

mod direct;
mod qcow2;
mod qcow2_alloc;
pub mod qcow2_header;
pub mod qcow2_leaks;
pub mod qcow2_snapshots;
#[cfg(any(test, feature = "testing"))]
mod sim;

pub use direct::PageBuf;
#[cfg(any(test, feature = "testing"))]
pub use qcow2::MetaFault;
pub use qcow2::{CreateOptions, Qcow2Disk, Qcow2Facts};
pub use qcow2_snapshots::SnapshotEntry;
#[cfg(any(test, feature = "testing"))]
pub use sim::{CrashDisk, CrashPlan, SharedDisk};

use crate::kind::ErrorKind;
use std::path::PathBuf;

/// What the store needs from the storage below it.
pub trait Disk: Send + Sync {
    /// Reads exactly `buf.len()` bytes at `offset` (which must lie below [`Disk::size`]).
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), ImageError>;
    /// Writes `data` at `offset`; not durable until [`Disk::sync`] returns.
    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), ImageError>;
    /// Writes each `(offset, data)` part, as [`Disk::write_at`] would; the
    /// parts of one commit, so a disk may pick the fastest way to write them
    /// all before the next [`Disk::sync`].
    fn write_parts(&mut self, parts: &[(u64, &[u8])]) -> Result<(), ImageError> {
        parts
            .iter()
            .try_for_each(|(offset, data)| self.write_at(*offset, data))
    }
    /// Makes every earlier write durable (one `fdatasync` on a file).
    fn sync(&mut self) -> Result<(), ImageError>;
    /// Reads as [`Disk::read_at`] does, past any cache another host's
    /// writes may have left stale (a shared file system's page cache).
    fn read_fresh(&self, offset: u64, buf: &mut [u8]) -> Result<(), ImageError> {
        self.read_at(offset, buf)
    }
    /// Reads the image's structure again after its lock was taken back:
    /// while it was not held, anything may have changed.
    fn reopen(&mut self) -> Result<(), ImageError> {
        Ok(())
    }
    /// Whether other hosts may write the image too (it lives on a network
    /// or cluster file system), so their writes can hide behind this
    /// host's cache and its locks can be lost to a lease.
    fn on_shared_storage(&self) -> bool {
        false
    }
    /// Whether the image's qcow2 tables are no longer where this disk
    /// mapped them (read past a shared file system's cache): another
    /// writer changed the image's structure.
    fn layout_changed(&self) -> Result<bool, ImageError> {
        Ok(false)
    }
    /// Bytes that are allocated and writable in place.
    fn size(&self) -> u64;
    /// The most bytes [`Disk::grow`] can reach (an image's virtual size).
    fn max_len(&self) -> u64;
    /// Makes at least `min_len` bytes allocated, durably, before it returns.
    /// Fails with [`ImageError::CapacityLimit`] when the image cannot hold that much.
    fn grow(&mut self, min_len: u64) -> Result<(), ImageError>;
    /// The image's internal snapshots (a disk without them has none).
    fn snapshots(&self) -> Result<Vec<SnapshotEntry>, ImageError> {
        Ok(Vec::new())
    }
    /// Creates, deletes or applies an internal snapshot, durably.
    fn change_snapshot(&mut self, op: SnapshotOp<'_>) -> Result<(), ImageError> {
        let _ = op;
        Err(ImageError::Unsupported {
            path: PathBuf::new(),
            feature: "internal snapshots on a disk that is not a qcow2 image".into(),
        })
    }
}

/// A change to an image's internal snapshots, by name (or QEMU's numeric ID).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotOp<'a> {
    /// Takes a snapshot of the active image under this new name.
    Create(&'a str),
    /// Deletes the snapshot.
    Delete(&'a str),
    /// Makes the snapshot's state the active image's (the VM must be off).
    Apply(&'a str),
}

/// Errors of the image layer. Every variant names the file it is about.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The image file could not be opened, or is not a regular file.
    #[error(transparent)]
    File(#[from] crate::file::FileError),
    /// An operating-system call failed.
    #[error("{path}: {op} failed")]
    Io {
        /// The image file.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a qcow2 image.
    #[error("{path}: not a qcow2 image: {reason}")]
    NotQcow2 {
        /// The file.
        path: PathBuf,
        /// Why not.
        reason: String,
    },
    /// The image uses something tpmstate refuses to write.
    #[error("{path}: unsupported qcow2 image: {feature}")]
    Unsupported {
        /// The image file.
        path: PathBuf,
        /// The feature and, where useful, what to do about it.
        feature: String,
    },
    /// The qcow2 structures are damaged.
    #[error("{path}: corrupt qcow2 image: {reason}")]
    Corrupt {
        /// The image file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The image cannot hold the requested store area.
    #[error(
        "{path}: store area cannot grow to {requested} bytes: the image holds at most {max} bytes"
    )]
    CapacityLimit {
        /// The image file.
        path: PathBuf,
        /// Bytes asked for.
        requested: u64,
        /// Bytes the image can hold.
        max: u64,
    },
    /// A snapshot operation that cannot be done as asked.
    #[error("{path}: snapshot {name:?}: {reason}")]
    Snapshot {
        /// The image file.
        path: PathBuf,
        /// The snapshot name given.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// An access outside the allocated area (a bug in the caller, reported, not a panic).
    #[error("{path}: access at {offset}+{len} beyond the allocated area of {area} bytes")]
    OutOfBounds {
        /// The image file.
        path: PathBuf,
        /// Offset asked for.
        offset: u64,
        /// Length asked for.
        len: u64,
        /// Allocated bytes.
        area: u64,
    },
    /// The simulated disk crashed (tests only).
    #[cfg(any(test, feature = "testing"))]
    #[error("simulated crash")]
    Crashed,
}

impl ImageError {
    /// The broad class of this error.
    pub fn kind(&self) -> ErrorKind {
        use ErrorKind as K;
        match self {
            ImageError::File(e) => e.kind(),
            // A full file system (or quota) is no room, not a broken disk.
            ImageError::Io { source, .. }
                if matches!(source.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT)) =>
            {
                K::NoSpace
            }
            ImageError::Io { .. } => K::Io,
            #[cfg(any(test, feature = "testing"))]
            ImageError::Crashed => K::Io,
            ImageError::NotQcow2 { .. } => K::NotAStore,
            ImageError::Unsupported { .. } => K::Unsupported,
            ImageError::Corrupt { .. } | ImageError::OutOfBounds { .. } => K::Corrupt,
            ImageError::CapacityLimit { .. } => K::NoSpace,
            ImageError::Snapshot { .. } => K::Usage,
        }
    }
}
