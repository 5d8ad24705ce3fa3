//! One function per subcommand, each using only the library's public API.

use super::args::{
    Cli, Command, ExpectArgs, KeyArgs, LockingArg, ModeArg, RollbackArgs, ShareArgs,
};
use super::report;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tpmstate::image::CreateOptions;
use tpmstate::migration::{ClaimOptions, Incoming};
use tpmstate::store::{self, FormatOptions, ImageDump};
use tpmstate::{
    ErrorKind, Expect, KeySource, LockMode, Locking, OpenOptions, ReadOnlyStore, RollbackPolicy,
    Store,
};
use zeroize::Zeroizing;

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
    tpmstate::crypto::CryptoError,
    tpmstate::snapshot_ctl::CtlError
);

pub fn usage(msg: String) -> Failure {
    Failure {
        kind: ErrorKind::Usage,
        error: msg.into(),
    }
}

pub fn io(path: &Path, source: std::io::Error) -> Failure {
    Failure {
        kind: ErrorKind::Io,
        error: Box::new(FileIo {
            path: path.to_path_buf(),
            source,
        }),
    }
}

pub use tpmstate::kind::chain;

/// The option that supplies what an error says is missing, for the
/// library's errors that do not name the CLI's options.
pub fn hint(e: &(dyn std::error::Error + 'static)) -> Option<&'static str> {
    use tpmstate::swtpm_files::SwtpmFilesError;
    let mut cause = Some(e);
    while let Some(c) = cause {
        if let Some(tpmstate::StoreError::KeyMissing { .. }) = c.downcast_ref() {
            return Some("give the store's key with --key-file or --passphrase-file");
        }
        if let Some(SwtpmFilesError::NeedKey { .. }) = c.downcast_ref() {
            return Some("give swtpm's key with --swtpm-key FILE or --swtpm-pwdfile FILE");
        }
        cause = c.source();
    }
    None
}

fn locking(l: LockingArg) -> Locking {
    match l {
        LockingArg::Auto => Locking::Auto,
        LockingArg::On => Locking::On,
        LockingArg::Off => Locking::Off,
    }
}

pub fn key_source(k: &KeyArgs) -> Result<Option<KeySource>, Failure> {
    let (path, source) = match (&k.key_file, &k.passphrase_file, &k.legacy_key_file) {
        (Some(p), _, _) => (p, KeySource::from_key_file(p)?),
        (None, Some(p), _) => (p, KeySource::from_passphrase_file(p)?),
        (None, None, Some(p)) => {
            eprintln!(
                "tpmstate: warning: {}: a text key file is a guessable key; rekey the store to a random one (head -c 32 /dev/urandom > KEYFILE)",
                p.display()
            );
            (p, KeySource::from_legacy_key_file(p)?)
        }
        (None, None, None) => return Ok(None),
    };
    if let Some(w) = tpmstate::crypto::permission_warning(path) {
        eprintln!("tpmstate: {w}");
    }
    Ok(Some(source))
}

/// A size as `qemu-img` takes it: a number, optionally with a fraction,
/// and a binary unit (`K`, `M`, `G`, `T`, also written `KiB`, `MiB`, ...,
/// or `k`, `m`, ...); no unit means bytes.
pub fn parse_size(s: &str) -> Result<u64, Failure> {
    let bad = || {
        usage(format!(
            "bad size {s:?}: use a number with K, M, G or T (4M, 4MiB, 1.5G)"
        ))
    };
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let unit = unit.trim().to_ascii_lowercase();
    let shift = match unit.as_str() {
        "" | "b" => 0,
        "k" | "kib" => 10,
        "m" | "mib" => 20,
        "g" | "gib" => 30,
        "t" | "tib" => 40,
        _ => return Err(bad()),
    };
    let (whole, frac) = num.split_once('.').unwrap_or((num, ""));
    if !frac.is_empty() && shift == 0 {
        return Err(bad()); // a fraction of a byte
    }
    let whole: u64 = whole.parse().map_err(|_| bad())?;
    let mut bytes = whole
        .checked_shl(shift)
        .filter(|b| b >> shift == whole)
        .ok_or_else(bad)?;
    if !frac.is_empty() {
        let digits: u64 = frac.parse().map_err(|_| bad())?;
        let scale = 10u64.checked_pow(frac.len() as u32).ok_or_else(bad)?;
        let part = (u128::from(digits) << shift) / u128::from(scale);
        bytes = bytes.checked_add(part as u64).ok_or_else(bad)?;
    }
    Ok(bytes)
}

pub fn warn_lock(warning: Option<&str>) {
    if let Some(w) = warning {
        eprintln!("tpmstate: warning: {w}");
    }
}

/// The store a caller expects, from `--expect-generation` and `--expect-store-id`.
fn expect(e: &ExpectArgs) -> Result<Expect, Failure> {
    let store_id = match &e.expect_store_id {
        None => None,
        Some(text) => {
            let mut id = [0u8; 16];
            hex::decode_to_slice(text.trim(), &mut id).map_err(|_| {
                usage(format!(
                    "--expect-store-id {text:?}: give the 32 hex digits `info` shows"
                ))
            })?;
            Some(id)
        }
    };
    Ok(Expect {
        min_generation: e.expect_generation,
        store_id,
    })
}

/// The policy of a command that serves or changes the store's content:
/// refuse a rollback unless `--accept-rollback`.
fn policy(r: RollbackArgs) -> RollbackPolicy {
    match (r.accept_rollback, r.accept_torn_commit) {
        (true, _) => RollbackPolicy::Accept,
        (false, true) => RollbackPolicy::AcceptTorn,
        (false, false) => RollbackPolicy::Refuse,
    }
}

/// How a command opens the store.
struct Opening<'a> {
    key: &'a KeyArgs,
    expect: &'a ExpectArgs,
    rollback: RollbackPolicy,
    locking: Locking,
    timeout: Option<Duration>,
}

impl<'a> Opening<'a> {
    /// A command that serves or changes the store's content: a rollback is
    /// refused unless `--accept-rollback`.
    fn data(
        key: &'a KeyArgs,
        expect: &'a ExpectArgs,
        rollback: RollbackArgs,
        locking: Locking,
    ) -> Self {
        Opening {
            key,
            expect,
            rollback: policy(rollback),
            locking,
            timeout: None,
        }
    }

    /// A diagnostic (`info`, `check`): it reports a rollback instead of refusing.
    fn diagnostic(key: &'a KeyArgs, expect: &'a ExpectArgs, locking: Locking) -> Self {
        Opening {
            key,
            expect,
            rollback: RollbackPolicy::Accept,
            locking,
            timeout: None,
        }
    }
}

fn open_options(o: &Opening) -> Result<OpenOptions, Failure> {
    Ok(OpenOptions {
        key: key_source(o.key)?,
        locking: o.locking,
        lock_timeout: o.timeout,
        rollback: o.rollback,
        expect: expect(o.expect)?,
    })
}

/// Opens the writer handle (`exclusive`: the exclusive lock, for rekey).
fn open_writer(image: &Path, o: &Opening, exclusive: bool) -> Result<Store, Failure> {
    let opts = open_options(o)?;
    let store = match exclusive {
        true => Store::open_exclusive(image, opts)?,
        false => Store::open(image, opts)?,
    };
    warn_lock(store.lock_warning());
    Ok(store)
}

/// Opens a read-only handle, shared or (with `-U`) force-share.
fn open_reader(image: &Path, o: &Opening, share: ShareArgs) -> Result<ReadOnlyStore, Failure> {
    let mut opts = open_options(o)?;
    if share.force_share && opts.rollback == RollbackPolicy::Refuse {
        // A force-share reader may catch a writer mid-commit: that commit
        // looks torn, and the generation before it is the acknowledged one.
        opts.rollback = RollbackPolicy::AcceptTorn;
    }
    let store = match share.force_share {
        true => ReadOnlyStore::open_force_share(image, opts)?,
        false => ReadOnlyStore::open(image, opts)?,
    };
    warn_lock(store.lock_warning());
    Ok(store)
}

/// The one line a user sees when a store is made without a key.
fn note_plaintext(plaintext: bool) {
    if plaintext {
        eprintln!(
            "tpmstate: note: the store is not encrypted (give --key-file or --passphrase-file to encrypt it)"
        );
    }
}

/// Creates `path` for a blob's plaintext: mode 0600 whatever the umask,
/// never through a symlink, and only if it does not exist unless `force`.
fn create_output(path: &Path, force: bool) -> Result<std::fs::File, Failure> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(!force)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
        .open(path)
        .map_err(
            |e| match e.raw_os_error().map(nix::errno::Errno::from_raw) {
                Some(nix::errno::Errno::EEXIST) => usage(format!(
                    "{}: already exists (give --force to overwrite it)",
                    path.display()
                )),
                Some(nix::errno::Errno::ELOOP) => usage(format!(
                    "{}: is a symbolic link; refusing to write a secret through it",
                    path.display()
                )),
                _ => io(path, e),
            },
        )?;
    // An existing file keeps its mode through open(): narrow it.
    file.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(|e| io(path, e))?;
    Ok(file)
}

/// Runs the parsed command; returns the exit code on success.
pub fn run(cli: Cli) -> Result<u8, Failure> {
    let lk = locking(cli.locking);
    let none = KeyArgs::default();
    match cli.command {
        Command::Create {
            image,
            key,
            size,
            cluster_size,
            force,
        } => {
            let cs = parse_size(&cluster_size)?;
            if !cs.is_power_of_two() {
                return Err(usage(format!("cluster size {cs} is not a power of two")));
            }
            let opts = CreateOptions {
                size: parse_size(&size)?,
                cluster_bits: cs.trailing_zeros(),
            };
            let key = key_source(&key)?;
            let plaintext = key.is_none();
            let format = FormatOptions {
                key,
                area: None,
                locking: lk,
                force,
            };
            Store::create(&image, opts, format)?;
            note_plaintext(plaintext);
            println!(
                "created {} ({} bytes, store formatted)",
                image.display(),
                opts.size
            );
        }
        Command::Format {
            image,
            key,
            area,
            force,
        } => {
            let area = area.map(|a| parse_size(&a)).transpose()?;
            let key = key_source(&key)?;
            let plaintext = key.is_none();
            let opts = FormatOptions {
                key,
                area,
                locking: lk,
                force,
            };
            Store::format(&image, opts)?;
            note_plaintext(plaintext);
            println!("formatted a store in {}", image.display());
        }
        Command::Put {
            image,
            name,
            file,
            key,
            expect,
            rollback,
            timeout_ms,
        } => {
            let data = read_input(&file)?;
            let o = Opening {
                timeout: timeout_ms.map(Duration::from_millis),
                ..Opening::data(&key, &expect, rollback, lk)
            };
            let mut store = open_writer(&image, &o, false)?;
            let generation = store.put(&name, &data)?;
            eprintln!("committed generation {generation}");
        }
        Command::Get {
            image,
            name,
            key,
            expect,
            rollback,
            share,
            output,
            force,
        } => {
            let o = Opening::data(&key, &expect, rollback, lk);
            let store = open_reader(&image, &o, share)?;
            let data = store.get_required(&name)?;
            match output {
                Some(p) => create_output(&p, force)?
                    .write_all(&data)
                    .map_err(|e| io(&p, e))?,
                None => std::io::stdout()
                    .write_all(&data)
                    .map_err(|e| io(Path::new("<stdout>"), e))?,
            }
        }
        Command::Rm {
            image,
            name,
            key,
            expect,
            rollback,
        } => {
            let o = Opening::data(&key, &expect, rollback, lk);
            let mut store = open_writer(&image, &o, false)?;
            let generation = store.delete(&name)?;
            eprintln!("committed generation {generation}");
        }
        Command::Ls {
            image,
            expect,
            rollback,
            share,
        } => {
            let o = Opening::data(&none, &expect, rollback, lk);
            let store = open_reader(&image, &o, share)?;
            let blobs = store.list();
            if blobs.is_empty() {
                println!("the store is empty (generation {})", store.generation());
            }
            for b in blobs {
                println!("{:>10}  {}", b.size, b.name);
            }
        }
        Command::Info {
            image,
            key,
            expect,
            share,
            json,
            verbose,
        } => {
            let o = Opening::diagnostic(&key, &expect, lk);
            let store = open_reader(&image, &o, share)?;
            let info = store.info();
            match json {
                true => print_json(&info),
                false => report::print_info(&info, verbose),
            }
        }
        Command::Check {
            image,
            key,
            expect,
            share,
            json,
            verbose,
        } => {
            let o = Opening::diagnostic(&key, &expect, lk);
            return check(&image, &o, share, json, verbose);
        }
        Command::Rekey {
            image,
            key,
            expect,
            rollback,
            new_key_file,
            new_passphrase_file,
        } => {
            let new = key_source(&KeyArgs {
                key_file: new_key_file,
                passphrase_file: new_passphrase_file,
                legacy_key_file: None,
            })?
            .ok_or_else(|| usage("rekey needs --new-key-file or --new-passphrase-file".into()))?;
            let o = Opening::data(&key, &expect, rollback, lk);
            let mut store = open_writer(&image, &o, true)?;
            let rekeyed = store.rekey(&new)?;
            println!("rekeyed: generation {}", rekeyed.generation);
            if let Some(e) = rekeyed.scrub_failed {
                eprintln!(
                    "tpmstate: warning: the new key is in force, but free space still holds data under the old key ({}); the next commit zeroes it",
                    chain(&e)
                );
            }
        }
        Command::Snapshot { action } => super::snapshot::run(action, lk)?,
        Command::DumpHeaders { image } => dump_headers(&image)?,
        Command::Lock {
            image,
            mode,
            timeout_ms,
            command,
        } => {
            let mode = match mode {
                ModeArg::Shared => LockMode::Shared,
                ModeArg::Writer => LockMode::Writer,
                ModeArg::Exclusive => LockMode::Exclusive,
            };
            let timeout = timeout_ms.map(Duration::from_millis);
            return super::run_locked::run(&image, mode, timeout, &command, lk);
        }
        Command::Locks { image, json } => locks(&image, json)?,
        Command::ValidateIncoming {
            image,
            key,
            expect: expected,
            require,
            timeout_ms,
        } => {
            let incoming = Incoming::open_deferred(&image, lk)?;
            let opts = ClaimOptions {
                key: key_source(&key)?,
                required: require.into_iter().filter(|s| !s.is_empty()).collect(),
                timeout: Some(Duration::from_millis(timeout_ms)),
                validate: None,
                expect: expect(&expected)?,
            };
            let store = incoming.claim(opts)?;
            let r = store.check()?;
            println!(
                "ok: generation {}, {}, {} validated",
                r.generation,
                report::count(r.blobs, "blob"),
                report::count(r.bytes as usize, "byte")
            );
        }
        Command::ImportSwtpm {
            source,
            image,
            swtpm_key,
            key,
            size,
        } => {
            let secret = super::swtpm::secret(&swtpm_key)?;
            let key = key_source(&key)?;
            super::swtpm::import(&source, &image, secret, key, parse_size(&size)?, lk)?
        }
        Command::ExportSwtpm {
            image,
            dest,
            key,
            swtpm_key,
            force,
        } => {
            let secret = super::swtpm::secret(&swtpm_key)?;
            let expected = ExpectArgs::default();
            let o = Opening::data(&key, &expected, RollbackArgs::default(), lk);
            let store = open_reader(&image, &o, ShareArgs::default())?;
            super::swtpm::export(&store, &dest, secret, force)?
        }
        Command::Bench { dir, iterations } => {
            if iterations == 0 {
                return Err(usage("--iterations must be at least 1".into()));
            }
            super::bench::run(&dir, iterations).map_err(|e| io(&dir, e))?
        }
    }
    Ok(0)
}

/// Reads a blob's content (TPM state, secret) from a file, or standard
/// input for `-`, into wiped-on-drop memory without leaving copies behind:
/// a file into one buffer of its size; standard input in chunks, joined
/// into one buffer of the total size, each chunk wiped as it is dropped.
fn read_input(file: &str) -> Result<Zeroizing<Vec<u8>>, Failure> {
    if file == "-" {
        return read_chunks(&mut std::io::stdin().lock(), Path::new("<stdin>"));
    }
    let path = Path::new(file);
    let mut f = std::fs::File::open(path).map_err(|e| io(path, e))?;
    let meta = f.metadata().map_err(|e| io(path, e))?;
    if !meta.is_file() {
        // A pipe, `/dev/stdin`, a process substitution: no size to trust.
        return read_chunks(&mut f, path);
    }
    let len = meta.len();
    let len = usize::try_from(len).map_err(|_| usage(format!("{file}: too large")))?;
    let mut data = Zeroizing::new(vec![0u8; len]);
    f.read_exact(&mut data).map_err(|e| io(path, e))?;
    let mut extra = [0u8; 1];
    if f.read(&mut extra).map_err(|e| io(path, e))? != 0 {
        return Err(usage(format!("{file}: changed size while being read")));
    }
    Ok(data)
}

fn read_chunks(input: &mut impl Read, name: &Path) -> Result<Zeroizing<Vec<u8>>, Failure> {
    let mut chunks: Vec<Zeroizing<Vec<u8>>> = Vec::new();
    loop {
        let mut chunk = Zeroizing::new(vec![0u8; 64 * 1024]);
        let mut filled = 0;
        while filled < chunk.len() {
            match input.read(&mut chunk[filled..]).map_err(|e| io(name, e))? {
                0 => break,
                n => filled += n,
            }
        }
        chunk.truncate(filled);
        let last = filled < 64 * 1024;
        chunks.push(chunk);
        if last {
            break;
        }
    }
    let total = chunks.iter().map(|c| c.len()).sum();
    let mut data = Zeroizing::new(Vec::with_capacity(total));
    chunks.iter().for_each(|c| data.extend_from_slice(c));
    Ok(data)
}

fn print_json<T: serde::Serialize>(value: &T) {
    // Serializing plain data structs to a String cannot fail.
    println!(
        "{}",
        serde_json::to_string_pretty(value).expect("plain data serializes")
    );
}

/// `tpmstate check`: verifies everything it can. Exit status 3 when a newer
/// commit does not verify (a rollback: a TPM must notice; with `-U`, one
/// commit with the shape of a commit in progress is not one), 4 when the
/// store is encrypted and no key was given (checksums verified, tags not),
/// else 0.
fn check(
    image: &Path,
    o: &Opening,
    share: ShareArgs,
    json: bool,
    verbose: bool,
) -> Result<u8, Failure> {
    let store = open_reader(image, o, share)?;
    let r = store.verify()?;
    match json {
        true => print_json(&r),
        false => report::print_check(&r, verbose),
    }
    // A force-share read can catch a writer between its write and its sync:
    // that commit looks torn, and is no rollback of anything acknowledged.
    let in_flight = share.force_share && matches!(&r.skipped[..], [one] if one.could_be_torn);
    if in_flight && !json {
        println!(
            "(read with -U while a writer may be committing: the newer commit may be in progress)"
        );
    }
    let rolled_back = !r.skipped.is_empty() && !in_flight;
    Ok(match (rolled_back, r.authenticated) {
        (true, _) => ErrorKind::Corrupt.exit_code(),
        (false, false) => ErrorKind::KeyMissing.exit_code(),
        (false, true) => 0,
    })
}

fn locks(image: &Path, json: bool) -> Result<(), Failure> {
    let holders = tpmstate::lock::holders_of(image)?;
    if json {
        print_json(&holders);
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
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::{parse_size, read_chunks};

    #[test]
    fn standard_input_is_read_whole_across_chunks() {
        let data: Vec<u8> = (0..150_000u32).map(|i| i as u8).collect();
        let got = read_chunks(&mut &data[..], std::path::Path::new("<stdin>"))
            .ok()
            .unwrap();
        assert_eq!(&got[..], &data[..]);
        let empty = read_chunks(&mut &[][..], std::path::Path::new("<stdin>"))
            .ok()
            .unwrap();
        assert!(empty.is_empty());
    }

    #[test]
    fn sizes_are_read_as_qemu_img_reads_them() {
        let ok = |s: &str| parse_size(s).ok();
        assert_eq!(ok("4M"), Some(4 << 20));
        assert_eq!(ok("4MiB"), Some(4 << 20));
        assert_eq!(ok("4m"), Some(4 << 20));
        assert_eq!(ok("64K"), Some(64 << 10));
        assert_eq!(ok("1G"), Some(1 << 30));
        assert_eq!(ok("1T"), Some(1 << 40));
        assert_eq!(ok("1.5G"), Some(3 << 29));
        assert_eq!(ok("512"), Some(512));
        assert_eq!(ok("512B"), Some(512));
        for bad in ["", "M", "4X", "4MB", "-1M", "99999999999T", "1.2.3M", "1.5"] {
            assert_eq!(ok(bad), None, "{bad:?}");
        }
    }
}
