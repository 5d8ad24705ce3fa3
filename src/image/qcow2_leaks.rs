//! Finding qcow2 clusters that are counted as used but referenced by nothing.
//!
//! A crash between the refcount update and the table write of a qcow2
//! allocation done in place (QEMU's, or qcow2-rs's) leaves clusters whose
//! refcount is 1 but which no table references: *leaked* clusters. They
//! cannot corrupt anything, but `qemu-img check` reports them (exit 3). So the
//! next writer of the image frees them, as QEMU does when it opens a
//! lazy-refcounts image after a crash. tpmstate's own allocations
//! ([`super::qcow2_alloc`]) leave none, and use the same survey.
//!
//! The scan counts every reference the image holds (header cluster, L1
//! tables of the active image and of every internal snapshot, the snapshot
//! table, refcount table, refcount blocks, L2 tables, data clusters) and
//! compares the counts with the refcounts, like `qemu-img check`. It only
//! reports leaks when it understands the whole image. With compressed
//! clusters, tables it does not parse (bitmaps), metadata referenced twice, a
//! cluster used as two kinds of cluster, or a referenced cluster whose
//! refcount differs from its count (real corruption, which is not ours to
//! repair), it reports [`Scan::Unsure`] and the image is left alone. This
//! module reads; the caller writes.

use super::qcow2_header::Qcow2Header;
use super::qcow2_snapshots::{read_table, SnapshotEntry};

/// Bits 9-55 of L1 and L2 entries: the host offset.
pub(crate) const TABLE_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Bits 9-63 of refcount table entries: the refcount block's host offset.
pub(crate) const REFTABLE_OFFSET_MASK: u64 = 0xffff_ffff_ffff_fe00;
/// L2 entry flag of a compressed cluster (its offset field is laid out differently).
pub(crate) const L2_COMPRESSED: u64 = 1 << 62;
/// Images with more clusters than this are not scanned (the count tables
/// would take more than 80 MiB); an NVRAM image has a few hundred.
const MAX_SCANNED_CLUSTERS: u64 = 16 << 20;

/// What a scan found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scan {
    /// Every structure was understood; these clusters leaked (maybe none).
    Leaks(Vec<LeakedEntries>),
    /// The image holds something the scan does not understand; why.
    Unsure(String),
}

/// Leaked clusters whose refcounts sit in one refcount block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeakedEntries {
    /// Host offset of the refcount block.
    pub block: u64,
    /// Indices of the leaked clusters' entries in that block.
    pub entries: Vec<usize>,
}

impl Scan {
    /// Number of leaked clusters found (0 when unsure).
    pub fn leaked(&self) -> u64 {
        match self {
            Scan::Leaks(blocks) => blocks.iter().map(|b| b.entries.len() as u64).sum(),
            Scan::Unsure(_) => 0,
        }
    }
}

/// Reads exactly `buf.len()` host bytes at an offset. The scan only reads
/// tables it has checked to lie inside the file.
pub(crate) type ReadAt<'a> = dyn FnMut(u64, &mut [u8]) -> std::io::Result<()> + 'a;

/// Scans an image of `file_len` bytes with header `h`, reading through `read`.
pub(crate) fn scan(h: &Qcow2Header, file_len: u64, read: &mut ReadAt<'_>) -> std::io::Result<Scan> {
    Ok(match survey(h, file_len, read)? {
        Ok(survey) => Scan::Leaks(survey.leaks),
        Err(doubt) => Scan::Unsure(doubt.to_string()),
    })
}

/// Why a survey did not understand an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Doubt {
    /// It uses a qcow2 feature the survey does not follow.
    Unsupported(String),
    /// Its structures contradict each other.
    Corrupt(String),
}

impl std::fmt::Display for Doubt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Doubt::Unsupported(why) | Doubt::Corrupt(why) => f.write_str(why),
        }
    }
}

/// What a survey of an image it fully understands found.
pub(crate) struct Survey {
    /// For each host cluster up to the end of the file: how many references
    /// the image holds to it, counted as its refcount must be (1 for
    /// metadata; for an L2 table or a data cluster, one per L1 table, the
    /// active one or a snapshot's, that reaches it).
    pub counts: Vec<u32>,
    /// Clusters counted as used that nothing references.
    pub leaks: Vec<LeakedEntries>,
    /// The internal snapshots.
    pub snapshots: Vec<SnapshotEntry>,
}

/// Marks what the image references and compares it with the refcounts; `Err`
/// says why the image is not fully understood.
pub(crate) fn survey(
    h: &Qcow2Header,
    file_len: u64,
    read: &mut ReadAt<'_>,
) -> std::io::Result<Result<Survey, Doubt>> {
    if h.foreign_tables {
        return Ok(Err(Doubt::Unsupported(
            "the image has tables tpmstate does not parse (bitmaps)".into(),
        )));
    }
    let cs = h.cluster_size();
    let clusters = file_len.div_ceil(cs);
    if clusters > MAX_SCANNED_CLUSTERS {
        return Ok(Err(Doubt::Unsupported(format!(
            "{clusters} clusters are too many to scan"
        ))));
    }
    let mut refs = References {
        cs,
        counts: vec![0; clusters as usize],
        kinds: vec![Use::Free; clusters as usize],
        l2_reach: Default::default(),
    };
    let snapshots = match referenced_by(h, file_len, &mut refs, read)? {
        Ok(snapshots) => snapshots,
        Err(doubt) => return Ok(Err(doubt)),
    };
    let mut reftable = vec![0u8; h.refcount_table_clusters as usize * cs as usize];
    read(h.refcount_table_offset, &mut reftable)?;
    let blocks: Vec<u64> = entries(&reftable)
        .map(|e| e & REFTABLE_OFFSET_MASK)
        .collect();
    for &block_at in blocks.iter().filter(|&&b| b != 0) {
        if let Err(why) = refs.add_meta(block_at, cs) {
            return Ok(Err(Doubt::Corrupt(why)));
        }
    }
    match compare(h, &refs.counts, &blocks, read)? {
        Ok(leaks) => Ok(Ok(Survey {
            counts: refs.counts,
            leaks,
            snapshots,
        })),
        Err(doubt) => Ok(Err(doubt)),
    }
}

/// Counts the references of the header, the tables of the active image and
/// of every snapshot, and the snapshot table; returns the snapshots.
fn referenced_by(
    h: &Qcow2Header,
    file_len: u64,
    refs: &mut References,
    read: &mut ReadAt<'_>,
) -> std::io::Result<Result<Vec<SnapshotEntry>, Doubt>> {
    let corrupt = |why: String| Ok(Err(Doubt::Corrupt(why)));
    // The header cluster and the refcount table (the L1 table is walked below).
    let [header, _, reftable] = h.metadata_ranges();
    for (start, len) in [header, reftable] {
        if let Err(why) = refs.add_meta(start, len) {
            return corrupt(why);
        }
    }
    let (snapshots, table_len) = if h.nb_snapshots == 0 {
        (Vec::new(), 0)
    } else {
        match read_table(h.snapshots_offset, h.nb_snapshots, file_len, read)? {
            Ok(table) => table,
            Err(doubt) => return Ok(Err(doubt)),
        }
    };
    if table_len > 0 {
        if let Err(why) = refs.add_meta(h.snapshots_offset, table_len) {
            return corrupt(why);
        }
    }
    if let Err(doubt) = refs.walk_l1(h.l1_table_offset, h.l1_size, true, read)? {
        return Ok(Err(doubt));
    }
    for s in &snapshots {
        if let Err(doubt) = refs.walk_l1(s.l1_table_offset, s.l1_size, false, read)? {
            return Ok(Err(doubt));
        }
    }
    if let Err(doubt) = refs.walk_l2s(read)? {
        return Ok(Err(doubt));
    }
    Ok(Ok(snapshots))
}

/// Compares the counted references with the refcount blocks at `blocks`:
/// the leaked clusters, or why the image is inconsistent.
fn compare(
    h: &Qcow2Header,
    counts: &[u32],
    blocks: &[u64],
    read: &mut ReadAt<'_>,
) -> std::io::Result<Result<Vec<LeakedEntries>, Doubt>> {
    let cs = h.cluster_size();
    let bits = 1u32 << h.refcount_order;
    let per_block = (cs * 8 / u64::from(bits)) as usize;
    let mut block = vec![0u8; cs as usize];
    let mut leaks = Vec::new();
    for (i, counted) in counts.chunks(per_block).enumerate() {
        let block_at = blocks.get(i).copied().unwrap_or(0);
        if block_at == 0 {
            block.fill(0);
        } else {
            read(block_at, &mut block)?;
        }
        let mut leaked = Vec::new();
        for (j, &count) in counted.iter().enumerate() {
            let refcount = refcount(&block, j, bits);
            if count == 0 && refcount > 0 {
                leaked.push(j);
            } else if refcount != u64::from(count) {
                let cluster = i * per_block + j;
                return Ok(Err(Doubt::Corrupt(format!(
                    "cluster {cluster} is referenced {count} time(s) but has refcount {refcount}"
                ))));
            }
        }
        if !leaked.is_empty() {
            leaks.push(LeakedEntries {
                block: block_at,
                entries: leaked,
            });
        }
    }
    Ok(Ok(leaks))
}

/// What a host cluster holds, as far as the references tell.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Use {
    Free,
    /// Header, an L1 table, the refcount or snapshot table, a refcount block.
    Metadata,
    L2,
    Data,
}

/// The references to each host cluster. Metadata is referenced once; L2
/// tables and data clusters once per L1 table that reaches them. A cluster
/// used two ways ends the survey; that also bounds the tables it reads by
/// the clusters in the file.
struct References {
    cs: u64,
    counts: Vec<u32>,
    kinds: Vec<Use>,
    /// L1 entries naming each L2 table, over every L1 table walked so far.
    l2_reach: std::collections::BTreeMap<u64, u32>,
}

impl References {
    /// The clusters holding `[start, start + len)`, checked to lie in the file.
    fn clusters(&self, start: u64, len: u64) -> Result<std::ops::Range<u64>, String> {
        if !start.is_multiple_of(self.cs) {
            return Err(format!("a table points at unaligned offset {start:#x}"));
        }
        let end = start
            .checked_add(len)
            .map(|e| e.div_ceil(self.cs))
            .filter(|&e| e <= self.counts.len() as u64)
            .ok_or_else(|| format!("a table points beyond the end of the file at {start:#x}"))?;
        Ok(start / self.cs..end)
    }

    /// Marks every cluster in `[start, start + len)` as metadata, once.
    fn add_meta(&mut self, start: u64, len: u64) -> Result<(), String> {
        for c in self.clusters(start, len)? {
            if self.kinds[c as usize] != Use::Free {
                return Err(format!("cluster {c} is referenced twice"));
            }
            self.kinds[c as usize] = Use::Metadata;
            self.counts[c as usize] = 1;
        }
        Ok(())
    }

    /// Counts one more reference to the L2 table or data cluster at `start`.
    fn add(&mut self, start: u64, kind: Use) -> Result<(), String> {
        self.add_times(start, kind, 1)
    }

    /// Counts `times` more references to the L2 table or data cluster at `start`.
    fn add_times(&mut self, start: u64, kind: Use, times: u32) -> Result<(), String> {
        for c in self.clusters(start, self.cs)? {
            let seen = &mut self.kinds[c as usize];
            if *seen != Use::Free && *seen != kind {
                return Err(format!("cluster {c} is used as two kinds of cluster"));
            }
            *seen = kind;
            self.counts[c as usize] = self.counts[c as usize].saturating_add(times);
        }
        Ok(())
    }

    /// Counts the L1 table at `offset` and the L2 tables it names (once
    /// per entry); their data clusters are counted by [`References::walk_l2s`].
    /// The active L1 table may name an L2 table only once.
    fn walk_l1(
        &mut self,
        offset: u64,
        size: u32,
        active: bool,
        read: &mut ReadAt<'_>,
    ) -> std::io::Result<Result<(), Doubt>> {
        let corrupt = |why: String| Ok(Err(Doubt::Corrupt(why)));
        if u64::from(size) * 8 > super::qcow2_header::MAX_L1_BYTES {
            return corrupt(format!("an L1 table of {size} entries"));
        }
        if let Err(why) = self.add_meta(offset, u64::from(size) * 8) {
            return corrupt(why);
        }
        let mut l1 = vec![0u8; size as usize * 8];
        read(offset, &mut l1)?;
        let mut seen = std::collections::HashSet::new();
        for l2_at in table_offsets(&l1, TABLE_OFFSET_MASK) {
            if active && !seen.insert(l2_at) {
                return corrupt(format!(
                    "the active L1 table names L2 table {l2_at:#x} twice"
                ));
            }
            if let Err(why) = self.add(l2_at, Use::L2) {
                return corrupt(why);
            }
            *self.l2_reach.entry(l2_at).or_insert(0) += 1;
        }
        Ok(Ok(()))
    }

    /// Reads each L2 table the L1 tables named, once, and counts its data
    /// clusters once per L1 entry that reaches it (so a table shared by many
    /// snapshots costs one read, whatever a hostile image repeats).
    fn walk_l2s(&mut self, read: &mut ReadAt<'_>) -> std::io::Result<Result<(), Doubt>> {
        let mut l2 = vec![0u8; self.cs as usize];
        for (l2_at, reach) in std::mem::take(&mut self.l2_reach) {
            read(l2_at, &mut l2)?;
            for entry in entries(&l2) {
                if entry & L2_COMPRESSED != 0 {
                    return Ok(Err(Doubt::Unsupported(
                        "the image has compressed clusters".into(),
                    )));
                }
                let data_at = entry & TABLE_OFFSET_MASK;
                if data_at != 0 {
                    if let Err(why) = self.add_times(data_at, Use::Data, reach) {
                        return Ok(Err(Doubt::Corrupt(why)));
                    }
                }
            }
        }
        Ok(Ok(()))
    }
}

/// The big-endian u64 entries of a table.
pub(crate) fn entries(table: &[u8]) -> impl Iterator<Item = u64> + '_ {
    table.chunks_exact(8).map(|e| {
        let mut a = [0u8; 8];
        a.copy_from_slice(e);
        u64::from_be_bytes(a)
    })
}

/// The non-zero offsets of a table's entries.
pub(crate) fn table_offsets(table: &[u8], mask: u64) -> impl Iterator<Item = u64> + '_ {
    entries(table).map(move |e| e & mask).filter(|&o| o != 0)
}

/// Entry `index` of a refcount block of `bits`-bit entries. qcow2 packs entries
/// narrower than a byte from the least significant bit up, and stores wider
/// ones big-endian.
pub(crate) fn refcount(block: &[u8], index: usize, bits: u32) -> u64 {
    if bits < 8 {
        let bit = index * bits as usize;
        let mask = (1u8 << bits) - 1;
        u64::from((block[bit / 8] >> (bit % 8)) & mask)
    } else {
        let width = bits as usize / 8;
        block[index * width..(index + 1) * width]
            .iter()
            .fold(0, |acc, &b| (acc << 8) | u64::from(b))
    }
}

/// Sets entry `index` of a refcount block of `bits`-bit entries to `value`
/// (which must fit in `bits`; see [`refcount`]).
pub(crate) fn set_refcount(block: &mut [u8], index: usize, bits: u32, value: u64) {
    if bits < 8 {
        let bit = index * bits as usize;
        let mask = (1u8 << bits) - 1;
        let byte = &mut block[bit / 8];
        *byte = (*byte & !(mask << (bit % 8))) | (((value as u8) & mask) << (bit % 8));
    } else {
        let width = bits as usize / 8;
        let be = value.to_be_bytes();
        block[index * width..(index + 1) * width].copy_from_slice(&be[8 - width..]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn setting_one_refcount_leaves_its_neighbours(
            order in 0u32..=6,
            bytes in proptest::collection::vec(any::<u8>(), 64),
            index in 0usize..8,
            value in any::<u64>(),
        ) {
            let bits = 1u32 << order;
            let value = if bits == 64 { value } else { value & ((1 << bits) - 1) };
            let mut block = bytes.clone();
            set_refcount(&mut block, index, bits, value);
            prop_assert_eq!(refcount(&block, index, bits), value);
            for other in (0..64 * 8 / bits as usize).filter(|&i| i != index) {
                prop_assert_eq!(refcount(&block, other, bits), refcount(&bytes, other, bits));
            }
        }
    }

    #[test]
    fn refcount_layout_matches_qcow2() {
        // 16-bit entries (QEMU's default) are big-endian.
        assert_eq!(refcount(&[0x01, 0x02, 0x00, 0x07], 0, 16), 0x0102);
        assert_eq!(refcount(&[0x01, 0x02, 0x00, 0x07], 1, 16), 7);
        // 1-bit entries start at the least significant bit.
        assert_eq!(refcount(&[0b0000_0010], 1, 1), 1);
        assert_eq!(refcount(&[0b0000_0010], 0, 1), 0);
        assert_eq!(
            refcount(&[0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x09], 0, 64),
            9
        );
    }
}
