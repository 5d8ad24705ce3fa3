//! Allocating guest clusters so that no crash can leak a cluster or corrupt
//! the image: new metadata beside the old, then one header write.
//!
//! A qcow2 allocation changes two structures that live apart: the refcounts
//! and the L1/L2 tables that reference clusters. Whichever is written first,
//! a crash between the two leaves either leaked clusters (`qemu-img check`
//! exit 3) or referenced clusters with refcount 0 (corruption). So this module
//! never changes a structure the image uses. Its [`Plan`] is a complete new
//! set of qcow2 metadata for the image with the new clusters:
//!
//! - the L2 tables that change, as copies with the new entries;
//! - a copy of the L1 table pointing at them;
//! - a refcount table and refcount blocks computed from scratch: 1 for every
//!   cluster the new image references, 0 for every other.
//!
//! All of it goes into clusters the current image does not reference, and is
//! synced. Then header bytes 36..60 (L1 size and offset, refcount table
//! offset and size), which lie inside the first 512-byte sector, are rewritten
//! in one write and synced. A sector write is atomic, so after a crash the
//! image is either the old one or the new one:
//!
//! - **Old**: the new structures lie in clusters that nothing references and
//!   whose refcount is 0, which `qemu-img check` counts as free space.
//! - **New**: the old L1 table, refcount table and blocks and the replaced L2
//!   tables are referenced by nothing and have refcount 0 in the new blocks:
//!   free as well. Leaks an earlier crash of another program left are dropped
//!   the same way, because the refcounts are recomputed.
//!
//! This needs an image whose every reference is understood
//! ([`super::qcow2_leaks::survey`]); the caller refuses to allocate in any
//! other. This module plans from what it reads; the caller writes.

use super::qcow2_header::Qcow2Header;
use super::qcow2_leaks::{
    entries, set_refcount, table_offsets, Doubt, ReadAt, L2_COMPRESSED, REFTABLE_OFFSET_MASK,
    TABLE_OFFSET_MASK,
};

/// Header offset of the fields a [`Plan`] switches: `l1_size` (u32),
/// `l1_table_offset` (u64), `refcount_table_offset` (u64) and
/// `refcount_table_clusters` (u32), all big-endian and all in sector 0.
pub(crate) const SWITCH_AT: u64 = 36;
/// Length of the switched header fields.
pub(crate) const SWITCH_LEN: usize = 24;

/// L1/L2 entry flag: the cluster's refcount is exactly 1 (QCOW_OFLAG_COPIED).
const COPIED: u64 = 1 << 63;
/// L2 entry flag (version 3): the cluster reads as zeros (QCOW_OFLAG_ZERO).
const L2_ZERO: u64 = 1;

/// The writes that allocate guest clusters.
#[derive(Debug)]
pub(crate) struct Plan {
    /// Host byte ranges to fill with zeros: the data clusters of the range
    /// being allocated (new ones, and ones it already had).
    pub zeros: Vec<(u64, u64)>,
    /// New metadata, each `(host offset, bytes)` in clusters the current
    /// image does not reference. Written and synced before the switch.
    pub tables: Vec<(u64, Vec<u8>)>,
    /// The bytes that go to [`SWITCH_AT`] in the header, last.
    pub switch: [u8; SWITCH_LEN],
}

/// Plans allocating and zeroing guest bytes `[zero_from, guest_end)` of the
/// image with header `h`, whose referenced host clusters (`referenced`, one
/// flag per cluster of the file) the survey found. Guest bytes below
/// `zero_from` must be allocated already. `Err` tells what makes the image
/// unfit (corruption the header checks let through).
pub(crate) fn plan(
    h: &Qcow2Header,
    referenced: Vec<bool>,
    zero_from: u64,
    guest_end: u64,
    read: &mut ReadAt<'_>,
) -> std::io::Result<Result<Plan, Doubt>> {
    let cs = h.cluster_size();
    let per_l2 = cs / 8;
    let bits = 1u32 << h.refcount_order;
    let per_block = cs * 8 / u64::from(bits);

    // `taken`: what may not be handed out (referenced by the current image, or
    // by this plan). `refs`: what the new image references.
    let mut taken = Clusters(referenced.clone());
    let mut refs = Clusters(referenced);
    let mut l1 = vec![0u8; h.l1_size as usize * 8];
    read(h.l1_table_offset, &mut l1)?;
    let mut l1: Vec<u64> = entries(&l1).collect();
    let mut reftable = vec![0u8; (u64::from(h.refcount_table_clusters) * cs) as usize];
    read(h.refcount_table_offset, &mut reftable)?;
    refs.clear_range(h.l1_table_offset, u64::from(h.l1_size) * 8, cs);
    refs.clear_range(
        h.refcount_table_offset,
        u64::from(h.refcount_table_clusters) * cs,
        cs,
    );
    for block in table_offsets(&reftable, REFTABLE_OFFSET_MASK) {
        refs.clear_range(block, cs, cs);
    }

    // Data clusters first, at the end of what is in use, so that the new
    // area is contiguous in the file; the L2 tables that change are placed
    // after.
    let mut zeros: Vec<(u64, u64)> = Vec::new();
    let mut changed_l2: Vec<(usize, Vec<u64>)> = Vec::new();
    let mut next_data = taken.len();
    let (first, last) = (zero_from / cs, guest_end.div_ceil(cs));
    let mut guest = first;
    while guest < last {
        let l1_index = (guest / per_l2) as usize;
        let Some(&l1_entry) = l1.get(l1_index) else {
            return Ok(Err(Doubt::Corrupt(format!(
                "guest cluster {guest} lies beyond the L1 table"
            ))));
        };
        let table_end = last.min((l1_index as u64 + 1) * per_l2);
        let old_l2 = l1_entry & TABLE_OFFSET_MASK;
        let mut l2 = vec![0u64; per_l2 as usize];
        if old_l2 != 0 {
            let mut buf = vec![0u8; cs as usize];
            read(old_l2, &mut buf)?;
            l2 = entries(&buf).collect();
        }
        let mut changed = false;
        for g in guest..table_end {
            let entry = &mut l2[(g % per_l2) as usize];
            let host = *entry & TABLE_OFFSET_MASK;
            if *entry & L2_COMPRESSED != 0 {
                return Ok(Err(Doubt::Unsupported(
                    "the image has compressed clusters".into(),
                )));
            }
            let at = if host != 0 && *entry & L2_ZERO == 0 {
                host
            } else {
                // Unallocated, or a zero cluster (maybe with a preallocated
                // host cluster, which the new image no longer references).
                if host != 0 {
                    refs.clear_range(host, cs, cs);
                }
                let c = next_data;
                next_data += 1;
                taken.set(c);
                refs.set(c);
                *entry = (c * cs) | COPIED;
                changed = true;
                c * cs
            };
            match zeros.last_mut() {
                Some((start, len)) if *start + *len == at => *len += cs,
                _ => zeros.push((at, cs)),
            }
        }
        if changed {
            if old_l2 != 0 {
                refs.clear_range(old_l2, cs, cs);
            }
            changed_l2.push((l1_index, l2));
        }
        guest = table_end;
    }

    let mut tables = Vec::new();
    for (l1_index, l2) in changed_l2 {
        let c = taken.run(1);
        refs.set(c);
        l1[l1_index] = (c * cs) | COPIED;
        tables.push((c * cs, encode(&l2, cs)));
    }
    let l1_clusters = (l1.len() as u64 * 8).div_ceil(cs).max(1);
    let l1_at = taken.run(l1_clusters) * cs;
    refs.set_range(l1_at / cs, l1_clusters);
    tables.push((l1_at, encode(&l1, cs)));

    // The refcount blocks must cover every cluster up to the last one in use,
    // themselves and the refcount table included: grow the guess until the
    // placement it leads to is covered.
    let mut n_blocks = taken.len().div_ceil(per_block).max(1);
    let (blocks, table_at, table_clusters) = loop {
        let mut trial = taken.clone();
        let blocks: Vec<u64> = (0..n_blocks).map(|_| trial.run(1)).collect();
        let table_clusters = (n_blocks * 8).div_ceil(cs);
        let table_at = trial.run(table_clusters);
        let needed = trial.len().div_ceil(per_block);
        if needed <= n_blocks {
            taken = trial;
            break (blocks, table_at, table_clusters);
        }
        n_blocks = needed;
    };
    for &b in &blocks {
        refs.set(b);
    }
    refs.set_range(table_at, table_clusters);
    let table_entries: Vec<u64> = blocks.iter().map(|b| b * cs).collect();
    for (i, &b) in blocks.iter().enumerate() {
        let mut block = vec![0u8; cs as usize];
        let covered = i as u64 * per_block..((i as u64 + 1) * per_block);
        for c in covered.clone().filter(|&c| refs.get(c)) {
            set_refcount(&mut block, (c - covered.start) as usize, bits, 1);
        }
        tables.push((b * cs, block));
    }
    tables.push((table_at * cs, encode(&table_entries, cs)));
    debug_assert!(taken.len() <= n_blocks * per_block);

    let mut switch = [0u8; SWITCH_LEN];
    switch[..4].copy_from_slice(&h.l1_size.to_be_bytes());
    switch[4..12].copy_from_slice(&l1_at.to_be_bytes());
    switch[12..20].copy_from_slice(&(table_at * cs).to_be_bytes());
    let Ok(table_clusters) = u32::try_from(table_clusters) else {
        return Ok(Err(Doubt::Unsupported(
            "the refcount table would be too large".into(),
        )));
    };
    switch[20..].copy_from_slice(&table_clusters.to_be_bytes());
    Ok(Ok(Plan {
        zeros,
        tables,
        switch,
    }))
}

/// Big-endian table entries, padded with zeros to whole clusters.
fn encode(entries: &[u64], cs: u64) -> Vec<u8> {
    let mut out: Vec<u8> = entries.iter().flat_map(|e| e.to_be_bytes()).collect();
    out.resize(
        (out.len() as u64).div_ceil(cs).max(1) as usize * cs as usize,
        0,
    );
    out
}

/// One flag per host cluster; clusters past the end of the vector are clear.
#[derive(Clone)]
struct Clusters(Vec<bool>);

impl Clusters {
    fn get(&self, c: u64) -> bool {
        self.0.get(c as usize).copied().unwrap_or(false)
    }

    fn set(&mut self, c: u64) {
        if c as usize >= self.0.len() {
            self.0.resize(c as usize + 1, false);
        }
        self.0[c as usize] = true;
    }

    fn set_range(&mut self, first: u64, n: u64) {
        (first..first + n).for_each(|c| self.set(c));
    }

    /// Clears the clusters holding host bytes `[start, start + len)`.
    fn clear_range(&mut self, start: u64, len: u64, cs: u64) {
        for c in start / cs..(start + len).div_ceil(cs) {
            if let Some(flag) = self.0.get_mut(c as usize) {
                *flag = false;
            }
        }
    }

    /// One past the last set cluster.
    fn len(&self) -> u64 {
        self.0.iter().rposition(|&f| f).map_or(0, |i| i as u64 + 1)
    }

    /// Takes the first run of `n` clear clusters (never cluster 0, the header).
    fn run(&mut self, n: u64) -> u64 {
        let mut first = 1;
        let mut c = 1;
        while c < first + n {
            if self.get(c) {
                first = c + 1;
            }
            c += 1;
        }
        self.set_range(first, n);
        first
    }
}
