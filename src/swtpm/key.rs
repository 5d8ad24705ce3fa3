//! swtpm's AES-CBC keys: `--key` encrypts its state files, and
//! `--migration-key` the state blobs on the control channel (so a VM can
//! migrate between swtpm and tpmstate-emu with each side's own storage and
//! the state never crosses the wire in the clear). Both use one scheme with
//! different flags and tags ([`Purpose`]).
//!
//! The blob is the header and three TLVs: the ciphertext, `TLV3{HMAC-SHA256
//! (key, ciphertext || iv)}` and the IV. The IV is random and as long as
//! the key; AES-CBC uses its first 16 bytes; the plaintext is padded to a
//! multiple of the key's length (not the block's) with PKCS#7-style bytes,
//! so a 256-bit key may add up to 32 bytes of padding (measured against
//! swtpm 0.7.1). A state file's plaintext is the libtpms blob itself; a
//! migration blob's is `TLV1{libtpms blob}` (both measured against swtpm
//! 0.7.1's files and GET_STATEBLOB). A key comes as 16 or 32 bytes, in hex
//! or raw, or from a passphrase through PBKDF2-HMAC-SHA512 (salt `swtpm`,
//! 1,000 rounds) or the first bytes of SHA-512, as swtpm derives it.

use super::blob::{
    BlobError, FLAG_ENCRYPTED, FLAG_MIGRATION_DATA, FLAG_MIGRATION_ENCRYPTED, HEADER_LEN, TAG_DATA,
};
use aes::cipher::block_padding::NoPadding;
use aes::cipher::{BlockModeDecrypt, BlockModeEncrypt, KeyIvInit};
use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256, Sha512};
use zeroize::{Zeroize, Zeroizing};

/// Header flag: the state key has 256 bits.
pub const FLAG_ENCRYPTED_256BIT_KEY: u16 = 0x08;
/// Header flag: the migration key has 256 bits.
pub const FLAG_MIGRATION_256BIT_KEY: u16 = 0x10;
/// TLV tag: data encrypted with the state key.
pub const TAG_ENCRYPTED_DATA: u16 = 2;
/// TLV tag: the HMAC.
pub const TAG_HMAC: u16 = 3;
/// TLV tag: data encrypted with the migration key.
pub const TAG_ENCRYPTED_MIGRATION_DATA: u16 = 5;
/// TLV tag: the IV of state-key-encrypted data.
pub const TAG_IVEC_ENCRYPTED_DATA: u16 = 6;
/// TLV tag: the IV of migration-encrypted data.
pub const TAG_IVEC_ENCRYPTED_MIGRATION_DATA: u16 = 7;

/// What a key encrypts: swtpm's state files or migration blobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// A state file (`--key`): flag 0x01, tags 2 and 6, plaintext = data.
    State,
    /// A blob on the control channel (`--migration-key`): flags 0x02 |
    /// 0x04, tags 5 and 7, plaintext = `TLV1{data}`.
    Migration,
}

impl Purpose {
    /// The header flags of a blob sealed with a key of `len` bytes.
    fn flags(self, len: usize) -> u16 {
        match (self, len) {
            (Purpose::State, 32) => FLAG_ENCRYPTED | FLAG_ENCRYPTED_256BIT_KEY,
            (Purpose::State, _) => FLAG_ENCRYPTED,
            (Purpose::Migration, 32) => {
                FLAG_MIGRATION_ENCRYPTED | FLAG_MIGRATION_DATA | FLAG_MIGRATION_256BIT_KEY
            }
            (Purpose::Migration, _) => FLAG_MIGRATION_ENCRYPTED | FLAG_MIGRATION_DATA,
        }
    }

    /// The ciphertext's and the IV's TLV tags.
    fn tags(self) -> (u16, u16) {
        match self {
            Purpose::State => (TAG_ENCRYPTED_DATA, TAG_IVEC_ENCRYPTED_DATA),
            Purpose::Migration => (
                TAG_ENCRYPTED_MIGRATION_DATA,
                TAG_IVEC_ENCRYPTED_MIGRATION_DATA,
            ),
        }
    }
}

/// How swtpm turns a passphrase into a key (`kdf=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kdf {
    /// PBKDF2-HMAC-SHA512, salt `swtpm`, 1,000 rounds (swtpm's default).
    Pbkdf2,
    /// The first bytes of SHA-512.
    Sha512,
}

/// What swtpm's key options hold: a key, or a passphrase whose key length
/// comes from `mode=` or, when reading, from the blob's own flags.
#[derive(Clone)]
pub enum SwtpmSecret {
    /// `--key file=` / `fd=`.
    Key(SwtpmKey),
    /// `--key pwdfile=` / `pwdfd=`.
    Passphrase {
        /// The passphrase: the file's whole contents, as swtpm reads it.
        passphrase: Zeroizing<Vec<u8>>,
        /// `kdf=`.
        kdf: Kdf,
        /// `mode=` as bits (128 or 256), if given.
        bits: Option<u32>,
    },
}

impl std::fmt::Debug for SwtpmSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SwtpmSecret::Key(k) => write!(f, "{k:?}"),
            SwtpmSecret::Passphrase { kdf, bits, .. } => {
                write!(f, "SwtpmSecret::Passphrase({kdf:?}, {bits:?}, <redacted>)")
            }
        }
    }
}

impl SwtpmSecret {
    /// The key for a blob encrypted with a key of `blob_bits` bits: a
    /// passphrase without `mode=` follows the blob.
    pub fn key_for(&self, blob_bits: u32) -> SwtpmKey {
        match self {
            SwtpmSecret::Key(k) => k.clone(),
            SwtpmSecret::Passphrase {
                passphrase,
                kdf,
                bits,
            } => SwtpmKey::from_passphrase(passphrase, *kdf, bits.unwrap_or(blob_bits) == 256),
        }
    }

    /// The key for writing: a passphrase without `mode=` gives a 128-bit
    /// key, swtpm's default (`mode=aes-cbc`).
    pub fn key(&self) -> SwtpmKey {
        self.key_for(128)
    }
}

/// A swtpm key: 16 or 32 bytes.
#[derive(Clone)]
pub struct SwtpmKey(Zeroizing<Vec<u8>>);

impl std::fmt::Debug for SwtpmKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SwtpmKey({} bits, <redacted>)", self.0.len() * 8)
    }
}

impl SwtpmKey {
    /// A key of 16 or 32 bytes.
    pub fn new(bytes: &[u8]) -> Result<SwtpmKey, String> {
        match bytes.len() {
            16 | 32 => Ok(SwtpmKey(Zeroizing::new(bytes.to_vec()))),
            n => Err(format!("a swtpm key has 16 or 32 bytes, not {n}")),
        }
    }

    /// A key file's contents as swtpm reads them: 32 or 64 hex digits
    /// (`format=hex`, an optional `0x` and surrounding white space), or 16
    /// or 32 raw bytes (`format=binary`); `bits`, when given, is the length
    /// `mode=` demands (128 or 256).
    pub fn from_key_file(data: &[u8], hex: bool, bits: Option<u32>) -> Result<SwtpmKey, String> {
        let raw = match hex {
            true => {
                let not_hex = || {
                    "not a hex key (format=hex, the default); for 16 or 32 raw bytes give format=binary"
                        .to_string()
                };
                let text = std::str::from_utf8(data).map_err(|_| not_hex())?.trim();
                let text = text.strip_prefix("0x").unwrap_or(text);
                Zeroizing::new(hex::decode(text).map_err(|_| not_hex())?)
            }
            false => Zeroizing::new(data.to_vec()),
        };
        let found = raw.len();
        match bits {
            Some(b) if found * 8 != b as usize => Err(format!(
                "a {} key has {} bytes ({} hex digits), found {found} bytes",
                if b == 256 {
                    "mode=aes-256-cbc"
                } else {
                    "mode=aes-cbc"
                },
                b / 8,
                b / 4
            )),
            _ => SwtpmKey::new(&raw),
        }
    }

    /// The key swtpm derives from `passphrase` for a 128- or 256-bit mode.
    pub fn from_passphrase(passphrase: &[u8], kdf: Kdf, bits256: bool) -> SwtpmKey {
        let len = if bits256 { 32 } else { 16 };
        let mut key = Zeroizing::new(vec![0u8; len]);
        match kdf {
            Kdf::Sha512 => {
                let mut digest = Sha512::digest(passphrase);
                key.copy_from_slice(&digest[..len]);
                digest[..].zeroize();
            }
            Kdf::Pbkdf2 => pbkdf2_sha512(passphrase, b"swtpm", 1000, &mut key),
        }
        SwtpmKey(key)
    }

    /// The key's bytes (for deriving another key from it).
    pub fn bytes(&self) -> &[u8] {
        &self.0
    }

    /// The key's length in bits (128 or 256).
    pub fn bits(&self) -> u32 {
        self.0.len() as u32 * 8
    }

    fn hmac(&self, ciphertext: &[u8], iv: &[u8]) -> Hmac<Sha256> {
        // HMAC takes keys of any length: this cannot fail.
        let mut mac =
            <Hmac<Sha256> as KeyInit>::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(ciphertext);
        mac.update(iv);
        mac
    }

    fn encrypt(&self, iv: &[u8; 16], plain: &[u8]) -> Vec<u8> {
        let unit = self.0.len();
        let pad = unit - plain.len() % unit;
        let mut padded = Zeroizing::new(Vec::with_capacity(plain.len() + pad));
        padded.extend_from_slice(plain);
        padded.resize(plain.len() + pad, pad as u8);
        match unit {
            16 => cbc::Encryptor::<aes::Aes128>::new_from_slices(&self.0, iv)
                .map(|c| c.encrypt_padded_vec::<NoPadding>(&padded)),
            _ => cbc::Encryptor::<aes::Aes256>::new_from_slices(&self.0, iv)
                .map(|c| c.encrypt_padded_vec::<NoPadding>(&padded)),
        }
        // The key is 16 or 32 bytes (checked when made), the IV 16, and
        // the padded plaintext a multiple of 16 bytes.
        .expect("key, IV and plaintext lengths are checked")
    }

    /// AES-CBC decryption of whole blocks, no padding removed.
    fn decrypt_blocks(
        &self,
        iv: &[u8; 16],
        ciphertext: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, BlobError> {
        // The key is 16 or 32 bytes (checked when made), the IV 16.
        let plain = match self.0.len() {
            16 => cbc::Decryptor::<aes::Aes128>::new_from_slices(&self.0, iv)
                .expect("key and IV lengths are checked")
                .decrypt_padded_vec::<NoPadding>(ciphertext),
            _ => cbc::Decryptor::<aes::Aes256>::new_from_slices(&self.0, iv)
                .expect("key and IV lengths are checked")
                .decrypt_padded_vec::<NoPadding>(ciphertext),
        };
        plain.map(Zeroizing::new).map_err(|_| {
            BlobError::BadTlv(format!(
                "{} bytes of encrypted data are not whole AES blocks",
                ciphertext.len()
            ))
        })
    }

    fn decrypt(&self, iv: &[u8; 16], ciphertext: &[u8]) -> Result<Zeroizing<Vec<u8>>, BlobError> {
        let bad = || BlobError::BadTlv("the decrypted data's padding is malformed".into());
        let unit = self.0.len();
        let mut plain = self.decrypt_blocks(iv, ciphertext)?;
        let pad = usize::from(*plain.last().ok_or_else(bad)?);
        if pad == 0
            || pad > unit
            || pad > plain.len()
            || plain[plain.len() - pad..]
                .iter()
                .any(|&b| usize::from(b) != pad)
        {
            return Err(bad());
        }
        let keep = plain.len() - pad;
        plain.truncate(keep);
        Ok(plain)
    }

    /// Why a blob's HMAC fails: if this key decrypts its first block to
    /// the start of a libtpms blob, the key is right and a byte after it
    /// (or the HMAC) was changed; another key yields noise there, which
    /// looks like a libtpms header about once in 2^31 tries. A change to
    /// the IV (its TLV or its first 16 bytes) or the first block also reads
    /// as another key.
    fn classify_mismatch(&self, purpose: Purpose, iv: &[u8; 16], ciphertext: &[u8]) -> BlobError {
        let Some(block) = ciphertext.get(..16) else {
            return BlobError::WrongKey;
        };
        let plain = match self.decrypt_blocks(iv, block) {
            Ok(p) => p,
            Err(_) => return BlobError::WrongKey,
        };
        let data = match purpose {
            Purpose::State => &plain[..],
            Purpose::Migration if plain[..2] == TAG_DATA.to_be_bytes() => &plain[6..],
            Purpose::Migration => return BlobError::WrongKey,
        };
        match super::blob::is_libtpms_header(data) {
            true => BlobError::Corrupt,
            false => BlobError::WrongKey,
        }
    }

    /// Encrypts libtpms blob `data` in swtpm's blob format for `purpose`:
    /// a state file as swtpm writes it with `--key`, or a blob as swtpm's
    /// GET_STATEBLOB hands it out with `--migration-key`; `None` over 4 GiB.
    pub fn seal(&self, purpose: Purpose, data: &[u8]) -> Option<Vec<u8>> {
        let iv_bytes: Vec<u8> = (0..self.0.len()).map(|_| rand::random::<u8>()).collect();
        let mut iv = [0u8; 16];
        iv.copy_from_slice(&iv_bytes[..16]);
        let mut plain = Zeroizing::new(Vec::with_capacity(data.len() + 6));
        if purpose == Purpose::Migration {
            plain.extend_from_slice(&TAG_DATA.to_be_bytes());
            plain.extend_from_slice(&u32::try_from(data.len()).ok()?.to_be_bytes());
        }
        plain.extend_from_slice(data);
        let ciphertext = self.encrypt(&iv, &plain);
        let mac = self.hmac(&ciphertext, &iv_bytes).finalize().into_bytes();
        let (data_tag, iv_tag) = purpose.tags();
        let mut body = Vec::new();
        for (tag, value) in [
            (data_tag, &ciphertext[..]),
            (TAG_HMAC, &mac[..]),
            (iv_tag, &iv_bytes[..]),
        ] {
            body.extend_from_slice(&tag.to_be_bytes());
            body.extend_from_slice(&u32::try_from(value.len()).ok()?.to_be_bytes());
            body.extend_from_slice(value);
        }
        let total = u32::try_from(HEADER_LEN + body.len()).ok()?;
        let mut b = vec![2, 1];
        b.extend_from_slice(&(HEADER_LEN as u16).to_be_bytes());
        b.extend_from_slice(&purpose.flags(self.0.len()).to_be_bytes());
        b.extend_from_slice(&total.to_be_bytes());
        b.extend_from_slice(&body);
        Some(b)
    }

    /// The libtpms blob in an encrypted blob's TLVs (`body`, after the
    /// header): the HMAC is checked first, in constant time.
    pub(super) fn open(
        &self,
        purpose: Purpose,
        body: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, BlobError> {
        let (data_tag, iv_tag) = purpose.tags();
        let ciphertext = super::blob::find_tlv(body, data_tag)?;
        let mac = super::blob::find_tlv(body, TAG_HMAC)?;
        // swtpm before 0.4 wrote no IV: a zero IV, and an HMAC over the
        // ciphertext alone (swtpm 0.7.1 still reads such files).
        let iv = super::blob::find_tlv_opt(body, iv_tag)?.unwrap_or(&[]);
        if !iv.is_empty() && iv.len() < 16 {
            return Err(BlobError::BadTlv(format!("an IV of {} bytes", iv.len())));
        }
        let mut first = [0u8; 16];
        if !iv.is_empty() {
            first.copy_from_slice(&iv[..16]);
        }
        if self.hmac(ciphertext, iv).verify_slice(mac).is_err() {
            return Err(self.classify_mismatch(purpose, &first, ciphertext));
        }
        let plain = self.decrypt(&first, ciphertext)?;
        match purpose {
            Purpose::State => Ok(plain),
            Purpose::Migration => Ok(Zeroizing::new(
                super::blob::find_tlv(&plain, TAG_DATA)?.to_vec(),
            )),
        }
    }
}

/// PBKDF2 with HMAC-SHA512 (RFC 8018), for swtpm's passphrase keys.
fn pbkdf2_sha512(password: &[u8], salt: &[u8], rounds: u32, out: &mut [u8]) {
    // HMAC takes keys of any length: this cannot fail.
    let prf =
        <Hmac<Sha512> as KeyInit>::new_from_slice(password).expect("HMAC takes any key length");
    for (i, chunk) in out.chunks_mut(64).enumerate() {
        let mut mac = prf.clone();
        mac.update(salt);
        mac.update(&(i as u32 + 1).to_be_bytes());
        let mut u = mac.finalize().into_bytes();
        let mut t = u;
        for _ in 1..rounds {
            let mut mac = prf.clone();
            mac.update(&u);
            u = mac.finalize().into_bytes();
            t.iter_mut().zip(u.iter()).for_each(|(a, b)| *a ^= b);
        }
        chunk.copy_from_slice(&t[..chunk.len()]);
        // Both hold derived key material.
        t[..].zeroize();
        u[..].zeroize();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pbkdf2_sha512_matches_rfc_test_vectors() {
        // From RFC 7914 section 11 (PBKDF2-HMAC-SHA256 there); SHA-512
        // vector: password "password", salt "salt", 1 round, 64 bytes.
        let mut out = [0u8; 64];
        pbkdf2_sha512(b"password", b"salt", 1, &mut out);
        assert_eq!(
            hex::encode(out),
            "867f70cf1ade02cff3752599a3a53dc4af34c7a669815ae5d513554e1c8cf252\
             c02d470a285a0501bad999bfe943c08f050235d7d68b1da55e63f73b60a57fce"
        );
    }

    #[test]
    fn sealed_blobs_open_with_the_key_only() {
        for len in [16, 32] {
            let key = SwtpmKey::new(&vec![7u8; len]).unwrap();
            let sealed = key.seal(Purpose::Migration, b"libtpms state").unwrap();
            assert_eq!(
                &super::super::blob::unwrap_with(&sealed, Some(&key)).unwrap()[..],
                b"libtpms state"
            );
            let other = SwtpmKey::new(&vec![8u8; len]).unwrap();
            assert_eq!(
                super::super::blob::unwrap_with(&sealed, Some(&other)),
                Err(BlobError::WrongKey)
            );
            assert!(matches!(
                super::super::blob::unwrap_with(&sealed, None),
                Err(BlobError::Encrypted(_))
            ));
        }
    }

    #[test]
    fn a_state_file_without_an_iv_opens_as_swtpm_0_7_reads_it() {
        // swtpm before 0.4: a zero IV, an HMAC over the ciphertext alone.
        let key = SwtpmKey::new(&[3u8; 16]).unwrap();
        let ciphertext = key.encrypt(&[0u8; 16], b"old state");
        let mac = key.hmac(&ciphertext, &[]).finalize().into_bytes();
        let mut body = Vec::new();
        for (tag, value) in [(TAG_ENCRYPTED_DATA, &ciphertext[..]), (TAG_HMAC, &mac[..])] {
            body.extend_from_slice(&tag.to_be_bytes());
            body.extend_from_slice(&(value.len() as u32).to_be_bytes());
            body.extend_from_slice(value);
        }
        let mut file = vec![2, 1, 0, 10, 0, 1];
        file.extend_from_slice(&((10 + body.len()) as u32).to_be_bytes());
        file.extend_from_slice(&body);
        let data = super::super::blob::unwrap_state_file(&file, Some(&key)).unwrap();
        assert_eq!(&data[..], b"old state");
    }
}
