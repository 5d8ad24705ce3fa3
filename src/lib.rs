//! tpmstate keeps a virtual TPM's state blobs (`permall`, `volatilestate`,
//! `savestate`, ...) crash-safe and encrypted inside a qcow2 image.
//!
//! Layers, top to bottom (a module only uses the ones below it):
//! - [`migration`]: release on a migration source, claim-and-validate on a target;
//! - [`store`]: open/recover, transactions, one-sync commits, rekey, check;
//! - [`format`] (on-disk structures, CBOR, checksums; no I/O) and [`crypto`]
//!   (keys, AES-256-GCM);
//! - [`image`]: the qcow2 file behind the small [`image::Disk`] trait, plus an
//!   in-memory crash-simulating disk for tests; [`lock`] sits beside it on the
//!   same file descriptor and speaks QEMU's image-locking protocol.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod crypto;
pub mod format;
pub mod image;
pub mod lock;
pub mod migration;
pub mod store;

pub use crypto::{Key, KeySource};
pub use lock::{LockMode, Locking};
pub use store::{OpenOptions, Store, StoreError, Transaction};

/// The broad class of a failure; the CLI turns it into its exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Bad command-line usage or a bad argument to an API call.
    Usage,
    /// The file is not a qcow2 image, or the image holds no tpmstate store.
    NotAStore,
    /// The image or the store inside it is damaged.
    Corrupt,
    /// The store is encrypted and no key was given.
    KeyMissing,
    /// The key does not open this store (or a key was given for a plaintext store).
    WrongKey,
    /// Another process (or handle) holds a conflicting lock on the image.
    Locked,
    /// The image uses a feature tpmstate refuses to write (snapshots, small clusters, ...).
    Unsupported,
    /// An operating-system I/O error.
    Io,
}

impl ErrorKind {
    /// The CLI's exit code for this kind (documented in `tpmstate --help`).
    pub fn exit_code(self) -> i32 {
        match self {
            ErrorKind::Usage => 1,
            ErrorKind::NotAStore => 2,
            ErrorKind::Corrupt => 3,
            ErrorKind::KeyMissing => 4,
            ErrorKind::WrongKey => 5,
            ErrorKind::Locked => 6,
            ErrorKind::Unsupported => 7,
            ErrorKind::Io => 8,
        }
    }
}

/// The handles an emulator shares between threads must stay `Send + Sync`.
const _: () = {
    const fn send_sync<T: Send + Sync>() {}
    send_sync::<Store>();
    send_sync::<lock::ImageLock>();
    send_sync::<lock::LockGuard>();
};
