//! Our own reading of the qcow2 header, done before qcow2-rs sees a file.
//!
//! qcow2-rs panics or corrupts images on inputs it does not handle (see
//! `docs/format.md`), so every field it relies on is checked here first, without
//! I/O, and everything it cannot write safely is refused with a clear reason.

/// qcow2 magic, "QFI\xfb".
pub const MAGIC: u32 = 0x5146_49fb;
/// The largest header we read (QEMU's limit for a header with extensions).
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// Smallest cluster we accept: qcow2-rs hangs on 512 B - 2 KiB clusters.
pub const MIN_CLUSTER_BITS: u32 = 12;
/// Largest cluster qcow2 allows (2 MiB).
pub const MAX_CLUSTER_BITS: u32 = 21;
/// Largest virtual size we accept; an NVRAM image is a few MiB.
pub const MAX_VIRTUAL_SIZE: u64 = 1 << 40;
/// QEMU's limits on the L1 table (32 MiB) and the refcount table (8 MiB). They
/// also bound what qcow2-rs allocates for a hostile header: an allocation
/// failure aborts the process, which no error handling could catch.
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// See [`MAX_L1_BYTES`].
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;

const INCOMPAT_DIRTY: u64 = 1 << 0;
const INCOMPAT_CORRUPT: u64 = 1 << 1;
const INCOMPAT_DATA_FILE: u64 = 1 << 2;
const INCOMPAT_COMPRESSION: u64 = 1 << 3;
const INCOMPAT_EXTL2: u64 = 1 << 4;
/// Header extension of persistent dirty bitmaps (their directory and tables
/// live in clusters of their own).
const EXT_BITMAPS: u32 = 0x2385_2875;
/// Header extension naming the backing file's format.
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// QEMU's limits: snapshots per image, and bytes of a backing file name.
pub const MAX_SNAPSHOTS: u32 = 65536;
const MAX_BACKING_NAME: u32 = 1023;

/// The header fields tpmstate uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Qcow2Header {
    /// 2 (compat 0.10) or 3 (compat 1.1).
    pub version: u32,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Virtual disk size in bytes.
    pub size: u64,
    /// Entries of the L1 table.
    pub l1_size: u32,
    /// Host offset of the L1 table.
    pub l1_table_offset: u64,
    /// Host offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Clusters of the refcount table.
    pub refcount_table_clusters: u32,
    /// log2 of the refcount width in bits.
    pub refcount_order: u32,
    /// Compatible feature bits (bit 0: lazy refcounts).
    pub compatible_features: u64,
    /// The image may reference clusters from tables tpmstate does not parse:
    /// it has a bitmaps extension, or its extension list is unreadable.
    pub foreign_tables: bool,
    /// Internal snapshots in the snapshot table.
    pub nb_snapshots: u32,
    /// Host offset of the snapshot table (0 when there are none).
    pub snapshots_offset: u64,
    /// The backing file this image is an overlay of, if any.
    pub backing: Option<BackingRef>,
}

/// The backing file an overlay names in its header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackingRef {
    /// The file name as written (relative names are relative to the overlay's directory).
    pub name: String,
    /// The format named by the backing-format extension, if there is one.
    pub format: Option<String>,
}

impl Qcow2Header {
    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }
    /// Host byte ranges that hold fixed metadata: the header cluster, the L1
    /// table and the refcount table. Data clusters must never overlap them.
    pub fn metadata_ranges(&self) -> [(u64, u64); 3] {
        let cs = self.cluster_size();
        [
            (0, cs),
            (self.l1_table_offset, u64::from(self.l1_size) * 8),
            (
                self.refcount_table_offset,
                u64::from(self.refcount_table_clusters) * cs,
            ),
        ]
    }
}

/// Why a header was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderProblem {
    /// Not a qcow2 image at all.
    NotQcow2(String),
    /// A qcow2 image using something we refuse.
    Unsupported(String),
    /// A qcow2 header with inconsistent fields.
    Corrupt(String),
}

fn be32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(a)
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

/// Parses and validates the header at the start of `buf` (the first bytes of
/// the file, up to [`MAX_HEADER_BYTES`]) for a file of `file_len` bytes.
pub fn parse(buf: &[u8], file_len: u64) -> Result<Qcow2Header, HeaderProblem> {
    use HeaderProblem::*;
    if buf.len() < 72 {
        return Err(NotQcow2(format!("file too short ({} bytes)", buf.len())));
    }
    if be32(buf, 0) != MAGIC {
        return Err(NotQcow2("no qcow2 magic".into()));
    }
    let version = be32(buf, 4);
    if version != 2 && version != 3 {
        return Err(Unsupported(format!("qcow2 version {version}")));
    }
    if version == 3 && buf.len() < 104 {
        return Err(Corrupt("qcow2 v3 header truncated".into()));
    }
    let backing_file_offset = be64(buf, 8);
    let cluster_bits = be32(buf, 20);
    let size = be64(buf, 24);
    let crypt_method = be32(buf, 32);
    let l1_size = be32(buf, 36);
    let l1_table_offset = be64(buf, 40);
    let refcount_table_offset = be64(buf, 48);
    let refcount_table_clusters = be32(buf, 56);
    let nb_snapshots = be32(buf, 60);
    let (incompatible, compatible, refcount_order, header_length) = if version == 3 {
        (be64(buf, 72), be64(buf, 80), be32(buf, 96), be32(buf, 100))
    } else {
        (0, 0, 4, 72)
    };

    if !(9..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
        return Err(Corrupt(format!("cluster_bits {cluster_bits} out of range")));
    }
    if cluster_bits < MIN_CLUSTER_BITS {
        return Err(Unsupported(format!(
            "cluster size {} bytes (at least 4096 needed; recreate with -o cluster_size=64k)",
            1u64 << cluster_bits
        )));
    }
    if crypt_method != 0 {
        return Err(Unsupported(
            "qcow2 encryption (tpmstate encrypts blobs itself; use an unencrypted image)".into(),
        ));
    }
    let snapshots_offset = be64(buf, 64);
    if nb_snapshots > MAX_SNAPSHOTS {
        return Err(Corrupt(format!(
            "{nb_snapshots} snapshots (QEMU allows {MAX_SNAPSHOTS})"
        )));
    }
    if incompatible & INCOMPAT_DIRTY != 0 {
        return Err(Unsupported(
            "dirty bit set (repair it with qemu-img check -r all)".into(),
        ));
    }
    if incompatible & INCOMPAT_CORRUPT != 0 {
        return Err(Corrupt("image is marked corrupt by QEMU".into()));
    }
    if incompatible & INCOMPAT_DATA_FILE != 0 {
        return Err(Unsupported("external data file".into()));
    }
    if incompatible & INCOMPAT_EXTL2 != 0 {
        return Err(Unsupported("extended L2 entries".into()));
    }
    if incompatible & INCOMPAT_COMPRESSION != 0 {
        return Err(Unsupported("non-zlib compression type".into()));
    }
    let unknown = incompatible & !0x1f;
    if unknown != 0 {
        return Err(Unsupported(format!(
            "unknown incompatible features {unknown:#x}"
        )));
    }
    if refcount_order > 6 {
        return Err(Corrupt(format!(
            "refcount_order {refcount_order} out of range"
        )));
    }
    if version == 3 && (header_length < 104 || header_length as usize > MAX_HEADER_BYTES) {
        return Err(Corrupt(format!(
            "header_length {header_length} out of range"
        )));
    }
    if size == 0 {
        // Also guards qcow2-rs, which asserts on the zero-length L1 buffer it would allocate.
        return Err(Unsupported("virtual size 0 (no room for a store)".into()));
    }
    if size > MAX_VIRTUAL_SIZE {
        return Err(Unsupported(format!(
            "virtual size {size} bytes (at most 1 TiB)"
        )));
    }
    let cs = 1u64 << cluster_bits;
    let aligned = |off: u64| off.is_multiple_of(cs);
    if !aligned(l1_table_offset)
        || !aligned(refcount_table_offset)
        || !aligned(snapshots_offset)
        || l1_table_offset == 0 && l1_size != 0
        || snapshots_offset == 0 && nb_snapshots != 0
    {
        return Err(Corrupt("metadata table offset not cluster aligned".into()));
    }
    // Each L1 entry covers one L2 table of cs/8 entries, each mapping one cluster.
    let bytes_per_l1 = (cs / 8) * cs;
    let needed_l1 = size.div_ceil(bytes_per_l1);
    if u64::from(l1_size) < needed_l1 {
        return Err(Corrupt(format!(
            "L1 table of {l1_size} entries too small for {size} bytes"
        )));
    }
    if u64::from(l1_size) * 8 > MAX_L1_BYTES
        || u64::from(refcount_table_clusters) * cs > MAX_REFTABLE_BYTES
    {
        return Err(Corrupt(format!(
            "L1 table ({l1_size} entries) or refcount table ({refcount_table_clusters} clusters) larger than QEMU allows"
        )));
    }
    if refcount_table_clusters == 0 || refcount_table_offset == 0 {
        return Err(Corrupt("no refcount table".into()));
    }
    let l1_end = l1_table_offset.checked_add(u64::from(l1_size) * 8);
    let rt_end = refcount_table_offset.checked_add(u64::from(refcount_table_clusters) * cs);
    match (l1_end, rt_end) {
        (Some(l1e), Some(rte)) if l1e <= file_len && rte <= file_len => {}
        _ => {
            return Err(Corrupt(format!(
                "metadata tables extend beyond the end of the file ({file_len} bytes): truncated?"
            )))
        }
    }
    let ext_area = &buf[..buf.len().min(cs as usize)];
    let foreign_tables =
        extension_list_has(ext_area, header_length as usize, EXT_BITMAPS).unwrap_or(true);
    let backing = match backing_file_offset {
        0 => None,
        at => Some(BackingRef {
            name: backing_name(ext_area, at, be32(buf, 16))?,
            format: extension(ext_area, header_length as usize, EXT_BACKING_FORMAT)
                .flatten()
                .map(|b| String::from_utf8_lossy(b).into_owned()),
        }),
    };
    Ok(Qcow2Header {
        version,
        cluster_bits,
        size,
        l1_size,
        l1_table_offset,
        refcount_table_offset,
        refcount_table_clusters,
        refcount_order,
        compatible_features: compatible,
        foreign_tables,
        nb_snapshots,
        snapshots_offset,
        backing,
    })
}

/// The backing file name of `len` bytes at header offset `at`.
fn backing_name(header: &[u8], at: u64, len: u32) -> Result<String, HeaderProblem> {
    let bad = |why: &str| HeaderProblem::Corrupt(format!("backing file name {why}"));
    if len == 0 || len > MAX_BACKING_NAME {
        return Err(bad(&format!("of {len} bytes")));
    }
    let bytes = usize::try_from(at)
        .ok()
        .and_then(|at| header.get(at..at.checked_add(len as usize)?))
        .ok_or_else(|| bad("lies outside the header cluster"))?;
    String::from_utf8(bytes.to_vec())
        .map_err(|_| HeaderProblem::Unsupported("a backing file name that is not UTF-8".into()))
}

/// Whether the header extension list starting at `at` holds `magic`; `None`
/// when the list runs off the header cluster (then nobody can tell).
fn extension_list_has(buf: &[u8], at: usize, magic: u32) -> Option<bool> {
    extension(buf, at, magic).map(|found| found.is_some())
}

/// The data of header extension `magic` in the list starting at `at`
/// (`Some(None)`: not in the list; `None`: the list runs off the header
/// cluster, so nobody can tell).
fn extension(buf: &[u8], mut at: usize, magic: u32) -> Option<Option<&[u8]>> {
    loop {
        if at.checked_add(8)? > buf.len() {
            return None;
        }
        let (m, len) = (be32(buf, at), be32(buf, at + 4) as usize);
        if m == 0 {
            return Some(None);
        }
        if m == magic {
            return buf
                .get(at + 8..at.checked_add(8)?.checked_add(len)?)
                .map(Some);
        }
        at = at
            .checked_add(8)?
            .checked_add(len.checked_next_multiple_of(8)?)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `len` bytes starting with the fields every v3 header needs: magic,
    /// version 3, 4 KiB clusters, 16-bit refcounts, a 112-byte header.
    fn v3_header(len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        b[0..4].copy_from_slice(&MAGIC.to_be_bytes());
        b[4..8].copy_from_slice(&3u32.to_be_bytes());
        b[20..24].copy_from_slice(&12u32.to_be_bytes());
        b[96..100].copy_from_slice(&4u32.to_be_bytes());
        b[100..104].copy_from_slice(&112u32.to_be_bytes());
        b
    }

    #[test]
    fn random_bytes_are_not_qcow2() {
        assert!(matches!(
            parse(&[7u8; 200], 200),
            Err(HeaderProblem::NotQcow2(_))
        ));
        assert!(matches!(parse(&[], 0), Err(HeaderProblem::NotQcow2(_))));
    }

    #[test]
    fn zero_virtual_size_is_refused() {
        // Found by the qcow2_image fuzz target: qcow2-rs asserts on it.
        let b = v3_header(512);
        assert!(matches!(
            parse(&b, 1 << 20),
            Err(HeaderProblem::Unsupported(_))
        ));
    }

    #[test]
    fn a_bitmaps_extension_or_an_unreadable_extension_list_marks_foreign_tables() {
        // A 4 KiB-cluster v3 header with its tables in clusters 1 and 2.
        let mut b = v3_header(4096);
        b[24..32].copy_from_slice(&(1u64 << 20).to_be_bytes());
        b[36..40].copy_from_slice(&1u32.to_be_bytes());
        b[40..48].copy_from_slice(&4096u64.to_be_bytes());
        b[48..56].copy_from_slice(&8192u64.to_be_bytes());
        b[56..60].copy_from_slice(&1u32.to_be_bytes());
        let foreign = |b: &[u8]| parse(b, 3 * 4096).unwrap().foreign_tables;
        assert!(!foreign(&b), "no extensions");
        // A feature-name table (8 bytes) first, then the bitmaps extension.
        b[112..116].copy_from_slice(&0x6803_f857u32.to_be_bytes());
        b[116..120].copy_from_slice(&5u32.to_be_bytes());
        assert!(!foreign(&b), "one extension, then the end marker");
        b[128..132].copy_from_slice(&EXT_BITMAPS.to_be_bytes());
        assert!(foreign(&b), "bitmaps after a padded extension");
        b[128..132].copy_from_slice(&1u32.to_be_bytes());
        b[132..136].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(foreign(&b), "a length that runs off the cluster");
    }

    #[test]
    fn magic_with_garbage_never_panics() {
        for fill in [0u8, 0x55, 0xff] {
            let mut b = vec![fill; 512];
            b[0..4].copy_from_slice(&MAGIC.to_be_bytes());
            for v in [2u32, 3] {
                b[4..8].copy_from_slice(&v.to_be_bytes());
                assert!(parse(&b, 512).is_err());
            }
        }
    }
}
