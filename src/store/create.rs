//! Making a store: a new qcow2 image holding an empty one, or an empty
//! store formatted inside an existing image, and generation 1 on any disk.

use super::recover::recover;
use super::{open_file, FormatOptions, Store, StoreError, DEFAULT_AREA};
use crate::crypto::KeySource;
use crate::format::{self, Slot, SLOT_BYTES};
use crate::image::{CreateOptions, Disk, ImageError, Qcow2Disk};
use crate::lock::{ImageLock, LockMode};
use std::fs::File;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;

impl Store {
    /// Creates a new qcow2 image at `path` holding an empty store. The
    /// image is built under a temporary name (mode 0600) and linked into
    /// place only when complete, so a crash leaves no half-made image at
    /// `path`. An existing file is refused, naming what it holds, unless
    /// `opts.force`: then it is replaced in one `rename`, under its
    /// exclusive lock, so no process using it loses it unawares.
    pub fn create(
        path: &Path,
        image: CreateOptions,
        opts: FormatOptions,
    ) -> Result<(), StoreError> {
        let existing = std::fs::symlink_metadata(path).is_ok();
        let _held = match (existing, opts.force) {
            (false, _) => None,
            (true, false) => {
                return Err(StoreError::WouldDestroy {
                    path: path.to_path_buf(),
                    holds: describe_file(path),
                    action: "creating an image over it",
                })
            }
            (true, true) => {
                let file = open_file(path, true)?;
                let (lock, _warning) = ImageLock::new(path, file, opts.locking)?;
                let guard = lock.acquire(LockMode::Exclusive, None)?;
                Some((lock, guard))
            }
        };
        let file_name = path
            .file_name()
            .ok_or_else(|| StoreError::Usage(format!("{}: not a file path", path.display())))?;
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let tmp = dir.join(format!(
            ".{}.tpmstate-{}.tmp",
            file_name.to_string_lossy(),
            std::process::id()
        ));
        let _ = std::fs::remove_file(&tmp);
        let io = |op, source| ImageError::Io {
            path: path.to_path_buf(),
            op,
            source,
        };
        let result = (|| {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(|e| io("create", e))?;
            // Every error below names `path`, the name the image will have.
            Qcow2Disk::write_empty(&file, path, image)?;
            Store::format_file(Arc::new(file), path, &opts)?;
            match existing {
                true => std::fs::rename(&tmp, path).map_err(|e| io("rename", e))?,
                // link() refuses to replace a file that appeared meanwhile.
                false => std::fs::hard_link(&tmp, path).map_err(|e| io("link", e))?,
            }
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| io("fsync directory", e))?;
            Ok(())
        })();
        let _ = std::fs::remove_file(&tmp);
        result
    }

    /// Formats a new, empty store inside the existing qcow2 image at `path`
    /// (for example one made by `qemu-img create -f qcow2 IMAGE 4M`), under an
    /// exclusive lock. An image that already holds a store, or any data, is
    /// refused, naming what it holds, unless `opts.force`.
    pub fn format(path: &Path, opts: FormatOptions) -> Result<(), StoreError> {
        Store::format_file(open_file(path, true)?, path, &opts)
    }

    fn format_file(file: Arc<File>, path: &Path, opts: &FormatOptions) -> Result<(), StoreError> {
        let (lock, _warning) = ImageLock::new(path, file.clone(), opts.locking)?;
        let _guard = lock.acquire(LockMode::Exclusive, None)?;
        let mut disk = Qcow2Disk::open(path, file)?;
        let _backing = super::handle::lock_backing_files(&disk, opts.locking)?;
        let area =
            opts.area.unwrap_or(DEFAULT_AREA.min(disk.max_len())) / format::BLOCK * format::BLOCK;
        if !opts.force {
            if let Some(holds) = contents(&disk, path, area)? {
                return Err(StoreError::WouldDestroy {
                    path: path.to_path_buf(),
                    holds,
                    action: "formatting",
                });
            }
        }
        if area < format::DATA_START + 4 * format::BLOCK || area > disk.max_len() {
            return Err(StoreError::Usage(format!(
                "{}: store area of {area} bytes does not fit (image virtual size {} bytes, at least {} needed)",
                path.display(),
                disk.max_len(),
                format::DATA_START + 4 * format::BLOCK
            )));
        }
        disk.zero_fill(area)?;
        Store::write_first_generation(&mut disk, path, area, opts.key.as_ref())
    }

    /// Writes generation 1 (no blobs) to a zeroed `disk`, with one sync.
    /// Public for tests and fuzz targets (the `testing` feature); the
    /// library formats images through [`Store::format`], under the lock.
    #[cfg(any(test, feature = "testing"))]
    pub fn format_disk(
        disk: &mut dyn Disk,
        path: &Path,
        area: u64,
        key: Option<&KeySource>,
    ) -> Result<(), StoreError> {
        Store::write_first_generation(disk, path, area, key)
    }

    /// Writes generation 1 (no blobs) to a zeroed `disk`, with one sync.
    fn write_first_generation(
        disk: &mut dyn Disk,
        path: &Path,
        area: u64,
        key: Option<&KeySource>,
    ) -> Result<(), StoreError> {
        let store_id = crate::crypto::os_random();
        let crypto = |source| StoreError::Crypto {
            path: path.to_path_buf(),
            source,
        };
        let (encryption, master) = match key {
            None => (None, None),
            Some(source) => {
                let kdf = source.new_kdf();
                let master = source.master_key(&kdf).map_err(crypto)?;
                let key_check = master.key_check(&store_id);
                (Some(format::Encryption { kdf, key_check }), Some(master))
            }
        };
        let dir = format::Directory {
            version: format::DIRECTORY_VERSION,
            store_id,
            generation: 1,
            encryption,
            blobs: Default::default(),
            held_state: false,
        };
        let bytes = dir.encode();
        let slot = Slot {
            format_version: format::FORMAT_VERSION,
            encrypted: master.is_some(),
            generation: 1,
            store_id,
            area_len: area,
            // Embedded in slot 0's block (an empty directory is far below
            // EMBEDDED_DIRECTORY_MAX).
            directory: format::Extent {
                offset: format::SLOT_OFFSETS[0] + SLOT_BYTES as u64,
                len: bytes.len() as u32,
            },
            directory_crc: crc32c::crc32c(&bytes),
            directory_mac: master
                .map(|m| m.directory_mac(&store_id, &bytes))
                .unwrap_or([0; 32]),
            commit_id: crate::crypto::os_random(),
            prev_id: [0; 16],
            // The first commit anchors.
            next: 0,
        };
        let mut slot0 = vec![0u8; format::BLOCK as usize];
        slot0[..SLOT_BYTES].copy_from_slice(&slot.encode());
        slot0[SLOT_BYTES..SLOT_BYTES + bytes.len()].copy_from_slice(&bytes);
        disk.write_at(format::SLOT_OFFSETS[0], &slot0)?;
        disk.write_at(format::SLOT_OFFSETS[1], &[0u8; format::BLOCK as usize])?;
        disk.sync()?;
        Ok(())
    }
}

/// What a user would lose if `[0, area)` of the image behind `disk` were
/// formatted: `None` if it is blank (no cluster allocated, or only zeros).
fn contents(disk: &Qcow2Disk, path: &Path, area: u64) -> Result<Option<String>, StoreError> {
    let described = match recover(disk, path, None) {
        Ok(r) => {
            let blobs = r.chosen.dir.blobs.len();
            format!(
                "a tpmstate store at generation {}, with {blobs} blob{} ({})",
                r.chosen.slot.generation,
                if blobs == 1 { "" } else { "s" },
                if r.chosen.slot.encrypted {
                    "encrypted"
                } else {
                    "not encrypted"
                }
            )
        }
        Err(StoreError::NotAStore { .. }) => {
            let data = match first_data(disk, area)? {
                Some(at) => Some(at),
                None => disk.data_beyond_prefix(area)?,
            };
            match data {
                None => return Ok(None),
                Some(at) => format!("data that is not a tpmstate store (from byte {at})"),
            }
        }
        Err(StoreError::Corrupt { reason, .. }) => format!("a damaged tpmstate store ({reason})"),
        Err(StoreError::NewerFormat { what, .. }) => {
            format!("a tpmstate store written by a newer version ({what})")
        }
        Err(other) => return Err(other),
    };
    Ok(Some(described))
}

/// The guest offset of the first non-zero byte in the first `limit` bytes
/// of the disk's allocated prefix, if any.
pub(super) fn first_data(disk: &dyn Disk, limit: u64) -> Result<Option<u64>, StoreError> {
    let end = disk.size().min(limit);
    let mut buf = vec![0u8; 64 * 1024];
    let mut at = 0;
    while at < end {
        let n = (end - at).min(buf.len() as u64) as usize;
        disk.read_at(at, &mut buf[..n])?;
        if let Some(i) = buf[..n].iter().position(|&b| b != 0) {
            return Ok(Some(at + i as u64));
        }
        at += n as u64;
    }
    Ok(None)
}

/// What the file at `path` holds, in a user's words, for a refusal to
/// replace it. Reads without locking (like `qemu-img -U`).
fn describe_file(path: &Path) -> String {
    let Ok(file) = open_file(path, false) else {
        return "a file that cannot be read as an image".into();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    match Qcow2Disk::open(path, file) {
        Err(_) => format!("a file of {len} bytes that is not a qcow2 image tpmstate can use"),
        // Up to 64 MiB: a description, not a guarantee (the file is replaced whole).
        Ok(disk) => match contents(&disk, path, disk.max_len().min(64 << 20)) {
            Ok(Some(holds)) => holds,
            Ok(None) => "an empty qcow2 image".into(),
            Err(_) => "a qcow2 image whose store cannot be read".into(),
        },
    }
}
