//! A whole image file of arbitrary bytes through the qcow2 layer (our header
//! validation, qcow2-rs's mapping, our leak scan, an allocation of one more
//! cluster, then snapshots: listed, created, unshared, deleted): any panic that reaches here is a case our validation should
//! refuse first.
#![no_main]
use std::sync::Arc;
use tpmstate::image::{Disk, SnapshotOp};
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let dir = std::env::temp_dir().join(format!("tpmstate-fuzz-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join("image.qcow2");
    if std::fs::write(&path, data).is_err() {
        return;
    }
    let Ok(file) = std::fs::OpenOptions::new().read(true).write(true).open(&path) else {
        return;
    };
    if let Ok(mut disk) = tpmstate::image::Qcow2Disk::open_unlocked(&path, Arc::new(file)) {
        // The leak scan parses every L1, L2 and refcount table the file names;
        // an allocation plans new ones from them and writes them.
        let _ = disk.scan_leaks();
        let _ = disk.grow(disk.size() + 1);
        // Snapshots: the table, a new one (a whole metadata plan with
        // shared clusters), and the unshare before a write.
        let _ = disk.snapshots();
        let _ = disk.change_snapshot(SnapshotOp::Create("fuzz"));
        let _ = disk.make_own();
        let _ = disk.change_snapshot(SnapshotOp::Delete("1"));
    }
});
