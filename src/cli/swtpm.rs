//! `tpmstate import-swtpm` and `export-swtpm`: swtpm's state directories
//! and linear files into a new image and out of one, with swtpm's own key
//! options for its encrypted files.

use super::args::SwtpmKeyArgs;
use super::commands::{io, usage, Failure};
use std::path::Path;
use tpmstate::swtpm::key::{Kdf, SwtpmKey, SwtpmSecret};
use tpmstate::swtpm_files::{self, ImportOptions, Location, SwtpmDirLock, SwtpmFilesError};
use tpmstate::{KeySource, Locking, ReadOnlyStore};
use zeroize::Zeroizing;

impl From<SwtpmFilesError> for Failure {
    fn from(e: SwtpmFilesError) -> Self {
        Failure {
            kind: e.kind(),
            error: Box::new(e),
        }
    }
}

/// An option's `KEY=VALUE` parameters.
type Params<'a> = Vec<(&'a str, &'a str)>;

/// `FILE[,k=v]...` split into the file and its parameters, each checked
/// against `allowed`.
fn split<'a>(
    option: &str,
    text: &'a str,
    allowed: &[&str],
) -> Result<(&'a str, Params<'a>), Failure> {
    let mut parts = text.split(',');
    let file = parts.next().filter(|f| !f.is_empty());
    let file = file.ok_or_else(|| usage(format!("{option}: the file name is missing")))?;
    let mut params = Vec::new();
    for p in parts {
        let (k, v) = p
            .split_once('=')
            .ok_or_else(|| usage(format!("{option}: '{p}' is not KEY=VALUE")))?;
        if !allowed.contains(&k) {
            return Err(usage(format!(
                "{option}: unknown parameter '{k}' (known: {})",
                allowed.join(", ")
            )));
        }
        params.push((k, v));
    }
    Ok((file, params))
}

fn mode_bits(option: &str, v: &str) -> Result<u32, Failure> {
    match v {
        "aes-cbc" | "aes-128-cbc" => Ok(128),
        "aes-256-cbc" => Ok(256),
        _ => Err(usage(format!(
            "{option}: mode={v}: use aes-cbc or aes-256-cbc"
        ))),
    }
}

fn read_secret(option: &str, path: &Path) -> Result<Zeroizing<Vec<u8>>, Failure> {
    if let Some(w) = tpmstate::crypto::permission_warning(path) {
        eprintln!("tpmstate: {w}");
    }
    let data = std::fs::read(path).map_err(|e| io(path, e))?;
    if data.is_empty() {
        return Err(usage(format!(
            "{option} {}: the file is empty",
            path.display()
        )));
    }
    Ok(Zeroizing::new(data))
}

/// The swtpm key `--swtpm-key` or `--swtpm-pwdfile` gives, if any.
pub fn secret(args: &SwtpmKeyArgs) -> Result<Option<SwtpmSecret>, Failure> {
    if let Some(text) = &args.swtpm_key {
        let (file, params) = split("--swtpm-key", text, &["format", "mode"])?;
        let (mut hex, mut bits) = (true, None);
        for (k, v) in params {
            match (k, v) {
                ("format", "hex") => hex = true,
                ("format", "binary") => hex = false,
                ("format", _) => {
                    return Err(usage(format!("--swtpm-key: format={v}: use hex or binary")))
                }
                _ => bits = Some(mode_bits("--swtpm-key", v)?),
            }
        }
        let path = Path::new(file);
        let data = read_secret("--swtpm-key", path)?;
        let key = SwtpmKey::from_key_file(&data, hex, bits)
            .map_err(|e| usage(format!("--swtpm-key {}: {e}", path.display())))?;
        return Ok(Some(SwtpmSecret::Key(key)));
    }
    if let Some(text) = &args.swtpm_pwdfile {
        let (file, params) = split("--swtpm-pwdfile", text, &["kdf", "mode"])?;
        let (mut kdf, mut bits) = (Kdf::Pbkdf2, None);
        for (k, v) in params {
            match (k, v) {
                ("kdf", "pbkdf2") => kdf = Kdf::Pbkdf2,
                ("kdf", "sha512") => kdf = Kdf::Sha512,
                ("kdf", _) => {
                    return Err(usage(format!(
                        "--swtpm-pwdfile: kdf={v}: use pbkdf2 or sha512"
                    )))
                }
                _ => bits = Some(mode_bits("--swtpm-pwdfile", v)?),
            }
        }
        let passphrase = read_secret("--swtpm-pwdfile", Path::new(file))?;
        return Ok(Some(SwtpmSecret::Passphrase {
            passphrase,
            kdf,
            bits,
        }));
    }
    Ok(None)
}

/// `tpmstate import-swtpm SOURCE IMAGE`.
pub fn import(
    source: &str,
    image: &Path,
    secret: Option<SwtpmSecret>,
    key: Option<KeySource>,
    size: u64,
    locking: Locking,
) -> Result<(), Failure> {
    let location = Location::parse(source);
    let plaintext = key.is_none();
    let opts = ImportOptions {
        image: tpmstate::image::CreateOptions {
            size,
            ..Default::default()
        },
        key,
        locking,
    };
    let _swtpm_lock = match &location {
        Location::Dir(dir) => Some(SwtpmDirLock::acquire(dir, false)?),
        Location::Linear(_) => None,
    };
    let (state, generation) = swtpm_files::import(&location, secret.as_ref(), image, opts)?;
    let names: Vec<String> = state
        .blobs
        .iter()
        .map(|(n, b)| format!("{n} ({} bytes)", b.len()))
        .collect();
    println!(
        "imported {} from {} into {} (generation {generation})",
        names.join(", "),
        location.path().display(),
        image.display()
    );
    if plaintext {
        eprintln!(
            "tpmstate: note: the store is not encrypted (give --key-file or --passphrase-file to encrypt it)"
        );
    }
    Ok(())
}

/// `tpmstate export-swtpm IMAGE DEST`.
pub fn export(
    store: &ReadOnlyStore,
    dest: &str,
    secret: Option<SwtpmSecret>,
    force: bool,
) -> Result<(), Failure> {
    let location = Location::parse(dest);
    let key = secret.map(|s| s.key());
    swtpm_files::export(store, &location, key.as_ref(), force)?;
    println!(
        "exported generation {} of {} to {}{}",
        store.generation(),
        store.path().display(),
        location.path().display(),
        match key {
            Some(k) => format!(" (encrypted for swtpm, {}-bit key)", k.bits()),
            None => String::new(),
        }
    );
    Ok(())
}
