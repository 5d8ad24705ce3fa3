//! swtpm's `--migration-key`: state blobs on the control channel encrypted
//! in swtpm's blob format, so that a VM can migrate between swtpm and
//! tpmstate-emu with each side's own storage and the state never crosses
//! the wire in the clear.
//!
//! The blob is the header (flags `MIGRATION_ENCRYPTED | MIGRATION_DATA`,
//! plus `MIGRATION_256BIT_KEY` for a 256-bit key) and three TLVs:
//! `TLV5{AES-CBC(TLV1{state})}`, `TLV3{HMAC-SHA256(key, ciphertext || iv)}`,
//! `TLV7{iv}`. The IV is random and as long as the key; AES-CBC uses its
//! first 16 bytes; the plaintext is padded to a multiple of the key's
//! length (not the block's) with PKCS#7-style bytes, so a 256-bit key may
//! add up to 32 bytes of padding (measured against swtpm 0.7.1). A key comes as 16 or 32 bytes, or from
//! a passphrase through PBKDF2-HMAC-SHA512 (salt `swtpm`, 1,000 rounds) or
//! the first bytes of SHA-512, as swtpm derives it.

use super::blob::{BlobError, FLAG_MIGRATION_DATA, FLAG_MIGRATION_ENCRYPTED, HEADER_LEN, TAG_DATA};
use aes::cipher::block_padding::NoPadding;
use aes::cipher::{BlockModeDecrypt, BlockModeEncrypt, KeyIvInit};
use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256, Sha512};
use zeroize::Zeroizing;

/// Header flag: the migration key has 256 bits.
pub const FLAG_MIGRATION_256BIT_KEY: u16 = 0x10;
/// TLV tag: data encrypted with the migration key.
pub const TAG_ENCRYPTED_MIGRATION_DATA: u16 = 5;
/// TLV tag: the HMAC.
pub const TAG_HMAC: u16 = 3;
/// TLV tag: the IV of migration-encrypted data.
pub const TAG_IVEC_ENCRYPTED_MIGRATION_DATA: u16 = 7;

/// How swtpm turns a passphrase into a key (`kdf=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kdf {
    /// PBKDF2-HMAC-SHA512, salt `swtpm`, 1,000 rounds (swtpm's default).
    Pbkdf2,
    /// The first bytes of SHA-512.
    Sha512,
}

/// A migration key: 16 or 32 bytes.
#[derive(Clone)]
pub struct MigrationKey(Zeroizing<Vec<u8>>);

impl std::fmt::Debug for MigrationKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MigrationKey({} bits, <redacted>)", self.0.len() * 8)
    }
}

impl MigrationKey {
    /// A key of 16 or 32 bytes.
    pub fn new(bytes: &[u8]) -> Result<MigrationKey, String> {
        match bytes.len() {
            16 | 32 => Ok(MigrationKey(Zeroizing::new(bytes.to_vec()))),
            n => Err(format!("a migration key has 16 or 32 bytes, not {n}")),
        }
    }

    /// The key swtpm derives from `passphrase` for a 128- or 256-bit mode.
    pub fn from_passphrase(passphrase: &[u8], kdf: Kdf, bits256: bool) -> MigrationKey {
        let len = if bits256 { 32 } else { 16 };
        let mut key = Zeroizing::new(vec![0u8; len]);
        match kdf {
            Kdf::Sha512 => key.copy_from_slice(&Sha512::digest(passphrase)[..len]),
            Kdf::Pbkdf2 => pbkdf2_sha512(passphrase, b"swtpm", 1000, &mut key),
        }
        MigrationKey(key)
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

    fn decrypt(&self, iv: &[u8; 16], ciphertext: &[u8]) -> Result<Zeroizing<Vec<u8>>, BlobError> {
        let bad = || {
            BlobError::BadTlv("the encrypted data does not decrypt (bad length or padding)".into())
        };
        let unit = self.0.len();
        // The key is 16 or 32 bytes (checked when made), the IV 16.
        let plain = match unit {
            16 => cbc::Decryptor::<aes::Aes128>::new_from_slices(&self.0, iv)
                .expect("key and IV lengths are checked")
                .decrypt_padded_vec::<NoPadding>(ciphertext),
            _ => cbc::Decryptor::<aes::Aes256>::new_from_slices(&self.0, iv)
                .expect("key and IV lengths are checked")
                .decrypt_padded_vec::<NoPadding>(ciphertext),
        };
        let mut plain = Zeroizing::new(plain.map_err(|_| bad())?);
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

    /// Encrypts libtpms blob `data` for the control channel, as swtpm's
    /// GET_STATEBLOB does with a migration key; `None` over 4 GiB.
    pub fn seal(&self, data: &[u8]) -> Option<Vec<u8>> {
        let iv_bytes: Vec<u8> = (0..self.0.len()).map(|_| rand::random::<u8>()).collect();
        let mut iv = [0u8; 16];
        iv.copy_from_slice(&iv_bytes[..16]);
        let mut inner = Zeroizing::new(Vec::with_capacity(data.len() + 6));
        inner.extend_from_slice(&TAG_DATA.to_be_bytes());
        inner.extend_from_slice(&u32::try_from(data.len()).ok()?.to_be_bytes());
        inner.extend_from_slice(data);
        let ciphertext = self.encrypt(&iv, &inner);
        let mac = self.hmac(&ciphertext, &iv_bytes).finalize().into_bytes();
        let mut flags = FLAG_MIGRATION_ENCRYPTED | FLAG_MIGRATION_DATA;
        if self.0.len() == 32 {
            flags |= FLAG_MIGRATION_256BIT_KEY;
        }
        let mut body = Vec::new();
        for (tag, value) in [
            (TAG_ENCRYPTED_MIGRATION_DATA, &ciphertext[..]),
            (TAG_HMAC, &mac[..]),
            (TAG_IVEC_ENCRYPTED_MIGRATION_DATA, &iv_bytes[..]),
        ] {
            body.extend_from_slice(&tag.to_be_bytes());
            body.extend_from_slice(&u32::try_from(value.len()).ok()?.to_be_bytes());
            body.extend_from_slice(value);
        }
        let total = u32::try_from(HEADER_LEN + body.len()).ok()?;
        let mut b = vec![2, 1];
        b.extend_from_slice(&(HEADER_LEN as u16).to_be_bytes());
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&total.to_be_bytes());
        b.extend_from_slice(&body);
        Some(b)
    }

    /// The libtpms blob in a migration-encrypted blob's TLVs (`body`, after
    /// the header): the HMAC is checked first, in constant time.
    pub(super) fn open(&self, body: &[u8]) -> Result<Zeroizing<Vec<u8>>, BlobError> {
        let ciphertext = super::blob::find_tlv(body, TAG_ENCRYPTED_MIGRATION_DATA)?;
        let mac = super::blob::find_tlv(body, TAG_HMAC)?;
        let iv = super::blob::find_tlv(body, TAG_IVEC_ENCRYPTED_MIGRATION_DATA)?;
        if iv.len() < 16 {
            return Err(BlobError::BadTlv(format!("an IV of {} bytes", iv.len())));
        }
        self.hmac(ciphertext, iv)
            .verify_slice(mac)
            .map_err(|_| BlobError::WrongKey)?;
        let mut first = [0u8; 16];
        first.copy_from_slice(&iv[..16]);
        let inner = self.decrypt(&first, ciphertext)?;
        let data = super::blob::find_tlv(&inner, TAG_DATA)?;
        Ok(Zeroizing::new(data.to_vec()))
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
            let key = MigrationKey::new(&vec![7u8; len]).unwrap();
            let sealed = key.seal(b"libtpms state").unwrap();
            assert_eq!(
                &super::super::blob::unwrap_with(&sealed, Some(&key)).unwrap()[..],
                b"libtpms state"
            );
            let other = MigrationKey::new(&vec![8u8; len]).unwrap();
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
}
