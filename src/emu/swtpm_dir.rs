//! `--tpmstate dir=D`, the way libvirt starts swtpm: the state lives in
//! the image `D/tpmstate.qcow2`. A start that finds swtpm's state files in
//! D and no image yet imports them first (all in one commit; the image
//! appears only whole), then moves them into `D/swtpm-imported/`, where
//! neither swtpm nor tpmstate-emu reads them, so no stale copy of the TPM
//! can be started later. A start that finds both (a crash between the two
//! steps, or swtpm run on D since) keeps the image and moves the files
//! aside too, saying so in the log. Both happen under swtpm's own lock on
//! D (`D/.lock`), so a swtpm still running there stops the start. A
//! migration's target (`--migration incoming`) imports nothing: its state
//! comes from the source, which may still be using the files.

use crate::log::Log;
use std::path::{Path, PathBuf};
use tpmstate::swtpm::key::SwtpmSecret;
use tpmstate::swtpm_files::BLOB_NAMES;
use tpmstate::swtpm_files::{self, ImportOptions, Location, SwtpmDirLock, SwtpmFilesError};
use tpmstate::KeySource;

/// The image's name inside the state directory.
pub const IMAGE_NAME: &str = "tpmstate.qcow2";
/// Where swtpm's imported files go, inside the state directory.
pub const IMPORTED_DIR: &str = "swtpm-imported";

/// swtpm's state files present in `dir`.
fn swtpm_files_in(dir: &Path) -> Vec<PathBuf> {
    BLOB_NAMES
        .iter()
        .map(|n| dir.join(swtpm_files::file_name(n)))
        .filter(|p| p.exists())
        .collect()
}

/// Imports swtpm's state in `dir` into `image` if there is no image yet,
/// and moves swtpm's files aside.
pub fn adopt(
    dir: &Path,
    image: &Path,
    key: Option<KeySource>,
    secret: Option<&SwtpmSecret>,
    mode: u32,
    log: &Log,
) -> Result<(), String> {
    let found = swtpm_files_in(dir);
    if found.is_empty() {
        return Ok(());
    }
    let _swtpm_lock = SwtpmDirLock::acquire(dir).map_err(|e| tpmstate::kind::chain(&e))?;
    if std::fs::symlink_metadata(image).is_err() {
        let opts = ImportOptions {
            key,
            ..Default::default()
        };
        let location = Location::Dir(dir.to_path_buf());
        match swtpm_files::import(&location, secret, image, opts) {
            Ok((state, generation)) => {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(image, std::fs::Permissions::from_mode(mode))
                    .map_err(|e| format!("chmod {}: {e}", image.display()))?;
                let names: Vec<_> = state.blobs.iter().map(|(n, _)| *n).collect();
                log.info(&format!(
                    "imported swtpm's state ({}) from {} into {} (generation {generation})",
                    names.join(", "),
                    dir.display(),
                    image.display()
                ));
            }
            // Another start imported it meanwhile: use its image.
            Err(SwtpmFilesError::Exists { .. }) => {}
            Err(e) => {
                return Err(format!(
                    "importing swtpm's state from {}: {}",
                    dir.display(),
                    tpmstate::kind::chain(&e)
                ))
            }
        }
    } else {
        log.info(&format!(
            "{} exists and holds the TPM; swtpm's files beside it are not read",
            image.display()
        ));
    }
    move_aside(dir, &found, log)
}

/// Moves `files` into `dir/swtpm-imported/` (a name already there is kept
/// and the newcomer gets a numbered one: nothing is overwritten).
fn move_aside(dir: &Path, files: &[PathBuf], log: &Log) -> Result<(), String> {
    let aside = dir.join(IMPORTED_DIR);
    match std::fs::create_dir(&aside) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
            return Err(format!("mkdir {}: {e}", aside.display()))
        }
        _ => {}
    }
    for file in files {
        let Some(name) = file.file_name() else {
            continue;
        };
        let mut target = aside.join(name);
        let mut n = 1;
        while target.exists() {
            target = aside.join(format!("{}.{n}", name.to_string_lossy()));
            n += 1;
        }
        match std::fs::rename(file, &target) {
            Ok(()) => log.info(&format!("moved {} to {}", file.display(), target.display())),
            // Another start moved it meanwhile.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("moving {} aside: {e}", file.display())),
        }
    }
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| format!("fsync {}: {e}", dir.display()))
}
