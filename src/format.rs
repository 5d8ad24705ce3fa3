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

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

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

const FLAG_ENCRYPTED: u32 = 1;

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
    /// End of the last block the extent touches.
    pub fn end(&self) -> u64 {
        (self.offset + u64::from(self.len)).div_ceil(BLOCK) * BLOCK
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
        if slot.directory.is_embedded() && slot.directory.offset != at + SLOT_BYTES as u64 {
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
            if slot.format_version < 3
                || d.len > EMBEDDED_DIRECTORY_MAX
                || d.offset + u64::from(d.len) > slot.area_len
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

/// How the store's master key is obtained.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kdf {
    /// 32 raw bytes from a key file.
    RawKey,
    /// Argon2id over a passphrase.
    Argon2id {
        /// Per-store random salt.
        #[serde(with = "serde_bytes")]
        salt: [u8; 16],
        /// Memory in KiB.
        m_kib: u32,
        /// Passes.
        t: u32,
        /// Lanes.
        p: u32,
    },
}

/// Encryption settings of a store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Encryption {
    /// How the master key is made.
    pub kdf: Kdf,
    /// HMAC proving the master key, so a wrong key is told from corrupt data.
    #[serde(with = "serde_bytes")]
    pub key_check: [u8; 32],
}

/// Per-version AEAD parameters of an encrypted blob. Byte arrays are CBOR
/// byte strings (directory version 1 wrote arrays of integers; both decode).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sealed {
    /// Random salt from which this blob version's key is derived.
    #[serde(with = "serde_bytes")]
    pub salt: [u8; 32],
    /// AES-GCM nonce.
    #[serde(with = "serde_bytes")]
    pub nonce: [u8; 12],
    /// The GCM tag. `None` for a version written by directory version 1,
    /// whose extent holds the ciphertext followed by the tag.
    #[serde(default, skip_serializing_if = "Option::is_none", with = "serde_bytes")]
    pub tag: Option<[u8; 16]>,
}

/// A blob as the directory records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobEntry {
    /// Where its stored bytes (the ciphertext when encrypted, followed by the
    /// tag if `sealed` does not hold it) lie.
    pub extent: Extent,
    /// Plaintext length.
    pub plain_len: u32,
    /// CRC32C of the stored bytes.
    pub crc: u32,
    /// Generation that wrote this version (bound into the AEAD's associated data).
    pub written_gen: u64,
    /// AEAD parameters; present exactly when the store is encrypted.
    pub sealed: Option<Sealed>,
}

/// The directory: everything a generation holds. Serialized as CBOR.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Directory {
    /// Schema version ([`DIRECTORY_VERSION`]).
    pub version: u32,
    /// Must equal the slot's store id.
    #[serde(with = "serde_bytes")]
    pub store_id: [u8; 16],
    /// Must equal the slot's generation.
    pub generation: u64,
    /// Encryption settings; `None` for a plaintext store.
    pub encryption: Option<Encryption>,
    /// Blobs by name.
    pub blobs: BTreeMap<String, BlobEntry>,
}

/// Why a directory was refused.
#[derive(Debug, thiserror::Error)]
pub enum DirectoryProblem {
    /// Not valid CBOR for a directory.
    #[error("directory does not decode: {0}")]
    Decode(String),
    /// Written by a newer tpmstate.
    #[error("directory version {0} is newer than this tpmstate supports ({DIRECTORY_VERSION})")]
    NewerVersion(u32),
    /// Decodes but contradicts itself or its slot.
    #[error("directory is inconsistent: {0}")]
    Inconsistent(String),
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

fn check_extent(e: &Extent, area_len: u64) -> Result<(), String> {
    if e.len == 0 {
        return if e.offset == 0 {
            Ok(())
        } else {
            Err("empty extent with an offset".into())
        };
    }
    if e.offset < DATA_START || !e.offset.is_multiple_of(BLOCK) || e.end() > area_len {
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

impl Directory {
    /// Encodes as CBOR.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(256 + self.blobs.len() * 128);
        // Writing plain serde data into a Vec cannot fail: the only error
        // sources are the writer (infallible for Vec) and unsupported types.
        ciborium::into_writer(self, &mut out).expect("CBOR encoding into a Vec cannot fail");
        out
    }

    /// Decodes CBOR and checks it against its slot.
    pub fn decode(bytes: &[u8], slot: &Slot) -> Result<Directory, DirectoryProblem> {
        #[derive(Deserialize)]
        struct VersionOnly {
            version: u32,
        }
        // Read the version first so a newer schema is refused clearly, not as garbage.
        if let Ok(v) = ciborium::from_reader::<VersionOnly, _>(bytes) {
            if v.version > DIRECTORY_VERSION {
                return Err(DirectoryProblem::NewerVersion(v.version));
            }
        }
        let dir: Directory =
            ciborium::from_reader(bytes).map_err(|e| DirectoryProblem::Decode(e.to_string()))?;
        dir.validate(slot).map_err(DirectoryProblem::Inconsistent)?;
        Ok(dir)
    }

    /// An upper bound on the bytes the encoding grows by when an entry for
    /// `name` is added (or replaces one of that name), whatever its values:
    /// CBOR integers never get shorter as they grow, so the entry is measured
    /// with every field at its largest.
    pub fn entry_bound(name: &str) -> u64 {
        static LARGEST_ENTRY: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
        let entry = *LARGEST_ENTRY.get_or_init(|| {
            encoded_len(&BlobEntry {
                extent: Extent {
                    offset: u64::MAX,
                    len: u32::MAX,
                },
                plain_len: u32::MAX,
                crc: u32::MAX,
                written_gen: u64::MAX,
                sealed: Some(Sealed {
                    salt: [0xff; 32],
                    nonce: [0xff; 12],
                    tag: Some([0xff; 16]),
                }),
            })
        });
        // The name's text header (at most 9 bytes) and the map's count header,
        // which may grow by up to 8 bytes.
        entry + name.len() as u64 + 9 + 8
    }

    /// Bytes by which the encoding may grow when the generation number grows
    /// (a CBOR integer takes 1 to 9 bytes).
    pub const GENERATION_GROWTH_BOUND: u64 = 8;

    /// Every extent this generation uses, the directory's own included.
    pub fn extents<'a>(&'a self, slot: &'a Slot) -> impl Iterator<Item = Extent> + 'a {
        std::iter::once(slot.directory).chain(self.blobs.values().map(|b| b.extent))
    }

    fn validate(&self, slot: &Slot) -> Result<(), String> {
        if self.version == 0 || self.version > DIRECTORY_VERSION {
            return Err(format!("version {}", self.version));
        }
        if self.store_id != slot.store_id || self.generation != slot.generation {
            return Err("store id or generation differs from the header".into());
        }
        if self.encryption.is_some() != slot.encrypted {
            return Err("encryption flag differs from the header".into());
        }
        // The directory's own extent was checked with its header.
        let mut ranges = vec![(slot.directory.start(), slot.directory.end())];
        for b in self.blobs.values() {
            check_extent(&b.extent, slot.area_len)?;
            if b.extent.len > 0 {
                ranges.push((b.extent.start(), b.extent.end()));
            }
        }
        ranges.sort_unstable();
        if ranges.windows(2).any(|w| w[1].0 < w[0].1) {
            return Err("extents overlap".into());
        }
        for (name, b) in &self.blobs {
            check_name(name).map_err(|e| format!("{name:?}: {e}"))?;
            if b.written_gen == 0 || b.written_gen > self.generation {
                return Err(format!("{name:?}: written in generation {}", b.written_gen));
            }
            let expected = match (&b.sealed, slot.encrypted) {
                (Some(Sealed { tag: Some(_), .. }), true) => Some(b.plain_len),
                (Some(Sealed { tag: None, .. }), true) => b.plain_len.checked_add(TAG_BYTES),
                (None, false) => Some(b.plain_len),
                _ => return Err(format!("{name:?}: encryption differs from the store's")),
            };
            if expected != Some(b.extent.len) {
                return Err(format!(
                    "{name:?}: stored length {} does not fit plain length {}",
                    b.extent.len, b.plain_len
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot() -> Slot {
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

    fn entry(offset: u64, len: u32, written_gen: u64, sealed: bool) -> BlobEntry {
        BlobEntry {
            extent: Extent { offset, len },
            plain_len: len,
            crc: len.wrapping_mul(2654435761),
            written_gen,
            sealed: sealed.then_some(Sealed {
                salt: [0xa5; 32],
                nonce: [0x5a; 12],
                tag: Some([0xff; 16]),
            }),
        }
    }

    proptest::proptest! {
        #[test]
        fn directory_grows_by_at_most_the_bound_a_commit_reserves(
            names in proptest::collection::vec("[a-z]{1,40}", 0..40),
            new in "[a-z]{1,255}",
            generation in proptest::num::u64::ANY,
            offset in proptest::num::u64::ANY,
            len in proptest::num::u32::ANY,
            sealed in proptest::bool::ANY,
        ) {
            let mut dir = Directory {
                version: DIRECTORY_VERSION,
                store_id: [1; 16],
                generation: 1,
                encryption: None,
                blobs: names.iter().map(|n| (n.clone(), entry(DATA_START, 1, 1, sealed))).collect(),
            };
            let before = dir.encode().len() as u64;
            dir.generation = generation;
            dir.blobs.insert(new.clone(), entry(offset, len, generation, sealed));
            let after = dir.encode().len() as u64;
            proptest::prop_assert!(
                after <= before + Directory::entry_bound(&new) + Directory::GENERATION_GROWTH_BOUND,
                "{before} -> {after}"
            );
        }
    }

    #[test]
    fn directory_of_version_1_with_integer_arrays_and_trailing_tags_decodes() {
        // Directory version 1 encoded byte arrays as CBOR arrays of integers
        // and had no tag field; the same field names otherwise.
        #[derive(Serialize)]
        struct OldSealed {
            salt: [u8; 32],
            nonce: [u8; 12],
        }
        #[derive(Serialize)]
        struct OldEntry {
            extent: Extent,
            plain_len: u32,
            crc: u32,
            written_gen: u64,
            sealed: Option<OldSealed>,
        }
        #[derive(Serialize)]
        struct OldEncryption {
            kdf: Kdf,
            key_check: [u8; 32],
        }
        #[derive(Serialize)]
        struct OldDirectory {
            version: u32,
            store_id: [u8; 16],
            generation: u64,
            encryption: Option<OldEncryption>,
            blobs: BTreeMap<String, OldEntry>,
        }
        let old = OldDirectory {
            version: 1,
            store_id: [3; 16],
            generation: 7,
            encryption: Some(OldEncryption {
                kdf: Kdf::RawKey,
                key_check: [1; 32],
            }),
            blobs: [(
                "permall".to_string(),
                OldEntry {
                    extent: Extent {
                        offset: DATA_START + BLOCK,
                        len: 116,
                    },
                    plain_len: 100,
                    crc: 9,
                    written_gen: 2,
                    sealed: Some(OldSealed {
                        salt: [200; 32],
                        nonce: [7; 12],
                    }),
                },
            )]
            .into(),
        };
        let mut bytes = Vec::new();
        ciborium::into_writer(&old, &mut bytes).unwrap();
        let mut s = slot();
        s.encrypted = true;
        let dir = Directory::decode(&bytes, &s).unwrap();
        let b = &dir.blobs["permall"];
        assert_eq!(b.extent.len, 116);
        assert_eq!(
            b.sealed,
            Some(Sealed {
                salt: [200; 32],
                nonce: [7; 12],
                tag: None
            })
        );
        assert_eq!(dir.store_id, [3; 16]);
        assert_eq!(dir.encryption.unwrap().key_check, [1; 32]);
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
    fn overlapping_extents_are_inconsistent() {
        let s = slot();
        let entry = BlobEntry {
            extent: Extent {
                offset: DATA_START,
                len: 10,
            },
            plain_len: 10,
            crc: 0,
            written_gen: 1,
            sealed: None,
        };
        let dir = Directory {
            version: DIRECTORY_VERSION,
            store_id: s.store_id,
            generation: s.generation,
            encryption: None,
            blobs: [("a".to_string(), entry)].into(),
        };
        assert!(matches!(
            Directory::decode(&dir.encode(), &s),
            Err(DirectoryProblem::Inconsistent(_))
        ));
    }
}
