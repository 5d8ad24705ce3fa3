//! `--tpmstate dir=D`, the way libvirt starts swtpm: the state lives in
//! the image `D/tpmstate.qcow2`. A start that finds swtpm's state files in
//! D and no image yet imports them first (all in one commit; the image
//! appears only whole), then moves them into `D/swtpm-imported/`, where
//! neither swtpm nor tpmstate-emu reads them, so no stale copy of the TPM
//! can be started later. A start that finds both moves the files aside
//! only if they hold exactly the image's blobs (a crash between the two
//! steps); other files (swtpm ran on D since, or swtpm_setup made a new
//! TPM there) stop the start, naming both: neither state is dropped
//! silently. Both happen under swtpm's own lock on
//! D (`D/.lock`), so a swtpm still running there stops the start. A
//! migration's target (`--migration incoming`) imports nothing: its state
//! comes from the source, which may still be using the files.

use crate::log::Log;
use std::path::{Path, PathBuf};
use tpmstate::swtpm::key::SwtpmSecret;
use tpmstate::swtpm_files::BLOB_NAMES;
use tpmstate::swtpm_files::{self, ImportOptions, Location, SwtpmDirLock, SwtpmFilesError};
use tpmstate::{KeySource, OpenOptions, ReadOnlyStore};

/// The image's name inside the state directory.
pub const IMAGE_NAME: &str = "tpmstate.qcow2";
/// Where swtpm's imported files go, inside the state directory.
pub const IMPORTED_DIR: &str = "swtpm-imported";

/// swtpm's state files present in `dir`.
/// swtpm's state files present in `dir`, by blob name, `permall` last: it
/// is moved last, so a move cut short leaves it, and a next start compares
/// what is left with the image.
fn swtpm_files_in(dir: &Path) -> Vec<(&'static str, PathBuf)> {
    BLOB_NAMES
        .iter()
        .rev()
        .map(|n| (*n, dir.join(swtpm_files::file_name(n))))
        .filter(|(_, p)| p.exists())
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
    if swtpm_files_in(dir).is_empty() {
        return Ok(());
    }
    let _swtpm_lock = SwtpmDirLock::acquire(dir, true).map_err(|e| tpmstate::kind::chain(&e))?;
    // What an import killed part-way left (never a whole image: that is
    // linked into place only when complete).
    swtpm_files::remove_stale_temporaries(dir, IMAGE_NAME);
    // Under the lock, look again: another start may have moved them.
    let found = swtpm_files_in(dir);
    if found.is_empty() {
        return Ok(());
    }
    let location = Location::Dir(dir.to_path_buf());
    if std::fs::symlink_metadata(image).is_err() {
        let opts = ImportOptions {
            key,
            ..Default::default()
        };
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
            Err(e) => {
                let hint = match e {
                    SwtpmFilesError::NeedKey { .. } => " (give --key as swtpm was given it)",
                    _ => "",
                };
                return Err(format!(
                    "importing swtpm's state from {}: {}{hint}",
                    dir.display(),
                    tpmstate::kind::chain(&e)
                ));
            }
        }
    } else {
        same_as_image(&found, image, key, secret)?;
        log.info(&format!(
            "swtpm's files in {} hold what {} holds (an import cut short before they moved)",
            dir.display(),
            image.display()
        ));
    }
    move_aside(dir, &found, log)
}

/// Checks that swtpm's files beside an image hold exactly the image's
/// blobs: the leftovers of an import cut short before the move. Anything
/// else is another TPM state (swtpm ran on the directory since, or
/// swtpm_setup made a new TPM there), and neither may be dropped silently.
fn same_as_image(
    found: &[(&str, PathBuf)],
    image: &Path,
    key: Option<KeySource>,
    secret: Option<&SwtpmSecret>,
) -> Result<(), String> {
    let chain = |e: &dyn std::error::Error| tpmstate::kind::chain(e);
    let differ = |why: String| {
        let names: Vec<_> = found.iter().map(|(_, p)| p.display().to_string()).collect();
        format!(
            "{} holds the TPM, and swtpm's state files beside it ({}) hold another state ({why}): \
             refusing to choose one. To keep the image, move those files away; to use swtpm's \
             state, move the image away and start again (the files are then imported)",
            image.display(),
            names.join(", ")
        )
    };
    let opts = OpenOptions {
        key,
        ..Default::default()
    };
    let store = ReadOnlyStore::open(image, opts).map_err(|e| chain(&e))?;
    for (name, path) in found {
        let bytes = std::fs::read(path).map_err(|e| format!("read {}: {e}", path.display()))?;
        let data = match swtpm_files::decode_one(&bytes, secret, path) {
            Ok(d) => d,
            Err(e @ SwtpmFilesError::NeedKey { .. }) => {
                return Err(format!("{} (give --key as swtpm was given it)", chain(&e)))
            }
            Err(e) => return Err(differ(chain(&e))),
        };
        match store.get(name).map_err(|e| chain(&e))? {
            Some(ours) if ours[..] == data[..] => {}
            Some(_) => return Err(differ(format!("its {name} differs"))),
            None => return Err(differ(format!("the image has no {name}"))),
        }
    }
    Ok(())
}

/// Moves `files` into `dir/swtpm-imported/` (a name already there is kept
/// and the newcomer gets a numbered one: nothing is overwritten).
fn move_aside(dir: &Path, files: &[(&str, PathBuf)], log: &Log) -> Result<(), String> {
    let aside = dir.join(IMPORTED_DIR);
    match std::fs::create_dir(&aside) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
            return Err(format!("mkdir {}: {e}", aside.display()))
        }
        _ => {}
    }
    for (_, file) in files {
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
