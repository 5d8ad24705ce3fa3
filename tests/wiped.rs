//! Key material is wiped before its memory is freed. This test binary's
//! allocator looks into every heap block as it is freed, while armed, for
//! the test's key (raw, or the hex text of its key file), the passphrase
//! and swtpm's key: a block that still holds one was dropped unwiped.
//! (Copies on the stack are out of its sight.) One test only: the scan is
//! process-wide.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use tpmstate::swtpm::key::{Kdf, SwtpmKey, SwtpmSecret};
use tpmstate::{KeySource, OpenOptions, Store};

const KEY: [u8; 32] = [
    0x5a, 0xc3, 0x17, 0x9e, 0x42, 0xd8, 0x6b, 0xf1, 0x0d, 0xa4, 0x73, 0x2c, 0xe9, 0x38, 0xb5, 0x61,
    0x8f, 0x14, 0xca, 0x57, 0x9b, 0x26, 0xe3, 0x7d, 0x41, 0xbe, 0x05, 0x92, 0x6f, 0xd1, 0x3a, 0xc7,
];
const KEY_HEX: &[u8; 64] = b"5ac3179e42d86bf10da4732ce938b5618f14ca579b26e37d41be05926fd13ac7";
const PASSPHRASE: &[u8] = b"a passphrase to be wiped 4419";
const SWTPM_KEY: [u8; 16] = [
    0xa1, 0x3b, 0x7e, 0x52, 0xc4, 0x09, 0xd6, 0x8f, 0x21, 0xe7, 0x4a, 0x95, 0x1c, 0xb3, 0x68, 0xf0,
];

static ARMED: AtomicBool = AtomicBool::new(false);
static FOUND: AtomicUsize = AtomicUsize::new(0);

/// The system allocator, looking into freed blocks while armed.
struct Scanning;

fn holds_secret(block: &[u8]) -> bool {
    let needles: [&[u8]; 4] = [
        &KEY[..16],
        &KEY_HEX[..32],
        &PASSPHRASE[..16],
        &SWTPM_KEY[..12],
    ];
    needles
        .iter()
        .any(|n| block.len() >= n.len() && block.windows(n.len()).any(|w| w == *n))
}

// SAFETY: every call is passed to the system allocator unchanged; the only
// addition reads a block that is still allocated, within its layout.
unsafe impl GlobalAlloc for Scanning {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's layout, passed on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if ARMED.load(Ordering::SeqCst) {
            // SAFETY: `ptr` is a live block of `layout.size()` bytes until
            // the dealloc below.
            let block = unsafe { std::slice::from_raw_parts(ptr, layout.size()) };
            if holds_secret(block) {
                FOUND.fetch_add(1, Ordering::SeqCst);
            }
        }
        // SAFETY: the caller's block and layout, passed on.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Scanning = Scanning;

/// Runs `f` with the scan armed; how many freed blocks held a secret.
fn unwiped_blocks(f: impl FnOnce()) -> usize {
    FOUND.store(0, Ordering::SeqCst);
    ARMED.store(true, Ordering::SeqCst);
    f();
    ARMED.store(false, Ordering::SeqCst);
    FOUND.load(Ordering::SeqCst)
}

#[test]
fn key_material_is_wiped_before_its_memory_is_freed() {
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("key");
    std::fs::write(&key_file, KEY_HEX).unwrap();
    let pass_file = dir.path().join("pass");
    std::fs::write(&pass_file, PASSPHRASE).unwrap();
    let image = dir.path().join("nv.qcow2");

    // The scan finds a secret dropped unwiped (else it proves nothing).
    assert_eq!(
        unwiped_blocks(|| drop(KEY.to_vec())),
        1,
        "the scan sees a freed key"
    );

    let found = unwiped_blocks(|| {
        let key = KeySource::from_key_file(&key_file).unwrap();
        let format = tpmstate::store::FormatOptions {
            key: Some(key.clone()),
            ..Default::default()
        };
        Store::create(&image, Default::default(), format).unwrap();
        let opts = OpenOptions {
            key: Some(key),
            ..Default::default()
        };
        let mut store = Store::open(&image, opts).unwrap();
        store.put("permall", b"state").unwrap();
        assert_eq!(&store.get("permall").unwrap().unwrap()[..], b"state");
        let pass = KeySource::from_passphrase_file(&pass_file).unwrap();
        let _ = store.rekey(&pass).unwrap();
        drop(store);

        let swtpm = SwtpmKey::from_key_file(hex::encode(SWTPM_KEY).as_bytes(), true, Some(128));
        let sealed = swtpm
            .unwrap()
            .seal(tpmstate::swtpm::key::Purpose::State, b"x");
        assert!(sealed.is_some());
        let secret = SwtpmSecret::Passphrase {
            passphrase: zeroize::Zeroizing::new(PASSPHRASE.to_vec()),
            kdf: Kdf::Pbkdf2,
            bits: None,
        };
        drop(secret.key());
    });
    assert_eq!(found, 0, "freed heap blocks still holding key material");
}
