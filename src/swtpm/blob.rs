//! swtpm's state blob format, as GET_STATEBLOB hands blobs out and
//! SET_STATEBLOB takes them in (and as swtpm's state files hold them):
//! a 10-byte header `{u8 version=2, u8 min_version=1, u16 hdrsize=10,
//! u16 flags, u32 totlen}` and then TLVs `{u16 tag, u32 length, value}`,
//! all big-endian. A blob for migration is `TLV4{TLV1{libtpms blob}}` with
//! flag 0x04; a state file is `TLV1{libtpms blob}` with no flag.

use super::migration_key::MigrationKey;
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
    /// Encrypted with a migration key other than this one (swtpm:
    /// "Verification of HMAC failed").
    #[error("state blob: its HMAC does not verify: the migration keys differ")]
    WrongKey,
}

/// The libtpms blob inside a swtpm blob (either form), borrowed.
pub fn unwrap(blob: &[u8]) -> Result<&[u8], BlobError> {
    let (flags, body) = header(blob)?;
    if flags & (FLAG_ENCRYPTED | FLAG_MIGRATION_ENCRYPTED) != 0 {
        return Err(BlobError::Encrypted(flags));
    }
    match flags & FLAG_MIGRATION_DATA {
        0 => find_tlv(body, TAG_DATA),
        _ => find_tlv(find_tlv(body, TAG_MIGRATION_DATA)?, TAG_DATA),
    }
}

/// The libtpms blob inside a swtpm blob, plain or encrypted with the
/// migration key `key` (`--migration-key`).
pub fn unwrap_with(
    blob: &[u8],
    key: Option<&MigrationKey>,
) -> Result<Zeroizing<Vec<u8>>, BlobError> {
    let (flags, body) = header(blob)?;
    match (flags & FLAG_MIGRATION_ENCRYPTED != 0, key) {
        (true, Some(key)) if flags & FLAG_ENCRYPTED == 0 => key.open(body),
        _ => unwrap(blob).map(|d| Zeroizing::new(d.to_vec())),
    }
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
    if min_version > 2 || version == 0 {
        return Err(BlobError::BadHeader(format!(
            "version {version} (needs at least {min_version}); this emulator reads version 2"
        )));
    }
    if hdrsize < HEADER_LEN || hdrsize > blob.len() {
        return Err(BlobError::BadHeader(format!(
            "header size {hdrsize} in a blob of {} bytes",
            blob.len()
        )));
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
pub(super) fn find_tlv(mut stream: &[u8], tag: u16) -> Result<&[u8], BlobError> {
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
            return Ok(value);
        }
        stream = &rest[len..];
    }
    Err(BlobError::BadTlv(format!("no TLV with tag {tag}")))
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
        assert!(matches!(unwrap(&w), Err(BlobError::BadHeader(_))));
        let mut w = wrap_for_migration(b"abc").unwrap();
        w[5] |= FLAG_ENCRYPTED as u8;
        assert!(matches!(unwrap(&w), Err(BlobError::Encrypted(_))));
        let mut w = wrap_for_migration(b"abc").unwrap();
        w[19] = 200; // inner TLV length past the end
        assert!(matches!(unwrap(&w), Err(BlobError::BadTlv(_))));
    }
}
