//! Making a store: a new qcow2 image holding an empty one, or an empty
//! store formatted inside an existing image, and generation 1 on any disk.

use super::{open_file, FormatOptions, Store, StoreError, DEFAULT_AREA};
use crate::crypto::KeySource;
use crate::format::{self, Slot, SLOT_BYTES};
use crate::image::{CreateOptions, Disk, Qcow2Disk};
use crate::lock::{ImageLock, LockMode};
use std::fs::File;
use std::path::Path;

impl Store {
    /// Creates a new qcow2 image at `path` (which must not exist) holding an
    /// empty store. The image is built under a temporary name and linked into
    /// place only when complete, so a crash leaves no half-made image at `path`.
    pub fn create(
        path: &Path,
        image: CreateOptions,
        opts: FormatOptions,
    ) -> Result<(), StoreError> {
        if path.exists() {
            return Err(StoreError::Usage(format!(
                "{}: already exists",
                path.display()
            )));
        }
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
        let result = (|| {
            Qcow2Disk::create_file(&tmp, image)?;
            Store::format(&tmp, opts)?;
            let io = |op, source| crate::image::ImageError::Io {
                path: path.to_path_buf(),
                op,
                source,
            };
            // link() refuses to replace an existing file, unlike rename().
            std::fs::hard_link(&tmp, path).map_err(|e| io("link", e))?;
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
    /// exclusive lock. Any store already there is destroyed.
    pub fn format(path: &Path, opts: FormatOptions) -> Result<(), StoreError> {
        let file = open_file(path, true)?;
        let (lock, _warning) = ImageLock::new(path, file.clone(), opts.locking)?;
        let _guard = lock.acquire(LockMode::Exclusive, None)?;
        let mut disk = Qcow2Disk::open(path, file)?;
        let area =
            opts.area.unwrap_or(DEFAULT_AREA.min(disk.max_len())) / format::BLOCK * format::BLOCK;
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
        let mut store_id = [0u8; 16];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut store_id);
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
            commit_id: rand::random(),
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
