//! Changing the key: one commit that re-encrypts every blob under the new
//! key, then a scrub that zeroes every block the new generation does not
//! use, so no ciphertext under the old key (or old plaintext) stays behind.
//!
//! The rekey commit anchors, so the other header slot then holds the last
//! generation under the old key. The scrub zeroes free blocks first (that
//! header's own directory excepted) and syncs, then zeroes that slot and
//! syncs again: until the scrub has finished, the other slot names a
//! directory whose key check differs from the current one. A writer that
//! opens the image sees that ([`super::StoreView::old_key_remains`]) and
//! its next commit scrubs, so a scrub cut short by a crash or an I/O error
//! is finished by whichever writer commits next.

use super::alloc::Allocator;
use super::commit::Transaction;
use super::recover::SlotReport;
use super::view::StoreView;
use super::{Store, StoreError};
use crate::crypto::KeySource;
use crate::format::{BLOCK, SLOT_OFFSETS};

/// What [`Store::rekey`] did.
#[derive(Debug)]
#[must_use = "a failed scrub is a warning to show"]
pub struct Rekeyed {
    /// The generation committed under the new key.
    pub generation: u64,
    /// Why the free blocks still hold data under the old key, if the scrub
    /// after the commit failed. The new key is in force either way; the
    /// handle's next commit scrubs again.
    pub scrub_failed: Option<StoreError>,
}

impl Store {
    /// Changes the key (or encrypts a plaintext store) in one atomic commit:
    /// every blob is re-encrypted under `new`, with a new key check. Once
    /// that commit is durable, every block it does not use and the other
    /// header slot are overwritten with zeros and synced. A failure of that
    /// scrub is reported in [`Rekeyed::scrub_failed`], not as an error: the
    /// new key is committed by then.
    pub fn rekey(&mut self, new: &KeySource) -> Result<Rekeyed, StoreError> {
        if self.is_encrypted() && self.view.key.is_none() {
            return Err(self.key_missing());
        }
        let kdf = new.new_kdf();
        let master = new.master_key(&kdf).map_err(|e| self.crypto(e))?;
        let mut t = Transaction::new(self);
        t.rekey_to(master, kdf)?;
        let generation = t.commit()?;
        Ok(Rekeyed {
            generation,
            scrub_failed: self.scrub_free_space().err(),
        })
    }

    /// Zeroes every block of the area the current generation does not use
    /// and then the other header slot, each followed by a sync (see the
    /// module documentation). Only free space is written, so a crash
    /// part-way leaves the current generation intact; a failure leaves the
    /// scrub pending for the next commit.
    pub(super) fn scrub_free_space(&mut self) -> Result<(), StoreError> {
        self.scrub_pending = true;
        let v = &self.view;
        let g = &v.current;
        let other = 1 - v.chain.anchor_slot;
        let marker = v.slot_directory(other).map(|(extent, _)| extent);
        let in_use = g.dir.extents(&g.slot).chain(v.chain.pinned()).chain(marker);
        let free = Allocator::new(g.slot.area_len, in_use).free_runs();
        let zeros = vec![0u8; 64 * 1024];
        let disk = &mut self.view.disk;
        for (start, end) in free {
            let mut off = start;
            while off < end {
                let n = (end - off).min(zeros.len() as u64);
                disk.write_at(off, &zeros[..n as usize])?;
                off += n;
            }
        }
        disk.sync()?;
        disk.write_at(SLOT_OFFSETS[other], &zeros[..BLOCK as usize])?;
        disk.sync()?;
        self.view.slot_marked[other] = false;
        self.view.slots[other] = SlotReport {
            index: other,
            generation: None,
            status: "no tpmstate magic".into(),
            sound: true,
        };
        self.scrub_pending = false;
        Ok(())
    }
}

impl StoreView {
    /// Whether the slot not holding the current anchor still holds a
    /// generation under another key (or in plaintext while the store is now
    /// encrypted): a rekey's scrub has not finished, and free blocks may
    /// still hold data under the old key until the next commit zeroes them.
    pub fn old_key_remains(&self) -> bool {
        let current = self.current.dir.encryption.as_ref().map(|e| e.key_check);
        let other = 1 - self.chain.anchor_slot;
        self.slot_directory(other)
            .is_some_and(|(_, dir)| dir.encryption.map(|e| e.key_check) != current)
    }
}
