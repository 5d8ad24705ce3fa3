//! swtpm's wire formats, for the emulator (`tpmstate-emu`) and for tools
//! that exchange state with swtpm: the control channel's messages and the
//! state blob format. Parsing only, no I/O; every length is checked
//! against the bytes present (fuzzed by `fuzz/fuzz_targets/swtpm_ctrl.rs`).

pub mod blob;
pub mod ctrl;
