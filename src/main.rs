//! The `tpmstate` command: a thin layer over the library's public API.

/// The command line's own modules, under `src/cli/`.
mod cli {
    pub mod bench;
    pub mod commands;
}
use cli::commands;

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::process::ExitCode;

const EXIT_CODES: &str = "\
Exit codes:
  0  ok
  1  usage error (bad arguments, no such blob, ...)
  2  not a qcow2 image, or no tpmstate store in it
  3  corrupt image or store
  4  key missing (the store is encrypted)
  5  wrong key (or a key given for a plaintext store)
  6  locked by another process
  7  unsupported image feature (snapshots, small clusters, backing file, ...)
  8  I/O error
  9  no space: the store area (or the image around it) cannot hold the commit
 10  internal error (a bug in tpmstate; nothing was written)
`tpmstate lock IMAGE -- CMD` exits with CMD's status; 125 when tpmstate
itself fails (bad arguments, cannot open or lock the image), 126 when CMD
cannot be run, 127 when it is not found.";

/// Crash-safe, encrypted vTPM state blobs inside a qcow2 image.
#[derive(Parser, Debug)]
#[command(name = "tpmstate", version, after_help = EXIT_CODES)]
struct Cli {
    /// QEMU's locking option: auto (OFD, POSIX fallback), on (OFD only), off.
    #[arg(long, global = true, value_enum, default_value_t = LockingArg::Auto)]
    locking: LockingArg,
    #[command(subcommand)]
    command: Command,
}

#[derive(Copy, Clone, Debug, ValueEnum)]
enum LockingArg {
    Auto,
    On,
    Off,
}

#[derive(Copy, Clone, Debug, ValueEnum)]
enum ModeArg {
    Shared,
    Writer,
    Exclusive,
}

/// Key options of commands that read or write blobs.
#[derive(Args, Debug, Clone, Default)]
struct KeyArgs {
    /// File with the store key: 32 raw bytes or 64 hex digits.
    #[arg(long, conflicts_with = "passphrase_file")]
    key_file: Option<PathBuf>,
    /// File with a passphrase (stretched with Argon2id).
    #[arg(long)]
    passphrase_file: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create a new qcow2 image holding an empty store (no external tool needed).
    Create {
        image: PathBuf,
        /// Virtual size (suffixes K, M, G).
        #[arg(long, default_value = "4M")]
        size: String,
        /// qcow2 cluster size (4K to 2M).
        #[arg(long, default_value = "64K")]
        cluster_size: String,
        #[command(flatten)]
        key: KeyArgs,
    },
    /// Format a store inside an existing qcow2 image (e.g. from `qemu-img create -f qcow2 IMG 4M`).
    Format {
        image: PathBuf,
        /// Store area (default: the virtual size, at most 4M).
        #[arg(long)]
        area: Option<String>,
        #[command(flatten)]
        key: KeyArgs,
    },
    /// Store FILE (or standard input with -) as blob NAME, in one atomic commit.
    Put {
        image: PathBuf,
        name: String,
        file: String,
        #[command(flatten)]
        key: KeyArgs,
        /// Wait up to this long for the writer lock.
        #[arg(long)]
        timeout_ms: Option<u64>,
    },
    /// Write blob NAME to standard output or FILE.
    Get {
        image: PathBuf,
        name: String,
        #[arg(short = 'o', long)]
        output: Option<PathBuf>,
        #[command(flatten)]
        key: KeyArgs,
        /// Force-share: read while another process holds the image (diagnostics).
        #[arg(short = 'U', long)]
        force_share: bool,
    },
    /// Delete blob NAME.
    Rm {
        image: PathBuf,
        name: String,
        #[command(flatten)]
        key: KeyArgs,
    },
    /// List blobs and their sizes.
    Ls {
        image: PathBuf,
        #[arg(short = 'U', long)]
        force_share: bool,
    },
    /// Show the store's format, generation, encryption, blobs and qcow2 facts.
    Info {
        image: PathBuf,
        #[arg(long)]
        json: bool,
        #[arg(short = 'U', long)]
        force_share: bool,
    },
    /// Verify everything: headers, directory, every checksum, and with a key every tag.
    Check {
        image: PathBuf,
        #[command(flatten)]
        key: KeyArgs,
        #[arg(short = 'U', long)]
        force_share: bool,
    },
    /// Change the key (or encrypt a plaintext store) in one atomic commit.
    Rekey {
        image: PathBuf,
        #[command(flatten)]
        key: KeyArgs,
        /// The new key file.
        #[arg(long, conflicts_with = "new_passphrase_file")]
        new_key_file: Option<PathBuf>,
        /// The new passphrase file.
        #[arg(long)]
        new_passphrase_file: Option<PathBuf>,
    },
    /// Print both header slots raw, even from a damaged store.
    DumpHeaders { image: PathBuf },
    /// Run a command while holding the image locked (like flock(1)).
    Lock {
        image: PathBuf,
        #[arg(long, value_enum, default_value_t = ModeArg::Writer)]
        mode: ModeArg,
        #[arg(long)]
        timeout_ms: Option<u64>,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Show which processes hold lock bytes on the image, in the protocol's terms.
    Locks {
        image: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Claim the image exclusively as a migration target would, validate and
    /// decrypt everything, then release it.
    ValidateIncoming {
        image: PathBuf,
        #[command(flatten)]
        key: KeyArgs,
        /// Blobs that must be present, comma-separated.
        #[arg(long, value_delimiter = ',')]
        require: Vec<String>,
        #[arg(long, default_value_t = 3000)]
        timeout_ms: u64,
    },
    /// Measure commit latency against raw pwrite+fdatasync in the same file system.
    Bench {
        /// Directory to measure in (default: the current one).
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// Commits per measurement.
        #[arg(long, default_value_t = 1000)]
        iterations: u32,
    },
}

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
                (true, true) => commands::LOCK_OWN_FAILURE,
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
            match locking_a_command {
                true => ExitCode::from(commands::LOCK_OWN_FAILURE),
                false => ExitCode::from(e.kind.exit_code()),
            }
        }
    }
}
