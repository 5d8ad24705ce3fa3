//! Changing qcow2 metadata so that no crash can leak a cluster or corrupt
//! the image: new metadata beside the old, then one header write.
//!
//! Allocating clusters for the store area, making the area's clusters the
//! active image's own again after an internal snapshot shared them, copying
//! the area up from a backing file, and creating, deleting or applying an
//! internal snapshot all change structures that live apart: the refcounts,
//! the L1/L2 tables that reference clusters, and the snapshot table.
//! Whichever is written first, a crash between two in-place writes leaves
//! either leaked clusters (`qemu-img check` exit 3) or referenced clusters
//! with a refcount too low (corruption). So this module never changes a
//! structure the image uses. Its [`Plan`] is a complete new set of qcow2
//! metadata:
//!
//! - new data clusters, filled with zeros, with a copy of a shared cluster,
//!   or with the backing file's bytes;
//! - the active image's L2 tables that change, as copies;
//! - a copy of the active L1 table pointing at them (and, for a new
//!   snapshot, its own L1 table), and a new snapshot table when it changes;
//! - a refcount table and refcount blocks computed from scratch from the
//!   references the new image holds (see [`super::qcow2_leaks::survey`]).
//!
//! All of it goes into clusters the current image does not reference, and is
//! synced. Then header bytes 36..72 (L1 size and offset, refcount table
//! offset and size, snapshot count and table offset), which lie inside the
//! first 512-byte sector, are rewritten in one write and synced. A sector
//! write is atomic, so after a crash the image is either the old one or the
//! new one:
//!
//! - **Old**: the new structures lie in clusters that nothing references and
//!   whose refcount is 0, which `qemu-img check` counts as free space.
//! - **New**: the old L1 table, refcount table and blocks, snapshot table and
//!   replaced L2 tables are referenced by nothing and have refcount 0 in the
//!   new blocks: free as well. Leaks an earlier crash of another program left
//!   are dropped the same way, because the refcounts are recomputed.
//!
//! Shared clusters are never written: a cluster written in place (zeroed
//! for `format`) has exactly one reference. The active image's COPIED flags
//! (refcount exactly 1) are recomputed for every entry, as `qemu-img check`
//! wants them.
//!
//! This needs an image whose every reference is understood
//! ([`super::qcow2_leaks::survey`]); the caller refuses to change any other.
//! This module plans from what it reads; the caller writes.

use super::qcow2_header::Qcow2Header;
use super::qcow2_leaks::{
    entries, set_refcount, Doubt, ReadAt, Survey, L2_COMPRESSED, REFTABLE_OFFSET_MASK,
    TABLE_OFFSET_MASK,
};
use super::qcow2_snapshots::{encode_table, SnapshotEntry};
use std::collections::BTreeMap;
use std::ops::Range;

/// Header offset of the fields a [`Plan`] switches: `l1_size` (u32),
/// `l1_table_offset` (u64), `refcount_table_offset` (u64),
/// `refcount_table_clusters` (u32), `nb_snapshots` (u32) and
/// `snapshots_offset` (u64), all big-endian and all in sector 0.
pub(crate) const SWITCH_AT: u64 = 36;
/// Length of the switched header fields.
pub(crate) const SWITCH_LEN: usize = 36;

/// L1/L2 entry flag: the cluster's refcount is exactly 1 (QCOW_OFLAG_COPIED).
const COPIED: u64 = 1 << 63;
/// L2 entry flag (version 3): the cluster reads as zeros (QCOW_OFLAG_ZERO).
const L2_ZERO: u64 = 1;

/// Where a new data cluster's bytes come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fill {
    /// Zeros.
    Zeros,
    /// A copy of the host cluster at this offset (a shared cluster, unshared).
    Host(u64),
    /// The backing file's bytes at this guest offset (copied up).
    Backing(u64),
}

/// The writes of one metadata change.
#[derive(Debug)]
pub(crate) struct Plan {
    /// Data clusters to fill, `(host offset, source)`, one cluster each:
    /// new clusters, and clusters with one reference that are zeroed in place.
    pub data: Vec<(u64, Fill)>,
    /// New metadata, each `(host offset, bytes)` in clusters the current
    /// image does not reference. Written and synced before the switch.
    pub tables: Vec<(u64, Vec<u8>)>,
    /// The bytes that go to [`SWITCH_AT`] in the header, last.
    pub switch: [u8; SWITCH_LEN],
}

/// What a plan changes, in this order: the snapshot table, then the store
/// area of the active image.
#[derive(Debug, Default)]
pub(crate) struct Request {
    /// A change to the snapshot table.
    pub snapshot: Option<SnapshotChange>,
    /// Guest bytes `[0, own_to)` become the active image's own: shared
    /// clusters are copied, clusters only the backing file has are copied up.
    pub own_to: u64,
    /// Guest bytes the backing file provides (0: no backing file).
    pub backing_to: u64,
    /// Guest bytes to allocate and fill with zeros.
    pub zero: Range<u64>,
}

/// A change to the internal snapshots.
#[derive(Debug)]
pub(crate) enum SnapshotChange {
    /// Adds a snapshot of the active image, sharing its clusters.
    Create {
        /// The new snapshot's ID.
        id: String,
        /// Its name.
        name: String,
    },
    /// Deletes the snapshot at this index of the table.
    Delete(usize),
    /// Makes the snapshot at this index the active image's state, sharing its clusters.
    Apply(usize),
}

/// Why planning stopped.
enum Stop {
    Io(std::io::Error),
    Doubt(Doubt),
}

impl From<std::io::Error> for Stop {
    fn from(e: std::io::Error) -> Self {
        Stop::Io(e)
    }
}

fn corrupt<T>(why: String) -> Result<T, Stop> {
    Err(Stop::Doubt(Doubt::Corrupt(why)))
}

fn unsupported<T>(why: String) -> Result<T, Stop> {
    Err(Stop::Doubt(Doubt::Unsupported(why)))
}

/// Plans `req` for the image with header `h`, whose references the survey
/// counted. `Ok(None)`: nothing to change. `Err` (inside) tells what makes
/// the image unfit (corruption the header checks let through).
pub(crate) fn plan(
    h: &Qcow2Header,
    survey: Survey,
    req: &Request,
    read: &mut ReadAt<'_>,
) -> std::io::Result<Result<Option<Plan>, Doubt>> {
    match Planner::new(h, survey, read).and_then(|p| p.run(req)) {
        Ok(plan) => Ok(Ok(plan)),
        Err(Stop::Io(e)) => Err(e),
        Err(Stop::Doubt(d)) => Ok(Err(d)),
    }
}

/// The new image being planned.
struct Planner<'h, 'r, 'a> {
    h: &'h Qcow2Header,
    cs: u64,
    read: &'r mut ReadAt<'a>,
    /// References the new image holds, per host cluster.
    counts: Vec<u32>,
    /// What may not be handed out: referenced by the current image, or by this plan.
    taken: Clusters,
    /// Where the next data cluster goes (the end of what is in use, so that
    /// a new area is contiguous in the file).
    next_data: u64,
    /// The active image's L1 entries.
    l1: Vec<u64>,
    /// The active L2 tables to write anew, by L1 index.
    pending: BTreeMap<usize, Vec<u64>>,
    snapshots: Vec<SnapshotEntry>,
    /// Length of the snapshot table on disk.
    old_table_len: u64,
    /// The snapshot table changes.
    table_changed: bool,
    data: Vec<(u64, Fill)>,
    tables: Vec<(u64, Vec<u8>)>,
}

impl<'h, 'r, 'a> Planner<'h, 'r, 'a> {
    fn new(h: &'h Qcow2Header, survey: Survey, read: &'r mut ReadAt<'a>) -> Result<Self, Stop> {
        let taken = Clusters(survey.counts.iter().map(|&c| c > 0).collect());
        let next_data = taken.len();
        let mut l1 = vec![0u8; h.l1_size as usize * 8];
        read(h.l1_table_offset, &mut l1)?;
        let old_table_len = encode_table(&survey.snapshots).len() as u64;
        Ok(Planner {
            h,
            cs: h.cluster_size(),
            read,
            counts: survey.counts,
            taken,
            next_data,
            l1: entries(&l1).collect(),
            pending: BTreeMap::new(),
            snapshots: survey.snapshots,
            old_table_len,
            table_changed: false,
            data: Vec::new(),
            tables: Vec::new(),
        })
    }

    fn run(mut self, req: &Request) -> Result<Option<Plan>, Stop> {
        if let Some(change) = &req.snapshot {
            self.change_snapshots(change)?;
        }
        self.own_and_zero(req)?;
        self.fix_copied_flags()?;
        if req.snapshot.is_none() && self.pending.is_empty() && self.data.is_empty() {
            return Ok(None);
        }
        self.finish().map(Some)
    }

    /// The references of the new image to cluster `c`.
    fn count(&self, c: u64) -> u32 {
        self.counts.get(c as usize).copied().unwrap_or(0)
    }

    fn hold(&mut self, c: u64) -> Result<(), Stop> {
        self.hold_n(c, 1)
    }

    fn hold_n(&mut self, c: u64, n: u32) -> Result<(), Stop> {
        if c as usize >= self.counts.len() {
            self.counts.resize(c as usize + 1, 0);
        }
        let count = &mut self.counts[c as usize];
        match count.checked_add(n) {
            Some(sum) => *count = sum,
            None => return unsupported(format!("cluster {c} would have too many references")),
        }
        Ok(())
    }

    fn release(&mut self, c: u64) -> Result<(), Stop> {
        self.release_n(c, 1)
    }

    fn release_n(&mut self, c: u64, n: u32) -> Result<(), Stop> {
        match self.counts.get_mut(c as usize) {
            Some(count) if *count >= n => *count -= n,
            _ => return corrupt(format!("cluster {c} released more often than referenced")),
        }
        Ok(())
    }

    /// Releases the clusters holding host bytes `[start, start + len)`.
    fn release_range(&mut self, start: u64, len: u64) -> Result<(), Stop> {
        (start / self.cs..(start + len).div_ceil(self.cs)).try_for_each(|c| self.release(c))
    }

    fn read_entries(&mut self, at: u64, n: usize) -> Result<Vec<u64>, Stop> {
        let mut buf = vec![0u8; n * 8];
        (self.read)(at, &mut buf)?;
        Ok(entries(&buf).collect())
    }

    /// The active L2 table at L1 index `i` (all zeros when there is none).
    fn l2_of(&mut self, i: usize) -> Result<Vec<u64>, Stop> {
        if let Some(l2) = self.pending.get(&i) {
            return Ok(l2.clone());
        }
        let per_l2 = (self.cs / 8) as usize;
        match self.l1.get(i).map_or(0, |e| e & TABLE_OFFSET_MASK) {
            0 => Ok(vec![0; per_l2]),
            at => self.read_entries(at, per_l2),
        }
    }

    /// Replaces the active L2 table at L1 index `i` with a new one holding
    /// `l2`; the data clusters it references keep their counts.
    fn set_l2(&mut self, i: usize, l2: Vec<u64>) -> Result<(), Stop> {
        if !self.pending.contains_key(&i) {
            let old = self.l1[i] & TABLE_OFFSET_MASK;
            if old != 0 {
                self.release(old / self.cs)?;
            }
        }
        self.pending.insert(i, l2);
        Ok(())
    }

    /// A new data cluster filled from `fill`; its host offset.
    fn new_data(&mut self, fill: Fill) -> Result<u64, Stop> {
        while self.taken.get(self.next_data) {
            self.next_data += 1;
        }
        let c = self.next_data;
        self.taken.set(c);
        self.hold(c)?;
        self.data.push((c * self.cs, fill));
        Ok(c * self.cs)
    }

    /// Places `bytes` (whole clusters) in new clusters; their host offset.
    fn new_table(&mut self, bytes: Vec<u8>) -> Result<u64, Stop> {
        let n = (bytes.len() as u64).div_ceil(self.cs).max(1);
        let first = self.taken.run(n);
        (first..first + n).try_for_each(|c| self.hold(c))?;
        self.tables.push((first * self.cs, bytes));
        Ok(first * self.cs)
    }

    /// Adds one reference to every L2 table and data cluster the L1 entries
    /// `l1` reach (`add`), or takes one away: one L1 table more, or one
    /// less. Each L2 table is read once however often `l1` names it.
    fn reach(&mut self, l1: &[u64], add: bool) -> Result<(), Stop> {
        let per_l2 = (self.cs / 8) as usize;
        let change = |p: &mut Self, c: u64, n: u32| match add {
            true => p.hold_n(c, n),
            false => p.release_n(c, n),
        };
        let mut named: BTreeMap<u64, u32> = BTreeMap::new();
        for l2_at in l1.iter().map(|e| e & TABLE_OFFSET_MASK).filter(|&o| o != 0) {
            *named.entry(l2_at).or_insert(0) += 1;
        }
        for (l2_at, times) in named {
            let entries = self.read_entries(l2_at, per_l2)?;
            change(self, l2_at / self.cs, times)?;
            for entry in entries {
                if entry & L2_COMPRESSED != 0 {
                    return unsupported("the image has compressed clusters".into());
                }
                let host = entry & TABLE_OFFSET_MASK;
                if host != 0 {
                    change(self, host / self.cs, times)?;
                }
            }
        }
        Ok(())
    }

    fn change_snapshots(&mut self, change: &SnapshotChange) -> Result<(), Stop> {
        let index_ok = |i: usize, p: &Self| i < p.snapshots.len();
        match change {
            SnapshotChange::Create { id, name } => {
                let shared: Vec<u64> = self.l1.iter().map(|e| e & !COPIED).collect();
                self.reach(&shared, true)?;
                let at = self.new_table(encode(&shared, self.cs))?;
                let size = self.l1.len() as u32;
                let entry = SnapshotEntry::new(id.clone(), name.clone(), (at, size), self.h.size);
                self.snapshots.push(entry);
            }
            SnapshotChange::Delete(i) if index_ok(*i, self) => {
                let gone = self.snapshots.remove(*i);
                let l1 = self.read_entries(gone.l1_table_offset, gone.l1_size as usize)?;
                self.release_range(gone.l1_table_offset, u64::from(gone.l1_size) * 8)?;
                self.reach(&l1, false)?;
            }
            SnapshotChange::Apply(i) if index_ok(*i, self) => {
                let s = self.snapshots[*i].clone();
                if s.disk_size.is_some_and(|d| d != self.h.size) {
                    return unsupported(format!(
                        "snapshot {} was taken at a different virtual size",
                        s.name
                    ));
                }
                let active = std::mem::take(&mut self.l1);
                self.reach(&active, false)?;
                let mut l1 = self.read_entries(s.l1_table_offset, s.l1_size as usize)?;
                l1.resize(active.len().max(l1.len()), 0);
                self.reach(&l1, true)?;
                self.l1 = l1;
            }
            SnapshotChange::Delete(i) | SnapshotChange::Apply(i) => {
                return corrupt(format!("no snapshot at index {i}"));
            }
        }
        self.table_changed |= !matches!(change, SnapshotChange::Apply(_));
        Ok(())
    }

    /// Makes guest clusters `[0, own_to)` the active image's own and
    /// allocates and zeroes `zero`.
    fn own_and_zero(&mut self, req: &Request) -> Result<(), Stop> {
        let (cs, per_l2) = (self.cs, self.cs / 8);
        let own = 0..req.own_to.div_ceil(cs);
        let zero = req.zero.start / cs..req.zero.end.div_ceil(cs);
        let mut guests: Vec<u64> = own.clone().filter(|g| !zero.contains(g)).collect();
        guests.extend(zero.clone());
        guests.sort_unstable();
        let mut at = 0;
        while at < guests.len() {
            let i = (guests[at] / per_l2) as usize;
            if i >= self.l1.len() {
                return corrupt(format!(
                    "guest cluster {} lies beyond the L1 table",
                    guests[at]
                ));
            }
            let shared_l2 = !self.pending.contains_key(&i)
                && self.count((self.l1[i] & TABLE_OFFSET_MASK) / cs) > 1;
            let mut l2 = self.l2_of(i)?;
            let mut changed = false;
            while at < guests.len() && guests[at] / per_l2 == i as u64 {
                let g = guests[at];
                let entry = &mut l2[(g % per_l2) as usize];
                let fill = self.fill_for(*entry, g, zero.contains(&g), shared_l2, req)?;
                if let Some(fill) = fill {
                    let old = *entry & TABLE_OFFSET_MASK;
                    if old != 0 {
                        self.release(old / cs)?;
                    }
                    *entry = self.new_data(fill)? | COPIED;
                    changed = true;
                }
                at += 1;
            }
            if changed {
                self.set_l2(i, l2)?;
            }
        }
        Ok(())
    }

    /// What the active L2 `entry` of guest cluster `g` needs: `Some` fill
    /// for a new cluster, or `None` (kept; a cluster to zero that only this
    /// entry references is zeroed in place).
    fn fill_for(
        &mut self,
        entry: u64,
        g: u64,
        zero: bool,
        shared_l2: bool,
        req: &Request,
    ) -> Result<Option<Fill>, Stop> {
        if entry & L2_COMPRESSED != 0 {
            return unsupported("the image has compressed clusters".into());
        }
        let host = entry & TABLE_OFFSET_MASK;
        let allocated = host != 0 && entry & L2_ZERO == 0;
        let own = allocated && !shared_l2 && self.count(host / self.cs) == 1;
        Ok(match (zero, allocated) {
            (true, _) if own => {
                self.data.push((host, Fill::Zeros));
                None
            }
            (true, _) => Some(Fill::Zeros),
            (false, true) if own => None,
            (false, true) => Some(Fill::Host(host)),
            (false, false) if entry == 0 && g * self.cs < req.backing_to => {
                Some(Fill::Backing(g * self.cs))
            }
            (false, false) => None,
        })
    }

    /// Sets each active L2 entry's COPIED flag to whether its cluster has
    /// exactly one reference, copying the tables whose flags change.
    fn fix_copied_flags(&mut self) -> Result<(), Stop> {
        for i in 0..self.l1.len() {
            if !self.pending.contains_key(&i) && self.l1[i] & TABLE_OFFSET_MASK == 0 {
                continue;
            }
            let l2 = self.l2_of(i)?;
            let fixed: Vec<u64> = l2
                .iter()
                .map(|&e| match e & TABLE_OFFSET_MASK {
                    0 => e & !COPIED,
                    host if self.count(host / self.cs) == 1 => e | COPIED,
                    _ => e & !COPIED,
                })
                .collect();
            if self.pending.contains_key(&i) || fixed != l2 {
                self.set_l2(i, fixed)?;
            }
        }
        Ok(())
    }

    /// Places the new tables, computes the refcounts, and makes the switch.
    fn finish(mut self) -> Result<Plan, Stop> {
        let (h, cs) = (self.h, self.cs);
        self.release_range(h.l1_table_offset, u64::from(h.l1_size) * 8)?;
        self.release_range(
            h.refcount_table_offset,
            u64::from(h.refcount_table_clusters) * cs,
        )?;
        let reftable = self.read_entries(
            h.refcount_table_offset,
            (u64::from(h.refcount_table_clusters) * cs / 8) as usize,
        )?;
        for block in reftable
            .iter()
            .map(|e| e & REFTABLE_OFFSET_MASK)
            .filter(|&b| b != 0)
        {
            self.release(block / cs)?;
        }
        for (i, l2) in std::mem::take(&mut self.pending) {
            self.l1[i] = self.new_table(encode(&l2, cs))? | COPIED;
        }
        for i in 0..self.l1.len() {
            let l2 = self.l1[i] & TABLE_OFFSET_MASK;
            self.l1[i] = match l2 {
                0 => 0,
                _ if self.count(l2 / cs) == 1 => l2 | COPIED,
                _ => l2,
            };
        }
        let l1_at = self.new_table(encode(&self.l1, cs))?;
        let snapshots_at = if self.table_changed {
            if h.nb_snapshots > 0 {
                self.release_range(h.snapshots_offset, self.old_table_len)?;
            }
            match encode_table(&self.snapshots) {
                table if table.is_empty() => 0,
                mut table => {
                    table.resize(table.len().next_multiple_of(cs as usize), 0);
                    self.new_table(table)?
                }
            }
        } else {
            h.snapshots_offset
        };
        let (table_at, table_clusters) = self.place_refcounts()?;
        let Ok(l1_size) = u32::try_from(self.l1.len()) else {
            return unsupported("the L1 table would be too large".into());
        };
        let Ok(nb_snapshots) = u32::try_from(self.snapshots.len()) else {
            return unsupported("too many snapshots".into());
        };
        let mut switch = [0u8; SWITCH_LEN];
        switch[..4].copy_from_slice(&l1_size.to_be_bytes());
        switch[4..12].copy_from_slice(&l1_at.to_be_bytes());
        switch[12..20].copy_from_slice(&(table_at * cs).to_be_bytes());
        switch[20..24].copy_from_slice(&table_clusters.to_be_bytes());
        switch[24..28].copy_from_slice(&nb_snapshots.to_be_bytes());
        switch[28..].copy_from_slice(&snapshots_at.to_be_bytes());
        Ok(Plan {
            data: self.data,
            tables: self.tables,
            switch,
        })
    }

    /// Places refcount blocks covering every cluster up to the last one in
    /// use (themselves and the refcount table included) and the table:
    /// grows the guess until the placement it leads to is covered. Returns
    /// the table's first cluster and its length in clusters.
    fn place_refcounts(&mut self) -> Result<(u64, u32), Stop> {
        let cs = self.cs;
        let bits = 1u32 << self.h.refcount_order;
        let per_block = cs * 8 / u64::from(bits);
        let mut n_blocks = self.taken.len().div_ceil(per_block).max(1);
        let (blocks, table_at, table_clusters) = loop {
            let mut trial = self.taken.clone();
            let blocks: Vec<u64> = (0..n_blocks).map(|_| trial.run(1)).collect();
            let table_clusters = (n_blocks * 8).div_ceil(cs);
            let table_at = trial.run(table_clusters);
            let needed = trial.len().div_ceil(per_block);
            if needed <= n_blocks {
                self.taken = trial;
                break (blocks, table_at, table_clusters);
            }
            n_blocks = needed;
        };
        for &b in &blocks {
            self.hold(b)?;
        }
        (table_at..table_at + table_clusters).try_for_each(|c| self.hold(c))?;
        let max = if bits == 64 {
            u64::MAX
        } else {
            (1u64 << bits) - 1
        };
        let mut out = Vec::with_capacity(blocks.len() + 1);
        for (i, &b) in blocks.iter().enumerate() {
            let mut block = vec![0u8; cs as usize];
            let first = i as u64 * per_block;
            for (j, &count) in self
                .counts
                .iter()
                .enumerate()
                .skip(first as usize)
                .take(per_block as usize)
            {
                if u64::from(count) > max {
                    return unsupported(format!(
                        "cluster {j} needs refcount {count}, more than {bits}-bit refcounts hold"
                    ));
                }
                set_refcount(&mut block, j - first as usize, bits, u64::from(count));
            }
            out.push((b * cs, block));
        }
        let table_entries: Vec<u64> = blocks.iter().map(|b| b * cs).collect();
        out.push((table_at * cs, encode(&table_entries, cs)));
        self.tables.extend(out);
        let Ok(table_clusters) = u32::try_from(table_clusters) else {
            return unsupported("the refcount table would be too large".into());
        };
        Ok((table_at, table_clusters))
    }
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
