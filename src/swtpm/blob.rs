//! swtpm's state blob format, as GET_STATEBLOB hands blobs out and
//! SET_STATEBLOB takes them in (and as swtpm's state files hold them):
//! a 10-byte header `{u8 version=2, u8 min_version=1, u16 hdrsize=10,
//! u16 flags, u32 totlen}` and then TLVs `{u16 tag, u32 length, value}`,
//! all big-endian. A blob for migration is `TLV4{TLV1{libtpms blob}}` with
//! flag 0x04; a state file is `TLV1{libtpms blob}` with no flag.

use super::key::{Purpose, SwtpmKey, FLAG_ENCRYPTED_256BIT_KEY};
use zeroize::Zeroizing;

/// The header's length.
pub const HEADER_LEN: usize = 10;
/// Header flag: encrypted with the state key (`BLOB_FLAG_ENCRYPTED`).
pub const FLAG_ENCRYPTED: u16 = 0x01;
/// Header flag: encrypted with the migration key.
pub const FLAG_MIGRATION_ENCRYPTED: u16 = 0x02;
/// Header flag: the payload is migration data (TLV 4).
pub const FLAG_MIGRATION_DATA: u16 = 0x04;
/// TLV tag: plain data.
pub const TAG_DATA: u16 = 1;
/// TLV tag: migration data (a TLV stream inside).
pub const TAG_MIGRATION_DATA: u16 = 4;
const TLV_HEADER: usize = 6;

/// Why a blob is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlobError {
    /// Shorter than the header (swtpm itself over-read here: CVE-2026-75900).
    #[error("state blob of {0} bytes is shorter than swtpm's {HEADER_LEN}-byte blob header")]
    TooShort(usize),
    /// A header field is out of range.
    #[error("state blob header: {0}")]
    BadHeader(String),
    /// Encrypted with a key this side does not hold.
    #[error("{}", match .0 & FLAG_MIGRATION_ENCRYPTED {
        0 => format!("state blob is encrypted with swtpm's state key (flags 0x{:04x}); send it decrypted", .0),
        _ => format!("state blob is encrypted with a migration key (flags 0x{:04x}), and no --migration-key was given", .0),
    })]
    Encrypted(u16),
    /// A TLV runs past its container, or the data TLV is missing.
    #[error("state blob: {0}")]
    BadTlv(String),
    /// Shorter than its header's total length says: cut off.
    #[error("state blob is truncated: its header says {expected} bytes, only {found} are there")]
    Truncated {
        /// The header's total length.
        expected: u32,
        /// The bytes present.
        found: usize,
    },
    /// Encrypted with a key other than this one (swtpm: "Verification of
    /// HMAC failed"): its HMAC fails and the data does not decrypt either.
    #[error("state blob: its HMAC does not verify: the keys differ")]
    WrongKey,
    /// Its HMAC fails, but the key decrypts the data to well-formed
    /// plaintext: the key is right and the bytes were changed.
    #[error("state blob: its HMAC does not verify, though the key decrypts it: the data or the HMAC was changed")]
    Corrupt,
    /// Plain, though a key was given (swtpm with `--key` refuses it too).
    #[error("state blob is not encrypted, but a key was given for it (swtpm would refuse it too)")]
    NotEncrypted,
    /// Encrypted with a key of another length than the one given.
    #[error(
        "state blob is encrypted with a {blob_bits}-bit key; the key given has {key_bits} bits"
    )]
    KeyLength {
        /// The key length the blob's flags name.
        blob_bits: u32,
        /// The given key's length.
        key_bits: u32,
    },
}

/// The libtpms blob inside a swtpm blob (either form), borrowed. A
/// version-1 blob holds the data itself, with no TLVs.
pub fn unwrap(blob: &[u8]) -> Result<&[u8], BlobError> {
    let (flags, body) = header(blob)?;
    if flags & (FLAG_ENCRYPTED | FLAG_MIGRATION_ENCRYPTED) != 0 {
        return Err(BlobError::Encrypted(flags));
    }
    if blob[0] == 1 {
        return Ok(body);
    }
    match flags & FLAG_MIGRATION_DATA {
        0 => find_tlv(body, TAG_DATA),
        _ => find_tlv(find_tlv(body, TAG_MIGRATION_DATA)?, TAG_DATA),
    }
}

/// The libtpms blob inside a swtpm blob, plain or encrypted with the
/// migration key `key` (`--migration-key`).
pub fn unwrap_with(blob: &[u8], key: Option<&SwtpmKey>) -> Result<Zeroizing<Vec<u8>>, BlobError> {
    let (flags, body) = header(blob)?;
    match (flags & FLAG_MIGRATION_ENCRYPTED != 0, key) {
        (true, Some(key)) if flags & FLAG_ENCRYPTED == 0 => key.open(Purpose::Migration, body),
        _ => unwrap(blob).map(|d| Zeroizing::new(d.to_vec())),
    }
}

/// The length in bits of the state key a state file is encrypted with
/// (its `ENCRYPTED_256BIT_KEY` flag), `None` if it is not encrypted.
pub fn state_file_key_bits(file: &[u8]) -> Result<Option<u32>, BlobError> {
    if is_headerless(file) {
        return Ok(None);
    }
    let (flags, _) = header(file)?;
    Ok(
        match (flags & FLAG_ENCRYPTED, flags & FLAG_ENCRYPTED_256BIT_KEY) {
            (0, _) => None,
            (_, 0) => Some(128),
            _ => Some(256),
        },
    )
}

/// The libtpms blob in a swtpm state file (`tpm2-00.permall`, ...), plain
/// or encrypted with swtpm's state key (`--key`), or a headerless one from
/// swtpm before its blob header (the libtpms blob itself). A plain file read
/// with a key is refused, as swtpm refuses it; so is an encrypted version-1
/// file.
pub fn unwrap_state_file(
    file: &[u8],
    key: Option<&SwtpmKey>,
) -> Result<Zeroizing<Vec<u8>>, BlobError> {
    if is_headerless(file) {
        return match key {
            None => Ok(Zeroizing::new(file.to_vec())),
            Some(_) => Err(BlobError::NotEncrypted),
        };
    }
    let (flags, body) = header(file)?;
    if flags & (FLAG_MIGRATION_ENCRYPTED | FLAG_MIGRATION_DATA) != 0 {
        return Err(BlobError::BadHeader(format!(
            "flags 0x{flags:04x} mark a migration blob, not a state file"
        )));
    }
    match (flags & FLAG_ENCRYPTED != 0, key) {
        (false, None) => unwrap(file).map(|d| Zeroizing::new(d.to_vec())),
        (false, Some(_)) => Err(BlobError::NotEncrypted),
        (true, None) => Err(BlobError::Encrypted(flags)),
        (true, Some(_)) if file[0] == 1 => Err(BlobError::BadHeader(
            "an encrypted version-1 file (swtpm before 0.2): not supported".into(),
        )),
        (true, Some(key)) => {
            let blob_bits = match flags & FLAG_ENCRYPTED_256BIT_KEY {
                0 => 128,
                _ => 256,
            };
            if blob_bits != key.bits() {
                return Err(BlobError::KeyLength {
                    blob_bits,
                    key_bits: key.bits(),
                });
            }
            key.open(Purpose::State, body)
        }
    }
}

/// swtpm's state file for libtpms blob `data`: plain (`TLV1{data}`) or
/// encrypted with `key`; `None` over 4 GiB.
pub fn wrap_state_file(data: &[u8], key: Option<&SwtpmKey>) -> Option<Vec<u8>> {
    if let Some(key) = key {
        return key.seal(Purpose::State, data);
    }
    let inner = u32::try_from(data.len()).ok()?;
    let total = inner.checked_add((TLV_HEADER + HEADER_LEN) as u32)?;
    let mut b = Vec::with_capacity(total as usize);
    b.extend_from_slice(&[2, 1]);
    b.extend_from_slice(&(HEADER_LEN as u16).to_be_bytes());
    b.extend_from_slice(&0u16.to_be_bytes());
    b.extend_from_slice(&total.to_be_bytes());
    b.extend_from_slice(&TAG_DATA.to_be_bytes());
    b.extend_from_slice(&inner.to_be_bytes());
    b.extend_from_slice(data);
    Some(b)
}

/// The magic numbers that begin libtpms's TPM 2 state blobs (after a
/// 16-bit version): the permanent state and the volatile state.
const LIBTPMS_MAGICS: [u32; 2] = [0xab36_4723, 0x4563_7889];

/// Whether `data` begins as a libtpms TPM 2 state blob does: a version
/// from 1 to 16, then a known magic number.
pub fn is_libtpms_header(data: &[u8]) -> bool {
    match data.get(..6) {
        Some(h) => {
            let version = u16::from_be_bytes([h[0], h[1]]);
            let magic = u32::from_be_bytes([h[2], h[3], h[4], h[5]]);
            (1..=16).contains(&version) && LIBTPMS_MAGICS.contains(&magic)
        }
        None => false,
    }
}

/// Whether `file` is a state file from swtpm before its blob header: the
/// libtpms blob itself, which swtpm 0.7.1 still reads (it takes a file
/// whose header does not check as plain data).
fn is_headerless(file: &[u8]) -> bool {
    header(file).is_err() && is_libtpms_header(file)
}

/// The header's flags and what follows it, checked.
fn header(blob: &[u8]) -> Result<(u16, &[u8]), BlobError> {
    if blob.len() < HEADER_LEN {
        return Err(BlobError::TooShort(blob.len()));
    }
    let (version, min_version) = (blob[0], blob[1]);
    let hdrsize = usize::from(u16::from_be_bytes([blob[2], blob[3]]));
    let flags = u16::from_be_bytes([blob[4], blob[5]]);
    let totlen = u32::from_be_bytes([blob[6], blob[7], blob[8], blob[9]]);
    // swtpm 0.7.1 reads versions 1 and 2 (and crashes on a higher one
    // that claims to be readable as 1 or 2), with a 10-byte header only.
    if !(1..=2).contains(&version) || min_version > version {
        return Err(BlobError::BadHeader(format!(
            "version {version} (readable as {min_version}); swtpm's versions are 1 and 2"
        )));
    }
    if hdrsize != HEADER_LEN {
        return Err(BlobError::BadHeader(format!(
            "header size {hdrsize}; swtpm's header has {HEADER_LEN} bytes"
        )));
    }
    if usize::try_from(totlen).map_or(true, |t| t > blob.len()) {
        return Err(BlobError::Truncated {
            expected: totlen,
            found: blob.len(),
        });
    }
    if usize::try_from(totlen).ok() != Some(blob.len()) {
        return Err(BlobError::BadHeader(format!(
            "total length {totlen} but {} bytes received",
            blob.len()
        )));
    }
    Ok((flags, &blob[hdrsize..]))
}

/// The value of the first TLV tagged `tag` in `stream`.
pub(super) fn find_tlv(stream: &[u8], tag: u16) -> Result<&[u8], BlobError> {
    find_tlv_opt(stream, tag)?.ok_or_else(|| BlobError::BadTlv(format!("no TLV with tag {tag}")))
}

/// The value of the first TLV tagged `tag` in `stream`, if there is one.
pub(super) fn find_tlv_opt(mut stream: &[u8], tag: u16) -> Result<Option<&[u8]>, BlobError> {
    while !stream.is_empty() {
        if stream.len() < TLV_HEADER {
            return Err(BlobError::BadTlv(format!(
                "{} trailing bytes are not a TLV",
                stream.len()
            )));
        }
        let t = u16::from_be_bytes([stream[0], stream[1]]);
        let len = u32::from_be_bytes([stream[2], stream[3], stream[4], stream[5]]) as usize;
        let rest = &stream[TLV_HEADER..];
        let value = rest.get(..len).ok_or_else(|| {
            BlobError::BadTlv(format!("TLV {t} claims {len} bytes, {} remain", rest.len()))
        })?;
        if t == tag {
            return Ok(Some(value));
        }
        stream = &rest[len..];
    }
    Ok(None)
}

/// Wraps a libtpms blob for GET_STATEBLOB: `TLV4{TLV1{data}}`, flag 0x04,
/// as swtpm hands out a decrypted blob; `None` if it would exceed 4 GiB.
pub fn wrap_for_migration(data: &[u8]) -> Option<Vec<u8>> {
    let inner = u32::try_from(data.len()).ok()?;
    let outer = inner.checked_add(TLV_HEADER as u32)?;
    let total = outer.checked_add((TLV_HEADER + HEADER_LEN) as u32)?;
    let mut b = Vec::with_capacity(total as usize);
    b.extend_from_slice(&[2, 1]);
    b.extend_from_slice(&(HEADER_LEN as u16).to_be_bytes());
    b.extend_from_slice(&FLAG_MIGRATION_DATA.to_be_bytes());
    b.extend_from_slice(&total.to_be_bytes());
    b.extend_from_slice(&TAG_MIGRATION_DATA.to_be_bytes());
    b.extend_from_slice(&outer.to_be_bytes());
    b.extend_from_slice(&TAG_DATA.to_be_bytes());
    b.extend_from_slice(&inner.to_be_bytes());
    b.extend_from_slice(data);
    Some(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrapped_blobs_unwrap_to_their_data() {
        let data = b"libtpms state".to_vec();
        let wrapped = wrap_for_migration(&data).unwrap();
        assert_eq!(unwrap(&wrapped).unwrap(), &data[..]);
    }

    #[test]
    fn a_state_file_blob_unwraps_too() {
        let mut b = vec![2, 1, 0, 10, 0, 0, 0, 0, 0, 19];
        b.extend_from_slice(&[0, 1, 0, 0, 0, 3, 7, 8, 9]);
        assert_eq!(unwrap(&b).unwrap(), &[7, 8, 9]);
    }

    #[test]
    fn short_lying_and_encrypted_blobs_are_refused() {
        for n in 0..HEADER_LEN {
            assert_eq!(unwrap(&vec![2; n]), Err(BlobError::TooShort(n)));
        }
        let mut w = wrap_for_migration(b"abc").unwrap();
        w[9] += 1;
        let found = w.len();
        assert_eq!(
            unwrap(&w),
            Err(BlobError::Truncated {
                expected: found as u32 + 1,
                found
            })
        );
        w[9] -= 2; // shorter than the bytes present: trailing bytes
        assert!(matches!(unwrap(&w), Err(BlobError::BadHeader(_))));
        let mut w = wrap_for_migration(b"abc").unwrap();
        w[5] |= FLAG_ENCRYPTED as u8;
        assert!(matches!(unwrap(&w), Err(BlobError::Encrypted(_))));
        let mut w = wrap_for_migration(b"abc").unwrap();
        w[19] = 200; // inner TLV length past the end
        assert!(matches!(unwrap(&w), Err(BlobError::BadTlv(_))));
    }

    /// The start of a libtpms permanent-state blob, and some more bytes.
    fn permall_like() -> Vec<u8> {
        let mut d = vec![0, 3, 0xab, 0x36, 0x47, 0x23];
        d.extend((0..200u8).map(|i| i.wrapping_mul(7)));
        d
    }

    #[test]
    fn state_files_round_trip_plain_and_with_either_key_length() {
        let data = permall_like();
        let plain = wrap_state_file(&data, None).unwrap();
        assert_eq!(&unwrap_state_file(&plain, None).unwrap()[..], &data[..]);
        for len in [16, 32] {
            let key = SwtpmKey::new(&vec![5u8; len]).unwrap();
            let file = wrap_state_file(&data, Some(&key)).unwrap();
            assert_eq!(
                &unwrap_state_file(&file, Some(&key)).unwrap()[..],
                &data[..]
            );
            assert!(matches!(
                unwrap_state_file(&file, None),
                Err(BlobError::Encrypted(_))
            ));
        }
    }

    #[test]
    fn a_state_file_tells_a_wrong_key_from_a_changed_byte() {
        let key = SwtpmKey::new(&[5u8; 32]).unwrap();
        let file = wrap_state_file(&permall_like(), Some(&key)).unwrap();
        let other = SwtpmKey::new(&[6u8; 32]).unwrap();
        assert_eq!(
            unwrap_state_file(&file, Some(&other)),
            Err(BlobError::WrongKey)
        );
        let short = SwtpmKey::new(&[5u8; 16]).unwrap();
        assert_eq!(
            unwrap_state_file(&file, Some(&short)),
            Err(BlobError::KeyLength {
                blob_bits: 256,
                key_bits: 128
            })
        );
        // Every byte after the first ciphertext block, HMAC included, but
        // the IV TLV's header and its first 16 bytes: they decrypt the
        // first block, so a change there reads as another key (the IV TLV
        // comes last).
        let iv_used = file.len() - 32 - 6..file.len() - 16;
        for i in (HEADER_LEN + 6 + 16..file.len()).filter(|i| !iv_used.contains(i)) {
            let mut bad = file.clone();
            bad[i] ^= 0x10;
            let got = unwrap_state_file(&bad, Some(&key));
            assert!(
                matches!(got, Err(BlobError::Corrupt) | Err(BlobError::BadTlv(_))),
                "byte {i}: {got:?}"
            );
        }
    }

    #[test]
    fn headers_swtpm_refuses_are_refused_and_version_1_is_raw_data() {
        let v1 = [&[1, 1, 0, 10, 0, 0, 0, 0, 0, 13][..], b"raw"].concat();
        assert_eq!(unwrap(&v1).unwrap(), b"raw");
        let mut v3 = wrap_state_file(b"abc", None).unwrap();
        v3[0] = 3;
        assert!(matches!(unwrap(&v3), Err(BlobError::BadHeader(m)) if m.contains("version 3")));
        let mut long_header = wrap_state_file(b"abc", None).unwrap();
        long_header[3] = 12;
        assert!(
            matches!(unwrap(&long_header), Err(BlobError::BadHeader(m)) if m.contains("size 12"))
        );
        let key = SwtpmKey::new(&[1u8; 16]).unwrap();
        let plain = wrap_state_file(b"abc", None).unwrap();
        assert_eq!(
            unwrap_state_file(&plain, Some(&key)),
            Err(BlobError::NotEncrypted)
        );
    }

    #[test]
    fn a_headerless_state_file_is_the_libtpms_blob_itself() {
        let old = permall_like();
        assert_eq!(&unwrap_state_file(&old, None).unwrap()[..], &old[..]);
        assert_eq!(state_file_key_bits(&old), Ok(None));
        let key = SwtpmKey::new(&[1u8; 16]).unwrap();
        assert_eq!(
            unwrap_state_file(&old, Some(&key)),
            Err(BlobError::NotEncrypted)
        );
        assert!(unwrap_state_file(b"neither a header nor libtpms", None).is_err());
    }
}
