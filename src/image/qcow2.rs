//! The qcow2 image as a [`Disk`].
//!
//! The store area's clusters are allocated (once, at format or grow time) by
//! [`qcow2_alloc`], which no crash can leave with a leak; images it does not
//! fully understand are refused. qcow2-rs lays out new images and reads the
//! guest-to-host cluster map. It runs over our own file descriptor through its
//! `Qcow2IoOps` trait, so the image is opened once and the locks of
//! [`crate::lock`] stay valid. Steady-state reads and writes are plain `pread`/`pwrite` at the
//! mapped host offsets and [`Disk::sync`] is one `fdatasync`: a commit never
//! changes qcow2 metadata, so qcow2's own (non-atomic) allocation path is never
//! on the commit path.

use super::direct::{self, DirectFile};
use super::qcow2_alloc::{self, Fill, Request, SnapshotChange};
use super::qcow2_header::{self, HeaderProblem, Qcow2Header, MAX_HEADER_BYTES};
use super::qcow2_leaks::{self, Doubt, Scan};
use super::qcow2_snapshots::{self, SnapshotEntry};
use super::{Disk, ImageError, SnapshotOp};
use qcow2_rs::dev::{Qcow2Dev, Qcow2DevParams};
use qcow2_rs::error::Qcow2Result;
use qcow2_rs::meta::MappingSource;
use qcow2_rs::ops::Qcow2IoOps;
use std::collections::HashSet;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// How `tpmstate create` lays out a new image.
#[derive(Debug, Clone, Copy)]
pub struct CreateOptions {
    /// Virtual size in bytes (a multiple of 512).
    pub size: u64,
    /// log2 of the cluster size (12..=21); 16 (64 KiB) is QEMU's default.
    pub cluster_bits: u32,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            size: 4 << 20,
            cluster_bits: 16,
        }
    }
}

/// Facts about the qcow2 image, for `tpmstate info`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Qcow2Facts {
    /// qcow2 version (2 = compat 0.10, 3 = compat 1.1).
    pub version: u32,
    /// Cluster size in bytes.
    pub cluster_size: u64,
    /// Virtual disk size in bytes.
    pub virtual_size: u64,
    /// Size of the image file in bytes.
    pub file_size: u64,
    /// Bytes allocated from guest offset 0 on (the most the store may use without growing).
    pub allocated_prefix: u64,
    /// Refcount width in bits.
    pub refcount_bits: u32,
    /// Lazy refcounts enabled.
    pub lazy_refcounts: bool,
}

/// A qcow2 image whose allocated prefix serves as the store's area.
///
/// The prefix may reach clusters an internal snapshot shares, or clusters
/// only the backing file holds: reads follow them, and the first write makes
/// the whole prefix the active image's own first ([`Qcow2Disk::make_own`]).
pub struct Qcow2Disk {
    path: PathBuf,
    file: Arc<File>,
    header: Qcow2Header,
    /// Host offset of each guest cluster of the allocated prefix;
    /// [`FROM_BACKING`] for a cluster read from the backing file.
    host: Vec<u64>,
    /// Bytes of the prefix that can be read (the backing file's may end
    /// inside one of this image's clusters).
    readable: u64,
    /// The backing file, for an overlay.
    backing: Option<Box<Qcow2Disk>>,
    /// Every cluster of the prefix is known to have exactly one reference.
    own: bool,
    /// Every cluster of the prefix is in this file with its COPIED flag set.
    copied: bool,
    /// A metadata change failed part way: the map may be stale, so nothing
    /// more is written through this disk.
    broken: bool,
    /// The file lives on a file system other hosts write too (a network or
    /// cluster file system, or FUSE), whose page cache can be stale.
    shared_fs: bool,
    /// Faults to inject into metadata I/O (tests only).
    #[cfg(any(test, feature = "testing"))]
    faults: MetaFaults,
    /// The file length the mapping and the metadata need: a shorter file
    /// was truncated under the store.
    needed_len: u64,
    /// The same file opened for writes that bypass the page cache.
    direct: DirectFile,
}

impl std::fmt::Debug for Qcow2Disk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow2Disk")
            .field("path", &self.path)
            .field("clusters", &self.host.len())
            .finish()
    }
}

/// The host offset recorded for a prefix cluster the backing file holds
/// (no data cluster can sit at offset 0, the header's).
const FROM_BACKING: u64 = 0;
/// Longest backing chain followed (QEMU allows more; an NVRAM overlay
/// chain is short, and a loop must end).
const MAX_BACKING_DEPTH: usize = 16;

/// A fault injected into the qcow2 metadata I/O of a change (tests only).
#[cfg(any(test, feature = "testing"))]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetaFault {
    /// The call fails with this errno, doing nothing.
    Errno(i32),
    /// A write puts down its first half, then fails with ENOSPC (a read or
    /// sync fails with EIO).
    ShortWrite,
}

/// The metadata calls made so far and the fault to inject at one of them.
#[cfg(any(test, feature = "testing"))]
#[derive(Debug, Default)]
struct MetaFaults {
    calls: std::sync::atomic::AtomicUsize,
    at: Option<(usize, MetaFault)>,
}

#[cfg(any(test, feature = "testing"))]
thread_local! {
    /// A fault the next disk opened on this thread injects (tests only).
    static NEXT_OPEN_FAULT: std::cell::Cell<Option<(usize, MetaFault)>> =
        const { std::cell::Cell::new(None) };
}

/// qcow2-rs's I/O engine over our descriptor.
struct FdIo(Arc<File>);

#[allow(async_fn_in_trait)]
impl Qcow2IoOps for FdIo {
    async fn read_to(&self, offset: u64, buf: &mut [u8]) -> Qcow2Result<usize> {
        // Reads past EOF return zeros, as they would from a sparse tail.
        let mut done = 0;
        while done < buf.len() {
            let n = self.0.read_at(&mut buf[done..], offset + done as u64)?;
            if n == 0 {
                buf[done..].fill(0);
                break;
            }
            done += n;
        }
        Ok(buf.len())
    }
    async fn write_from(&self, offset: u64, buf: &[u8]) -> Qcow2Result<()> {
        Ok(self.0.write_all_at(buf, offset)?)
    }
    async fn fallocate(&self, offset: u64, len: usize, _flags: u32) -> Qcow2Result<()> {
        // Only used to zero ranges; writing zeros is always correct.
        let zeros = vec![0u8; len];
        Ok(self.0.write_all_at(&zeros, offset)?)
    }
    async fn fsync(&self, _offset: u64, _len: usize, _flags: u32) -> Qcow2Result<()> {
        Ok(self.0.sync_all()?)
    }
}

fn io_err<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(std::io::Error) -> ImageError + 'a {
    move |source| ImageError::Io {
        path: path.to_path_buf(),
        op,
        source,
    }
}

impl Qcow2Disk {
    /// Opens the qcow2 image behind `file` without any lock, for tests and
    /// fuzz targets only: a library user reaches images through the store's
    /// handles, which hold the lock their writes need.
    #[cfg(any(test, feature = "testing"))]
    pub fn open_unlocked(path: &Path, file: Arc<File>) -> Result<Self, ImageError> {
        Qcow2Disk::open(path, file)
    }

    /// Validates the qcow2 image behind `file` (opened once by the caller, who
    /// holds its locks) and maps its allocated prefix.
    pub(crate) fn open(path: &Path, file: Arc<File>) -> Result<Self, ImageError> {
        Qcow2Disk::open_in_chain(path, file, 0)
    }

    fn open_in_chain(path: &Path, file: Arc<File>, depth: usize) -> Result<Self, ImageError> {
        // Opened after the lock was taken: what this host cached of the
        // file before may predate another host's writes.
        let shared_fs = shared_file_system(&file);
        if shared_fs {
            drop_cached(&file, 0, 0).map_err(io_err(path, "posix_fadvise"))?;
        }
        let header = read_header(path, &file)?;
        let backing = match &header.backing {
            None => None,
            Some(b) => Some(Box::new(open_backing(path, b, depth)?)),
        };
        let mut disk = Qcow2Disk {
            path: path.to_path_buf(),
            file,
            header,
            host: Vec::new(),
            readable: 0,
            backing,
            own: false,
            copied: false,
            broken: false,
            shared_fs,
            #[cfg(any(test, feature = "testing"))]
            faults: MetaFaults::default(),
            needed_len: 0,
            direct: DirectFile::default(),
        };
        #[cfg(any(test, feature = "testing"))]
        if depth == 0 {
            disk.faults.at = NEXT_OPEN_FAULT.take();
        }
        disk.remap()?;
        Ok(disk)
    }

    /// Makes call number `at_call` of the next image opened on this thread
    /// (reads of the store area through [`Disk::read_at`], and metadata
    /// calls) fail with `fault`: for code that opens its own disk, such as
    /// a claim (tests only).
    #[cfg(any(test, feature = "testing"))]
    pub fn inject_fault_into_next_open(at_call: usize, fault: MetaFault) {
        NEXT_OPEN_FAULT.set(Some((at_call, fault)));
    }

    /// Reads the image's metadata again and maps the prefix anew, after the
    /// lock was taken back: while it was not held, anything may have changed
    /// (a snapshot taken, the area copied elsewhere, another host's writes).
    pub fn reopen(&mut self) -> Result<(), ImageError> {
        self.forget_cached_all()?;
        self.own = false;
        // Until the new map is complete, the old one may name clusters that
        // are not the image's any more: no write may use it.
        self.broken = true;
        self.header = read_header(&self.path, &self.file)?;
        self.backing = match &self.header.backing {
            None => None,
            Some(b) => Some(Box::new(open_backing(&self.path, b, 0)?)),
        };
        self.remap()?;
        self.broken = false;
        Ok(())
    }

    /// The backing files of this overlay, nearest first, with their
    /// descriptors (opened read-only), for the caller to lock.
    pub fn backing_files(&self) -> Vec<(&Path, &Arc<File>)> {
        let mut out = Vec::new();
        let mut next = self.backing.as_deref();
        while let Some(b) = next {
            out.push((b.path.as_path(), &b.file));
            next = b.backing.as_deref();
        }
        out
    }

    /// Writes a new, empty qcow2 image to `path`, which must not exist.
    pub fn create_file(path: &Path, opts: CreateOptions) -> Result<(), ImageError> {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(io_err(path, "create"))?;
        Qcow2Disk::write_empty(&file, path, opts)
    }

    /// Writes an empty qcow2 image into `file`, a new empty file, durably.
    /// Errors name `path`, the name the image will have.
    pub fn write_empty(file: &File, path: &Path, opts: CreateOptions) -> Result<(), ImageError> {
        use qcow2_rs::meta::Qcow2Header as Q;
        let bad = |reason: String| ImageError::Unsupported {
            path: path.to_path_buf(),
            feature: reason,
        };
        if !(qcow2_header::MIN_CLUSTER_BITS..=qcow2_header::MAX_CLUSTER_BITS)
            .contains(&opts.cluster_bits)
        {
            return Err(bad(format!("cluster size 2^{} bytes", opts.cluster_bits)));
        }
        if opts.size == 0
            || !opts.size.is_multiple_of(512)
            || opts.size > qcow2_header::MAX_VIRTUAL_SIZE
        {
            return Err(bad(format!(
                "image size {} bytes (a non-zero multiple of 512 up to 1 TiB)",
                opts.size
            )));
        }
        let bits = opts.cluster_bits as usize;
        let (rc_table, rc_block, l1) = Q::calculate_meta_params(opts.size, bits, 4, 512);
        let clusters = 1 + rc_table.1 as usize + rc_block.1 as usize + l1.1 as usize;
        let mut buf = vec![0u8; clusters << bits];
        Q::format_qcow2(&mut buf, opts.size, bits, 4, 512).map_err(|e| ImageError::Corrupt {
            path: path.to_path_buf(),
            reason: format!("qcow2-rs could not lay out the image: {e}"),
        })?;
        file.write_all_at(&buf, 0).map_err(io_err(path, "write"))?;
        file.sync_all().map_err(io_err(path, "fsync"))?;
        Ok(())
    }

    /// The shared descriptor (for locks).
    pub fn file(&self) -> &Arc<File> {
        &self.file
    }

    /// Facts about the image.
    pub fn facts(&self) -> Qcow2Facts {
        Qcow2Facts {
            version: self.header.version,
            cluster_size: self.header.cluster_size(),
            virtual_size: self.header.size,
            file_size: self.file.metadata().map(|m| m.len()).unwrap_or(0),
            allocated_prefix: self.size(),
            refcount_bits: 1 << self.header.refcount_order,
            lazy_refcounts: self.header.compatible_features & 1 != 0,
        }
    }

    /// Largest area the image can hold (its virtual size).
    fn virtual_size(&self) -> u64 {
        self.header.size
    }

    /// Allocates `[0, len)` and fills it with zeros, durably. Used when a
    /// store is formatted: afterwards every cluster of the area is allocated
    /// in qcow2 and in the host file system, so commits only overwrite.
    /// Clusters a snapshot shares are replaced, never zeroed.
    pub fn zero_fill(&mut self, len: u64) -> Result<(), ImageError> {
        self.check_capacity(len)?;
        self.change(Request {
            zero: 0..len,
            ..Request::default()
        })
    }

    /// Makes every cluster of the allocated prefix the active image's own,
    /// durably, unless a survey finds they are: copies the clusters an
    /// internal snapshot shares, and copies up the clusters only the backing
    /// file holds, in one crash-safe metadata change (see [`qcow2_alloc`]).
    /// Writes call it first; the holder of the write lock may call it earlier.
    pub fn make_own(&mut self) -> Result<(), ImageError> {
        // Without snapshots nothing shares a cluster, and the COPIED flags
        // confirm it (images the survey does not understand stay writable).
        // With snapshots the flags are not trusted: the survey counts.
        let unshared = self.copied && self.header.nb_snapshots == 0;
        if !self.own && !unshared {
            self.change(self.own_request())?;
        }
        self.own = true;
        Ok(())
    }

    /// A request that makes the allocated prefix own, to build on.
    fn own_request(&self) -> Request {
        Request {
            own_to: self.size(),
            backing_to: self.backing.as_ref().map_or(0, |b| b.size()),
            ..Request::default()
        }
    }

    /// The image's internal snapshots, read from the file now.
    pub fn snapshots(&self) -> Result<Vec<SnapshotEntry>, ImageError> {
        let header = read_header(&self.path, &self.file)?;
        if header.nb_snapshots == 0 {
            return Ok(Vec::new());
        }
        let file_len = file_len(&self.path, &self.file)?;
        let file = &self.file;
        let read = &mut |at: u64, buf: &mut [u8]| file.read_exact_at(buf, at);
        let table = qcow2_snapshots::read_table(
            header.snapshots_offset,
            header.nb_snapshots,
            file_len,
            read,
        )
        .map_err(io_err(&self.path, "read"))?;
        match table {
            Ok((entries, _)) => Ok(entries),
            Err(doubt) => Err(self.corrupt(doubt.to_string())),
        }
    }

    /// Creates, deletes or applies an internal snapshot, durably, in one
    /// crash-safe metadata change. A new snapshot shares nothing with the
    /// active image afterwards (the store area is copied in the same change),
    /// so the next commit is an ordinary one. Applying leaves the active image
    /// sharing the snapshot's clusters until its first write.
    pub fn change_snapshot(&mut self, op: SnapshotOp<'_>) -> Result<(), ImageError> {
        let existing = self.snapshots()?;
        let find = |name: &str| {
            existing
                .iter()
                .position(|s| s.id == name)
                .or_else(|| existing.iter().position(|s| s.name == name))
                .ok_or_else(|| self.snapshot_error(name, "no such snapshot"))
        };
        let mut req = self.own_request();
        req.snapshot = Some(match op {
            SnapshotOp::Create(name) => {
                if name.is_empty() || name.len() > qcow2_snapshots::MAX_NAME_BYTES {
                    return Err(self.snapshot_error(name, "a name must be 1 to 1024 bytes"));
                }
                if existing.iter().any(|s| s.name == name) {
                    return Err(self.snapshot_error(name, "a snapshot of that name exists"));
                }
                SnapshotChange::Create {
                    id: qcow2_snapshots::next_id(&existing),
                    name: name.to_string(),
                }
            }
            SnapshotOp::Delete(name) => SnapshotChange::Delete(find(name)?),
            SnapshotOp::Apply(name) => {
                req.own_to = 0;
                SnapshotChange::Apply(find(name)?)
            }
        });
        let applying = req.own_to == 0;
        self.change(req)?;
        self.own = !applying;
        Ok(())
    }

    fn snapshot_error(&self, name: &str, reason: &str) -> ImageError {
        ImageError::Snapshot {
            path: self.path.clone(),
            name: name.to_string(),
            reason: reason.to_string(),
        }
    }

    fn corrupt(&self, reason: String) -> ImageError {
        ImageError::Corrupt {
            path: self.path.clone(),
            reason,
        }
    }

    /// Looks for clusters an earlier crash leaked (see [`qcow2_leaks`]); reads only.
    pub fn scan_leaks(&self) -> Result<Scan, ImageError> {
        // The header on disk, not the one read at open: the scan must see
        // the tables as they are now.
        let header = read_header(&self.path, &self.file)?;
        let file_len = file_len(&self.path, &self.file)?;
        let file = &self.file;
        qcow2_leaks::scan(&header, file_len, &mut |at, buf| {
            file.read_exact_at(buf, at)
        })
        .map_err(io_err(&self.path, "read"))
    }

    /// Frees the clusters an earlier crash during an allocation leaked, durably,
    /// and returns how many. Only the holder of the image's write lock may call
    /// it. Each refcount-block write only zeroes counts of clusters nothing
    /// references, so a crash during it leaves fewer leaks, never corruption.
    pub fn reclaim_leaks(&mut self) -> Result<u64, ImageError> {
        let scan = self.scan_leaks()?;
        let Scan::Leaks(blocks) = &scan else {
            return Ok(0);
        };
        if blocks.is_empty() {
            return Ok(0);
        }
        let bits = 1 << self.header.refcount_order;
        let mut buf = vec![0u8; self.header.cluster_size() as usize];
        for leaked in blocks {
            self.meta_read(&mut buf, leaked.block)?;
            for &entry in &leaked.entries {
                qcow2_leaks::set_refcount(&mut buf, entry, bits, 0);
            }
            self.meta_write(&buf, leaked.block)?;
        }
        self.meta_sync()?;
        Ok(scan.leaked())
    }

    fn check_capacity(&self, to: u64) -> Result<(), ImageError> {
        if to > self.header.size {
            return Err(ImageError::CapacityLimit {
                path: self.path.clone(),
                requested: to,
                max: self.header.size,
            });
        }
        Ok(())
    }

    /// Plans and carries out `req`, then maps the prefix again.
    fn change(&mut self, req: Request) -> Result<(), ImageError> {
        self.check_not_broken()?;
        // The tables may have moved since this disk was opened.
        self.header = read_header(&self.path, &self.file)?;
        match self.plan(&req)? {
            Ok(Some(plan)) => {
                // A failure before the switch leaves the image (and this
                // map) as it was; after it, `apply` marks the disk broken.
                self.apply(&plan)?
            }
            Ok(None) => return Ok(()),
            // qcow2-rs could allocate here, but its refcount-first order
            // leaks clusters on a crash, and in a corrupt image it could make
            // things worse: refuse, touching nothing.
            Err(Doubt::Unsupported(feature)) => {
                return Err(ImageError::Unsupported {
                    path: self.path.clone(),
                    feature: format!(
                        "{feature}: tpmstate cannot change its metadata safely \
                         (qemu-img convert -O qcow2 makes a copy it can change)"
                    ),
                })
            }
            Err(Doubt::Corrupt(reason)) => return Err(self.corrupt(reason)),
        }
        self.header = read_header(&self.path, &self.file)?;
        self.remap()
    }

    /// Plans `req` without a crash window (see [`qcow2_alloc`]); `Err`
    /// (inside) says why this image cannot be planned for.
    fn plan(&self, req: &Request) -> Result<Result<Option<qcow2_alloc::Plan>, Doubt>, ImageError> {
        let file_len = file_len(&self.path, &self.file)?;
        let file = &self.file;
        let read = &mut |at: u64, buf: &mut [u8]| file.read_exact_at(buf, at);
        let planned = match qcow2_leaks::survey(&self.header, file_len, read) {
            Ok(Ok(survey)) => qcow2_alloc::plan(&self.header, survey, req, read),
            Ok(Err(doubt)) => Ok(Err(doubt)),
            Err(e) => Err(e),
        };
        planned.map_err(io_err(&self.path, "read"))
    }

    /// Carries out a plan: the data clusters and the new metadata, one
    /// sync, the header switch, a second sync (see [`qcow2_alloc`]).
    fn apply(&mut self, plan: &qcow2_alloc::Plan) -> Result<(), ImageError> {
        let cs = self.header.cluster_size() as usize;
        let mut buf = vec![0u8; cs];
        for &(at, fill) in &plan.data {
            self.fill(&mut buf, fill)?;
            self.meta_write(&buf, at)?;
        }
        for (at, bytes) in &plan.tables {
            self.meta_write(bytes, *at)?;
        }
        self.meta_sync()?;
        let mut old = [0u8; qcow2_alloc::SWITCH_LEN];
        self.meta_read(&mut old, qcow2_alloc::SWITCH_AT)?;
        if let Err(e) = self.meta_write(&plan.switch, qcow2_alloc::SWITCH_AT) {
            // A write cut short may have left part of the switch in the page
            // cache, a header that is neither image: put the old bytes back
            // before anything writes it out. If that fails too, the header
            // is unknown, and so is whether this map is still the image's.
            let restored = self
                .meta_write(&old, qcow2_alloc::SWITCH_AT)
                .and_then(|()| self.meta_sync());
            self.broken = restored.is_err();
            return Err(e);
        }
        // Unsynced, the new header may or may not reach the disk: the map
        // this disk holds may name clusters the new image gave away.
        let synced = self.meta_sync();
        self.broken = synced.is_err();
        synced
    }

    /// Refuses to write after a metadata change failed part way.
    fn check_not_broken(&self) -> Result<(), ImageError> {
        match self.broken {
            true => Err(ImageError::Io {
                path: self.path.clone(),
                op: "write after a failed qcow2 metadata change (reopen the image)",
                source: std::io::Error::other("the image's map in memory may be stale"),
            }),
            false => Ok(()),
        }
    }

    /// One write of a metadata change.
    fn meta_write(&self, bytes: &[u8], at: u64) -> Result<(), ImageError> {
        #[cfg(any(test, feature = "testing"))]
        if let Some(e) = self.injected_error("write", Some((bytes, at))) {
            return Err(e);
        }
        self.file
            .write_all_at(bytes, at)
            .map_err(io_err(&self.path, "write"))
    }

    /// One read of a metadata change.
    fn meta_read(&self, buf: &mut [u8], at: u64) -> Result<(), ImageError> {
        #[cfg(any(test, feature = "testing"))]
        if let Some(e) = self.injected_error("read", None) {
            return Err(e);
        }
        self.file
            .read_exact_at(buf, at)
            .map_err(io_err(&self.path, "read"))
    }

    /// The sync of a metadata change.
    fn meta_sync(&self) -> Result<(), ImageError> {
        #[cfg(any(test, feature = "testing"))]
        if let Some(e) = self.injected_error("fdatasync", None) {
            return Err(e);
        }
        self.file
            .sync_data()
            .map_err(io_err(&self.path, "fdatasync"))
    }

    /// Counts one call (`op`; for a write, its bytes and offset) and
    /// returns the error injected at it, if any, after putting down the
    /// first half of a write cut short.
    #[cfg(any(test, feature = "testing"))]
    fn injected_error(&self, op: &'static str, write: Option<(&[u8], u64)>) -> Option<ImageError> {
        let errno = match (self.injected()?, write) {
            (MetaFault::Errno(errno), _) => errno,
            (MetaFault::ShortWrite, Some((bytes, at))) => {
                let _ = self.file.write_all_at(&bytes[..bytes.len() / 2], at);
                libc::ENOSPC
            }
            (MetaFault::ShortWrite, None) => libc::EIO,
        };
        Some(io_err(&self.path, op)(std::io::Error::from_raw_os_error(
            errno,
        )))
    }

    /// Counts one metadata call; the fault to inject at it, if any.
    #[cfg(any(test, feature = "testing"))]
    fn injected(&self) -> Option<MetaFault> {
        let call = self
            .faults
            .calls
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.faults.at.filter(|(at, _)| *at == call).map(|(_, f)| f)
    }

    /// Makes metadata call number `at_call` (counted from 0 from now on:
    /// each read, write and sync of a change or a leak reclaim) fail with
    /// `fault` (tests only).
    #[cfg(any(test, feature = "testing"))]
    pub fn inject_metadata_fault(&mut self, at_call: usize, fault: MetaFault) {
        self.faults = MetaFaults {
            calls: Default::default(),
            at: Some((at_call, fault)),
        };
    }

    /// Metadata calls made since the last [`Qcow2Disk::inject_metadata_fault`]
    /// (tests only).
    #[cfg(any(test, feature = "testing"))]
    pub fn metadata_calls(&self) -> usize {
        self.faults.calls.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Fills `buf` (one cluster) with what `fill` says.
    fn fill(&self, buf: &mut [u8], fill: Fill) -> Result<(), ImageError> {
        match fill {
            Fill::Zeros => buf.fill(0),
            Fill::Host(from) => self.meta_read(buf, from)?,
            Fill::Backing(guest) => match &self.backing {
                Some(backing) => backing.read_guest(guest, buf)?,
                None => return Err(self.corrupt("a copy-up without a backing file".into())),
            },
        }
        Ok(())
    }

    /// Reads guest bytes at any offset as QEMU would: the allocated prefix
    /// through the map; past it, each cluster through qcow2's mapping (this
    /// file's data, the backing file's bytes, or zeros; zeros past the
    /// virtual size). For a copy-up, which copies whole clusters.
    fn read_guest(&self, offset: u64, buf: &mut [u8]) -> Result<(), ImageError> {
        let cs = self.header.cluster_size();
        let mut pos = 0usize;
        while pos < buf.len() {
            let g = offset + pos as u64;
            let n = ((cs - g % cs) as usize).min(buf.len() - pos);
            let part = &mut buf[pos..pos + n];
            if g + n as u64 <= self.readable {
                self.read_at(g, part)?;
            } else if g >= self.header.size {
                part.fill(0);
            } else {
                self.read_mapped(g, part)?;
            }
            pos += n;
        }
        Ok(())
    }

    /// Reads `part` (inside one cluster, past the prefix) at guest offset `g`.
    fn read_mapped(&self, g: u64, part: &mut [u8]) -> Result<(), ImageError> {
        let cs = self.header.cluster_size();
        let m =
            self.qcow2_session(|dev| futures::executor::block_on(dev.get_mapping(g - g % cs)))?;
        match (m.source, m.cluster_offset) {
            (MappingSource::DataFile, Some(host)) => self
                .file
                .read_exact_at(part, host + g % cs)
                .map_err(io_err(&self.path, "read")),
            (MappingSource::Compressed, _) => Err(ImageError::Unsupported {
                path: self.path.clone(),
                feature: format!("a compressed cluster at guest offset {g} to copy up"),
            }),
            (MappingSource::Backing | MappingSource::Unallocated, _) => match &self.backing {
                Some(backing) => backing.read_guest(g, part),
                None => {
                    part.fill(0);
                    Ok(())
                }
            },
            _ => {
                part.fill(0);
                Ok(())
            }
        }
    }

    /// Drops this host's cached pages of this image and its backing files.
    fn forget_cached_all(&self) -> Result<(), ImageError> {
        let mut next = Some(self);
        while let Some(d) = next {
            if d.shared_fs {
                drop_cached(&d.file, 0, 0).map_err(io_err(&d.path, "posix_fadvise"))?;
            }
            next = d.backing.as_deref();
        }
        Ok(())
    }

    /// The guest offset of the first cluster below `to` that holds data but
    /// lies past the allocated prefix (behind an unallocated one), if any:
    /// the store area cannot reach it through [`Disk::read_at`], but
    /// formatting `[0, to)` would overwrite it.
    pub fn data_beyond_prefix(&self, to: u64) -> Result<Option<u64>, ImageError> {
        let cs = self.header.cluster_size();
        let first = self.host.len() as u64;
        let last = to.min(self.header.size).div_ceil(cs);
        self.qcow2_session(|dev| {
            futures::executor::block_on(async {
                for c in first..last {
                    let m = dev.get_mapping(c * cs).await?;
                    if let (MappingSource::DataFile, Some(_)) = (m.source, m.cluster_offset) {
                        return Ok(Some(c * cs));
                    }
                }
                Ok(None)
            })
        })
    }

    /// Re-reads the guest-to-host map of the allocated prefix and checks that
    /// every mapped cluster is safe to overwrite in place.
    fn remap(&mut self) -> Result<(), ImageError> {
        let h = self.header.clone();
        let cs = h.cluster_size();
        let file_len = file_len(&self.path, &self.file)?;
        let clusters = h.size.div_ceil(cs);
        let from_backing = self.backing.as_ref().map_or(0, |b| b.readable);
        let (mapped, compressed) = self.qcow2_session(|dev| {
            futures::executor::block_on(async {
                let mut out = Vec::new();
                for c in 0..clusters {
                    let m = dev.get_mapping(c * cs).await?;
                    match (m.source, m.cluster_offset) {
                        (MappingSource::DataFile, Some(host)) => out.push(Some((host, m.copied))),
                        (MappingSource::Compressed, _) => return Ok((out, Some(c))),
                        (MappingSource::Backing | MappingSource::Unallocated, _)
                            if c * cs < from_backing =>
                        {
                            out.push(None)
                        }
                        _ => break,
                    }
                }
                Ok((out, None))
            })
        })?;
        if let Some(c) = compressed {
            // Read as unallocated, the store would look absent or cut short.
            return Err(ImageError::Unsupported {
                path: self.path.clone(),
                feature: format!(
                    "compressed clusters in the store area (guest cluster {c}; \
                     qemu-img convert -c makes them): convert the image again with \
                     qemu-img convert -S 0 -O qcow2, which keeps the store area allocated"
                ),
            });
        }
        let corrupt = |reason: String| ImageError::Corrupt {
            path: self.path.clone(),
            reason,
        };
        let metadata = self.metadata_clusters(file_len)?;
        let mut seen = HashSet::new();
        let mut host = Vec::with_capacity(mapped.len());
        let mut readable = (mapped.len() as u64 * cs).min(h.size);
        let mut all_copied = true;
        for (i, off) in mapped.into_iter().enumerate() {
            let Some((off, copied)) = off else {
                readable = readable.min(from_backing);
                host.push(FROM_BACKING);
                all_copied = false;
                continue;
            };
            all_copied &= copied;
            if off % cs != 0 || off < cs || off.checked_add(cs).is_none_or(|e| e > file_len) {
                return Err(corrupt(format!(
                    "guest cluster {i} maps to bad host offset {off:#x}"
                )));
            }
            if metadata.contains(&(off / cs)) || !seen.insert(off) {
                return Err(corrupt(format!(
                    "guest cluster {i} overlaps metadata or another cluster"
                )));
            }
            host.push(off);
        }
        let data_end = self.host_end(&host, cs);
        let metadata_end = metadata.iter().max().map_or(0, |c| (c + 1) * cs);
        self.needed_len = data_end.max(metadata_end);
        self.host = host;
        self.readable = readable;
        self.copied = all_copied;
        Ok(())
    }

    /// Host clusters holding L2 tables and refcount blocks, read from the L1 and
    /// refcount tables, so a hostile map cannot make us overwrite metadata.
    fn metadata_clusters(&self, file_len: u64) -> Result<HashSet<u64>, ImageError> {
        let h = &self.header;
        let cs = h.cluster_size();
        let mut set: HashSet<u64> = HashSet::new();
        for (start, len) in h.metadata_ranges() {
            let mut c = start / cs;
            while c * cs < start + len.max(1) {
                set.insert(c);
                c += 1;
            }
        }
        let tables = [
            (h.l1_table_offset, u64::from(h.l1_size) * 8),
            (
                h.refcount_table_offset,
                u64::from(h.refcount_table_clusters) * cs,
            ),
        ];
        for (off, len) in tables {
            let mut buf = vec![0u8; len as usize];
            self.file
                .read_exact_at(&mut buf, off)
                .map_err(io_err(&self.path, "read"))?;
            for e in buf.chunks_exact(8) {
                let mut a = [0u8; 8];
                a.copy_from_slice(e);
                let target = u64::from_be_bytes(a) & 0x00ff_ffff_ffff_fe00;
                if target != 0 {
                    if target % cs != 0 || target >= file_len {
                        return Err(ImageError::Corrupt {
                            path: self.path.clone(),
                            reason: format!("metadata table entry {target:#x} out of range"),
                        });
                    }
                    set.insert(target / cs);
                }
            }
        }
        Ok(set)
    }

    /// Runs `work` on a read-only qcow2-rs device over our descriptor. qcow2-rs panics on
    /// some inputs (see docs/format.md); the header was validated first, and a
    /// panic that still happens is turned into an error instead of unwinding
    /// through the caller.
    fn qcow2_session<R>(
        &self,
        work: impl FnOnce(&Qcow2Dev<FdIo>) -> Qcow2Result<R>,
    ) -> Result<R, ImageError> {
        let path = self.path.clone();
        let file = self.file.clone();
        let fail = |what: String| ImageError::Corrupt {
            path: path.clone(),
            reason: format!("qcow2 layer: {what}"),
        };
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut buf = vec![0u8; MAX_HEADER_BYTES];
            let n = FileExt::read_at(&*file, &mut buf, 0).map_err(|e| e.to_string())?;
            // qcow2-rs only maps clusters here: it is not told of a backing
            // file (tpmstate follows it itself), and a version 2 header ends
            // at byte 72 (qcow2-rs would read a v3 header length at 100).
            buf[8..20].fill(0);
            if buf[4..8] == 2u32.to_be_bytes() {
                buf[72..].fill(0);
            }
            let header = qcow2_rs::meta::Qcow2Header::from_buf(&buf[..n.max(512).min(buf.len())])
                .map_err(|e| e.to_string())?;
            let params = Qcow2DevParams::new(9, None, None, true, false);
            let dev = Qcow2Dev::new(&path, header, &params, FdIo(file.clone()))
                .map_err(|e| e.to_string())?;
            futures::executor::block_on(dev.qcow2_prep_io()).map_err(|e| e.to_string())?;
            let result = work(&dev);
            if dev.need_flush_meta() {
                // Never drop a device with dirty metadata (qcow2-rs asserts on it).
                let _ = futures::executor::block_on(dev.flush_meta());
            }
            result.map_err(|e| e.to_string())
        }));
        match outcome {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(msg)) => Err(fail(msg)),
            Err(_) => Err(fail("qcow2-rs panicked on this image".into())),
        }
    }

    /// The end of the last data cluster in `host` (this file's own).
    fn host_end(&self, host: &[u64], cs: u64) -> u64 {
        host.iter().max().map_or(0, |h| h + cs)
    }

    /// Fails if the file is now shorter than the store needs: truncated
    /// under a running store, a write would land in a hole and a sync
    /// would acknowledge a commit whose image no longer opens.
    fn check_not_shrunk(&self) -> Result<(), ImageError> {
        let len = file_len(&self.path, &self.file)?;
        if len < self.needed_len {
            return Err(ImageError::Corrupt {
                path: self.path.clone(),
                reason: format!(
                    "the image file shrank to {len} bytes under the store, which needs {}: \
                     truncated while in use?",
                    self.needed_len
                ),
            });
        }
        Ok(())
    }

    fn host_ranges(
        &self,
        offset: u64,
        len: usize,
    ) -> Result<impl Iterator<Item = (Option<u64>, usize, usize)> + '_, ImageError> {
        let end = offset.checked_add(len as u64);
        if end.is_none_or(|e| e > self.size()) {
            return Err(ImageError::OutOfBounds {
                path: self.path.clone(),
                offset,
                len: len as u64,
                area: self.size(),
            });
        }
        let cs = self.header.cluster_size();
        let mut pos = 0usize;
        Ok(std::iter::from_fn(move || {
            if pos >= len {
                return None;
            }
            let start = pos;
            let guest = offset + pos as u64;
            if self.host[(guest / cs) as usize] == FROM_BACKING {
                // One cluster at a time from the backing file.
                pos += ((cs - guest % cs) as usize).min(len - pos);
                return Some((None, start, pos - start));
            }
            let host = self.host[(guest / cs) as usize] + guest % cs;
            // Clusters that follow each other in the file too make one range
            // (one syscall): preallocated areas usually are contiguous.
            while pos < len {
                let guest = offset + pos as u64;
                let in_cluster = guest % cs;
                if self.host[(guest / cs) as usize] + in_cluster != host + (pos - start) as u64 {
                    break;
                }
                pos += ((cs - in_cluster) as usize).min(len - pos);
            }
            Some((Some(host), start, pos - start))
        }))
    }
}

/// File systems whose page cache other hosts' writes do not invalidate:
/// FUSE (GlusterFS, ...), NFS, SMB/CIFS, CephFS, GFS2, OCFS2, 9p, AFS,
/// Lustre, OrangeFS, GPFS, kAFS (`statfs(2)` magic numbers).
const SHARED_FS_MAGIC: [libc::__fsword_t; 13] = [
    0x6573_5546,
    0x6969,
    0xfe53_4d42,
    0xff53_4d42,
    0x00c3_6400,
    0x0116_1970,
    0x7461_636f,
    0x0102_1997,
    0x5346_414f,
    0x0bd0_0bd0,
    0x1366_1366,
    0x4750_4653,
    0x6b41_4653,
];

/// Whether `file` lives on a file system in [`SHARED_FS_MAGIC`] (a failed
/// `fstatfs` counts as shared: the fresh reads are only slower).
fn shared_file_system(file: &File) -> bool {
    nix::sys::statfs::fstatfs(file)
        .map_or(true, |s| SHARED_FS_MAGIC.contains(&s.filesystem_type().0))
}

/// Drops this host's cached pages holding `len` bytes of `file` at `at`
/// (0: to the end), so the next read asks the file system (on FUSE, the
/// server). The kernel drops only whole pages inside the range it is
/// given, so the range is widened to page boundaries first.
fn drop_cached(file: &File, at: u64, len: u64) -> std::io::Result<()> {
    use nix::fcntl::{posix_fadvise, PosixFadviseAdvice};
    use std::os::fd::AsRawFd;
    let page = direct::PAGE as u64;
    let start = at - at % page;
    let len = match len {
        0 => 0,
        n => (at + n).next_multiple_of(page) - start,
    };
    posix_fadvise(
        file.as_raw_fd(),
        start as i64,
        len as i64,
        PosixFadviseAdvice::POSIX_FADV_DONTNEED,
    )
    .map_err(std::io::Error::from)
}

/// Opens the backing file `b` of the overlay at `overlay`, read-only. A
/// relative name is relative to the overlay's directory, as in QEMU.
fn open_backing(
    overlay: &Path,
    b: &qcow2_header::BackingRef,
    depth: usize,
) -> Result<Qcow2Disk, ImageError> {
    let unsupported = |feature: String| ImageError::Unsupported {
        path: overlay.to_path_buf(),
        feature,
    };
    if let Some(format) = b.format.as_deref().filter(|f| *f != "qcow2") {
        return Err(unsupported(format!(
            "backing file {} of format {format} (tpmstate follows qcow2 backing files only)",
            b.name
        )));
    }
    if depth >= MAX_BACKING_DEPTH {
        return Err(unsupported(format!(
            "a backing chain deeper than {MAX_BACKING_DEPTH} images (or a loop)"
        )));
    }
    let name = Path::new(&b.name);
    let path = match overlay.parent() {
        Some(dir) if name.is_relative() => dir.join(name),
        _ => name.to_path_buf(),
    };
    let file = crate::file::open_regular(&path, false)?;
    Qcow2Disk::open_in_chain(&path, Arc::new(file), depth + 1)
}

fn file_len(path: &Path, file: &File) -> Result<u64, ImageError> {
    Ok(file.metadata().map_err(io_err(path, "stat"))?.len())
}

fn read_header(path: &Path, file: &File) -> Result<Qcow2Header, ImageError> {
    let file_len = file_len(path, file)?;
    let mut buf = vec![0u8; MAX_HEADER_BYTES.min(file_len as usize)];
    file.read_exact_at(&mut buf, 0)
        .map_err(io_err(path, "read"))?;
    qcow2_header::parse(&buf, file_len).map_err(|p| match p {
        HeaderProblem::NotQcow2(reason) => ImageError::NotQcow2 {
            path: path.to_path_buf(),
            reason,
        },
        HeaderProblem::Unsupported(feature) => ImageError::Unsupported {
            path: path.to_path_buf(),
            feature,
        },
        HeaderProblem::Corrupt(reason) => ImageError::Corrupt {
            path: path.to_path_buf(),
            reason,
        },
    })
}

impl Disk for Qcow2Disk {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), ImageError> {
        #[cfg(any(test, feature = "testing"))]
        if let Some(e) = self.injected_error("read", None) {
            return Err(e);
        }
        let len = buf.len();
        for (host, pos, n) in self.host_ranges(offset, len)? {
            let part = &mut buf[pos..pos + n];
            match (host, &self.backing) {
                (Some(host), _) => self
                    .file
                    .read_exact_at(part, host)
                    .map_err(io_err(&self.path, "read"))?,
                (None, Some(backing)) => backing.read_at(offset + pos as u64, part)?,
                (None, None) => return Err(self.corrupt("a cluster mapped to no file".into())),
            }
        }
        Ok(())
    }

    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), ImageError> {
        self.check_not_broken()?;
        self.make_own()?;
        for (host, pos, n) in self.host_ranges(offset, data.len())? {
            let Some(host) = host else {
                return Err(self.corrupt("a cluster still in the backing file".into()));
            };
            self.file
                .write_all_at(&data[pos..pos + n], host)
                .map_err(io_err(&self.path, "write"))?;
        }
        Ok(())
    }

    /// One contiguous, aligned piece of file goes straight to the device
    /// (`O_DIRECT`, see [`direct`]); anything else goes through the page
    /// cache, because direct writes wait for the device one by one, while
    /// `fdatasync` writes several dirty ranges back together.
    fn write_parts(&mut self, parts: &[(u64, &[u8])]) -> Result<(), ImageError> {
        self.check_not_broken()?;
        self.make_own()?;
        self.check_not_shrunk()?;
        if let [(offset, data)] = parts {
            let single = {
                let mut ranges = self.host_ranges(*offset, data.len())?;
                match (ranges.next(), ranges.next()) {
                    (Some((host, _, _)), None) => host,
                    _ => None,
                }
            };
            // On shared storage every write goes through the descriptor
            // that holds the lock: a file system that revokes a lost lock
            // (GlusterFS's strict locks) then refuses the write, where a
            // second, unlocked descriptor would still be let through.
            if let Some(host) = single.filter(|_| !self.shared_fs) {
                if direct::aligned(data, host)
                    && self
                        .direct
                        .write(&self.file, data, host)
                        .map_err(io_err(&self.path, "direct write"))?
                {
                    return Ok(());
                }
            }
        }
        parts
            .iter()
            .try_for_each(|(offset, data)| self.write_at(*offset, data))
    }

    fn read_fresh(&self, offset: u64, buf: &mut [u8]) -> Result<(), ImageError> {
        if self.shared_fs {
            for (host, _, n) in self.host_ranges(offset, buf.len())? {
                if let Some(host) = host {
                    drop_cached(&self.file, host, n as u64)
                        .map_err(io_err(&self.path, "posix_fadvise"))?;
                }
            }
        }
        self.read_at(offset, buf)
    }

    fn on_shared_storage(&self) -> bool {
        self.shared_fs
    }

    fn layout_changed(&self) -> Result<bool, ImageError> {
        // The fields every metadata change switches (and the virtual
        // size), from the first sector: no change leaves them alone.
        let mut now = [0u8; 72];
        if self.shared_fs {
            drop_cached(&self.file, 0, now.len() as u64)
                .map_err(io_err(&self.path, "posix_fadvise"))?;
        }
        self.file
            .read_exact_at(&mut now, 0)
            .map_err(io_err(&self.path, "read"))?;
        let h = &self.header;
        let be64 = |at: usize| u64::from_be_bytes(now[at..at + 8].try_into().unwrap_or([0; 8]));
        let be32 = |at: usize| u32::from_be_bytes(now[at..at + 4].try_into().unwrap_or([0; 4]));
        Ok((
            be64(24),
            be32(36),
            be64(40),
            be64(48),
            be32(56),
            be32(60),
            be64(64),
        ) != (
            h.size,
            h.l1_size,
            h.l1_table_offset,
            h.refcount_table_offset,
            h.refcount_table_clusters,
            h.nb_snapshots,
            h.snapshots_offset,
        ))
    }

    fn reopen(&mut self) -> Result<(), ImageError> {
        Qcow2Disk::reopen(self)
    }

    fn sync(&mut self) -> Result<(), ImageError> {
        self.file
            .sync_data()
            .map_err(io_err(&self.path, "fdatasync"))?;
        // Truncated between the writes and the sync: not acknowledged.
        self.check_not_shrunk()
    }

    fn max_len(&self) -> u64 {
        self.virtual_size()
    }

    fn size(&self) -> u64 {
        self.readable
    }

    fn grow(&mut self, min_len: u64) -> Result<(), ImageError> {
        if min_len <= self.size() {
            return Ok(());
        }
        self.check_capacity(min_len)?;
        let mut req = self.own_request();
        req.zero = self.size()..min_len;
        self.change(req)?;
        self.own = true;
        Ok(())
    }

    fn snapshots(&self) -> Result<Vec<SnapshotEntry>, ImageError> {
        Qcow2Disk::snapshots(self)
    }

    fn change_snapshot(&mut self, op: SnapshotOp<'_>) -> Result<(), ImageError> {
        Qcow2Disk::change_snapshot(self, op)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn qemu_img(args: &[&str]) -> (i32, String) {
        let out = std::process::Command::new("qemu-img")
            .args(args)
            .output()
            .expect("qemu-img is installed");
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.code().unwrap_or(-1), text)
    }

    fn open(path: &Path) -> Qcow2Disk {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap();
        Qcow2Disk::open(path, Arc::new(file)).unwrap()
    }

    /// Whether this file system takes `O_DIRECT` at all (tmpfs may not).
    fn takes_o_direct(dir: &Path) -> bool {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .custom_flags(nix::fcntl::OFlag::O_DIRECT.bits())
            .open(dir.join("probe"))
            .is_ok()
    }

    /// A commit's single aligned run goes straight to the device; what the
    /// page cache held for those bytes is not read back afterwards, and QEMU
    /// reads the new bytes through the qcow2 mapping. Several parts, or a
    /// buffer off the page boundary, take the page cache.
    #[test]
    fn a_single_aligned_part_bypasses_the_page_cache_and_stays_coherent() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.qcow2");
        Qcow2Disk::create_file(&path, CreateOptions::default()).unwrap();
        let mut disk = open(&path);
        disk.grow(256 << 10).unwrap();
        let mut buf = super::super::PageBuf::default();
        buf.reset_zeroed(64 << 10);
        buf.bytes_mut().fill(0xab);

        // Two parts: page cache, the direct descriptor is not even opened.
        disk.write_parts(&[(0, &buf.bytes()[..4096]), (8192, &buf.bytes()[..4096])])
            .unwrap();
        assert!(!disk.direct.in_use());
        // Off the page boundary: page cache.
        disk.write_parts(&[(4096, &buf.bytes()[512..4608])])
            .unwrap();
        assert!(!disk.direct.in_use());

        // Dirty cached pages under the range first, then the direct write.
        disk.write_at(65536, &[0x11; 8192]).unwrap();
        disk.write_parts(&[(65536, buf.bytes())]).unwrap();
        assert_eq!(disk.direct.in_use(), takes_o_direct(dir.path()));
        disk.sync().unwrap();
        let mut back = vec![0u8; 64 << 10];
        disk.read_at(65536, &mut back).unwrap();
        assert!(
            back.iter().all(|&b| b == 0xab),
            "stale cached bytes read back"
        );
        let out = std::process::Command::new("qemu-io")
            .args(["-f", "qcow2", "-r", "-c", "read -P 0xab 65536 65536"])
            .arg(&path)
            .output()
            .expect("qemu-io is installed");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && !text.contains("Pattern verification failed"),
            "{text}"
        );
        let (code, report) = qemu_img(&["check", path.to_str().unwrap()]);
        assert_eq!(code, 0, "{report}");
    }

    /// Every write a plan makes before its switch, as `(offset, bytes)`.
    fn plan_writes(disk: &Qcow2Disk, plan: &qcow2_alloc::Plan) -> Vec<(u64, Vec<u8>)> {
        let mut writes = plan.tables.clone();
        for &(at, fill) in &plan.data {
            let mut buf = vec![0u8; disk.header.cluster_size() as usize];
            disk.fill(&mut buf, fill).unwrap();
            writes.push((at, buf));
        }
        writes
    }

    /// Power loss during an allocation, simulated: any subset of the sectors
    /// written before the first sync reaches the disk, or all of them and the
    /// header switch do. `qemu-img check` must find no leak and no error in
    /// any of those images, and the complete one must map the new clusters.
    #[test]
    fn power_loss_during_an_allocation_leaves_the_old_or_the_new_image() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x616c6c6f63);
        for (cluster, compat) in [
            ("4k", "1.1"),
            ("64k", "0.10"),
            ("64k", "1.1"),
            ("2M", "1.1"),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let base = dir.path().join("base.qcow2");
            let b = base.to_str().unwrap();
            let opts = format!("cluster_size={cluster},compat={compat}");
            assert_eq!(
                qemu_img(&["create", "-q", "-f", "qcow2", "-o", &opts, b, "16M"]).0,
                0
            );
            // A formatted area to grow from.
            let mut disk = open(&base);
            disk.zero_fill(1 << 20).unwrap();
            let old_size = disk.size();
            let mut req = disk.own_request();
            req.zero = old_size..old_size + (2 << 20);
            let plan = disk.plan(&req).unwrap().unwrap().unwrap();
            let writes = plan_writes(&disk, &plan);
            drop(disk);
            let crashed = dir.path().join("crashed.qcow2");
            let c = crashed.to_str().unwrap();
            for trial in 0..10 {
                std::fs::copy(&base, &crashed).unwrap();
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&crashed)
                    .unwrap();
                let keep = [0.0, 1.0, 0.5, 0.1, 0.9][trial % 5];
                for (at, bytes) in &writes {
                    for (i, sector) in bytes.chunks(512).enumerate() {
                        if rng.gen_bool(keep) {
                            f.write_all_at(sector, at + i as u64 * 512).unwrap();
                        }
                    }
                }
                drop(f);
                let (code, out) = qemu_img(&["check", c]);
                assert_eq!(code, 0, "{opts}, trial {trial}: {out}");
                assert_eq!(
                    open(&crashed).size(),
                    old_size,
                    "{opts}: still the old image"
                );
            }
            std::fs::copy(&base, &crashed).unwrap();
            let mut disk = open(&crashed);
            disk.apply(&plan).unwrap();
            disk.header = read_header(&disk.path, &disk.file).unwrap();
            disk.remap().unwrap();
            assert_eq!(disk.size(), old_size + (2 << 20), "{opts}: the new image");
            drop(disk);
            let (code, out) = qemu_img(&["check", c]);
            assert_eq!(code, 0, "{opts}, switched: {out}");
        }
    }

    /// Writes a crash-shaped part of `plan` into a copy of `image` at
    /// `crashed`: each sector written before the switch with probability
    /// `keep`, or (`keep` > 1) everything and the switch. The pre-switch
    /// writes go in `plan`'s order, so the copy is what a power loss at any
    /// point leaves where sectors reach the disk in any order.
    fn crash_copy(
        image: &Path,
        crashed: &Path,
        plan: &qcow2_alloc::Plan,
        keep: f64,
        rng: &mut rand::rngs::StdRng,
    ) {
        std::fs::copy(image, crashed).unwrap();
        let disk = open(image);
        let writes = plan_writes(&disk, plan);
        drop(disk);
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(crashed)
            .unwrap();
        for (at, bytes) in &writes {
            for (i, sector) in bytes.chunks(512).enumerate() {
                if keep > 1.0 || rng.gen_bool(keep) {
                    f.write_all_at(sector, at + i as u64 * 512).unwrap();
                }
            }
        }
        if keep > 1.0 {
            f.write_all_at(&plan.switch, qcow2_alloc::SWITCH_AT)
                .unwrap();
        }
    }

    fn snapshot_names(image: &Path) -> Vec<String> {
        open(image)
            .snapshots()
            .unwrap()
            .into_iter()
            .map(|s| s.name)
            .collect()
    }

    /// `qemu-io -r` reads `len` bytes of `pattern` at guest offset 0 of `image`.
    fn reads_pattern(image: &Path, pattern: u8, len: u64) -> bool {
        let out = std::process::Command::new("qemu-io")
            .args([
                "-f",
                "qcow2",
                "-r",
                "-c",
                &format!("read -P {pattern} 0 {len}"),
            ])
            .arg(image)
            .output()
            .expect("qemu-io is installed");
        out.status.success() && !String::from_utf8_lossy(&out.stdout).contains("fail")
    }

    /// Power loss at any point of an unshare, a copy-up, or a snapshot
    /// created or deleted, simulated as above: `qemu-img check` is clean,
    /// the area reads the same, the snapshots are the old list or the new,
    /// the snapshot's state applies, and the backing file is untouched.
    #[test]
    fn power_loss_during_an_unshare_a_copy_up_or_a_snapshot_change_leaves_the_old_or_the_new_image()
    {
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x736e6170);
        let dir = tempfile::tempdir().unwrap();
        let d = |n: &str| dir.path().join(n);
        let area = 1u64 << 20;
        let base = d("base.qcow2");
        Qcow2Disk::create_file(&base, CreateOptions::default()).unwrap();
        let mut disk = open(&base);
        disk.zero_fill(area).unwrap();
        disk.write_at(0, &vec![0xa5; area as usize]).unwrap();
        disk.sync().unwrap();
        drop(disk);
        let snapped = d("snapped.qcow2");
        std::fs::copy(&base, &snapped).unwrap();
        let (code, out) = qemu_img(&["snapshot", "-c", "s1", snapped.to_str().unwrap()]);
        assert_eq!(code, 0, "{out}");
        let overlay = d("overlay.qcow2");
        let (code, out) = qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            overlay.to_str().unwrap(),
        ]);
        assert_eq!(code, 0, "{out}");
        let base_sha = std::fs::read(&base).unwrap();
        assert!(
            !reads_pattern(&base, 0x5a, area),
            "a wrong pattern is noticed"
        );

        type Case = (
            &'static str,
            PathBuf,
            fn(&Qcow2Disk) -> Request,
            [&'static [&'static str]; 2],
        );
        let cases: [Case; 4] = [
            (
                "unshare",
                snapped.clone(),
                |d| d.own_request(),
                [&["s1"], &["s1"]],
            ),
            (
                "create",
                snapped.clone(),
                |d| Request {
                    snapshot: Some(SnapshotChange::Create {
                        id: "2".into(),
                        name: "s2".into(),
                    }),
                    ..d.own_request()
                },
                [&["s1"], &["s1", "s2"]],
            ),
            (
                "delete",
                snapped.clone(),
                |d| Request {
                    snapshot: Some(SnapshotChange::Delete(0)),
                    ..d.own_request()
                },
                [&["s1"], &[]],
            ),
            ("copy-up", overlay.clone(), |d| d.own_request(), [&[], &[]]),
        ];
        let crashed = d("crashed.qcow2");
        let c = crashed.to_str().unwrap();
        for (what, image, req, names) in cases {
            let disk = open(&image);
            let plan = disk.plan(&req(&disk)).unwrap().unwrap().unwrap();
            drop(disk);
            for (trial, keep) in [0.0, 0.1, 0.5, 0.9, 1.0, 0.3, 0.7, 2.0]
                .into_iter()
                .enumerate()
            {
                crash_copy(&image, &crashed, &plan, keep, &mut rng);
                let switched = keep > 1.0;
                let (code, out) = qemu_img(&["check", c]);
                assert_eq!(code, 0, "{what}, trial {trial}: {out}");
                assert_eq!(
                    snapshot_names(&crashed),
                    names[usize::from(switched)],
                    "{what}, trial {trial}"
                );
                assert!(
                    reads_pattern(&crashed, 0xa5, area),
                    "{what}, trial {trial}: the area"
                );
                if names[usize::from(switched)].contains(&"s1") {
                    let (code, out) = qemu_img(&["snapshot", "-a", "s1", c]);
                    assert_eq!(code, 0, "{what}, trial {trial}: {out}");
                    assert!(
                        reads_pattern(&crashed, 0xa5, area),
                        "{what}, trial {trial}: s1"
                    );
                }
                assert_eq!(
                    std::fs::read(&base).unwrap(),
                    base_sha,
                    "{what}: the backing file"
                );
            }
        }
    }
}
