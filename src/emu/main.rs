//! `tpmstate-emu`: a drop-in for `swtpm socket --tpm2` on libtpms, whose
//! state lives in a tpmstate image: every state write libtpms makes is one
//! durable commit before the command is answered. It uses the library's
//! public API only; the only `unsafe` is at the libtpms boundary
//! (`libtpms.rs`) and where inherited descriptors are taken (`fds.rs`).
#![deny(unsafe_code)]

mod args;
mod channel;
mod control;
mod fds;
mod image;
mod keys;
mod libtpms;
mod log;
mod nvram;
mod server;
mod snapshots;
mod startup;
mod swtpm_dir;
mod tpm;

use std::process::ExitCode;

use tpmstate::kind::chain;

fn main() -> ExitCode {
    // Before anything opens a file: which descriptors the parent handed over.
    fds::record_inherited();
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let config = match args::parse(&argv) {
        Ok(args::Action::Run(c)) => c,
        Ok(args::Action::Help) => {
            print!("{}", startup::USAGE);
            return ExitCode::SUCCESS;
        }
        Ok(args::Action::Version) => {
            println!(
                "tpmstate-emu {} (swtpm-compatible TPM 2 emulator on libtpms)",
                env!("CARGO_PKG_VERSION")
            );
            return ExitCode::SUCCESS;
        }
        Ok(args::Action::Capabilities) => {
            println!("{}", startup::capabilities_json());
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("tpmstate-emu: {e}");
            return ExitCode::from(1);
        }
    };
    match startup::run(&config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tpmstate-emu: {e}");
            ExitCode::from(1)
        }
    }
}
