//! The `tpmstate` command: a thin layer over the library's public API.

/// The command line's own modules, under `src/cli/`.
mod cli {
    pub mod args;
    pub mod bench;
    pub mod commands;
    pub mod report;
    pub mod run_locked;
    pub mod snapshot;
    pub mod swtpm;
}
use cli::commands;

use clap::Parser;
use cli::args::{Cli, Command};
use std::process::ExitCode;

/// Whether the command line names the `lock` subcommand, whose own usage
/// errors exit 125 too (its other statuses are the command's).
fn names_lock_command() -> bool {
    std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-') && !["auto", "on", "off"].contains(&a.as_str()))
        .is_some_and(|a| a == "lock")
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = match (e.use_stderr(), names_lock_command()) {
                (false, _) => 0,
                (true, true) => cli::run_locked::OWN_FAILURE,
                (true, false) => 1,
            };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    let locking_a_command = matches!(cli.command, Command::Lock { .. });
    match commands::run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("tpmstate: {}", commands::chain(&*e.error));
            if let Some(hint) = commands::hint(&*e.error) {
                eprintln!("tpmstate: {hint}");
            }
            match locking_a_command {
                true => ExitCode::from(cli::run_locked::OWN_FAILURE),
                false => ExitCode::from(e.kind.exit_code()),
            }
        }
    }
}
