//! The qcow2 snapshot table: reading it, and encoding a new one.
//!
//! An internal snapshot is an entry in this table naming an L1 table of its
//! own; the L2 tables and data clusters it reaches may be shared with the
//! active image and with other snapshots (their refcounts count every L1
//! table that reaches them). Each entry is laid out as the qcow2
//! specification says:
//!
//! | bytes | field |
//! |---|---|
//! | 0-7 | L1 table offset |
//! | 8-11 | L1 table entries |
//! | 12-13, 14-15 | ID and name lengths |
//! | 16-19, 20-23 | creation time (seconds, nanoseconds) |
//! | 24-31 | guest clock (nanoseconds) |
//! | 32-35 | VM state size (32 bits) |
//! | 36-39 | extra data size, then the extra data, the ID, the name |
//!
//! padded to a multiple of 8 bytes. Entries are kept as the bytes they were
//! read as, so that rewriting the table never changes what tpmstate does not
//! interpret. This module does no I/O of its own.

use super::qcow2_leaks::{Doubt, ReadAt};

/// QEMU's limit on the size of the snapshot table.
const MAX_TABLE_BYTES: u64 = 64 << 20;
/// Bytes of the fixed part of an entry.
const FIXED: usize = 40;

/// One internal snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotEntry {
    /// Host offset of the snapshot's L1 table.
    pub l1_table_offset: u64,
    /// Entries of that table.
    pub l1_size: u32,
    /// The snapshot's ID (QEMU numbers them).
    pub id: String,
    /// The snapshot's name.
    pub name: String,
    /// Creation time, seconds since the epoch.
    pub date_sec: u32,
    /// Bytes of saved VM state (0 for a disk-only snapshot).
    pub vm_state_size: u64,
    /// The virtual disk size when the snapshot was taken, where recorded.
    pub disk_size: Option<u64>,
    /// The entry as stored, padding included.
    raw: Vec<u8>,
}

impl SnapshotEntry {
    /// A new disk-only snapshot entry for an image of `disk_size` bytes.
    pub(crate) fn new(id: String, name: String, l1: (u64, u32), disk_size: u64) -> Self {
        let (secs, nanos) = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or((0, 0), |d| (d.as_secs() as u32, d.subsec_nanos()));
        let mut raw = Vec::with_capacity(FIXED + 24 + id.len() + name.len() + 8);
        raw.extend_from_slice(&l1.0.to_be_bytes());
        raw.extend_from_slice(&l1.1.to_be_bytes());
        raw.extend_from_slice(&(id.len() as u16).to_be_bytes());
        raw.extend_from_slice(&(name.len() as u16).to_be_bytes());
        raw.extend_from_slice(&secs.to_be_bytes());
        raw.extend_from_slice(&nanos.to_be_bytes());
        raw.extend_from_slice(&0u64.to_be_bytes()); // guest clock
        raw.extend_from_slice(&0u32.to_be_bytes()); // VM state size
        raw.extend_from_slice(&24u32.to_be_bytes()); // extra data size
        raw.extend_from_slice(&0u64.to_be_bytes()); // VM state size, 64 bits
        raw.extend_from_slice(&disk_size.to_be_bytes());
        raw.extend_from_slice(&u64::MAX.to_be_bytes()); // no instruction count
        raw.extend_from_slice(id.as_bytes());
        raw.extend_from_slice(name.as_bytes());
        raw.resize(raw.len().next_multiple_of(8), 0);
        SnapshotEntry {
            l1_table_offset: l1.0,
            l1_size: l1.1,
            id,
            name,
            date_sec: secs,
            vm_state_size: 0,
            disk_size: Some(disk_size),
            raw,
        }
    }
}

/// Longest snapshot name tpmstate creates (QEMU has no limit but the u16 field).
pub const MAX_NAME_BYTES: usize = 1024;

/// Reads the `count` entries of the table at `offset` in a file of
/// `file_len` bytes; returns them and the table's length in bytes.
pub(crate) fn read_table(
    offset: u64,
    count: u32,
    file_len: u64,
    read: &mut ReadAt<'_>,
) -> std::io::Result<Result<(Vec<SnapshotEntry>, u64), Doubt>> {
    let corrupt = |why: String| Ok(Err(Doubt::Corrupt(format!("snapshot table: {why}"))));
    let mut entries = Vec::with_capacity(count.min(1024) as usize);
    let mut at = offset;
    for i in 0..count {
        let end = at - offset + FIXED as u64;
        if end > MAX_TABLE_BYTES || at + FIXED as u64 > file_len {
            return corrupt(format!(
                "entry {i} lies beyond the end of the file or the table"
            ));
        }
        let mut fixed = [0u8; FIXED];
        read(at, &mut fixed)?;
        let be16 = |o: usize| u64::from(u16::from_be_bytes([fixed[o], fixed[o + 1]]));
        let extra_len = u64::from(u32::from_be_bytes([
            fixed[36], fixed[37], fixed[38], fixed[39],
        ]));
        let (id_len, name_len) = (be16(12), be16(14));
        let len = (FIXED as u64 + extra_len + id_len + name_len).next_multiple_of(8);
        if at - offset + len > MAX_TABLE_BYTES || at + len > file_len {
            return corrupt(format!(
                "entry {i} lies beyond the end of the file or the table"
            ));
        }
        let mut raw = vec![0u8; len as usize];
        read(at, &mut raw)?;
        match decode(raw) {
            Ok(entry) => entries.push(entry),
            Err(why) => return corrupt(format!("entry {i}: {why}")),
        }
        at += len;
    }
    Ok(Ok((entries, at - offset)))
}

/// Decodes one entry from its bytes (their length is already checked).
fn decode(raw: Vec<u8>) -> Result<SnapshotEntry, String> {
    let u64_at = |o: usize| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&raw[o..o + 8]);
        u64::from_be_bytes(a)
    };
    let u32_at = |o: usize| {
        let mut a = [0u8; 4];
        a.copy_from_slice(&raw[o..o + 4]);
        u32::from_be_bytes(a)
    };
    let u16_at = |o: usize| usize::from(u16::from_be_bytes([raw[o], raw[o + 1]]));
    let (id_len, name_len, extra_len) = (u16_at(12), u16_at(14), u32_at(36) as usize);
    let extra = &raw[FIXED..FIXED + extra_len];
    let text =
        |from: usize, len: usize| String::from_utf8_lossy(&raw[from..from + len]).into_owned();
    let id = text(FIXED + extra_len, id_len);
    let name = text(FIXED + extra_len + id_len, name_len);
    let large_state = (extra.len() >= 8).then(|| u64_at(FIXED));
    let l1_table_offset = u64_at(0);
    if l1_table_offset == 0 {
        return Err("no L1 table".into());
    }
    Ok(SnapshotEntry {
        l1_table_offset,
        l1_size: u32_at(8),
        id,
        name,
        date_sec: u32_at(16),
        vm_state_size: large_state.unwrap_or(u64::from(u32_at(32))),
        disk_size: (extra.len() >= 16).then(|| u64_at(FIXED + 8)),
        raw,
    })
}

/// The table holding `entries`, in order.
pub(crate) fn encode_table(entries: &[SnapshotEntry]) -> Vec<u8> {
    entries.iter().flat_map(|e| e.raw.iter().copied()).collect()
}

/// The ID QEMU would give the next snapshot: one more than the largest numeric ID.
pub(crate) fn next_id(entries: &[SnapshotEntry]) -> String {
    let max = entries
        .iter()
        .filter_map(|e| e.id.parse::<u64>().ok())
        .max()
        .unwrap_or(0);
    (max + 1).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reader(table: Vec<u8>) -> impl FnMut(u64, &mut [u8]) -> std::io::Result<()> {
        move |at, buf| {
            buf.copy_from_slice(&table[at as usize..at as usize + buf.len()]);
            Ok(())
        }
    }

    #[test]
    fn a_new_entry_reads_back_as_written() {
        let a = SnapshotEntry::new("1".into(), "before-update".into(), (0x30000, 1), 4 << 20);
        let b = SnapshotEntry::new("2".into(), "b".into(), (0x50000, 2), 4 << 20);
        let table = encode_table(&[a.clone(), b.clone()]);
        let len = table.len() as u64;
        let (back, read_len) = read_table(0, 2, len, &mut reader(table)).unwrap().unwrap();
        assert_eq!(back, vec![a, b]);
        assert_eq!(read_len, len);
        assert_eq!(next_id(&back), "3");
    }

    #[test]
    fn a_table_running_past_the_file_is_corrupt() {
        let a = SnapshotEntry::new("1".into(), "x".into(), (0x30000, 1), 4 << 20);
        let table = encode_table(&[a]);
        let len = table.len() as u64;
        let got = read_table(0, 2, len, &mut reader(table)).unwrap();
        assert!(matches!(got, Err(Doubt::Corrupt(_))), "{got:?}");
    }
}
