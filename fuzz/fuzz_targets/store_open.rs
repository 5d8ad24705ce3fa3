//! Opening a store on an arbitrary disk image, reading and checking every blob,
//! with and without a key: errors are fine, panics are not.
#![no_main]
use std::path::Path;
use tpmstate::image::CrashDisk;
use tpmstate::{Key, KeySource, Store};
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let key = KeySource::Key(Key::from_bytes(&[7; 32]).unwrap());
    for k in [None, Some(&key)] {
        let disk = CrashDisk::from_image(data.to_vec(), data.len() as u64);
        if let Ok(mut store) = Store::open_disk(Box::new(disk), Path::new("<fuzz>"), k) {
            let names: Vec<String> = store.names().map(str::to_string).collect();
            for n in &names {
                let _ = store.get(n);
            }
            let _ = store.check();
            let _ = store.put("permall", b"fuzz");
        }
    }
});
