//! A whole image file of arbitrary bytes through the qcow2 layer (our header
//! validation, qcow2-rs's mapping, then our leak scan): any panic that reaches here is a case
//! our validation should refuse first.
#![no_main]
use std::sync::Arc;
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let dir = std::env::temp_dir().join(format!("tpmstate-fuzz-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join("image.qcow2");
    if std::fs::write(&path, data).is_err() {
        return;
    }
    let Ok(file) = std::fs::OpenOptions::new().read(true).open(&path) else { return };
    if let Ok(disk) = tpmstate::image::Qcow2Disk::open(&path, Arc::new(file)) {
        // The leak scan parses every L1, L2 and refcount table the file names.
        let _ = disk.scan_leaks();
    }
});
