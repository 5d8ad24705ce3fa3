//! Header slot decoding on arbitrary bytes; a decoded slot re-encodes to itself.
#![no_main]
use tpmstate::format::Slot;
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(slot) = Slot::decode(data) {
        assert_eq!(Slot::decode(&slot.encode()), Ok(slot));
    }
});
