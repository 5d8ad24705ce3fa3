//! Transactions and the one-sync commit, in five steps:
//!
//! 1. **plan**: the next generation's directory, built on a copy, and the
//!    new blob versions staged (borrowed, not copied);
//! 2. **place**: blocks the current generation and the chain headers do not
//!    use, as one run starting with a header block at the current header's
//!    `next` (a *chained* commit: one contiguous write), or anywhere, growing
//!    the area first if needed, with the header going to the slot that does
//!    not hold the current anchor (an *anchored* commit); a small directory
//!    goes into the header's block;
//! 3. **seal**: each blob encrypted (or copied) straight into the buffer that
//!    is written, then the directory and the header;
//! 4. **write**, then sync once;
//! 5. **switch** the in-memory state to the new generation.
//!
//! Until step 4 returns, nothing recovery needs to reach the current
//! generation has been touched, so a crash anywhere opens at it or at the
//! new one.

use super::alloc::Allocator;
use super::layout::{blocks, layout, Layout, Placement, Writes};
use super::recover::{anchor_status, Chain, Generation, Skipped, SlotReport, MAX_CHAIN};
use super::view::StoreView;
use super::{Store, StoreError};
use crate::crypto::Key;
use crate::format::{
    self, BlobEntry, Directory, Encryption, Extent, Kdf, Slot, BLOCK, DATA_START, SLOT_BYTES,
    SLOT_OFFSETS,
};
use crate::image::ImageError;
use std::collections::BTreeMap;
use zeroize::Zeroizing;

/// A set of puts and deletes applied all together by [`Transaction::commit`],
/// or not at all. Dropping it without committing changes nothing. It borrows
/// the data it is given (`'d`) rather than copying it: the bytes are read
/// once, when they are encrypted or copied into the buffer that is written.
pub struct Transaction<'s, 'd> {
    store: &'s mut Store,
    changes: BTreeMap<String, Option<Data<'d>>>,
    rekey: Option<(Key, Kdf)>,
    settle: bool,
    /// A compacting commit: its blobs go to the lowest holes.
    compact: bool,
}

/// A new blob version: the caller's bytes, or bytes read back for a rekey.
enum Data<'d> {
    Borrowed(&'d [u8]),
    Owned(Zeroizing<Vec<u8>>),
}

impl Data<'_> {
    fn bytes(&self) -> &[u8] {
        match self {
            Data::Borrowed(b) => b,
            Data::Owned(v) => v,
        }
    }
}

/// A new blob version on its way to disk.
struct Staged<'d> {
    name: String,
    data: Data<'d>,
    /// Its stored length (the tag of a sealed blob is kept in the directory).
    stored_len: u32,
}

/// Step 1's result: the next generation before its blocks are known.
struct Plan<'d> {
    generation: u64,
    id: [u8; 16],
    /// The directory without the staged blobs' entries (step 3 adds them).
    dir: Directory,
    /// An upper bound on the encoded directory's length.
    dir_bound: u64,
    staged: Vec<Staged<'d>>,
}

impl Store {
    /// Starts a transaction.
    pub fn transaction<'d>(&mut self) -> Transaction<'_, 'd> {
        Transaction::new(self)
    }

    /// Puts one blob in its own transaction.
    pub fn put(&mut self, name: &str, data: &[u8]) -> Result<u64, StoreError> {
        let mut t = self.transaction();
        t.put(name, data)?;
        t.commit()
    }

    /// Deletes one blob in its own transaction (`NoSuchBlob` if absent).
    pub fn delete(&mut self, name: &str) -> Result<u64, StoreError> {
        if !self.contains(name) {
            return Err(self.no_such_blob(name));
        }
        let mut t = self.transaction();
        t.delete(name)?;
        t.commit()
    }

    /// Leaves the image in the form a migration target can check strictly:
    /// the current generation anchored in a header slot, naming no successor
    /// block, with both slots sound and nothing newer left by a crash. Commits
    /// an unchanged generation when the image is not already in that form.
    pub fn prepare_handover(&mut self) -> Result<(), StoreError> {
        if self.poisoned {
            return Err(StoreError::Poisoned {
                path: self.view.path.clone(),
            });
        }
        let v = &self.view;
        let settled = v.slots.iter().all(|r| r.sound)
            && v.chain.headers.is_empty()
            && v.skipped.is_empty()
            && v.current.slot.next == 0;
        if settled {
            return Ok(());
        }
        let mut t = Transaction::new(self);
        t.settle = true;
        t.commit().map(|_| ())
    }
}

fn invalid_name(name: &str, reason: String) -> StoreError {
    StoreError::InvalidName {
        name: name.to_string(),
        reason,
    }
}

impl<'s, 'd> Transaction<'s, 'd> {
    pub(super) fn new(store: &'s mut Store) -> Self {
        Transaction {
            store,
            changes: BTreeMap::new(),
            rekey: None,
            settle: false,
            compact: false,
        }
    }

    /// Sets blob `name` to `data` (creating or replacing it).
    pub fn put(&mut self, name: &str, data: &'d [u8]) -> Result<(), StoreError> {
        format::check_name(name).map_err(|reason| invalid_name(name, reason))?;
        if u32::try_from(data.len()).is_err() {
            return Err(StoreError::Usage(format!(
                "blob {name:?} of {} bytes is too large",
                data.len()
            )));
        }
        self.changes
            .insert(name.to_string(), Some(Data::Borrowed(data)));
        Ok(())
    }

    /// Removes blob `name` (nothing happens if it does not exist).
    pub fn delete(&mut self, name: &str) -> Result<(), StoreError> {
        format::check_name(name).map_err(|reason| invalid_name(name, reason))?;
        self.changes.insert(name.to_string(), None);
        Ok(())
    }

    /// Re-encrypts every blob under `key` in this commit.
    pub(super) fn rekey_to(&mut self, key: Key, kdf: Kdf) -> Result<(), StoreError> {
        let names: Vec<String> = self.store.names().map(str::to_string).collect();
        for name in names {
            if !self.changes.contains_key(&name) {
                let data = self.store.get_required(&name)?;
                self.changes.insert(name, Some(Data::Owned(data)));
            }
        }
        self.rekey = Some((key, kdf));
        Ok(())
    }

    /// Commits: all changes become durable together with one sync, or none do.
    /// Returns the new generation (the current one if there was nothing to do).
    pub fn commit(self) -> Result<u64, StoreError> {
        let Transaction {
            store,
            changes,
            rekey,
            settle,
            compact,
        } = self;
        if store.poisoned {
            return Err(StoreError::Poisoned {
                path: store.view.path.clone(),
            });
        }
        if changes.is_empty() && rekey.is_none() && !settle {
            return Ok(store.generation());
        }
        if rekey.is_none() && store.is_encrypted() && store.view.key.is_none() {
            return Err(store.key_missing());
        }
        // Before anything of this commit is written (a pending scrub, a
        // compaction, an area growth, the commit itself). A local file
        // system's OFD locks cannot be lost under their holder: the check
        // is for shared storage, POSIX locks and running without locks.
        let trusted = store.lock.lock.has_ofd_locks() && !store.view.disk.on_shared_storage();
        if !trusted {
            if let Err(e) = check_unchanged(&store.view) {
                store.poisoned = true;
                return Err(e);
            }
        }
        if store.scrub_pending && rekey.is_none() {
            // Before this commit can overwrite the other slot, which marks
            // an unfinished scrub on disk. A failure stays pending: it is
            // not this commit's, which writes only blocks it allocates.
            let _ = store.scrub_free_space();
        }
        let settle = settle || store.settle_next;
        if store.compact_next && !compact && rekey.is_none() && !settle {
            compact_first(store)?;
        }
        let mut plan = Plan::build(&store.view, changes, rekey.as_ref())?;
        // Until both slots say the store has held state, commits anchor, so
        // that the next one marks the other slot too.
        let unmarked =
            plan.dir.held_state && !store.view.slot_marked[1 - store.view.chain.anchor_slot];
        let must_anchor = rekey.is_some() || settle || unmarked;
        let placement = placement(&store.view, must_anchor, compact);
        let (layout, area) = place(&mut store.view, &plan, placement)?;
        let key = match &rekey {
            Some((k, _)) => Some(k),
            None => store.view.key.as_ref(),
        };
        let mut writes = Writes::new(&layout.regions, std::mem::take(&mut store.write_buf));
        let sealed = seal(
            &store.view,
            &mut plan,
            &layout,
            area,
            key,
            settle,
            &mut writes,
        );
        let (slot, dir_bytes) = match sealed {
            Ok(s) => s,
            Err(e) => {
                store.write_buf = writes.into_buffer();
                return Err(e);
            }
        };
        write(store, writes)?;
        let generation = plan.generation;
        let skipped = std::mem::take(&mut store.view.skipped);
        switch(store, layout.header_at, slot, plan.dir, dir_bytes);
        forget_skipped(store, &skipped);
        if let Some((k, _)) = rekey {
            store.view.key = Some(k);
        }
        store.settle_next = false;
        store.compact_next = needs_compaction(&store.view);
        Ok(generation)
    }
}

/// Zeroes the header blocks of the commits the previous generation was
/// served over (torn, damaged, or given up by an accepted rollback), now
/// that a newer generation is durable on top of it, where no block of the
/// new generation lies: left, an abandoned header newer than a later
/// generation would read as a rollback at every open. Free space only, so
/// a failure leaves them (the next open reports them again) and is not
/// this commit's.
fn forget_skipped(store: &mut Store, skipped: &[Skipped]) {
    if skipped.is_empty() {
        return;
    }
    let view = &store.view;
    let g = &view.current;
    let free = Allocator::new(
        g.slot.area_len,
        g.dir.extents(&g.slot).chain(view.chain.pinned()),
    )
    .free_runs();
    let anchor = SLOT_OFFSETS[view.chain.anchor_slot];
    let stale: Vec<u64> = skipped
        .iter()
        .map(|s| s.header_offset / BLOCK * BLOCK)
        .filter(|&at| match at < DATA_START {
            true => at != anchor,
            false => free.iter().any(|&(s, e)| s <= at && at + BLOCK <= e),
        })
        .collect();
    let zeros = [0u8; BLOCK as usize];
    let disk = &mut store.view.disk;
    let zeroed = stale.iter().try_for_each(|&at| disk.write_at(at, &zeros));
    let _ = zeroed.and_then(|()| disk.sync());
}

/// The compacting commit, before the caller's: every blob of the area's
/// upper half read back (and decrypted) and written again into the lowest
/// holes, as a commit of its own, so that the caller's commit neither waits
/// on it for room nor fails with it. If it finds no room after all, the
/// caller's commit goes ahead as it would have; a failed write fails both.
fn compact_first(store: &mut Store) -> Result<(), StoreError> {
    store.compact_next = false;
    let names: Vec<String> = upper_blobs(&store.view.current)
        .map(|(name, _)| name.clone())
        .collect();
    let mut t = Transaction::new(store);
    t.compact = true;
    for name in names {
        let data = t.store.get_required(&name)?;
        t.changes.insert(name, Some(Data::Owned(data)));
    }
    match t.commit() {
        Ok(_) | Err(StoreError::CapacityExceeded { .. }) => Ok(()),
        Err(e) => Err(e),
    }
}

impl<'d> Plan<'d> {
    /// Step 1: the next generation's directory on a copy of the current one,
    /// without the new versions' entries, and the staged versions.
    fn build(
        view: &StoreView,
        changes: BTreeMap<String, Option<Data<'d>>>,
        rekey: Option<&(Key, Kdf)>,
    ) -> Result<Plan<'d>, StoreError> {
        let cur = &view.current;
        let generation = cur
            .slot
            .generation
            .checked_add(1)
            .ok_or_else(|| StoreError::Corrupt {
                path: view.path.clone(),
                reason: "the generation counter is at its maximum".into(),
            })?;
        let id = cur.slot.store_id;
        let mut dir = cur.dir.clone();
        dir.generation = generation;
        dir.version = format::DIRECTORY_VERSION;
        // What the encoding can grow by: see Directory::entry_bound.
        let mut dir_bound = cur.dir_bytes.len() as u64 + Directory::GENERATION_GROWTH_BOUND;
        if let Some((k, kdf)) = rekey {
            let encryption = Encryption {
                kdf: kdf.clone(),
                key_check: k.key_check(&id),
            };
            dir_bound += format::encoded_len(&Some(&encryption));
            dir.encryption = Some(encryption);
        }
        if !dir.held_state && (changes.values().any(Option::is_some) || !dir.blobs.is_empty()) {
            dir.held_state = true;
            dir_bound += Directory::HELD_STATE_BOUND;
        }
        let mut staged = Vec::new();
        for (name, change) in changes {
            dir.blobs.remove(&name);
            if let Some(data) = change {
                dir_bound += Directory::entry_bound(&name);
                // Transaction::put refused anything longer than u32::MAX.
                let stored_len = u32::try_from(data.bytes().len()).map_err(|_| {
                    StoreError::Internal(format!("blob {name:?} passed the size check"))
                })?;
                staged.push(Staged {
                    name,
                    data,
                    stored_len,
                });
            }
        }
        Ok(Plan {
            generation,
            id,
            dir,
            dir_bound,
            staged,
        })
    }

    fn lens(&self) -> Vec<u32> {
        self.staged.iter().map(|s| s.stored_len).collect()
    }
}

/// How the commit places its blocks: chained where it can (at the block the
/// current header named, behind a chain not yet at its limit, with no torn
/// commit left to keep in quarantine); rekeys and settling commits anchor;
/// a compacting commit scatters its blobs into the lowest holes.
fn placement(view: &StoreView, must_anchor: bool, compact: bool) -> Placement {
    let next = view.current.slot.next;
    let chains = !must_anchor
        && next != 0
        && view.chain.headers.len() < MAX_CHAIN
        && view.chain.quarantine.is_empty();
    match (compact, chains) {
        (true, _) => Placement::Scatter,
        (false, true) => Placement::Chain(next),
        (false, false) => Placement::Anchor,
    }
}

/// Whether free space has come apart into runs too short to keep commits
/// cheap and possible: the directory has its own blocks and the largest free
/// run is below twice its size plus two blocks, while the blobs of the
/// area's upper half can move down into holes (which frees that half).
pub(super) fn needs_compaction(view: &StoreView) -> bool {
    let g = &view.current;
    let area = g.slot.area_len;
    let in_use = g.dir.extents(&g.slot).chain(view.chain.pinned());
    let runs = Allocator::new(area, in_use).free_runs();
    let largest = runs.iter().map(|(s, e)| e - s).max().unwrap_or(0);
    let free: u64 = runs.iter().map(|(s, e)| e - s).sum();
    let reserve = 2 * (blocks(g.slot.directory.len) + 2 * BLOCK);
    let upper: u64 = upper_blobs(g).map(|(_, b)| blocks(b.extent.len)).sum();
    // A directory embedded in its header's block needs no run of its own:
    // only a store of many blobs comes apart this way, and a vTPM's three
    // blobs keep their one sync per commit.
    !g.slot.directory.is_embedded()
        && largest < reserve
        && upper > 0
        && free >= upper + reserve
        && compaction_fits(view)
}

/// A dry run of the compacting commit: whether its blobs and directory can
/// be placed, every blob below the area's middle (else moving them would
/// not free the upper half, and would be tried again and again).
fn compaction_fits(view: &StoreView) -> bool {
    let g = &view.current;
    let moved: Vec<(&String, &BlobEntry)> = upper_blobs(g).collect();
    let lens: Vec<u32> = moved.iter().map(|(_, b)| b.extent.len).collect();
    let dir_bound = g.dir_bytes.len() as u64
        + Directory::GENERATION_GROWTH_BOUND
        + moved
            .iter()
            .map(|(n, _)| Directory::entry_bound(n))
            .sum::<u64>();
    let anchor_at = SLOT_OFFSETS[1 - view.chain.anchor_slot];
    let half = g.slot.area_len / 2;
    let placed = layout(
        g,
        &view.chain,
        g.slot.area_len,
        &lens,
        dir_bound,
        Placement::Scatter,
        anchor_at,
    );
    placed.is_some_and(|l| l.blobs.iter().all(|e| e.len == 0 || e.end() <= half))
}

/// The blobs that lie in the upper half of the area.
fn upper_blobs(g: &Generation) -> impl Iterator<Item = (&String, &BlobEntry)> {
    let half = g.slot.area_len / 2;
    g.dir
        .blobs
        .iter()
        .filter(move |(_, b)| b.extent.len > 0 && b.extent.start() >= half)
}

/// Step 2: places the plan, growing the area once if it does not fit.
/// Growing by the full size of the new data means the new blocks alone hold
/// it, so a second failure cannot happen while the image has room; it is
/// reported, with the free space and its largest run, rather than looped on.
fn place(
    view: &mut StoreView,
    plan: &Plan,
    placement: Placement,
) -> Result<(Layout, u64), StoreError> {
    let lens = plan.lens();
    let anchor_at = SLOT_OFFSETS[1 - view.chain.anchor_slot];
    let try_at = |v: &StoreView, area| {
        layout(
            &v.current,
            &v.chain,
            area,
            &lens,
            plan.dir_bound,
            placement,
            anchor_at,
        )
    };
    let area = view.current.slot.area_len;
    if let Some(l) = try_at(view, area) {
        return Ok((l, area));
    }
    let needed =
        lens.iter().map(|&len| blocks(len)).sum::<u64>() + plan.dir_bound.div_ceil(BLOCK) * BLOCK;
    // Quarantined blocks of a torn commit that grew the area may lie past
    // this generation's end: grow beyond them.
    let top = view.chain.pinned().map(|e| e.end()).fold(area, u64::max);
    let wanted = top.saturating_add(needed).saturating_add(BLOCK);
    // Growing only when the whole run then fits: a failed commit writes nothing.
    let grown = match view.disk.grow(wanted) {
        Ok(()) => wanted,
        Err(ImageError::CapacityLimit { .. }) => area,
        Err(other) => return Err(other.into()),
    };
    if let Some(l) = try_at(view, grown) {
        return Ok((l, grown));
    }
    let g = &view.current;
    let runs = Allocator::new(grown, g.dir.extents(&g.slot).chain(view.chain.pinned())).free_runs();
    Err(StoreError::CapacityExceeded {
        path: view.path.clone(),
        needed,
        area: grown,
        free: runs.iter().map(|(s, e)| e - s).sum(),
        largest_free: runs.iter().map(|(s, e)| e - s).max().unwrap_or(0),
        capacity: view.disk.max_len(),
        wanted,
    })
}

/// Step 3: fills the blocks (each new version encrypted or copied straight
/// from the caller's bytes into the buffer that is written), then the
/// directory and the header. Returns the header and the directory's bytes.
fn seal(
    view: &StoreView,
    plan: &mut Plan,
    layout: &Layout,
    area: u64,
    key: Option<&Key>,
    settle: bool,
    writes: &mut Writes,
) -> Result<(Slot, Vec<u8>), StoreError> {
    let (id, generation) = (plan.id, plan.generation);
    for (s, extent) in plan.staged.iter().zip(&layout.blobs) {
        let buf = match s.stored_len {
            0 => &mut [][..],
            len => writes.slice(extent.offset, len)?,
        };
        let sealed = match key {
            Some(k) => Some(
                k.seal_into(&id, &s.name, generation, s.data.bytes(), buf)
                    .map_err(|e| view.crypto(e))?,
            ),
            None => {
                buf.copy_from_slice(s.data.bytes());
                None
            }
        };
        let entry = BlobEntry {
            extent: *extent,
            plain_len: s.stored_len,
            crc: crc32c::crc32c(buf),
            written_gen: generation,
            sealed,
        };
        plan.dir.blobs.insert(s.name.clone(), entry);
    }
    let dir_bytes = plan.dir.encode();
    if dir_bytes.len() as u64 > layout.dir_room {
        // dir_bound is an upper bound by construction (Directory::entry_bound);
        // report a broken bound, never write past it.
        return Err(StoreError::Internal(format!(
            "directory of {} bytes exceeds its bound of {}",
            dir_bytes.len(),
            layout.dir_room
        )));
    }
    writes
        .slice(layout.dir_at, dir_bytes.len() as u32)?
        .copy_from_slice(&dir_bytes);
    let directory = Extent {
        offset: layout.dir_at,
        len: dir_bytes.len() as u32,
    };
    let next = match settle {
        true => 0,
        false => successor(view, plan, layout, area, directory),
    };
    let slot = Slot {
        format_version: format::FORMAT_VERSION,
        encrypted: key.is_some(),
        generation,
        store_id: id,
        area_len: area,
        directory,
        directory_crc: crc32c::crc32c(&dir_bytes),
        directory_mac: key
            .map(|k| k.directory_mac(&id, &dir_bytes))
            .unwrap_or([0; 32]),
        commit_id: crate::crypto::os_random(),
        prev_id: view.current.slot.commit_id,
        next,
    };
    writes
        .slice(layout.header_at, SLOT_BYTES as u32)?
        .copy_from_slice(&slot.encode());
    Ok((slot, dir_bytes))
}

/// The successor's header block: the largest run free once this generation
/// is durable (its blocks, plus the chain headers if it is chained; an
/// anchored commit frees the old chain). 0 if no block is free.
fn successor(view: &StoreView, plan: &Plan, layout: &Layout, area: u64, dir: Extent) -> u64 {
    // Slots lie below DATA_START; a chained header is in a block above it.
    let chained = layout.header_at >= DATA_START;
    let chain: &[u64] = if chained { &view.chain.headers } else { &[] };
    let pinned = chained
        .then_some(&layout.header_at)
        .into_iter()
        .chain(chain)
        .map(|&offset| Extent {
            offset,
            len: BLOCK as u32,
        });
    let in_use = plan.dir.blobs.values().map(|b| b.extent).chain([dir]);
    Allocator::new(area, in_use.chain(pinned))
        .largest_free()
        .unwrap_or(0)
}

/// Before a commit writes anything, on shared storage or without reliable
/// locks: confirms that the image's qcow2 tables are where this writer
/// left them and that nobody committed after the
/// generation this handle holds. Any successor of it sits in a header slot
/// or where its header's `next` points, so those three places are read,
/// past a shared file system's stale cache; one holding a newer generation
/// of this store that this handle did not skip at open means another
/// process wrote the image while this one thought it held the lock.
fn check_unchanged(view: &StoreView) -> Result<(), StoreError> {
    let changed = |what: String| StoreError::ImageChanged {
        path: view.path.clone(),
        what,
    };
    if view.disk.layout_changed()? {
        // Its qcow2 tables moved (a snapshot taken, the area copied): this
        // writer's map of the area may name clusters no longer the image's.
        return Err(changed("its qcow2 tables were rewritten".into()));
    }
    let current = &view.current.slot;
    let next = Some(current.next).filter(|&n| n != 0 && !SLOT_OFFSETS.contains(&n));
    for at in SLOT_OFFSETS.into_iter().chain(next) {
        let mut buf = [0u8; SLOT_BYTES];
        if at + SLOT_BYTES as u64 > view.disk.size() {
            continue;
        }
        view.disk.read_fresh(at, &mut buf)?;
        let Ok(found) = Slot::decode_at(&buf, at) else {
            continue;
        };
        let skipped = view
            .skipped
            .iter()
            .any(|s| s.header_offset == at && s.generation == Some(found.generation));
        if found.store_id != current.store_id && SLOT_OFFSETS.contains(&at) {
            return Err(changed(
                "a header slot holds another store (formatted anew?)".into(),
            ));
        }
        if found.store_id == current.store_id && found.generation > current.generation && !skipped {
            return Err(changed(format!(
                "generation {} is on disk, this writer has {}",
                found.generation, current.generation
            )));
        }
    }
    Ok(())
}

/// Step 4: writes every region, then the one sync. After a failed write or
/// sync the kernel may have dropped dirty pages: the on-disk state is
/// unknown until the store is reopened, so the handle is poisoned.
fn write(store: &mut Store, writes: Writes) -> Result<(), StoreError> {
    let disk = &mut store.view.disk;
    let parts: Vec<(u64, &[u8])> = writes.regions().collect();
    let written = disk.write_parts(&parts).and_then(|()| disk.sync());
    drop(parts);
    store.write_buf = writes.into_buffer();
    if let Err(e) = written {
        store.poisoned = true;
        return Err(e.into());
    }
    Ok(())
}

/// Step 5: the new generation is durable; the handle switches to it.
fn switch(store: &mut Store, header_at: u64, slot: Slot, dir: Directory, dir_bytes: Vec<u8>) {
    let view = &mut store.view;
    if header_at >= DATA_START {
        // The anchor's status follows from the chain: see StoreView::slot_reports.
        view.chain.headers.push(header_at);
    } else {
        let old = view.chain.anchor_slot;
        view.chain = Chain {
            anchor_slot: 1 - old,
            ..Chain::default()
        };
        view.skipped.clear();
        view.slots[1 - old] = SlotReport {
            index: 1 - old,
            generation: Some(slot.generation),
            status: anchor_status(slot.generation, 0),
            sound: true,
        };
        view.slots[old].status = "ok (older anchor, not needed)".into();
        view.slot_marked[1 - old] = dir.held_state;
    }
    view.current = Generation {
        header_at,
        slot,
        dir,
        dir_bytes,
    };
}
