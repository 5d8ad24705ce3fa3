//! An in-memory disk that simulates crashes, for tests.
//!
//! It keeps a *live* image (what reads see) and a *durable* one (what survives
//! a crash). Writes go to the live image and to a pending list; [`Disk::sync`]
//! moves them to the durable image. The N-th write or sync can be made to fail
//! as a crash, and [`CrashDisk::after_crash`] builds the image a machine could
//! find after power loss: the durable image plus any subset of the pending
//! writes, applied in any order, each torn at 512-byte sector granularity.

use super::{Disk, ImageError};
use rand::{Rng, SeedableRng};

/// Sector size at which unsynced writes may tear.
pub const SECTOR: usize = 512;

/// How [`CrashDisk::after_crash`] picks what survived.
#[derive(Debug, Clone, Copy)]
pub enum CrashPlan {
    /// Only what was synced survives.
    DurableOnly,
    /// Every write reached the disk, in order (a crash right after the last write).
    AllWritten,
    /// A random subset of sectors of the pending writes, in random order.
    Random(u64),
    /// As `Random`, on a device that promises no atomic sector write: a
    /// sector that lands may land in part, some of its bytes new and the
    /// rest old (in runs of 8 bytes, at random).
    TornSectors(u64),
}

/// The crash-simulating disk. See the module documentation.
#[derive(Debug, Clone)]
pub struct CrashDisk {
    live: Vec<u8>,
    durable: Vec<u8>,
    pending: Vec<(u64, Vec<u8>)>,
    max_len: u64,
    ops: u64,
    syncs: u64,
    crash_at: Option<u64>,
    crashed: bool,
}

impl CrashDisk {
    /// A zeroed disk of `len` bytes that may grow to `max_len`.
    pub fn new(len: u64, max_len: u64) -> Self {
        Self::from_image(vec![0; len as usize], max_len)
    }

    /// A disk whose durable and live content is `image`.
    pub fn from_image(image: Vec<u8>, max_len: u64) -> Self {
        CrashDisk {
            live: image.clone(),
            durable: image,
            pending: Vec::new(),
            max_len,
            ops: 0,
            syncs: 0,
            crash_at: None,
            crashed: false,
        }
    }

    /// Makes operation number `op` (0-based, counting writes, syncs and grows
    /// from now on) fail as a crash; every later write, sync or grow fails too.
    pub fn crash_at(&mut self, op: u64) {
        self.crash_at = Some(self.ops.saturating_add(op));
    }

    /// Writes, syncs and grows issued so far.
    pub fn ops(&self) -> u64 {
        self.ops
    }

    /// Syncs issued so far.
    pub fn syncs(&self) -> u64 {
        self.syncs
    }

    /// Whether the simulated crash has happened.
    pub fn crashed(&self) -> bool {
        self.crashed
    }

    /// The live image (what reads see now).
    pub fn live(&self) -> &[u8] {
        &self.live
    }

    /// Mutable live and durable image, for tamper tests: flips go to both.
    pub fn flip_byte(&mut self, offset: usize, mask: u8) {
        self.live[offset] ^= mask;
        self.durable[offset] ^= mask;
    }

    /// The disk a reboot after a crash now would find.
    pub fn after_crash(&self, plan: CrashPlan) -> CrashDisk {
        let mut image = self.durable.clone();
        match plan {
            CrashPlan::DurableOnly => {}
            CrashPlan::AllWritten => {
                for (off, data) in &self.pending {
                    image[*off as usize..*off as usize + data.len()].copy_from_slice(data);
                }
            }
            CrashPlan::Random(seed) | CrashPlan::TornSectors(seed) => {
                let torn = matches!(plan, CrashPlan::TornSectors(_));
                let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
                let mut sectors: Vec<(usize, &[u8])> = Vec::new();
                for (off, data) in &self.pending {
                    for (i, chunk) in data.chunks(SECTOR).enumerate() {
                        sectors.push((*off as usize + i * SECTOR, chunk));
                    }
                }
                // Any order: later writes to the same sector may land before earlier ones.
                for i in (1..sectors.len()).rev() {
                    let j = rng.gen_range(0..=i);
                    sectors.swap(i, j);
                }
                let keep = rng.gen_range(0..=100u32);
                for (off, chunk) in sectors {
                    if rng.gen_range(0..100u32) >= keep {
                        continue;
                    }
                    if !torn || rng.gen_range(0..3u32) > 0 {
                        image[off..off + chunk.len()].copy_from_slice(chunk);
                        continue;
                    }
                    // Some 8-byte runs of the sector new, the rest old.
                    let share = rng.gen_range(1..8u32);
                    for (i, run) in chunk.chunks(8).enumerate() {
                        if rng.gen_range(0..8u32) < share {
                            let at = off + i * 8;
                            image[at..at + run.len()].copy_from_slice(run);
                        }
                    }
                }
            }
        }
        CrashDisk::from_image(image, self.max_len)
    }

    fn step(&mut self) -> Result<(), ImageError> {
        if self.crashed || self.crash_at == Some(self.ops) {
            self.crashed = true;
            return Err(ImageError::Crashed);
        }
        self.ops += 1;
        Ok(())
    }

    fn bounds(&self, offset: u64, len: usize) -> Result<usize, ImageError> {
        match offset.checked_add(len as u64) {
            Some(end) if end <= self.live.len() as u64 => Ok(offset as usize),
            _ => Err(ImageError::OutOfBounds {
                path: "<memory>".into(),
                offset,
                len: len as u64,
                area: self.live.len() as u64,
            }),
        }
    }
}

impl Disk for CrashDisk {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), ImageError> {
        // Reads keep working after the crash point: it models a failed write
        // or sync in a process that goes on running.
        let at = self.bounds(offset, buf.len())?;
        buf.copy_from_slice(&self.live[at..at + buf.len()]);
        Ok(())
    }

    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), ImageError> {
        let at = self.bounds(offset, data.len())?;
        self.step()?;
        self.live[at..at + data.len()].copy_from_slice(data);
        self.pending.push((offset, data.to_vec()));
        Ok(())
    }

    fn sync(&mut self) -> Result<(), ImageError> {
        self.step()?;
        self.syncs += 1;
        self.durable.clone_from(&self.live);
        self.pending.clear();
        Ok(())
    }

    fn size(&self) -> u64 {
        self.live.len() as u64
    }

    fn max_len(&self) -> u64 {
        self.max_len
    }

    fn grow(&mut self, min_len: u64) -> Result<(), ImageError> {
        if min_len <= self.size() {
            return Ok(());
        }
        if min_len > self.max_len {
            return Err(ImageError::CapacityLimit {
                path: "<memory>".into(),
                requested: min_len,
                max: self.max_len,
            });
        }
        self.step()?;
        self.live.resize(min_len as usize, 0);
        self.durable.resize(min_len as usize, 0);
        Ok(())
    }
}

/// A [`CrashDisk`] that a test keeps a handle to while a store owns it, to
/// count syncs, arm a crash or take the image afterwards.
#[derive(Debug, Clone)]
pub struct SharedDisk(std::sync::Arc<std::sync::Mutex<CrashDisk>>);

impl SharedDisk {
    /// Shares `disk`.
    pub fn new(disk: CrashDisk) -> Self {
        SharedDisk(std::sync::Arc::new(std::sync::Mutex::new(disk)))
    }

    /// Runs `f` on the disk.
    pub fn with<R>(&self, f: impl FnOnce(&mut CrashDisk) -> R) -> R {
        // A test panicking elsewhere must not hide this disk's state.
        f(&mut self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl Disk for SharedDisk {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), ImageError> {
        self.with(|d| d.read_at(offset, buf))
    }
    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), ImageError> {
        self.with(|d| d.write_at(offset, data))
    }
    fn sync(&mut self) -> Result<(), ImageError> {
        self.with(|d| d.sync())
    }
    fn size(&self) -> u64 {
        self.with(|d| d.size())
    }
    fn max_len(&self) -> u64 {
        self.with(|d| d.max_len())
    }
    fn grow(&mut self, min_len: u64) -> Result<(), ImageError> {
        self.with(|d| d.grow(min_len))
    }
}
