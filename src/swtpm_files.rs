//! swtpm's state on disk, into a store and out of one: a state directory
//! (`tpm2-00.permall`, `tpm2-00.volatilestate`, `tpm2-00.savestate`, as
//! `swtpm_setup` and `swtpm --tpmstate dir=` keep them) or a linear file
//! (`--tpmstate backend-uri=file://`).
//!
//! An import reads and checks every file first (swtpm's blob format, and
//! its encryption with swtpm's `--key`), then builds the new image under a
//! temporary name, commits all blobs in one commit and links the image into
//! place: an image at the destination always holds the whole state, and a
//! refused import creates nothing and changes no file. An export writes
//! each file under a temporary name, syncs it and renames it into place.

use crate::crypto::KeySource;
use crate::image::CreateOptions;
use crate::kind::ErrorKind;
use crate::lock::Locking;
use crate::store::{FormatOptions, OpenOptions, Store, StoreError, StoreView};
use crate::swtpm::blob::{self, BlobError};
use crate::swtpm::key::{SwtpmKey, SwtpmSecret};
use crate::swtpm::linear::{self, LinearError};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use zeroize::Zeroizing;

/// The state blobs swtpm keeps, in its order; `permall` must be present.
pub const BLOB_NAMES: [&str; 3] = linear::NAMES;

/// The file name swtpm gives blob `name` in a state directory (TPM 2).
pub fn file_name(name: &str) -> String {
    format!("tpm2-00.{name}")
}

/// Where swtpm's state is: a directory, or a linear file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// `--tpmstate dir=PATH` (or `backend-uri=dir://PATH`).
    Dir(PathBuf),
    /// `--tpmstate backend-uri=file://PATH`.
    Linear(PathBuf),
}

impl Location {
    /// Reads a location as swtpm's options write it: `file://PATH` is a
    /// linear file, `dir://PATH` a directory; a plain path is a directory
    /// unless it names an existing regular file.
    pub fn parse(text: &str) -> Location {
        if let Some(p) = text.strip_prefix("file://") {
            return Location::Linear(PathBuf::from(p));
        }
        if let Some(p) = text.strip_prefix("dir://") {
            return Location::Dir(PathBuf::from(p));
        }
        match std::fs::metadata(text) {
            Ok(m) if m.is_file() => Location::Linear(PathBuf::from(text)),
            _ => Location::Dir(PathBuf::from(text)),
        }
    }

    /// The directory or file.
    pub fn path(&self) -> &Path {
        match self {
            Location::Dir(p) | Location::Linear(p) => p,
        }
    }
}

/// Why swtpm state could not be read, imported or written.
#[derive(Debug, thiserror::Error)]
pub enum SwtpmFilesError {
    /// An operating-system error on a file.
    #[error("{op} {}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// No `tpm2-00.permall`: nothing to import.
    #[error("{}: no {} (swtpm's permanent state): this is not a swtpm TPM 2 state", .location.display(), file_name("permall"))]
    MissingPermall {
        /// The directory or linear file.
        location: PathBuf,
    },
    /// A state file is not in swtpm's blob format, or does not decrypt.
    #[error("{}", path.display())]
    Blob {
        /// The file (for a linear file: `FILE[permall]`).
        path: PathBuf,
        /// What is wrong.
        #[source]
        source: BlobError,
    },
    /// A state file is encrypted and no swtpm key was given.
    #[error("{} is encrypted with swtpm's --key ({bits}-bit key), and no swtpm key was given", path.display())]
    NeedKey {
        /// The file.
        path: PathBuf,
        /// The key's length the file's flags name.
        bits: u32,
    },
    /// A swtpm process holds the state directory's lock.
    #[error("a swtpm process is using this state (it holds {}): stop it first", path.display())]
    InUse {
        /// The lock file.
        path: PathBuf,
    },
    /// A linear file's header is damaged.
    #[error("{}", path.display())]
    Linear {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        #[source]
        source: LinearError,
    },
    /// The destination exists; nothing was written.
    #[error("{} already exists; {hint}", path.display())]
    Exists {
        /// The file in the way.
        path: PathBuf,
        /// What to do about it.
        hint: &'static str,
    },
    /// A blob is over swtpm's 4 GiB file limit.
    #[error("{name} of {len} bytes does not fit swtpm's blob format")]
    TooLarge {
        /// The blob.
        name: String,
        /// Its length.
        len: usize,
    },
    /// The new image could not be made (nothing is left of it).
    #[error("{}: cannot make the image", image.display())]
    MakeImage {
        /// The image an import was making.
        image: PathBuf,
        /// Why (naming the temporary file it was built in).
        #[source]
        source: StoreError,
    },
    /// The store refused (opening or reading).
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl SwtpmFilesError {
    /// The broad class, for exit codes.
    pub fn kind(&self) -> ErrorKind {
        match self {
            SwtpmFilesError::Io { .. } => ErrorKind::Io,
            SwtpmFilesError::MissingPermall { .. } | SwtpmFilesError::Linear { .. } => {
                ErrorKind::NotAStore
            }
            SwtpmFilesError::Blob { source, .. } => match source {
                BlobError::Encrypted(_) => ErrorKind::KeyMissing,
                BlobError::WrongKey | BlobError::KeyLength { .. } | BlobError::NotEncrypted => {
                    ErrorKind::WrongKey
                }
                _ => ErrorKind::Corrupt,
            },
            SwtpmFilesError::NeedKey { .. } => ErrorKind::KeyMissing,
            SwtpmFilesError::Exists { .. } => ErrorKind::Usage,
            SwtpmFilesError::InUse { .. } => ErrorKind::Locked,
            SwtpmFilesError::TooLarge { .. } => ErrorKind::NoSpace,
            SwtpmFilesError::Store(e) | SwtpmFilesError::MakeImage { source: e, .. } => e.kind(),
        }
    }
}

fn io(path: &Path, op: &'static str) -> impl FnOnce(std::io::Error) -> SwtpmFilesError {
    let path = path.to_path_buf();
    move |source| SwtpmFilesError::Io { path, op, source }
}

/// swtpm's state, read and checked: the libtpms blobs by store name.
pub struct SwtpmState {
    /// `(name, libtpms blob)`, in [`BLOB_NAMES`] order; `permall` first.
    pub blobs: Vec<(&'static str, Zeroizing<Vec<u8>>)>,
}

impl std::fmt::Debug for SwtpmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let sizes: Vec<_> = self.blobs.iter().map(|(n, b)| (*n, b.len())).collect();
        write!(f, "SwtpmState({sizes:?})")
    }
}

/// Decodes the swtpm state files' bytes `files` (by [`BLOB_NAMES`] index),
/// with `secret` for encrypted ones; `path_of` names a file in errors.
pub fn decode(
    files: [Option<&[u8]>; 3],
    secret: Option<&SwtpmSecret>,
    location: &Path,
    path_of: impl Fn(&str) -> PathBuf,
) -> Result<SwtpmState, SwtpmFilesError> {
    if files[0].is_none() {
        return Err(SwtpmFilesError::MissingPermall {
            location: location.to_path_buf(),
        });
    }
    let mut blobs = Vec::new();
    for (name, bytes) in BLOB_NAMES.iter().zip(files) {
        let Some(bytes) = bytes else { continue };
        blobs.push((*name, decode_one(bytes, secret, &path_of(name))?));
    }
    Ok(SwtpmState { blobs })
}

/// Decodes one swtpm state file's bytes (`path` names it in errors), with
/// `secret` if it is encrypted.
pub fn decode_one(
    bytes: &[u8],
    secret: Option<&SwtpmSecret>,
    path: &Path,
) -> Result<Zeroizing<Vec<u8>>, SwtpmFilesError> {
    let bad = |source| SwtpmFilesError::Blob {
        path: path.to_path_buf(),
        source,
    };
    let key = match (secret, blob::state_file_key_bits(bytes).map_err(bad)?) {
        (Some(s), Some(bits)) => Some(s.key_for(bits)),
        (Some(s), None) => Some(s.key()),
        (None, Some(bits)) => {
            return Err(SwtpmFilesError::NeedKey {
                path: path.to_path_buf(),
                bits,
            })
        }
        (None, None) => None,
    };
    blob::unwrap_state_file(bytes, key.as_ref()).map_err(bad)
}

/// Reads and checks the swtpm state at `location`.
pub fn read(
    location: &Location,
    secret: Option<&SwtpmSecret>,
) -> Result<SwtpmState, SwtpmFilesError> {
    match location {
        Location::Dir(dir) => {
            std::fs::read_dir(dir).map_err(io(dir, "open directory"))?;
            let mut contents: [Option<Zeroizing<Vec<u8>>>; 3] = [None, None, None];
            for (slot, name) in contents.iter_mut().zip(BLOB_NAMES) {
                let path = dir.join(file_name(name));
                match std::fs::read(&path) {
                    Ok(b) => *slot = Some(Zeroizing::new(b)),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io(&path, "read")(e)),
                }
            }
            let files = [0, 1, 2].map(|i| contents[i].as_deref().map(|v| &v[..]));
            decode(files, secret, dir, |n| dir.join(file_name(n)))
        }
        Location::Linear(file) => {
            let bytes = Zeroizing::new(std::fs::read(file).map_err(io(file, "read"))?);
            let files = linear::parse(&bytes).map_err(|source| SwtpmFilesError::Linear {
                path: file.clone(),
                source,
            })?;
            decode(files, secret, file, |n| {
                PathBuf::from(format!("{}[{n}]", file.display()))
            })
        }
    }
}

/// swtpm's own lock on a state directory (`DIR/.lock`, a write lock on
/// the whole file, which swtpm holds while it runs), held here as an OFD
/// lock, which conflicts with swtpm's POSIX one: while it is held no swtpm
/// uses the directory. Released when dropped.
#[derive(Debug)]
pub struct SwtpmDirLock {
    _file: Option<std::fs::File>,
}

impl SwtpmDirLock {
    /// Takes swtpm's lock on `dir` (`InUse` while a swtpm holds it).
    /// `create`: make `.lock` if it is missing, as swtpm does when it
    /// starts, so that two takers exclude each other (for a caller about
    /// to write there); otherwise a directory without one has no swtpm
    /// running in it (swtpm 0.7.1 makes it and never removes it) and is
    /// left unchanged. A directory this process may only read gets a read
    /// lock, which conflicts with swtpm's write lock just as well.
    pub fn acquire(dir: &Path, create: bool) -> Result<SwtpmDirLock, SwtpmFilesError> {
        use std::os::fd::AsRawFd;
        let path = dir.join(".lock");
        // Never through a symlink (swtpm opens it with O_NOFOLLOW too): a
        // planted one would make this create or lock a file elsewhere.
        let writable = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(create)
            .mode(0o640)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path);
        let (file, kind) = match writable {
            Ok(f) => (f, libc::F_WRLCK),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(SwtpmDirLock { _file: None })
            }
            Err(e) if matches!(e.raw_os_error(), Some(libc::EACCES | libc::EROFS)) => {
                let read_only = std::fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&path);
                match read_only {
                    Ok(f) => (f, libc::F_RDLCK),
                    // Nobody can have made one: no swtpm runs here.
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        return Ok(SwtpmDirLock { _file: None })
                    }
                    Err(e) => return Err(io(&path, "open")(e)),
                }
            }
            Err(e) => return Err(io(&path, "open")(e)),
        };
        let whole = libc::flock {
            l_type: kind as libc::c_short,
            l_whence: libc::SEEK_SET as libc::c_short,
            l_start: 0,
            l_len: 0,
            l_pid: 0,
        };
        let arg = nix::fcntl::FcntlArg::F_OFD_SETLK(&whole);
        match nix::fcntl::fcntl(file.as_raw_fd(), arg) {
            Ok(_) => Ok(SwtpmDirLock { _file: Some(file) }),
            Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EACCES) => {
                Err(SwtpmFilesError::InUse { path })
            }
            Err(e) => Err(io(&path, "lock")(std::io::Error::from(e))),
        }
    }
}

/// How an import makes its image.
#[derive(Debug, Clone, Default)]
pub struct ImportOptions {
    /// The new image's size and cluster size.
    pub image: CreateOptions,
    /// The store's key (`None`: a plaintext store).
    pub key: Option<KeySource>,
    /// QEMU's `locking=` option.
    pub locking: Locking,
}

/// Imports the swtpm state at `location` (decrypted with `swtpm_key`) into
/// a new image at `image`, in one commit; returns the state and the
/// store's generation. Refuses an existing `image`. On any error nothing
/// is created. The caller holds [`SwtpmDirLock`] on a directory, so that
/// no running swtpm changes the files under the import.
pub fn import(
    location: &Location,
    swtpm_key: Option<&SwtpmSecret>,
    image: &Path,
    opts: ImportOptions,
) -> Result<(SwtpmState, u64), SwtpmFilesError> {
    if std::fs::symlink_metadata(image).is_ok() {
        return Err(SwtpmFilesError::Exists {
            path: image.to_path_buf(),
            hint: "an import makes a new image: remove it or name another",
        });
    }
    let state = read(location, swtpm_key)?;
    let tmp = sibling(image, "import");
    let made = |source| SwtpmFilesError::MakeImage {
        image: image.to_path_buf(),
        source,
    };
    let result = (|| {
        let format = FormatOptions {
            key: opts.key.clone(),
            area: None,
            locking: opts.locking,
            force: false,
        };
        Store::create(&tmp, opts.image, format).map_err(made)?;
        let open = OpenOptions {
            key: opts.key,
            locking: opts.locking,
            ..OpenOptions::default()
        };
        let mut store = Store::open(&tmp, open).map_err(made)?;
        let mut tx = store.transaction();
        for (name, data) in &state.blobs {
            tx.put(name, data).map_err(made)?;
        }
        let generation = tx.commit().map_err(made)?;
        drop(store);
        // link() refuses a file that appeared meanwhile; the data and the
        // image's metadata are synced by the commit.
        match std::fs::hard_link(&tmp, image) {
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(SwtpmFilesError::Exists {
                    path: image.to_path_buf(),
                    hint: "it appeared during the import",
                })
            }
            other => other.map_err(io(image, "link"))?,
        }
        // An image whose name may not survive a crash is taken back: a
        // failed import leaves nothing.
        sync_parent(image).inspect_err(|_| {
            let _ = std::fs::remove_file(image);
        })?;
        Ok(generation)
    })();
    let _ = std::fs::remove_file(&tmp);
    result.map(|g| (state, g))
}

/// Removes the temporary files an import or export of `name` in `dir`
/// left when it was killed (`.NAME.tpmstate-*.tmp`). Call it only under
/// [`SwtpmDirLock`], which every writer of them holds.
pub fn remove_stale_temporaries(dir: &Path, name: &str) {
    let prefix = format!(".{name}.tpmstate-");
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let file = entry.file_name();
        let file = file.to_string_lossy();
        if file.starts_with(&prefix) && file.ends_with(".tmp") {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// A new temporary name beside `path`, for `what`: unpredictable, so that
/// nobody can plant a file or symlink there first.
fn sibling(path: &Path, what: &str) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
    let tmp = format!(
        ".{}.tpmstate-{what}-{}-{:016x}.tmp",
        name.unwrap_or_default(),
        std::process::id(),
        rand::random::<u64>()
    );
    path.with_file_name(tmp)
}

fn sync_parent(path: &Path) -> Result<(), SwtpmFilesError> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir, "fsync directory"))
}

/// Writes `bytes` to `path` durably: a temporary file beside it, synced,
/// then renamed over it, and the directory synced.
fn write_durably(path: &Path, bytes: &[u8]) -> Result<(), SwtpmFilesError> {
    let tmp = sibling(path, "export");
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io(&tmp, "create"))?;
        f.write_all(bytes).map_err(io(&tmp, "write"))?;
        f.sync_all().map_err(io(&tmp, "fsync"))?;
        std::fs::rename(&tmp, path).map_err(io(path, "rename"))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result?;
    sync_parent(path)
}

/// The swtpm state files `store` holds, encoded as swtpm writes them
/// (encrypted with `swtpm_key` if given), by [`BLOB_NAMES`] index.
pub fn encode(
    store: &StoreView,
    swtpm_key: Option<&SwtpmKey>,
) -> Result<[Option<Zeroizing<Vec<u8>>>; 3], SwtpmFilesError> {
    let mut out = [None, None, None];
    for (slot, name) in out.iter_mut().zip(BLOB_NAMES) {
        let Some(data) = store.get(name)? else {
            continue;
        };
        let file = blob::wrap_state_file(&data, swtpm_key).ok_or(SwtpmFilesError::TooLarge {
            name: name.to_string(),
            len: data.len(),
        })?;
        *slot = Some(Zeroizing::new(file));
    }
    if out[0].is_none() {
        return Err(SwtpmFilesError::MissingPermall {
            location: store.path().to_path_buf(),
        });
    }
    Ok(out)
}

/// Writes the swtpm state `store` holds to `location`, as swtpm 0.7.1
/// reads it. Refuses to replace swtpm files already there unless `force`.
pub fn export(
    store: &StoreView,
    location: &Location,
    swtpm_key: Option<&SwtpmKey>,
    force: bool,
) -> Result<(), SwtpmFilesError> {
    let files = encode(store, swtpm_key)?;
    let hint = "give --force to replace it";
    match location {
        Location::Dir(dir) => {
            std::fs::create_dir_all(dir).map_err(io(dir, "create directory"))?;
            let _swtpm_lock = SwtpmDirLock::acquire(dir, true)?;
            for name in BLOB_NAMES {
                remove_stale_temporaries(dir, &file_name(name));
            }
            let paths = BLOB_NAMES.map(|n| dir.join(file_name(n)));
            if let (false, Some(p)) = (force, paths.iter().find(|p| p.exists())) {
                return Err(SwtpmFilesError::Exists {
                    path: p.clone(),
                    hint,
                });
            }
            for (path, file) in paths.iter().zip(&files) {
                match file {
                    Some(bytes) => write_durably(path, bytes)?,
                    // A stale file from an older state must not be read.
                    None => match std::fs::remove_file(path) {
                        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                            return Err(io(path, "remove")(e))
                        }
                        _ => {}
                    },
                }
            }
            Ok(())
        }
        Location::Linear(path) => {
            if !force && path.exists() {
                return Err(SwtpmFilesError::Exists {
                    path: path.clone(),
                    hint,
                });
            }
            let bytes = linear::build([0, 1, 2].map(|i| files[i].as_deref().map(|v| &v[..])))
                .map(Zeroizing::new)
                .ok_or(SwtpmFilesError::TooLarge {
                    name: "the linear file".into(),
                    len: files.iter().flatten().map(|f| f.len()).sum(),
                })?;
            write_durably(path, &bytes)
        }
    }
}
