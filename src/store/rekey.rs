//! Changing the key: one commit that re-encrypts every blob under the new
//! key, then a scrub that zeroes every block the new generation does not
//! use, so no ciphertext under the old key (or old plaintext) stays behind.

use super::alloc::Allocator;
use super::commit::Transaction;
use super::recover::SlotReport;
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

    /// Zeroes every block of the area the current generation does not use,
    /// and the other header slot. Only free space is written, so a crash
    /// part-way leaves the current generation intact; a failure leaves the
    /// scrub pending for the next commit.
    pub(super) fn scrub_free_space(&mut self) -> Result<(), StoreError> {
        self.scrub_pending = true;
        let v = &self.view;
        let g = &v.current;
        let free = Allocator::new(
            g.slot.area_len,
            g.dir.extents(&g.slot).chain(v.chain.pinned()),
        )
        .free_runs();
        let other = 1 - v.chain.anchor_slot;
        let zeros = vec![0u8; 64 * 1024];
        let disk = &mut self.view.disk;
        disk.write_at(SLOT_OFFSETS[other], &zeros[..BLOCK as usize])?;
        for (start, end) in free {
            let mut off = start;
            while off < end {
                let n = (end - off).min(zeros.len() as u64);
                disk.write_at(off, &zeros[..n as usize])?;
                off += n;
            }
        }
        disk.sync()?;
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
