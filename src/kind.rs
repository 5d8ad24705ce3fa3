//! The broad class of every failure, at the bottom of the layers so that each
//! error enum (image, lock, crypto, store, migration) maps itself to a class
//! in one `kind()` method without importing anything above it. The CLI turns
//! the class into its exit code.

/// The broad class of a failure; the CLI turns it into its exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Bad command-line usage or a bad argument to an API call.
    Usage,
    /// The file is not a qcow2 image (or not a regular file), or the image
    /// holds no tpmstate store.
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
    /// The store area, or the image around it, has no room for what was asked.
    NoSpace,
    /// An internal invariant failed: a bug in tpmstate, reported instead of a panic.
    Internal,
    /// The store is older than the caller expects, or not the store it
    /// expects, or opening it would serve an older generation than one on
    /// disk (a rollback the caller did not accept).
    Rollback,
}

impl ErrorKind {
    /// The CLI's exit code for this class (documented in `tpmstate --help`
    /// and `docs/architecture.md`).
    pub fn exit_code(self) -> u8 {
        match self {
            ErrorKind::Usage => 1,
            ErrorKind::NotAStore => 2,
            ErrorKind::Corrupt => 3,
            ErrorKind::KeyMissing => 4,
            ErrorKind::WrongKey => 5,
            ErrorKind::Locked => 6,
            ErrorKind::Unsupported => 7,
            ErrorKind::Io => 8,
            ErrorKind::NoSpace => 9,
            ErrorKind::Internal => 10,
            ErrorKind::Rollback => 11,
        }
    }
}

impl ErrorKind {
    /// Every class, in exit-code order.
    pub const ALL: [ErrorKind; 11] = [
        ErrorKind::Usage,
        ErrorKind::NotAStore,
        ErrorKind::Corrupt,
        ErrorKind::KeyMissing,
        ErrorKind::WrongKey,
        ErrorKind::Locked,
        ErrorKind::Unsupported,
        ErrorKind::Io,
        ErrorKind::NoSpace,
        ErrorKind::Internal,
        ErrorKind::Rollback,
    ];

    /// The class whose exit code is `code` (for an exit code passed on by
    /// another process, such as the emulator's answer to `tpmstate
    /// snapshot`); `None` for 0 and codes no class has.
    pub fn from_exit_code(code: u8) -> Option<ErrorKind> {
        ErrorKind::ALL.into_iter().find(|k| k.exit_code() == code)
    }
}

/// An error's message followed by its causes', joined by `: `, each once
/// (the modules keep causes in `source()`, never in the message).
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cur = c.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_class_comes_back_from_its_exit_code() {
        for k in ErrorKind::ALL {
            assert_eq!(ErrorKind::from_exit_code(k.exit_code()), Some(k));
        }
        assert_eq!(ErrorKind::from_exit_code(0), None);
        assert_eq!(ErrorKind::from_exit_code(12), None);
    }
}
