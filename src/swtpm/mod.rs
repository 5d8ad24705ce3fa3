//! swtpm's wire and file formats, for the emulator (`tpmstate-emu`) and for
//! tools that exchange state with swtpm: the control channel's messages,
//! the state blob format, its encryption with swtpm's keys, and the linear
//! state file. No I/O;
//! every length is checked against the bytes present (fuzzed by
//! `fuzz/fuzz_targets/swtpm_ctrl.rs`).

pub mod blob;
pub mod ctrl;
pub mod key;
pub mod linear;
