//! Commit writes that bypass the page cache.
//!
//! A commit writes whole 4 KiB blocks and then calls `fdatasync`. Written
//! through the page cache, the bytes are first copied into cached pages, and
//! `fdatasync` then has to find those dirty pages and write them back. With
//! `O_DIRECT` the `pwrite` sends the caller's buffer to the device itself,
//! and `fdatasync` is left with the device cache flush (and any journal
//! commit). On the reference VM a raw write plus `fdatasync` took 2-7% less
//! time that way (`docs/performance.md`). Durability is unchanged: `O_DIRECT` alone
//! promises nothing, so [`super::Disk::sync`] still issues its `fdatasync`,
//! which covers every write to the inode, through either descriptor.
//!
//! `O_DIRECT` needs the buffer's address, its length and the file offset
//! aligned to the device's block size. [`PageBuf`] gives page-aligned
//! buffers; writes that are not aligned, file systems without `O_DIRECT`
//! (`EINVAL` at open or at the first write) and read-only descriptors all
//! use the ordinary descriptor instead. The direct descriptor is opened on
//! the first aligned write, through `/proc/self/fd`, so it is the very file
//! the caller opened and locked; it holds no lock itself, and since QEMU's
//! protocol uses open-file-description locks, opening and closing it leaves
//! the caller's locks alone.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};

/// The alignment every direct write keeps: address, length and file offset.
/// 4 KiB covers the logical block size and DMA alignment of the usual
/// devices; a device that needs more answers `EINVAL` and gets buffered writes.
pub const PAGE: usize = 4096;

/// One page of a [`PageBuf`]; the alignment is what matters.
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C, align(4096))]
struct Page([u8; PAGE]);

/// A growable, zero-filled byte buffer that starts on a page boundary, so a
/// disk can write it without the page cache.
#[derive(Default)]
pub struct PageBuf {
    pages: Vec<Page>,
    len: usize,
}

impl PageBuf {
    /// Makes the buffer `len` zero bytes long, reusing its allocation.
    pub fn reset_zeroed(&mut self, len: usize) {
        self.pages.clear();
        self.pages
            .resize(len.div_ceil(PAGE), bytemuck::Zeroable::zeroed());
        self.len = len;
    }

    /// The buffer's bytes.
    pub fn bytes(&self) -> &[u8] {
        &bytemuck::cast_slice(&self.pages)[..self.len]
    }

    /// The buffer's bytes, to fill.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        &mut bytemuck::cast_slice_mut(&mut self.pages)[..self.len]
    }

    /// Bytes allocated, whatever the current length.
    pub fn capacity(&self) -> usize {
        self.pages.capacity() * PAGE
    }
}

/// Whether `data`, written at file offset `at`, meets [`PAGE`] alignment.
pub(super) fn aligned(data: &[u8], at: u64) -> bool {
    (data.as_ptr() as usize).is_multiple_of(PAGE)
        && data.len().is_multiple_of(PAGE)
        && at.is_multiple_of(PAGE as u64)
}

/// The `O_DIRECT` descriptor of one image file, opened on first use.
#[derive(Debug, Default)]
pub(super) enum DirectFile {
    /// Not needed yet.
    #[default]
    Untried,
    /// Open and working.
    Open(File),
    /// Not possible here: every write goes through the page cache.
    Unavailable,
}

impl DirectFile {
    /// The direct descriptor for `file`, opening it if this is the first use.
    pub(super) fn get(&mut self, file: &File) -> Option<&File> {
        if let DirectFile::Untried = self {
            *self = match open_direct(file) {
                Some(direct) => DirectFile::Open(direct),
                None => DirectFile::Unavailable,
            };
        }
        match self {
            DirectFile::Open(direct) => Some(direct),
            _ => None,
        }
    }

    /// Writes `data` at `at` through the direct descriptor. `Ok(false)` means
    /// this file system refused `O_DIRECT` (from now on, nothing is tried):
    /// the caller writes through the page cache instead, which rewrites
    /// anything a partial direct write left.
    pub(super) fn write(&mut self, file: &File, data: &[u8], at: u64) -> std::io::Result<bool> {
        let Some(direct) = self.get(file) else {
            return Ok(false);
        };
        match direct.write_all_at(data, at) {
            Ok(()) => Ok(true),
            Err(e) if e.raw_os_error() == Some(nix::libc::EINVAL) => {
                *self = DirectFile::Unavailable;
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// Whether direct writes are in use (after the first aligned write).
    #[cfg(test)]
    pub(super) fn in_use(&self) -> bool {
        matches!(self, DirectFile::Open(_))
    }
}

/// Reopens `file` for direct writes, if it was opened for writing and the
/// file system accepts `O_DIRECT`.
fn open_direct(file: &File) -> Option<File> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let flags = OFlag::from_bits_truncate(fcntl(file.as_raw_fd(), FcntlArg::F_GETFL).ok()?);
    if !flags.intersects(OFlag::O_WRONLY | OFlag::O_RDWR) {
        return None;
    }
    std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(OFlag::O_DIRECT.bits())
        .open(format!("/proc/self/fd/{}", file.as_raw_fd()))
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_buffers_start_on_a_page_and_come_back_zeroed() {
        let mut buf = PageBuf::default();
        buf.reset_zeroed(3 * PAGE);
        assert!(aligned(buf.bytes(), 0));
        buf.bytes_mut().fill(0xaa);
        buf.reset_zeroed(2 * PAGE + 1);
        assert_eq!(buf.bytes().len(), 2 * PAGE + 1);
        assert!(buf.bytes().iter().all(|&b| b == 0));
        assert!(
            !aligned(buf.bytes(), 0),
            "a length off the page is not aligned"
        );
        assert!(!aligned(&buf.bytes()[..PAGE], 512));
        assert!(!aligned(&buf.bytes()[1..PAGE + 1], 0));
    }

    #[test]
    fn read_only_descriptors_get_no_direct_writer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, [0u8; PAGE]).unwrap();
        let file = File::open(&path).unwrap();
        let mut direct = DirectFile::default();
        assert!(direct.get(&file).is_none());
        assert!(!direct.in_use());
    }
}
