//! swtpm's linear state file (`--tpmstate backend-uri=file://PATH`): one
//! file holding the three state files swtpm otherwise keeps in a directory.
//!
//! Little-endian, 192 bytes of header: `u64 magic` ("swtpmlin" read as a
//! big-endian number), `u8 version = 1`, `u8 padding`, `u16 hdrsize`, then
//! 15 entries `{u32 offset, u32 data_length, u32 section_length}`; entry 0
//! is `permall`, 1 `volatilestate`, 2 `savestate` (the others serve more
//! TPMs and stay empty). An offset of 0 marks an absent file. Each present
//! section holds a state file's bytes in swtpm's blob format.

/// The magic number, as swtpm compares it (`'swtpmlin'`).
pub const MAGIC: u64 = 0x7377_7470_6d6c_696e;
/// The only version swtpm writes.
pub const VERSION: u8 = 1;
/// The header's length.
pub const HEADER_LEN: usize = 192;
const ENTRIES: usize = 15;
const ENTRY_LEN: usize = 12;
const _: () = assert!(12 + ENTRIES * ENTRY_LEN == HEADER_LEN);
/// The state files of TPM 0, in entry order.
pub const NAMES: [&str; 3] = ["permall", "volatilestate", "savestate"];

/// Why a linear file is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinearError {
    /// No "swtpmlin" magic (or shorter than the header).
    #[error(
        "not a swtpm linear state file (no 'swtpmlin' header in its first {HEADER_LEN} bytes)"
    )]
    NotLinear,
    /// A version this reader does not know.
    #[error("swtpm linear state file version {0}; this reader knows version {VERSION}")]
    Version(u8),
    /// The header's size is out of range.
    #[error("swtpm linear state file: header size {0} (expected {HEADER_LEN})")]
    HeaderSize(u16),
    /// An entry points outside the file or into the header.
    #[error("swtpm linear state file: the {name} entry (offset {offset}, {length} bytes) lies outside the file's {file_len} bytes")]
    BadEntry {
        /// The entry's state file.
        name: &'static str,
        /// Its offset.
        offset: u32,
        /// Its data length.
        length: u32,
        /// The file's length.
        file_len: usize,
    },
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// The state files in a linear file (`permall`, `volatilestate`,
/// `savestate`; `None` where absent), borrowed and checked against the
/// file's length.
pub fn parse(file: &[u8]) -> Result<[Option<&[u8]>; 3], LinearError> {
    let head = file.get(..HEADER_LEN).ok_or(LinearError::NotLinear)?;
    let magic = u64::from_le_bytes(head[..8].try_into().map_err(|_| LinearError::NotLinear)?);
    if magic != MAGIC {
        return Err(LinearError::NotLinear);
    }
    if head[8] != VERSION {
        return Err(LinearError::Version(head[8]));
    }
    let hdrsize = u16::from_le_bytes([head[10], head[11]]);
    if usize::from(hdrsize) != HEADER_LEN {
        return Err(LinearError::HeaderSize(hdrsize));
    }
    let mut out = [None, None, None];
    for (i, name) in NAMES.iter().enumerate() {
        let at = 12 + i * ENTRY_LEN;
        let (offset, length) = (le32(head, at), le32(head, at + 4));
        if offset == 0 {
            continue;
        }
        let bad = LinearError::BadEntry {
            name,
            offset,
            length,
            file_len: file.len(),
        };
        let start = offset as usize;
        let end = start.checked_add(length as usize).ok_or(bad.clone())?;
        if start < HEADER_LEN {
            return Err(bad);
        }
        out[i] = Some(file.get(start..end).ok_or(bad)?);
    }
    Ok(out)
}

/// A linear file holding `files` (`permall`, `volatilestate`, `savestate`
/// in that order; `None` where absent), each section exactly as long as
/// its data; `None` if it would exceed 4 GiB.
pub fn build(files: [Option<&[u8]>; 3]) -> Option<Vec<u8>> {
    let mut out = vec![0u8; HEADER_LEN];
    out[..8].copy_from_slice(&MAGIC.to_le_bytes());
    out[8] = VERSION;
    out[10..12].copy_from_slice(&(HEADER_LEN as u16).to_le_bytes());
    for (i, data) in files.iter().enumerate() {
        let Some(data) = data else { continue };
        let offset = u32::try_from(out.len()).ok()?;
        let length = u32::try_from(data.len()).ok()?;
        offset.checked_add(length)?;
        let at = 12 + i * ENTRY_LEN;
        out[at..at + 4].copy_from_slice(&offset.to_le_bytes());
        out[at + 4..at + 8].copy_from_slice(&length.to_le_bytes());
        out[at + 8..at + 12].copy_from_slice(&length.to_le_bytes());
        out.extend_from_slice(data);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_files_parse_back() {
        let file = build([Some(b"perm"), None, Some(b"save")]).unwrap();
        assert_eq!(&file[..8], b"nilmptws");
        assert_eq!(
            parse(&file).unwrap(),
            [Some(&b"perm"[..]), None, Some(&b"save"[..])]
        );
    }

    #[test]
    fn short_foreign_and_lying_files_are_refused() {
        let file = build([Some(b"perm"), None, None]).unwrap();
        assert_eq!(parse(&file[..100]), Err(LinearError::NotLinear));
        assert_eq!(parse(&[0u8; 300]), Err(LinearError::NotLinear));
        let mut v = file.clone();
        v[8] = 2;
        assert_eq!(parse(&v), Err(LinearError::Version(2)));
        let cut = &file[..file.len() - 1];
        assert!(matches!(
            parse(cut),
            Err(LinearError::BadEntry {
                name: "permall",
                ..
            })
        ));
        let mut into_header = file.clone();
        into_header[12] = 4;
        assert!(matches!(
            parse(&into_header),
            Err(LinearError::BadEntry { .. })
        ));
    }
}
