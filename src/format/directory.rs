//! The directory: a generation's blobs, encryption settings and identity,
//! as CBOR (serde + ciborium), checked against the header that names it.

use super::{check_extent, check_name, encoded_len, Extent, Slot, DIRECTORY_VERSION, TAG_BYTES};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

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
    /// Set by the first commit that stores a blob and kept by every later
    /// one: the store has held state, so an empty generation is not a new
    /// store (an emulator must not make a fresh TPM over it). Not written
    /// while false, so a store that never held a blob encodes as before,
    /// and older readers ignore it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub held_state: bool,
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

    /// Decodes the CBOR directory at the start of `bytes` (trailing bytes
    /// ignored) without checking it against a header: for looking at a
    /// directory whose header is gone. Never trusted for reading blobs.
    pub fn decode_loose(bytes: &[u8]) -> Option<Directory> {
        ciborium::from_reader(bytes).ok()
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

    /// Bytes the `held_state` entry adds when it is first set (its key,
    /// `true`, and the map's count header growing).
    pub const HELD_STATE_BOUND: u64 = 24;

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
    use super::super::slot::tests::slot;
    use super::super::{BLOCK, DATA_START};
    use super::*;

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
                held_state: false,
            };
            let before = dir.encode().len() as u64;
            dir.generation = generation;
            dir.blobs.insert(new.clone(), entry(offset, len, generation, sealed));
            dir.held_state = true;
            let after = dir.encode().len() as u64;
            let bound = Directory::entry_bound(&new)
                + Directory::GENERATION_GROWTH_BOUND
                + Directory::HELD_STATE_BOUND;
            proptest::prop_assert!(after <= before + bound, "{before} -> {after}");
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
            held_state: false,
        };
        assert!(matches!(
            Directory::decode(&dir.encode(), &s),
            Err(DirectoryProblem::Inconsistent(_))
        ));
    }
}
