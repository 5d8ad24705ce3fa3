//! Opening an image file: the one descriptor a process keeps for an image,
//! refused at once unless it is a regular file.
//!
//! Opening a FIFO blocks until a writer appears, and reading a character
//! device never ends, so `tpmstate info` on one would hang (as `qemu-img`
//! does). The file is therefore opened with `O_NONBLOCK`, checked with
//! `fstat`, and only then switched back to blocking mode. Block devices are
//! refused too: the qcow2 layer sizes the image with `fstat`, which says 0
//! for a device. A leaf module: the image and lock layers both use it.

use nix::fcntl::{fcntl, FcntlArg, OFlag};
use std::fs::{File, FileType};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Why an image file could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// The path names something other than a regular file.
    #[error("{}: is {what}, not an image file", path.display())]
    NotRegular {
        /// The path.
        path: PathBuf,
        /// What it is ("a FIFO", "a socket", ...).
        what: &'static str,
    },
    /// The operating system refused.
    #[error("{}: {op} failed", path.display())]
    Io {
        /// The path.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

impl FileError {
    /// The broad class of this error.
    pub fn kind(&self) -> crate::kind::ErrorKind {
        match self {
            FileError::NotRegular { .. } => crate::kind::ErrorKind::NotAStore,
            FileError::Io { .. } => crate::kind::ErrorKind::Io,
        }
    }
}

fn describe(t: FileType) -> Option<&'static str> {
    match () {
        _ if t.is_file() => None,
        _ if t.is_dir() => Some("a directory"),
        _ if t.is_fifo() => Some("a FIFO"),
        _ if t.is_socket() => Some("a socket"),
        _ if t.is_char_device() => Some("a character device"),
        _ if t.is_block_device() => Some("a block device"),
        _ => Some("not a regular file"),
    }
}

/// Opens the regular file at `path` for reading (and writing when
/// `writable`), in blocking mode, without ever blocking in `open` itself.
pub fn open_regular(path: &Path, writable: bool) -> Result<File, FileError> {
    let io = |op| {
        move |source| FileError::Io {
            path: path.to_path_buf(),
            op,
            source,
        }
    };
    let not_regular = |what| FileError::NotRegular {
        path: path.to_path_buf(),
        what,
    };
    // A socket cannot be opened at all (ENXIO): name it before trying.
    if let Some(what) = std::fs::metadata(path)
        .ok()
        .and_then(|m| describe(m.file_type()))
    {
        return Err(not_regular(what));
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(writable)
        .custom_flags(OFlag::O_NONBLOCK.bits())
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            // No file at the end of the links: nothing that could be an image.
            Some(libc::ELOOP) => not_regular("a loop of symbolic links"),
            _ => io("open")(e),
        })?;
    // The path may have been replaced between the two looks: fstat decides.
    let meta = file.metadata().map_err(io("stat"))?;
    if let Some(what) = describe(meta.file_type()) {
        return Err(not_regular(what));
    }
    let flags = fcntl(file.as_raw_fd(), FcntlArg::F_GETFL)
        .map_err(|e| io("fcntl")(std::io::Error::from(e)))?;
    let blocking = OFlag::from_bits_truncate(flags) - OFlag::O_NONBLOCK;
    fcntl(file.as_raw_fd(), FcntlArg::F_SETFL(blocking))
        .map_err(|e| io("fcntl")(std::io::Error::from(e)))?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fifo_is_refused_at_once_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        for writable in [false, true] {
            let e = open_regular(&fifo, writable).unwrap_err();
            assert!(e.to_string().contains("is a FIFO"), "{e}");
            assert_eq!(e.kind(), crate::kind::ErrorKind::NotAStore);
        }
    }

    #[test]
    fn devices_and_directories_are_refused_and_regular_files_block_normally() {
        let dir = tempfile::tempdir().unwrap();
        for (path, what) in [
            (Path::new("/dev/null"), "a character device"),
            (dir.path(), "a directory"),
        ] {
            let e = open_regular(path, false).unwrap_err();
            assert!(e.to_string().contains(what), "{e}");
        }
        let f = dir.path().join("f");
        std::fs::write(&f, b"x").unwrap();
        let file = open_regular(&f, true).unwrap();
        let flags = fcntl(file.as_raw_fd(), FcntlArg::F_GETFL).unwrap();
        assert!(!OFlag::from_bits_truncate(flags).contains(OFlag::O_NONBLOCK));
    }
}
