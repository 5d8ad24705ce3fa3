//! swtpm's `--key` options, mapped onto the store's key. The store always
//! seals with AES-256-GCM under a 32-byte master key:
//! - `file=`/`fd=` with `mode=aes-256-cbc`: the 32-byte key is the master
//!   key itself, so `tpmstate --key-file` opens the image with the same
//!   file (hex or raw bytes). The store never uses its master key for a
//!   cipher, only as HKDF input for per-blob keys;
//! - with `mode=aes-cbc` (128 bits): the master key is HKDF-SHA256 of the
//!   16-byte key (salt `tpmstate-emu swtpm --key`, info `aes-cbc`), with
//!   128-bit strength;
//! - `pwdfile=`/`pwdfd=`: the passphrase goes through the store's Argon2id
//!   (stronger than swtpm's PBKDF2 with 1000 rounds); `kdf=` is accepted
//!   for swtpm's command lines and does not change the store's key.

use crate::args::{KeyOption, Secret};
use std::io::Read;
use tpmstate::crypto::Key;
use tpmstate::swtpm::key::{Kdf, SwtpmKey, SwtpmSecret};
use tpmstate::KeySource;
use zeroize::Zeroizing;

/// What `--key` gives: the store's key, and swtpm's own key from the same
/// secret, for swtpm state files found in a `dir=` state directory.
pub struct Keys {
    /// The store's key.
    pub store: KeySource,
    /// The key swtpm derives from the same option.
    pub swtpm: SwtpmSecret,
}

/// Reads the key or passphrase `--key` names (once: it may be a pipe).
pub fn load(opt: &KeyOption) -> Result<Keys, String> {
    let swtpm = load_swtpm(opt, "--key")?;
    let store = match (opt, &swtpm) {
        (KeyOption::Key { from, .. }, SwtpmSecret::Key(raw)) => {
            let raw = raw.bytes();
            let mut okm = Zeroizing::new([0u8; 32]);
            match raw.len() {
                32 => okm.copy_from_slice(raw),
                _ => hkdf::Hkdf::<sha2::Sha256>::new(Some(b"tpmstate-emu swtpm --key"), raw)
                    .expand(b"aes-cbc", &mut *okm)
                    .map_err(|_| "--key: key derivation failed".to_string())?,
            }
            Key::from_bytes(&okm)
                .map(KeySource::Key)
                .map_err(|e| format!("--key {}: {e}", describe(from)))?
        }
        (KeyOption::Passphrase { from, .. }, SwtpmSecret::Passphrase { passphrase, .. }) => {
            let mut data = passphrase.clone();
            if data.last() == Some(&b'\n') {
                data.pop();
            }
            if data.is_empty() {
                return Err(format!("--key {}: empty passphrase", describe(from)));
            }
            KeySource::Passphrase(data)
        }
        _ => return Err("--key: internal error: key kinds differ".into()),
    };
    Ok(Keys { store, swtpm })
}

/// Reads the key `--migration-key` names: swtpm's own key, or its
/// derivation from a passphrase (the whole file, as swtpm reads it).
pub fn load_migration_key(opt: &KeyOption) -> Result<SwtpmKey, String> {
    load_swtpm(opt, "--migration-key").map(|s| s.key_for(128))
}

/// swtpm's key as `option` (`--key` or `--migration-key`) gives it; a
/// passphrase's key length is its `mode=`.
fn load_swtpm(opt: &KeyOption, option: &str) -> Result<SwtpmSecret, String> {
    match opt {
        KeyOption::Key {
            from,
            hex,
            bits256,
            remove,
        } => {
            let data = read(from, *remove)?;
            let bits = if *bits256 { 256 } else { 128 };
            SwtpmKey::from_key_file(&data, *hex, Some(bits))
                .map(SwtpmSecret::Key)
                .map_err(|e| format!("{option} {}: {e}", describe(from)))
        }
        KeyOption::Passphrase {
            from,
            remove,
            bits256,
            sha512,
        } => {
            let passphrase = read(from, *remove)?;
            if passphrase.is_empty() {
                return Err(format!("{option} {}: empty passphrase", describe(from)));
            }
            Ok(SwtpmSecret::Passphrase {
                passphrase,
                kdf: if *sha512 { Kdf::Sha512 } else { Kdf::Pbkdf2 },
                bits: Some(if *bits256 { 256 } else { 128 }),
            })
        }
    }
}

fn describe(from: &Secret) -> String {
    match from {
        Secret::File(p) => format!("file {}", p.display()),
        Secret::Fd(fd) => format!("fd {fd}"),
    }
}

fn read(from: &Secret, remove: bool) -> Result<Zeroizing<Vec<u8>>, String> {
    let mut data = Zeroizing::new(Vec::new());
    match from {
        Secret::File(path) => {
            if let Some(w) = tpmstate::crypto::permission_warning(path) {
                eprintln!("tpmstate-emu: {w}");
            }
            let mut f = std::fs::File::open(path)
                .map_err(|e| format!("--key: cannot read {}: {e}", path.display()))?;
            f.read_to_end(&mut data)
                .map_err(|e| format!("--key: reading {}: {e}", path.display()))?;
            if remove {
                std::fs::remove_file(path)
                    .map_err(|e| format!("--key: remove {}: {e}", path.display()))?;
            }
        }
        Secret::Fd(fd) => {
            let fd = crate::fds::take(*fd).map_err(|e| format!("--key: {e}"))?;
            std::fs::File::from(fd)
                .read_to_end(&mut data)
                .map_err(|e| format!("--key: reading fd {fd}: {e}", fd = describe(from)))?;
        }
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn key_file(content: &[u8]) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        std::fs::write(&p, content).unwrap();
        (dir, p)
    }

    #[test]
    fn a_128_bit_hex_key_becomes_a_store_key_and_a_wrong_length_is_named() {
        let (_d, p) = key_file(b"00112233445566778899aabbccddeeff\n");
        let opt = |bits256| KeyOption::Key {
            from: Secret::File(p.clone()),
            hex: true,
            bits256,
            remove: false,
        };
        assert!(matches!(
            load(&opt(false)).map(|k| k.store),
            Ok(KeySource::Key(_))
        ));
        let Err(err) = load(&opt(true)) else {
            panic!("a 16-byte key with mode=aes-256-cbc is refused")
        };
        assert!(
            err.contains("32 bytes") && err.contains("found 16"),
            "{err}"
        );
    }

    #[test]
    fn remove_deletes_the_key_file_once_read() {
        let (_d, p) = key_file(&[7u8; 32]);
        let opt = KeyOption::Key {
            from: Secret::File(p.clone()),
            hex: false,
            bits256: true,
            remove: true,
        };
        assert!(load(&opt).is_ok());
        assert!(!p.exists());
    }
}
