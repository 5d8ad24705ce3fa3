//! The on-disk format: commit headers, two header slots and a CBOR directory
//! of blob extents. Pure data and checks, no I/O; `docs/format.md` describes
//! every byte.
//!
//! ```text
//! area offset 0      slot 0 (a 512-byte header, then usually its directory)
//! area offset 4096   slot 1
//! area offset 8192.. 4 KiB blocks: blob extents, directory extents and the
//!                    header blocks of chained commits, written copy-on-write
//!                    into blocks the committed generation does not use
//! ```
//!
//! A commit's header is either *anchored* (written to a slot) or *chained*:
//! written in the first block of the commit's own run, at the place its
//! predecessor's header named in `next`, so that a commit is one contiguous
//! write. A directory of up to [`EMBEDDED_DIRECTORY_MAX`] bytes is *embedded*
//! in its header's block, right after the header, so a small commit writes
//! one block besides its data.
//!
//! [`slot`] is the 512-byte header codec, [`directory`] the CBOR directory.
//! Every number read from disk is checked before it meets arithmetic: an
//! extent whose end would pass 2^64 is refused like one outside the area.

pub mod directory;
pub mod slot;

pub use directory::{BlobEntry, Directory, DirectoryProblem, Encryption, Kdf, Sealed};
pub use slot::{Slot, SlotProblem};

use serde::{Deserialize, Serialize};

/// Magic at the start of a slot.
pub const MAGIC: &[u8; 8] = b"TPMSTATE";
/// The format version this code writes and the newest it reads. Version 1
/// had no chained headers (its `next` is always zero), version 2 no embedded
/// directories; both read as they are.
pub const FORMAT_VERSION: u32 = 3;
/// The directory schema version this code writes and the newest it reads.
/// Version 1 wrote byte arrays as CBOR arrays of integers and kept every
/// GCM tag after its ciphertext; both still decode.
pub const DIRECTORY_VERSION: u32 = 2;
/// Bytes of a slot that carry data (the rest of its 4 KiB is zero).
pub const SLOT_BYTES: usize = 512;
/// Area offsets of the two slots.
pub const SLOT_OFFSETS: [u64; 2] = [0, 4096];
/// First byte of the extent space.
pub const DATA_START: u64 = 8192;
/// Allocation unit of the extent space.
pub const BLOCK: u64 = 4096;
/// Bytes added to a blob by AES-256-GCM (its tag).
pub const TAG_BYTES: u32 = 16;
/// Longest blob name, in bytes.
pub const MAX_NAME_BYTES: usize = 255;
/// Largest directory we accept (bounds memory use on hostile input).
pub const MAX_DIRECTORY_BYTES: u32 = 1 << 20;
/// Largest directory embedded in its header's block, after the header.
pub const EMBEDDED_DIRECTORY_MAX: u32 = (BLOCK - SLOT_BYTES as u64) as u32;

/// A contiguous run of bytes in the extent space.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Extent {
    /// Area offset (a multiple of [`BLOCK`], at least [`DATA_START`]; 0 when
    /// empty; a header's offset + [`SLOT_BYTES`] for an embedded directory).
    pub offset: u64,
    /// Bytes used.
    pub len: u32,
}

impl Extent {
    /// Start of the first block the extent touches.
    pub fn start(&self) -> u64 {
        self.offset / BLOCK * BLOCK
    }
    /// End of the last block the extent touches, or `None` if it would lie
    /// past 2^64 (only a crafted header can say so).
    pub fn checked_end(&self) -> Option<u64> {
        self.offset
            .checked_add(u64::from(self.len))?
            .checked_next_multiple_of(BLOCK)
    }
    /// End of the last block the extent touches; `u64::MAX` for an extent
    /// that wraps, which no area contains, so a fit check on it fails.
    /// Extents that passed decoding never wrap.
    pub fn end(&self) -> u64 {
        self.checked_end().unwrap_or(u64::MAX)
    }
    /// Blocks the extent touches.
    pub fn blocks(&self) -> u64 {
        (self.end() - self.start()) / BLOCK
    }
    /// Whether this (directory) extent lies inside a header's block, after the header.
    pub fn is_embedded(&self) -> bool {
        self.offset % BLOCK == SLOT_BYTES as u64
    }
}

/// Checks a blob name.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_NAME_BYTES {
        return Err(format!("blob name must be 1..={MAX_NAME_BYTES} bytes"));
    }
    if name.chars().any(|c| c.is_control()) {
        return Err("blob name contains a control character".into());
    }
    Ok(())
}

/// Checks that a non-empty extent starts on a block of the extent space and
/// ends inside the area, without overflow; an empty one has offset 0.
pub(crate) fn check_extent(e: &Extent, area_len: u64) -> Result<(), String> {
    if e.len == 0 {
        return if e.offset == 0 {
            Ok(())
        } else {
            Err("empty extent with an offset".into())
        };
    }
    let fits = e.checked_end().is_some_and(|end| end <= area_len);
    if e.offset < DATA_START || !e.offset.is_multiple_of(BLOCK) || !fits {
        return Err(format!(
            "extent {}+{} outside the area of {area_len} bytes",
            e.offset, e.len
        ));
    }
    Ok(())
}

/// Bytes of `value`'s CBOR encoding.
pub fn encoded_len<T: Serialize>(value: &T) -> u64 {
    let mut out = Vec::with_capacity(256);
    // As in Directory::encode: plain serde data into a Vec cannot fail.
    ciborium::into_writer(value, &mut out).expect("CBOR encoding into a Vec cannot fail");
    out.len() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_extent_that_wraps_past_2_pow_64_is_outside_every_area() {
        let e = Extent {
            offset: u64::MAX - BLOCK + 1,
            len: u32::MAX,
        };
        assert_eq!(e.checked_end(), None);
        assert_eq!(e.end(), u64::MAX);
        assert!(check_extent(&e, u64::MAX / BLOCK * BLOCK).is_err());
        let near = Extent {
            offset: u64::MAX / BLOCK * BLOCK,
            len: 1,
        };
        assert_eq!(near.checked_end(), None, "the block end itself wraps");
    }
}
