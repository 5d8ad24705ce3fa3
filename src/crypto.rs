//! Keys and authenticated encryption (`docs/security.md` argues the scheme).
//!
//! - The master key (32 bytes) comes from a key file or from a passphrase
//!   through Argon2id with a per-store salt. It lives in [`Key`], which is wiped
//!   on drop and never printed.
//! - Each blob *version* gets its own AES-256-GCM key, HKDF-SHA256(master,
//!   random 32-byte salt), used for exactly one encryption; so no (key, nonce)
//!   pair repeats even when an old copy of the image is restored and written
//!   again, and no per-key usage limit applies.
//! - Associated data binds the store id, the blob name and the generation that
//!   wrote it, so ciphertext cannot be moved between blobs or stores.
//! - A key check (HMAC of the store id under a key derived from the master)
//!   tells a wrong key from damaged data; a directory MAC stops blobs from being
//!   swapped for older versions of themselves.

use crate::format::{Kdf, Sealed};
use crate::kind::ErrorKind;
use aes_gcm::aead::inout::InOutBuf;
use aes_gcm::aead::{Aead, AeadInOut, KeyInit, Payload};
use aes_gcm::Aes256Gcm;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use zeroize::Zeroizing;

type HmacSha256 = Hmac<Sha256>;

/// Argon2id memory cost for new passphrase stores: RFC 9106's second
/// recommended option (64 MiB, 3 passes, 4 lanes), about 0.3 s here
/// (`docs/security.md`).
pub const ARGON2_M_KIB: u32 = 64 * 1024;
/// Argon2id passes.
pub const ARGON2_T: u32 = 3;
/// Argon2id lanes.
pub const ARGON2_P: u32 = 4;
/// The most memory a stored KDF may ask for: 256 MiB. A store asking for
/// more is refused as corrupt rather than run, so that a hostile image
/// cannot make every open cost gigabytes and seconds.
pub const ARGON2_MAX_M_KIB: u32 = 256 * 1024;
/// The most work (memory in KiB times passes) a stored KDF may ask for:
/// 256 MiB over 3 passes, about 1.1 s here.
pub const ARGON2_MAX_WORK: u64 = 256 * 1024 * 3;
/// The most lanes a stored KDF may ask for.
pub const ARGON2_MAX_P: u32 = 8;

/// Errors of the crypto layer.
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    /// A key or passphrase file could not be read.
    #[error("{path}: cannot read key material")]
    ReadKeyFile {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A key file is not 32 raw bytes or 64 hex digits, or is all zeros.
    #[error("{path}: {reason}")]
    BadKeyFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The key does not match the store's key check.
    #[error("wrong key: {0}")]
    WrongKey(String),
    /// Authentication of a blob or the directory failed although the key is right.
    #[error("authentication failed: {0}")]
    Tampered(String),
    /// The KDF could not run (parameters out of range).
    #[error("key derivation failed: {0}")]
    Kdf(String),
    /// A caller asked to seal what cannot be sealed: an output buffer of
    /// another length than the input, or more than AES-GCM's 64 GiB.
    #[error("cannot seal: {0}")]
    BadInput(String),
}

impl CryptoError {
    /// The broad class of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            CryptoError::WrongKey(_) => ErrorKind::WrongKey,
            CryptoError::Tampered(_) | CryptoError::Kdf(_) => ErrorKind::Corrupt,
            CryptoError::ReadKeyFile { .. } => ErrorKind::Io,
            CryptoError::BadKeyFile { .. } => ErrorKind::Usage,
            // The store sizes the buffers it seals into: a mismatch is a bug.
            CryptoError::BadInput(_) => ErrorKind::Internal,
        }
    }
}

/// `N` bytes from the operating system's generator: every salt, nonce, key,
/// store id and commit id comes from here, never from a user-space
/// generator whose state a VM snapshot or a process restore would duplicate.
pub fn os_random<const N: usize>() -> [u8; N] {
    let mut out = [0u8; N];
    rand::rngs::OsRng.fill_bytes(&mut out);
    out
}

/// A 32-byte key, wiped from memory on drop. Its `Debug` shows nothing secret.
#[derive(Clone)]
pub struct Key {
    master: Zeroizing<[u8; 32]>,
    /// The directory-MAC subkey for one store id, derived on first use
    /// (every commit MACs its directory); wiped with the key.
    directory_key: OnceLock<([u8; 16], Zeroizing<[u8; 32]>)>,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(<redacted>)")
    }
}

impl Key {
    /// Copies raw key bytes into a wiped-on-drop key (the caller wipes its
    /// own copy); an all-zero key is refused as an obvious mistake.
    pub fn from_bytes(bytes: &[u8; 32]) -> Result<Key, String> {
        let mut master = Zeroizing::new([0u8; 32]);
        master.copy_from_slice(bytes);
        let key = Key::new(master);
        if key.master.iter().all(|&b| b == 0) {
            return Err("key is all zeros".into());
        }
        Ok(key)
    }

    /// A fresh random key.
    pub fn generate() -> Key {
        let mut k = Zeroizing::new([0u8; 32]);
        rand::rngs::OsRng.fill_bytes(&mut *k);
        Key::new(k)
    }

    fn new(master: Zeroizing<[u8; 32]>) -> Key {
        Key {
            master,
            directory_key: OnceLock::new(),
        }
    }

    fn derive(&self, salt: &[u8], info: &[&[u8]]) -> Zeroizing<[u8; 32]> {
        let hk = hkdf::Hkdf::<Sha256>::new(Some(salt), &*self.master);
        let mut out = Zeroizing::new([0u8; 32]);
        // 32 bytes is far below HKDF-SHA256's 8160-byte output limit.
        hk.expand_multi_info(info, &mut *out)
            .expect("32 bytes is a valid HKDF-SHA256 output length");
        out
    }

    fn mac(&self, store_id: &[u8; 16], purpose: &[u8]) -> HmacSha256 {
        let k = self.derive(store_id, &[b"tpmstate/v1/", purpose]);
        // HMAC accepts keys of any length.
        <HmacSha256 as hmac::KeyInit>::new_from_slice(&*k).expect("HMAC takes any key length")
    }

    /// The directory MAC, keyed with the cached subkey when it is for `store_id`.
    fn directory_hmac(&self, store_id: &[u8; 16]) -> HmacSha256 {
        let (id, k) = self.directory_key.get_or_init(|| {
            (
                *store_id,
                self.derive(store_id, &[b"tpmstate/v1/", b"directory"]),
            )
        });
        match id == store_id {
            // HMAC accepts keys of any length.
            true => <HmacSha256 as hmac::KeyInit>::new_from_slice(&**k)
                .expect("HMAC takes any key length"),
            false => self.mac(store_id, b"directory"),
        }
    }

    /// The value stored in the directory to recognise this key.
    pub fn key_check(&self, store_id: &[u8; 16]) -> [u8; 32] {
        let mut m = self.mac(store_id, b"key-check");
        m.update(store_id);
        m.finalize().into_bytes().into()
    }

    /// Verifies a stored key check in constant time.
    pub fn verify_key_check(
        &self,
        store_id: &[u8; 16],
        stored: &[u8; 32],
    ) -> Result<(), CryptoError> {
        let mut m = self.mac(store_id, b"key-check");
        m.update(store_id);
        m.verify_slice(stored).map_err(|_| {
            CryptoError::WrongKey(
                "the key does not match this store's key check (or the store id in its header was altered)"
                    .into(),
            )
        })
    }

    /// MAC of a directory's bytes.
    pub fn directory_mac(&self, store_id: &[u8; 16], dir: &[u8]) -> [u8; 32] {
        let mut m = self.directory_hmac(store_id);
        m.update(dir);
        m.finalize().into_bytes().into()
    }

    /// Verifies a directory MAC in constant time.
    pub fn verify_directory_mac(
        &self,
        store_id: &[u8; 16],
        dir: &[u8],
        stored: &[u8; 32],
    ) -> Result<(), CryptoError> {
        let mut m = self.directory_hmac(store_id);
        m.update(dir);
        m.verify_slice(stored)
            .map_err(|_| CryptoError::Tampered("directory MAC does not verify".into()))
    }

    fn blob_cipher(&self, store_id: &[u8; 16], salt: &[u8; 32]) -> Aes256Gcm {
        let k = self.derive(salt, &[b"tpmstate/v1/blob", store_id]);
        // From the slice: no copy of the key on the stack. 32 bytes is
        // AES-256's key length, so this cannot fail.
        Aes256Gcm::new_from_slice(&k[..]).expect("a 32-byte key for AES-256")
    }

    /// Encrypts one blob version under a fresh derived key from `plain` into
    /// `out` (of the same length), returning the parameters and the tag that
    /// the directory keeps. Encrypting straight into the buffer that is
    /// written saves a copy (and wiping that copy). Fails only if `out` and
    /// `plain` differ in length, or for inputs over 64 GiB.
    pub fn seal_into(
        &self,
        store_id: &[u8; 16],
        name: &str,
        generation: u64,
        plain: &[u8],
        out: &mut [u8],
    ) -> Result<Sealed, CryptoError> {
        let (input, output) = (plain.len(), out.len());
        let buf = InOutBuf::new(plain, out).map_err(|_| {
            CryptoError::BadInput(format!(
                "output buffer of {output} bytes for {input} bytes of input"
            ))
        })?;
        // Salt (32 bytes) then nonce (12) straight from the OS: a user-space
        // generator's state is duplicated by a VM snapshot or a CRIU restore
        // of the process, and would then repeat salts and nonces.
        let mut random = [0u8; 44];
        rand::rngs::OsRng.fill_bytes(&mut random);
        let (salt, nonce) = random.split_at(32);
        let mut sealed = Sealed {
            salt: salt.try_into().expect("32 bytes by the split"),
            nonce: nonce.try_into().expect("12 bytes by the split"),
            tag: None,
        };
        let aad = associated_data(store_id, name, generation);
        let tag = self
            .blob_cipher(store_id, &sealed.salt)
            .encrypt_inout_detached(&sealed.nonce.into(), &aad, buf)
            .map_err(|_| CryptoError::BadInput("AES-GCM refuses more than 64 GiB".into()))?;
        sealed.tag = Some(tag.into());
        Ok(sealed)
    }

    /// Encrypts one blob version into a new buffer (the ciphertext; the tag
    /// is in the returned [`Sealed`]).
    pub fn seal(
        &self,
        store_id: &[u8; 16],
        name: &str,
        generation: u64,
        plain: &[u8],
    ) -> Result<(Sealed, Vec<u8>), CryptoError> {
        let mut buf = vec![0; plain.len()];
        let sealed = self.seal_into(store_id, name, generation, plain, &mut buf)?;
        Ok((sealed, buf))
    }

    /// Decrypts and authenticates one blob version: `stored` is the
    /// ciphertext, followed by the tag when `sealed` does not hold it (as
    /// directory version 1 wrote it).
    pub fn open(
        &self,
        store_id: &[u8; 16],
        name: &str,
        generation: u64,
        sealed: &Sealed,
        stored: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        let aad = associated_data(store_id, name, generation);
        let cipher = self.blob_cipher(store_id, &sealed.salt);
        let nonce = sealed.nonce.into();
        let opened = match &sealed.tag {
            Some(tag) => {
                let mut plain = Zeroizing::new(stored.to_vec());
                cipher
                    .decrypt_inout_detached(&nonce, &aad, plain.as_mut_slice().into(), tag.into())
                    .map(|()| plain)
            }
            None => cipher
                .decrypt(
                    &nonce,
                    Payload {
                        msg: stored,
                        aad: &aad,
                    },
                )
                .map(Zeroizing::new),
        };
        opened.map_err(|_| CryptoError::Tampered(format!("blob {name:?} does not authenticate")))
    }
}

fn associated_data(store_id: &[u8; 16], name: &str, generation: u64) -> Vec<u8> {
    let mut aad = Vec::with_capacity(40 + name.len());
    aad.extend_from_slice(b"tpmstate/v1/blob\0");
    aad.extend_from_slice(store_id);
    aad.extend_from_slice(&generation.to_le_bytes());
    aad.extend_from_slice(name.as_bytes());
    aad
}

/// Where a store's master key comes from.
#[derive(Clone)]
pub enum KeySource {
    /// A raw 32-byte key.
    Key(Key),
    /// A passphrase, stretched with Argon2id.
    Passphrase(Zeroizing<Vec<u8>>),
}

impl std::fmt::Debug for KeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeySource::Key(_) => f.write_str("KeySource::Key(<redacted>)"),
            KeySource::Passphrase(_) => f.write_str("KeySource::Passphrase(<redacted>)"),
        }
    }
}

impl KeySource {
    /// Reads a key file: 32 raw bytes, or 64 hex digits (surrounding whitespace ignored).
    pub fn from_key_file(path: &Path) -> Result<KeySource, CryptoError> {
        let data = read_secret(path)?;
        parse_key(&data)
            .map(KeySource::Key)
            .map_err(|reason| CryptoError::BadKeyFile {
                path: path.to_path_buf(),
                reason,
            })
    }

    /// Reads a key file an earlier tpmstate accepted as raw bytes although it
    /// is 32 bytes of printable text: only to open such a store and rekey
    /// it (`--legacy-key-file`); new stores refuse such keys.
    pub fn from_legacy_key_file(path: &Path) -> Result<KeySource, CryptoError> {
        let data = read_secret(path)?;
        let bad = |reason: String| CryptoError::BadKeyFile {
            path: path.to_path_buf(),
            reason,
        };
        let bytes: &[u8; 32] = data[..].try_into().map_err(|_| {
            bad(format!(
                "a legacy key file holds exactly 32 bytes ({MAKE_A_KEY})"
            ))
        })?;
        Key::from_bytes(bytes).map(KeySource::Key).map_err(bad)
    }

    /// Reads a passphrase file (one trailing newline is not part of the passphrase).
    pub fn from_passphrase_file(path: &Path) -> Result<KeySource, CryptoError> {
        let mut data = read_secret(path)?;
        if data.last() == Some(&b'\n') {
            data.pop();
            if data.last() == Some(&b'\r') {
                data.pop();
            }
        }
        if data.is_empty() {
            return Err(CryptoError::BadKeyFile {
                path: path.to_path_buf(),
                reason: "empty passphrase".into(),
            });
        }
        Ok(KeySource::Passphrase(data))
    }

    /// The KDF settings a new store (or a rekey) records for this source.
    pub fn new_kdf(&self) -> Kdf {
        match self {
            KeySource::Key(_) => Kdf::RawKey,
            KeySource::Passphrase(_) => {
                let mut salt = [0u8; 16];
                rand::rngs::OsRng.fill_bytes(&mut salt);
                Kdf::Argon2id {
                    salt,
                    m_kib: ARGON2_M_KIB,
                    t: ARGON2_T,
                    p: ARGON2_P,
                }
            }
        }
    }

    /// Derives the master key as the store's KDF settings say.
    pub fn master_key(&self, kdf: &Kdf) -> Result<Key, CryptoError> {
        match (self, kdf) {
            (KeySource::Key(k), Kdf::RawKey) => Ok(k.clone()),
            (
                KeySource::Passphrase(p),
                Kdf::Argon2id {
                    salt,
                    m_kib,
                    t,
                    p: lanes,
                },
            ) => {
                // Bound the cost a hostile image can ask of us.
                let work = u64::from(*m_kib) * u64::from(*t);
                if *m_kib > ARGON2_MAX_M_KIB || work > ARGON2_MAX_WORK || *lanes > ARGON2_MAX_P {
                    return Err(CryptoError::Kdf(format!(
                        "Argon2id parameters m={m_kib} KiB t={t} p={lanes} exceed the limits \
                         ({ARGON2_MAX_M_KIB} KiB, {ARGON2_MAX_WORK} KiB-passes, {ARGON2_MAX_P} lanes)"
                    )));
                }
                let params = argon2::Params::new(*m_kib, *t, *lanes, Some(32))
                    .map_err(|e| CryptoError::Kdf(e.to_string()))?;
                let a = argon2::Argon2::new(
                    argon2::Algorithm::Argon2id,
                    argon2::Version::V0x13,
                    params,
                );
                let mut out = Zeroizing::new([0u8; 32]);
                a.hash_password_into(p, salt, &mut *out)
                    .map_err(|e| CryptoError::Kdf(e.to_string()))?;
                Ok(Key::new(out))
            }
            (KeySource::Key(_), Kdf::Argon2id { .. }) => Err(CryptoError::WrongKey(
                "this store is opened with a passphrase, not a key file".into(),
            )),
            (KeySource::Passphrase(_), Kdf::RawKey) => Err(CryptoError::WrongKey(
                "this store is opened with a key file, not a passphrase".into(),
            )),
        }
    }
}

/// How a user makes a key file, said wherever one is refused.
pub const MAKE_A_KEY: &str = "make one with: head -c 32 /dev/urandom > KEYFILE";

/// Parses key-file content: 64 hex digits (whitespace around them
/// ignored), or exactly 32 bytes that are not all printable text. Anything
/// else, a 31-character passphrase and a newline, 32 spaces or 32 hex
/// digits included, is refused: taken as raw key bytes with no KDF it would
/// make the key check a fast offline test of a guessable text. An all-zero
/// key is refused too.
pub fn parse_key(data: &[u8]) -> Result<Key, String> {
    let mut key = Zeroizing::new([0u8; 32]);
    let text = std::str::from_utf8(data).map(str::trim).unwrap_or("");
    let printable = |b: &u8| b.is_ascii_graphic() || b.is_ascii_whitespace();
    if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
        hex::decode_to_slice(text, &mut *key).map_err(|_| "bad hex key".to_string())?;
    } else if data.len() == 32 && !data.iter().all(printable) {
        key.copy_from_slice(data);
    } else if data.len() == 32 {
        return Err(format!(
            "a 32-byte key file of printable text looks like a passphrase, not a key \
             (use --passphrase-file for a passphrase, or {MAKE_A_KEY})"
        ));
    } else {
        return Err(format!(
            "a key file holds 64 hex digits or 32 random bytes ({MAKE_A_KEY})"
        ));
    }
    Key::from_bytes(&key)
}

fn read_secret(path: &Path) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
    std::fs::read(path)
        .map(Zeroizing::new)
        .map_err(|source| CryptoError::ReadKeyFile {
            path: path.to_path_buf(),
            source,
        })
}

/// A warning when a key or passphrase file is readable by group or others.
pub fn permission_warning(path: &Path) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).ok()?.permissions().mode();
    (mode & 0o077 != 0).then(|| {
        format!(
            "warning: key file {} is accessible by group or others (mode {:o}); chmod 600 it",
            path.display(),
            mode & 0o777
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: [u8; 16] = [9; 16];

    #[test]
    fn sealed_blob_opens_with_same_key_and_binding_only() {
        let k = Key::generate();
        let (s, ct) = k.seal(&ID, "permall", 3, b"secret state").unwrap();
        assert_ne!(&ct[..12], b"secret state");
        assert_eq!(
            &**k.open(&ID, "permall", 3, &s, &ct).unwrap(),
            b"secret state"
        );
        assert!(k.open(&ID, "volatilestate", 3, &s, &ct).is_err());
        assert!(k.open(&ID, "permall", 4, &s, &ct).is_err());
        assert!(k.open(&[8; 16], "permall", 3, &s, &ct).is_err());
        assert!(Key::generate().open(&ID, "permall", 3, &s, &ct).is_err());
        let mut flipped = ct.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert!(k.open(&ID, "permall", 3, &s, &flipped).is_err());
        let mut bad_tag = s;
        bad_tag.tag.as_mut().unwrap()[0] ^= 1;
        assert!(k.open(&ID, "permall", 3, &bad_tag, &ct).is_err());
    }

    #[test]
    fn blob_sealed_with_its_tag_after_the_ciphertext_still_opens() {
        // Directory version 1 kept the tag at the end of the stored bytes.
        let k = Key::generate();
        let (mut s, mut stored) = k.seal(&ID, "permall", 3, b"old layout").unwrap();
        stored.extend_from_slice(&s.tag.take().unwrap());
        assert_eq!(
            &**k.open(&ID, "permall", 3, &s, &stored).unwrap(),
            b"old layout"
        );
        *stored.last_mut().unwrap() ^= 1;
        assert!(k.open(&ID, "permall", 3, &s, &stored).is_err());
    }

    #[test]
    fn directory_mac_is_bound_to_the_store_id_even_with_a_cached_subkey() {
        let k = Key::generate();
        let mac = k.directory_mac(&ID, b"dir");
        assert!(k.verify_directory_mac(&ID, b"dir", &mac).is_ok());
        assert!(k.verify_directory_mac(&[8; 16], b"dir", &mac).is_err());
        assert_ne!(k.directory_mac(&[8; 16], b"dir"), mac);
        assert_eq!(k.clone().directory_mac(&ID, b"dir"), mac);
        assert_eq!(
            Key::from_bytes(&k.master)
                .unwrap()
                .directory_mac(&ID, b"dir"),
            mac
        );
    }

    #[test]
    fn sealing_into_a_buffer_of_another_length_is_an_error_not_a_panic() {
        let k = Key::generate();
        let mut out = [0u8; 3];
        let e = k
            .seal_into(&ID, "permall", 1, b"four", &mut out)
            .unwrap_err();
        assert!(matches!(e, CryptoError::BadInput(_)), "{e}");
        assert!(e.to_string().contains("3 bytes for 4"), "{e}");
    }

    #[test]
    fn key_files_are_64_hex_digits_or_32_bytes_that_are_not_text() {
        let hex = hex::encode([0x5a; 32]);
        assert!(parse_key(hex.as_bytes()).is_ok());
        assert!(parse_key(format!("  {hex}\n").as_bytes()).is_ok());
        let mut random = [0u8; 32];
        random[0] = 0xff;
        random[1] = 7;
        assert!(parse_key(&random).is_ok());
        let refused: [&[u8]; 5] = [
            b"correct horse battery staples!!\n", // 31 printable + newline
            &[b' '; 32],
            &hex.as_bytes()[..32], // 32 hex digits
            b"short",
            &[0xff; 33],
        ];
        for data in refused {
            let err = parse_key(data).unwrap_err();
            assert!(err.contains("head -c 32 /dev/urandom"), "{data:?}: {err}");
        }
    }

    #[test]
    fn zero_key_is_refused() {
        assert!(Key::from_bytes(&[0; 32]).is_err());
    }

    #[test]
    fn key_check_tells_keys_apart() {
        let k = Key::generate();
        let check = k.key_check(&ID);
        assert!(k.verify_key_check(&ID, &check).is_ok());
        assert!(matches!(
            Key::generate().verify_key_check(&ID, &check),
            Err(CryptoError::WrongKey(_))
        ));
    }

    #[test]
    fn debug_output_hides_key_material() {
        let k = Key::from_bytes(&[0xab; 32]).unwrap();
        let shown = format!("{k:?} {:?}", KeySource::Key(k.clone()));
        assert!(!shown.contains("ab") && !shown.contains("171"));
    }
}
