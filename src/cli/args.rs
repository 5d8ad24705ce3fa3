//! The command line: every subcommand, argument and option, with the help
//! text `tpmstate --help` and `tpmstate CMD --help` print. Arguments come in
//! one order everywhere: the image, the subcommand's own names and files,
//! key options, lock options, output options, then `--force`.

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

const EXIT_CODES: &str = "\
Lock modes (QEMU's image-locking protocol; see docs/locking.md):
  shared     read; others may read, nobody may write (info, ls, get, check)
  writer     read and write; others may only force-share read (put, rm, an emulator)
  exclusive  nobody else at all, not even -U readers (rekey, format, a migration claim)
  -U         force-share read: reads while a writer holds the image (diagnostics)

Exit codes:
  0  ok
  1  usage error (bad arguments, no such blob, refusing to destroy data without --force)
  2  not a qcow2 image (or not a regular file), or no tpmstate store in it
  3  corrupt image or store
  4  key missing (the store is encrypted)
  5  wrong key (or a key given for a plaintext store)
  6  locked by another process
  7  unsupported image feature (small clusters, external data file, raw backing file, ...)
  8  I/O error
  9  no space: the store area (or the image around it) cannot hold the commit
 10  internal error (a bug in tpmstate; nothing was written)
 11  rollback refused: a newer commit on disk does not verify (give
     --accept-rollback to use the older state), or the store is older than
     --expect-generation or not the --expect-store-id
`tpmstate lock IMAGE -- CMD` exits with CMD's status; 125 when tpmstate
itself fails (bad arguments, cannot open or lock the image), 126 when CMD
cannot be run, 127 when it is not found.";

/// Crash-safe, encrypted vTPM state blobs inside a qcow2 image.
#[derive(Parser, Debug)]
#[command(name = "tpmstate", version, after_help = EXIT_CODES)]
pub struct Cli {
    /// QEMU's locking option: auto (OFD locks, POSIX locks where OFD locks
    /// are unavailable), on (OFD locks or an error), off (no locks at all).
    #[arg(long, global = true, value_enum, default_value_t = LockingArg::Auto, display_order = 900)]
    pub locking: LockingArg,
    #[command(subcommand)]
    pub command: Command,
}

/// QEMU's `locking=` option.
#[derive(Copy, Clone, Debug, ValueEnum)]
pub enum LockingArg {
    /// OFD locks; POSIX locks with a warning where OFD locks are unavailable.
    Auto,
    /// OFD locks, or an error.
    On,
    /// No locks.
    Off,
}

/// The lock mode `tpmstate lock` holds.
#[derive(Copy, Clone, Debug, ValueEnum)]
pub enum ModeArg {
    /// Others may read; nobody may write.
    Shared,
    /// Read and write; others may only force-share read.
    Writer,
    /// Nobody else at all.
    Exclusive,
}

const SWTPM_KEYS: &str = "\
swtpm's state keys, as swtpm's --key takes them:
--swtpm-key FILE[,format=hex|binary][,mode=aes-cbc|aes-256-cbc]
    a key file: 32 or 64 hex digits (format=hex, the default) or 16 or 32
    raw bytes; mode= checks its length
--swtpm-pwdfile FILE[,kdf=pbkdf2|sha512][,mode=aes-cbc|aes-256-cbc]
    a passphrase file (its whole contents); an import takes the key length
    from the files, an export uses mode= (default aes-cbc, as swtpm)";

/// swtpm's own key for its state files (`--key` of swtpm).
#[derive(Args, Debug, Clone, Default)]
pub struct SwtpmKeyArgs {
    /// swtpm's key file (its parameters below).
    #[arg(long, value_name = "FILE[,..]", conflicts_with = "swtpm_pwdfile")]
    pub swtpm_key: Option<String>,
    /// swtpm's passphrase file (its parameters below).
    #[arg(long, value_name = "FILE[,..]")]
    pub swtpm_pwdfile: Option<String>,
}

/// Key options of commands that read or write blobs.
#[derive(Args, Debug, Clone, Default)]
pub struct KeyArgs {
    /// File with the store key: 32 raw bytes or 64 hex digits.
    #[arg(long, value_name = "FILE", conflicts_with = "passphrase_file")]
    pub key_file: Option<PathBuf>,
    /// File with a passphrase (stretched with Argon2id).
    #[arg(long, value_name = "FILE", conflicts_with = "legacy_key_file")]
    pub passphrase_file: Option<PathBuf>,
    /// A 32-byte key file of printable text that an earlier tpmstate took
    /// as raw key bytes: opens such a store, to rekey it to a proper key.
    #[arg(long, value_name = "FILE", conflicts_with = "key_file")]
    pub legacy_key_file: Option<PathBuf>,
}

/// What the caller knows of the store: refused with exit 11 if it does not hold.
#[derive(Args, Debug, Clone, Default)]
pub struct ExpectArgs {
    /// Refuse (exit 11) a store at an older generation than N: the last one
    /// you saw committed, so a rolled-back image is not used.
    #[arg(long, value_name = "N")]
    pub expect_generation: Option<u64>,
    /// Refuse (exit 11) an image holding another store than this id (32 hex
    /// digits, from `info`), even one under the same key.
    #[arg(long, value_name = "HEX")]
    pub expect_store_id: Option<String>,
}

/// The options that accept serving an older generation than one on disk.
#[derive(Args, Debug, Clone, Copy, Default)]
pub struct RollbackArgs {
    /// Use the generation before one newer commit that does not verify, if
    /// that commit has the shape a crash while writing it leaves (and the
    /// generation holds blobs); refuse anything more. For a restart after a
    /// crash.
    #[arg(long, conflicts_with = "accept_rollback")]
    pub accept_torn_commit: bool,
    /// Use the newest generation that verifies even though newer commits on
    /// disk do not (after a crash during a commit, or damage): the TPM's
    /// state goes back in time. Without it (or --accept-torn-commit) that is
    /// refused with exit 11.
    #[arg(long)]
    pub accept_rollback: bool,
}

/// The force-share option of read-only commands.
#[derive(Args, Debug, Clone, Copy, Default)]
pub struct ShareArgs {
    /// Force-share read (like qemu-img -U): read while another process
    /// holds the image for writing; for diagnostics, may see a commit being
    /// written.
    #[arg(short = 'U', long)]
    pub force_share: bool,
}

/// Every subcommand.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Create a new qcow2 image holding an empty store (no external tool needed).
    Create {
        /// The image file to create (mode 0600).
        image: PathBuf,
        #[command(flatten)]
        key: KeyArgs,
        /// Virtual size, as qemu-img takes it (4M, 4MiB, 1G; K, M, G, T).
        #[arg(long, default_value = "4M")]
        size: String,
        /// qcow2 cluster size (4K to 2M).
        #[arg(long, default_value = "64K")]
        cluster_size: String,
        /// Replace an existing file, whatever it holds (taking its exclusive lock first).
        #[arg(long)]
        force: bool,
    },
    /// Format a store inside an existing qcow2 image (e.g. from `qemu-img create -f qcow2 IMG 4M`).
    Format {
        /// The qcow2 image (exclusive lock).
        image: PathBuf,
        #[command(flatten)]
        key: KeyArgs,
        /// Store area (default: the virtual size, at most 4M).
        #[arg(long)]
        area: Option<String>,
        /// Format even if the image already holds a store or other data, destroying it.
        #[arg(long)]
        force: bool,
    },
    /// Store FILE (or standard input with -) as blob NAME, in one atomic commit.
    Put {
        /// The image (writer lock).
        image: PathBuf,
        /// The blob's name.
        name: String,
        /// The file to store, or - for standard input.
        file: String,
        #[command(flatten)]
        key: KeyArgs,
        #[command(flatten)]
        expect: ExpectArgs,
        #[command(flatten)]
        rollback: RollbackArgs,
        /// Wait up to this many milliseconds for the writer lock (default: try once).
        #[arg(long, value_name = "MS")]
        timeout_ms: Option<u64>,
    },
    /// Write blob NAME to standard output or to a new file (mode 0600).
    Get {
        /// The image (shared lock).
        image: PathBuf,
        /// The blob's name.
        name: String,
        #[command(flatten)]
        key: KeyArgs,
        #[command(flatten)]
        expect: ExpectArgs,
        #[command(flatten)]
        rollback: RollbackArgs,
        #[command(flatten)]
        share: ShareArgs,
        /// Write to this new file (mode 0600) instead of standard output.
        #[arg(short = 'o', long, value_name = "FILE")]
        output: Option<PathBuf>,
        /// Overwrite the output file if it exists (never through a symlink).
        #[arg(long)]
        force: bool,
    },
    /// Delete blob NAME, in one atomic commit.
    Rm {
        /// The image (writer lock).
        image: PathBuf,
        /// The blob's name.
        name: String,
        #[command(flatten)]
        key: KeyArgs,
        #[command(flatten)]
        expect: ExpectArgs,
        #[command(flatten)]
        rollback: RollbackArgs,
    },
    /// List blobs and their sizes.
    Ls {
        /// The image (shared lock).
        image: PathBuf,
        #[command(flatten)]
        expect: ExpectArgs,
        #[command(flatten)]
        rollback: RollbackArgs,
        #[command(flatten)]
        share: ShareArgs,
    },
    /// Show the store: generation, last commit, encryption, blobs, space, health.
    Info {
        /// The image (shared lock).
        image: PathBuf,
        #[command(flatten)]
        key: KeyArgs,
        #[command(flatten)]
        expect: ExpectArgs,
        #[command(flatten)]
        share: ShareArgs,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// Also show the header slots, the commit chain and the qcow2 layer.
        #[arg(short, long)]
        verbose: bool,
    },
    /// Verify everything: headers, directory, every checksum, and with a key every tag.
    Check {
        /// The image (shared lock).
        image: PathBuf,
        #[command(flatten)]
        key: KeyArgs,
        #[command(flatten)]
        expect: ExpectArgs,
        #[command(flatten)]
        share: ShareArgs,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// Also show each header slot.
        #[arg(short, long)]
        verbose: bool,
    },
    /// Change the key (or encrypt a plaintext store) in one atomic commit.
    Rekey {
        /// The image (exclusive lock).
        image: PathBuf,
        #[command(flatten)]
        key: KeyArgs,
        #[command(flatten)]
        expect: ExpectArgs,
        #[command(flatten)]
        rollback: RollbackArgs,
        /// The new key file.
        #[arg(long, value_name = "FILE", conflicts_with = "new_passphrase_file")]
        new_key_file: Option<PathBuf>,
        /// The new passphrase file.
        #[arg(long, value_name = "FILE")]
        new_passphrase_file: Option<PathBuf>,
    },
    /// Print both header slots and their commit chains raw, even from a damaged store.
    DumpHeaders {
        /// The image (read without any lock).
        image: PathBuf,
    },
    /// Run a command while holding the image locked (like flock(1)).
    Lock {
        /// The image.
        image: PathBuf,
        /// The lock mode to hold while the command runs.
        #[arg(long, value_enum, default_value_t = ModeArg::Writer)]
        mode: ModeArg,
        /// Wait up to this many milliseconds for the lock (default: try once).
        #[arg(long, value_name = "MS")]
        timeout_ms: Option<u64>,
        /// The command and its arguments, after `--`.
        #[arg(last = true, required = true, value_name = "CMD")]
        command: Vec<String>,
    },
    /// Show which processes hold lock bytes on the image, in the protocol's terms.
    Locks {
        /// The image.
        image: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Claim the image exclusively as a migration target would, validate and
    /// decrypt everything, then release it.
    ValidateIncoming {
        /// The image (exclusive lock while validating).
        image: PathBuf,
        #[command(flatten)]
        key: KeyArgs,
        #[command(flatten)]
        expect: ExpectArgs,
        /// Blobs that must be present, comma-separated.
        #[arg(long, value_delimiter = ',', value_name = "NAMES")]
        require: Vec<String>,
        /// Wait up to this many milliseconds for the source to let go.
        #[arg(long, value_name = "MS", default_value_t = 3000)]
        timeout_ms: u64,
    },
    /// Internal snapshots of the image (qcow2 snapshots qemu-img lists and
    /// applies): list, create, apply, delete. While tpmstate-emu holds the
    /// image, list, create and delete go through it, between two commits.
    Snapshot {
        #[command(subcommand)]
        action: SnapshotAction,
    },
    /// Import a swtpm state directory (or file://FILE) into a new image, in one commit.
    #[command(after_help = SWTPM_KEYS)]
    ImportSwtpm {
        /// swtpm's state: a directory (tpm2-00.permall, ...) or file://FILE.
        source: String,
        /// The image to create (mode 0600); it must not exist.
        image: PathBuf,
        #[command(flatten)]
        swtpm_key: SwtpmKeyArgs,
        #[command(flatten)]
        key: KeyArgs,
        /// Virtual size, as qemu-img takes it (4M, 4MiB, 1G; K, M, G, T).
        #[arg(long, default_value = "4M")]
        size: String,
    },
    /// Write the image's TPM state as a swtpm state directory (or file://FILE).
    #[command(after_help = SWTPM_KEYS)]
    ExportSwtpm {
        /// The image (shared lock).
        image: PathBuf,
        /// Where to write: a directory, or file://FILE.
        dest: String,
        #[command(flatten)]
        key: KeyArgs,
        #[command(flatten)]
        swtpm_key: SwtpmKeyArgs,
        /// Replace swtpm state files already there.
        #[arg(long)]
        force: bool,
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

/// What `tpmstate snapshot` does.
#[derive(Subcommand, Debug)]
pub enum SnapshotAction {
    /// List the image's internal snapshots (shared lock, or through the emulator).
    List {
        /// The image.
        image: PathBuf,
    },
    /// Take a snapshot of the image's current state (writer lock, or through the emulator).
    Create {
        /// The image.
        image: PathBuf,
        /// The new snapshot's name.
        name: String,
    },
    /// Make a snapshot the image's state: the TPM state goes back to it
    /// (exclusive lock: the VM must be off).
    Apply {
        /// The image.
        image: PathBuf,
        /// The snapshot's name or ID.
        name: String,
    },
    /// Delete a snapshot (writer lock, or through the emulator).
    Delete {
        /// The image.
        image: PathBuf,
        /// The snapshot's name or ID.
        name: String,
    },
}
