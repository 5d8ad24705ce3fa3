//! The commit header: 512 little-endian bytes with a CRC32C in the last four,
//! kept in a header slot (anchored) or in the first block of a chained
//! commit's run (`docs/format.md`, section 3).

use super::{check_extent, Extent, BLOCK, DATA_START, EMBEDDED_DIRECTORY_MAX, FORMAT_VERSION};
use super::{MAGIC, MAX_DIRECTORY_BYTES, SLOT_BYTES};

const FLAG_ENCRYPTED: u32 = 1;

/// A commit header (little-endian, 512 bytes, CRC32C in the last 4), kept in
/// a header slot (anchored) or in the first block of a chained commit's run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    /// Format version that wrote the slot.
    pub format_version: u32,
    /// Whether blobs are encrypted.
    pub encrypted: bool,
    /// Commit number; the newer of two valid slots wins.
    pub generation: u64,
    /// Random id of the store, fixed at format time.
    pub store_id: [u8; 16],
    /// Bytes of the area this generation may use.
    pub area_len: u64,
    /// Where the directory lies.
    pub directory: Extent,
    /// CRC32C of the directory bytes.
    pub directory_crc: u32,
    /// HMAC-SHA256 of the directory bytes (zeros for a plaintext store).
    pub directory_mac: [u8; 32],
    /// Random id of this commit; a chained successor names it in `prev_id`.
    pub commit_id: [u8; 16],
    /// `commit_id` of the commit this one follows.
    pub prev_id: [u8; 16],
    /// Area offset of the block where the next commit's header may be chained
    /// (a block free in this generation); 0 if the next commit must anchor.
    pub next: u64,
}

/// Why a slot was not usable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SlotProblem {
    /// No magic: never written (or overwritten by something else).
    #[error("no tpmstate magic")]
    NoMagic,
    /// Magic present but the checksum fails (torn or damaged).
    #[error("header checksum mismatch")]
    BadChecksum,
    /// Written by a newer tpmstate.
    #[error("format version {0} is newer than this tpmstate supports ({FORMAT_VERSION})")]
    NewerVersion(u32),
    /// Fields that cannot be right.
    #[error("invalid header: {0}")]
    Invalid(String),
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn le64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

impl Slot {
    /// Encodes the slot into its 512 bytes.
    pub fn encode(&self) -> [u8; SLOT_BYTES] {
        let mut b = [0u8; SLOT_BYTES];
        b[0..8].copy_from_slice(MAGIC);
        b[8..12].copy_from_slice(&self.format_version.to_le_bytes());
        let flags = if self.encrypted { FLAG_ENCRYPTED } else { 0 };
        b[12..16].copy_from_slice(&flags.to_le_bytes());
        b[16..24].copy_from_slice(&self.generation.to_le_bytes());
        b[24..40].copy_from_slice(&self.store_id);
        b[40..48].copy_from_slice(&self.area_len.to_le_bytes());
        b[48..56].copy_from_slice(&self.directory.offset.to_le_bytes());
        b[56..60].copy_from_slice(&self.directory.len.to_le_bytes());
        b[60..64].copy_from_slice(&self.directory_crc.to_le_bytes());
        b[64..96].copy_from_slice(&self.directory_mac);
        b[96..112].copy_from_slice(&self.commit_id);
        b[112..128].copy_from_slice(&self.prev_id);
        b[128..136].copy_from_slice(&self.next.to_le_bytes());
        let crc = crc32c::crc32c(&b[..SLOT_BYTES - 4]);
        b[SLOT_BYTES - 4..].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes a header found at area offset `at` and checks it, including
    /// that an embedded directory lies in this header's own block.
    pub fn decode_at(b: &[u8], at: u64) -> Result<Slot, SlotProblem> {
        let slot = Slot::decode(b)?;
        let own = at.checked_add(SLOT_BYTES as u64);
        if slot.directory.is_embedded() && Some(slot.directory.offset) != own {
            return Err(SlotProblem::Invalid(format!(
                "directory at area offset {} is embedded in another header's block",
                slot.directory.offset
            )));
        }
        Ok(slot)
    }

    /// Decodes and checks a header wherever it was found: every field alone
    /// (see [`Slot::decode_at`] for where its directory may lie).
    pub fn decode(b: &[u8]) -> Result<Slot, SlotProblem> {
        if b.len() < SLOT_BYTES || &b[0..8] != MAGIC {
            return Err(SlotProblem::NoMagic);
        }
        let b = &b[..SLOT_BYTES];
        if crc32c::crc32c(&b[..SLOT_BYTES - 4]) != le32(b, SLOT_BYTES - 4) {
            return Err(SlotProblem::BadChecksum);
        }
        let format_version = le32(b, 8);
        let flags = le32(b, 12);
        if format_version > FORMAT_VERSION || flags & !FLAG_ENCRYPTED != 0 {
            return Err(SlotProblem::NewerVersion(
                format_version.max(FORMAT_VERSION + 1),
            ));
        }
        if format_version == 0 {
            return Err(SlotProblem::Invalid("format version 0".into()));
        }
        let mut store_id = [0u8; 16];
        store_id.copy_from_slice(&b[24..40]);
        let mut directory_mac = [0u8; 32];
        directory_mac.copy_from_slice(&b[64..96]);
        let mut commit_id = [0u8; 16];
        commit_id.copy_from_slice(&b[96..112]);
        let mut prev_id = [0u8; 16];
        prev_id.copy_from_slice(&b[112..128]);
        let slot = Slot {
            format_version,
            encrypted: flags & FLAG_ENCRYPTED != 0,
            generation: le64(b, 16),
            store_id,
            area_len: le64(b, 40),
            directory: Extent {
                offset: le64(b, 48),
                len: le32(b, 56),
            },
            directory_crc: le32(b, 60),
            directory_mac,
            commit_id,
            prev_id,
            next: le64(b, 128),
        };
        if slot.generation == 0 {
            return Err(SlotProblem::Invalid("generation 0".into()));
        }
        if slot.area_len < DATA_START + BLOCK || !slot.area_len.is_multiple_of(BLOCK) {
            return Err(SlotProblem::Invalid(format!(
                "area length {}",
                slot.area_len
            )));
        }
        if slot.directory.len == 0 || slot.directory.len > MAX_DIRECTORY_BYTES {
            return Err(SlotProblem::Invalid(format!(
                "directory length {}",
                slot.directory.len
            )));
        }
        let d = slot.directory;
        if d.is_embedded() {
            let end = d.offset.checked_add(u64::from(d.len));
            if slot.format_version < 3
                || d.len > EMBEDDED_DIRECTORY_MAX
                || end.is_none_or(|end| end > slot.area_len)
            {
                return Err(SlotProblem::Invalid(format!(
                    "embedded directory {}+{} does not fit its block",
                    d.offset, d.len
                )));
            }
        } else {
            check_extent(&d, slot.area_len).map_err(SlotProblem::Invalid)?;
        }
        let next = Extent {
            offset: slot.next,
            len: if slot.next == 0 { 0 } else { SLOT_BYTES as u32 },
        };
        check_extent(&next, slot.area_len)
            .map_err(|why| SlotProblem::Invalid(format!("next header: {why}")))?;
        Ok(slot)
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    pub(in crate::format) fn slot() -> Slot {
        Slot {
            format_version: FORMAT_VERSION,
            encrypted: false,
            generation: 7,
            store_id: [3; 16],
            area_len: 1 << 20,
            directory: Extent {
                offset: DATA_START,
                len: 100,
            },
            directory_crc: 1,
            directory_mac: [0; 32],
            commit_id: [4; 16],
            prev_id: [5; 16],
            next: DATA_START + BLOCK,
        }
    }

    #[test]
    fn slot_round_trips_and_every_flipped_byte_is_caught() {
        let s = slot();
        let b = s.encode();
        assert_eq!(Slot::decode(&b), Ok(s));
        for i in 0..SLOT_BYTES {
            let mut c = b;
            c[i] ^= 0x01;
            assert!(Slot::decode(&c).is_err(), "flip at {i} not caught");
        }
    }

    #[test]
    fn embedded_directory_must_lie_in_its_own_headers_block() {
        let mut s = slot();
        s.directory = Extent {
            offset: DATA_START + BLOCK + SLOT_BYTES as u64,
            len: 100,
        };
        let b = s.encode();
        assert!(Slot::decode_at(&b, DATA_START + BLOCK).is_ok());
        assert!(matches!(
            Slot::decode_at(&b, DATA_START),
            Err(SlotProblem::Invalid(_))
        ));
        s.directory.len = EMBEDDED_DIRECTORY_MAX + 1;
        assert!(matches!(
            Slot::decode(&s.encode()),
            Err(SlotProblem::Invalid(_))
        ));
        s.directory.len = 100;
        s.format_version = 2;
        assert!(matches!(
            Slot::decode(&s.encode()),
            Err(SlotProblem::Invalid(_))
        ));
    }

    #[test]
    fn newer_format_version_is_refused_by_name() {
        let mut s = slot();
        s.format_version = FORMAT_VERSION + 1;
        assert_eq!(
            Slot::decode(&s.encode()),
            Err(SlotProblem::NewerVersion(FORMAT_VERSION + 1))
        );
    }

    #[test]
    fn a_header_whose_extents_wrap_past_2_pow_64_is_invalid_not_a_panic() {
        let mut s = slot();
        s.area_len = u64::MAX / BLOCK * BLOCK;
        s.directory = Extent {
            offset: s.area_len - BLOCK + SLOT_BYTES as u64,
            len: u32::MAX,
        };
        assert!(matches!(
            Slot::decode(&s.encode()),
            Err(SlotProblem::Invalid(_))
        ));
        s.directory = Extent {
            offset: DATA_START,
            len: 100,
        };
        s.next = u64::MAX / BLOCK * BLOCK;
        assert!(matches!(
            Slot::decode(&s.encode()),
            Err(SlotProblem::Invalid(_))
        ));
        assert!(Slot::decode_at(&slot().encode(), u64::MAX).is_ok());
    }
}
