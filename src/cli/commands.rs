//! One function per subcommand, each using only the library's public API.

use crate::{Cli, Command, KeyArgs, LockingArg, ModeArg};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tpmstate::image::CreateOptions;
use tpmstate::migration::{ClaimOptions, Incoming};
use tpmstate::store::{self, FormatOptions, ImageDump};
use tpmstate::{ErrorKind, KeySource, LockMode, Locking, OpenOptions, ReadOnlyStore, Store};

/// A failure with its exit-code class.
pub struct Failure {
    pub kind: ErrorKind,
    pub error: Box<dyn std::error::Error>,
}

/// An I/O failure on a file the CLI reads or writes itself (not the image).
#[derive(Debug, thiserror::Error)]
#[error("{}", path.display())]
struct FileIo {
    path: PathBuf,
    #[source]
    source: std::io::Error,
}

macro_rules! failure_from {
    ($($t:ty),*) => {$(
        impl From<$t> for Failure {
            fn from(e: $t) -> Self {
                Failure { kind: e.kind(), error: Box::new(e) }
            }
        }
    )*};
}
failure_from!(
    tpmstate::StoreError,
    tpmstate::migration::MigrationError,
    tpmstate::lock::LockError,
    tpmstate::crypto::CryptoError
);

fn usage(msg: String) -> Failure {
    Failure {
        kind: ErrorKind::Usage,
        error: msg.into(),
    }
}

fn io(path: &Path, source: std::io::Error) -> Failure {
    Failure {
        kind: ErrorKind::Io,
        error: Box::new(FileIo {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// An error and its causes, joined by ": ". Every error of the library
/// keeps its cause as its `source()` and leaves it out of its own message,
/// so each part is printed once.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cur = c.source();
    }
    out
}

fn locking(l: LockingArg) -> Locking {
    match l {
        LockingArg::Auto => Locking::Auto,
        LockingArg::On => Locking::On,
        LockingArg::Off => Locking::Off,
    }
}

fn key_source(k: &KeyArgs) -> Result<Option<KeySource>, Failure> {
    let (path, source) = match (&k.key_file, &k.passphrase_file) {
        (Some(p), _) => (p, KeySource::from_key_file(p)?),
        (None, Some(p)) => (p, KeySource::from_passphrase_file(p)?),
        (None, None) => return Ok(None),
    };
    if let Some(w) = tpmstate::crypto::permission_warning(path) {
        eprintln!("tpmstate: {w}");
    }
    Ok(Some(source))
}

fn parse_size(s: &str) -> Result<u64, Failure> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_uppercase() {
                'K' => 1u64 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                _ => {
                    return Err(usage(format!(
                        "bad size {s:?}: use a number with K, M or G"
                    )))
                }
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| usage(format!("bad size {s:?}")))
}

fn warn_lock(warning: Option<&str>) {
    if let Some(w) = warning {
        eprintln!("tpmstate: warning: {w}");
    }
}

fn open_options(
    key: &KeyArgs,
    locking: Locking,
    timeout: Option<Duration>,
) -> Result<OpenOptions, Failure> {
    Ok(OpenOptions {
        key: key_source(key)?,
        locking,
        lock_timeout: timeout,
    })
}

/// Opens the writer handle (`exclusive`: the exclusive lock, for rekey).
fn open_writer(
    image: &Path,
    key: &KeyArgs,
    exclusive: bool,
    locking: Locking,
    timeout: Option<Duration>,
) -> Result<Store, Failure> {
    let opts = open_options(key, locking, timeout)?;
    let store = match exclusive {
        true => Store::open_exclusive(image, opts)?,
        false => Store::open(image, opts)?,
    };
    warn_lock(store.lock_warning());
    Ok(store)
}

/// Opens a read-only handle, shared or (with `-U`) force-share.
fn open_reader(
    image: &Path,
    key: &KeyArgs,
    force_share: bool,
    locking: Locking,
) -> Result<ReadOnlyStore, Failure> {
    let opts = open_options(key, locking, None)?;
    let store = match force_share {
        true => ReadOnlyStore::open_force_share(image, opts)?,
        false => ReadOnlyStore::open(image, opts)?,
    };
    warn_lock(store.lock_warning());
    Ok(store)
}

/// Runs the parsed command; returns the exit code on success.
pub fn run(cli: Cli) -> Result<u8, Failure> {
    let lk = locking(cli.locking);
    let none = KeyArgs::default();
    match cli.command {
        Command::Create {
            image,
            size,
            cluster_size,
            key,
        } => {
            let cs = parse_size(&cluster_size)?;
            if !cs.is_power_of_two() {
                return Err(usage(format!("cluster size {cs} is not a power of two")));
            }
            let opts = CreateOptions {
                size: parse_size(&size)?,
                cluster_bits: cs.trailing_zeros(),
            };
            Store::create(
                &image,
                opts,
                FormatOptions {
                    key: key_source(&key)?,
                    area: None,
                    locking: lk,
                },
            )?;
            println!(
                "created {} ({} bytes, store formatted)",
                image.display(),
                opts.size
            );
        }
        Command::Format { image, area, key } => {
            let area = area.map(|a| parse_size(&a)).transpose()?;
            Store::format(
                &image,
                FormatOptions {
                    key: key_source(&key)?,
                    area,
                    locking: lk,
                },
            )?;
            println!("formatted a store in {}", image.display());
        }
        Command::Put {
            image,
            name,
            file,
            key,
            timeout_ms,
        } => {
            let data = if file == "-" {
                let mut v = Vec::new();
                std::io::stdin()
                    .read_to_end(&mut v)
                    .map_err(|e| io(Path::new("<stdin>"), e))?;
                v
            } else {
                std::fs::read(&file).map_err(|e| io(Path::new(&file), e))?
            };
            let mut store = open_writer(
                &image,
                &key,
                false,
                lk,
                timeout_ms.map(Duration::from_millis),
            )?;
            let generation = store.put(&name, &data)?;
            eprintln!("committed generation {generation}");
        }
        Command::Get {
            image,
            name,
            output,
            key,
            force_share,
        } => {
            let store = open_reader(&image, &key, force_share, lk)?;
            let data = store.get_required(&name)?;
            match output {
                Some(p) => std::fs::write(&p, &*data).map_err(|e| io(&p, e))?,
                None => std::io::stdout()
                    .write_all(&data)
                    .map_err(|e| io(Path::new("<stdout>"), e))?,
            }
        }
        Command::Rm { image, name, key } => {
            let mut store = open_writer(&image, &key, false, lk, None)?;
            let generation = store.delete(&name)?;
            eprintln!("committed generation {generation}");
        }
        Command::Ls { image, force_share } => {
            let store = open_reader(&image, &none, force_share, lk)?;
            for b in store.list() {
                println!("{:>10}  {}", b.size, b.name);
            }
        }
        Command::Info {
            image,
            json,
            force_share,
        } => {
            let store = open_reader(&image, &none, force_share, lk)?;
            let info = store.info();
            if json {
                // Serializing plain data structs to a String cannot fail.
                println!(
                    "{}",
                    serde_json::to_string_pretty(&info).expect("info serializes")
                );
            } else {
                print_info(&info);
            }
        }
        Command::Check {
            image,
            key,
            force_share,
        } => {
            let store = open_reader(&image, &key, force_share, lk)?;
            let r = store.check()?;
            for s in &r.slots {
                println!("slot {}: {}", s.index, s.status);
            }
            if let Some(what) = &r.leftover {
                println!("left over: {what}");
            }
            println!(
                "ok: generation {}, {} blob(s), {} bytes verified",
                r.generation, r.blobs, r.bytes
            );
        }
        Command::Rekey {
            image,
            key,
            new_key_file,
            new_passphrase_file,
        } => {
            let new = key_source(&KeyArgs {
                key_file: new_key_file,
                passphrase_file: new_passphrase_file,
            })?
            .ok_or_else(|| usage("rekey needs --new-key-file or --new-passphrase-file".into()))?;
            let mut store = open_writer(&image, &key, true, lk, None)?;
            let rekeyed = store.rekey(&new)?;
            println!("rekeyed: generation {}", rekeyed.generation);
            if let Some(e) = rekeyed.scrub_failed {
                eprintln!(
                    "tpmstate: warning: the new key is in force, but free space still holds data under the old key ({}); the next commit zeroes it",
                    chain(&e)
                );
            }
        }
        Command::DumpHeaders { image } => dump_headers(&image)?,
        Command::Lock {
            image,
            mode,
            timeout_ms,
            command,
        } => return run_locked(&image, mode, timeout_ms, &command, lk),
        Command::Locks { image, json } => {
            let holders = tpmstate::lock::holders_of(&image)?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&holders).expect("holders serialize")
                );
            } else if holders.is_empty() {
                println!("no process holds lock bytes on {}", image.display());
            } else {
                for h in holders {
                    println!(
                        "pid {} ({}) fd {}: uses [{}], unshares [{}]",
                        h.pid,
                        h.command,
                        h.fd,
                        h.uses.join(", "),
                        h.unshares.join(", ")
                    );
                }
            }
        }
        Command::ValidateIncoming {
            image,
            key,
            require,
            timeout_ms,
        } => {
            let incoming = Incoming::open_deferred(&image, lk)?;
            let opts = ClaimOptions {
                key: key_source(&key)?,
                required: require.into_iter().filter(|s| !s.is_empty()).collect(),
                timeout: Some(Duration::from_millis(timeout_ms)),
                validate: None,
            };
            let store = incoming.claim(opts)?;
            let r = store.check()?;
            println!(
                "ok: generation {}, {} blob(s), {} bytes validated",
                r.generation, r.blobs, r.bytes
            );
        }
        Command::Bench { dir, iterations } => {
            crate::cli::bench::run(&dir, iterations).map_err(|e| io(&dir, e))?
        }
    }
    Ok(0)
}

fn print_info(i: &store::StoreInfo) {
    println!("image:          {}", i.path.display());
    println!("format version: {}", i.format_version);
    println!("generation:     {}", i.generation);
    println!("store id:       {}", i.store_id);
    match &i.key_derivation {
        Some(k) => println!("encrypted:      yes (AES-256-GCM, key: {k})"),
        None => println!("encrypted:      no"),
    }
    println!(
        "store area:     {} bytes ({} used)",
        i.area_bytes, i.used_bytes
    );
    for s in &i.slots {
        println!(
            "slot {}:         {}{}",
            s.index,
            s.status,
            s.generation
                .map(|g| format!(" (generation {g})"))
                .unwrap_or_default()
        );
    }
    println!(
        "header:         area offset {} ({} chained commits since the anchor)",
        i.header_offset, i.chained_commits
    );
    if let Some(what) = &i.leftover {
        println!("left over:      {what}");
    }
    if let Some(q) = &i.qcow2 {
        println!(
            "qcow2:          version {}, cluster {} bytes, virtual size {}, file size {}, refcount {} bits{}",
            q.version,
            q.cluster_size,
            q.virtual_size,
            q.file_size,
            q.refcount_bits,
            if q.lazy_refcounts { ", lazy refcounts" } else { "" }
        );
    }
    println!("blobs:          {}", i.blobs.len());
    for b in &i.blobs {
        println!(
            "  {:>10}  {}  (generation {})",
            b.size, b.name, b.written_generation
        );
    }
}

fn dump_headers(image: &Path) -> Result<(), Failure> {
    match store::dump_image(image)? {
        ImageDump::Mapped { area_bytes, slots } => {
            println!("allocated store area: {area_bytes} bytes");
            for slot in slots {
                let i = slot.index;
                let s = match slot.header {
                    Ok(s) => s,
                    Err(why) => {
                        println!("slot {i}: unusable: {why}");
                        continue;
                    }
                };
                println!("slot {i}: {}", describe_slot(&s));
                match slot.chain {
                    Ok(chain) => {
                        for (at, header) in chain {
                            match header {
                                Ok(h) => {
                                    println!("  chained at area offset {at}: {}", describe_slot(&h))
                                }
                                Err(why) => println!("  chain ends at damage: {why}"),
                            }
                        }
                    }
                    Err(e) => println!("  chain unreadable: {e}"),
                }
            }
        }
        ImageDump::Raw {
            unusable,
            file_len,
            found,
        } => {
            // The qcow2 layer is unreadable: slots found in the raw file.
            println!(
                "qcow2 layer unusable ({}); scanning the raw file for header slots",
                chain(&unusable)
            );
            for (at, header) in &found {
                match header {
                    Ok(s) => println!("file offset {at}: {}", describe_slot(s)),
                    Err(why) => println!("file offset {at}: magic, but unusable: {why}"),
                }
            }
            if found.is_empty() {
                println!("no header slot found in {file_len} bytes");
            }
        }
    }
    Ok(())
}

fn describe_slot(s: &tpmstate::format::Slot) -> String {
    format!(
        "format {} generation {} encrypted {} store {} area {} directory {}+{}{} crc {:08x} next {}",
        s.format_version,
        s.generation,
        s.encrypted,
        hex::encode(s.store_id),
        s.area_len,
        s.directory.offset,
        s.directory.len,
        if s.directory.is_embedded() {
            " (in the header's block)"
        } else {
            ""
        },
        s.directory_crc,
        s.next
    )
}

/// Exit status of `tpmstate lock` when tpmstate itself fails (the image
/// cannot be opened or locked), as `timeout(1)` and `env(1)` use 125: the
/// command's own statuses pass through unchanged, so a script tells the two
/// apart. The message on standard error names the cause and its class.
pub const LOCK_OWN_FAILURE: u8 = 125;
/// The command was found but could not be run (not executable), as a shell says.
const CANNOT_EXECUTE: u8 = 126;
/// The command was not found, as a shell says.
const NOT_FOUND: u8 = 127;

fn run_locked(
    image: &Path,
    mode: ModeArg,
    timeout_ms: Option<u64>,
    command: &[String],
    lk: Locking,
) -> Result<u8, Failure> {
    let mode = match mode {
        ModeArg::Shared => LockMode::Shared,
        ModeArg::Writer => LockMode::Writer,
        ModeArg::Exclusive => LockMode::Exclusive,
    };
    let (prog, args) = command
        .split_first()
        .ok_or_else(|| usage("no command given".into()))?;
    let (lock, warning) = tpmstate::lock::ImageLock::open(image, mode >= LockMode::Writer, lk)?;
    warn_lock(warning.as_deref());
    let _guard = lock.acquire(mode, timeout_ms.map(Duration::from_millis))?;
    let status = match std::process::Command::new(prog).args(args).status() {
        Ok(status) => status,
        Err(e) => {
            eprintln!("tpmstate: {prog}: {e}");
            return Ok(match e.kind() {
                std::io::ErrorKind::NotFound => NOT_FOUND,
                _ => CANNOT_EXECUTE,
            });
        }
    };
    // A signal death maps to 128+signal, like a shell.
    use std::os::unix::process::ExitStatusExt;
    Ok(status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0)) as u8)
}
