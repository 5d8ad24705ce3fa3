//! `tpmstate bench`: measurements with their reference taken in the same run,
//! printed as ratios (never asserted in tests).
//!
//! - commit: an encrypted, durable commit of a 4 KiB and a 64 KiB blob vs.
//!   raw `pwrite` + `fdatasync` of the same bytes to a preallocated file in
//!   the same directory (goal: within 1.15x);
//! - lock: acquire + release of a fresh writer lock, and of a nested one
//!   (goals: < 20 us and < 100 ns);
//! - claim: a migration target's claim (exclusive lock, full validation and
//!   decryption) of stores holding 64 KiB and 1 MiB (goal: < 5 ms for 1 MiB).

use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::time::{Duration, Instant};
use tpmstate::image::{CreateOptions, PageBuf};
use tpmstate::migration::{self, ClaimOptions, Incoming};
use tpmstate::store::FormatOptions;
use tpmstate::{Key, KeySource, LockMode, Locking, OpenOptions, Store};

/// The median; `run` refuses zero iterations, so no list here is empty.
fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Runs every measurement in `dir`: `iterations` commits of each kind,
/// fresh lock acquisitions and claims (and 100 times as many nested lock
/// acquisitions, each too short to time alone).
pub fn run(dir: &Path, iterations: u32) -> std::io::Result<()> {
    if iterations == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "--iterations must be at least 1",
        ));
    }
    let work = dir.join(format!(".tpmstate-bench-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let result = measure(&work, iterations);
    let _ = std::fs::remove_dir_all(&work);
    result
}

/// Keeps a library error, with its causes, inside the I/O error `run` returns.
fn fail(e: impl std::error::Error + Send + Sync + 'static) -> std::io::Error {
    std::io::Error::other(e)
}

fn measure(work: &Path, n: u32) -> std::io::Result<()> {
    let key = KeySource::Key(Key::generate());
    println!("commit latency (median of {n}, one fdatasync each):");
    commits(work, n, Some(&key), "encrypted")?;
    commits(work, n, None, "plaintext")?;
    locks(work, n)?;
    claims(work, &key, n)
}

/// A goal's outcome in plain words.
fn verdict(met: bool) -> &'static str {
    match met {
        true => "met",
        false => "NOT met",
    }
}

fn commits(work: &Path, n: u32, key: Option<&KeySource>, label: &str) -> std::io::Result<()> {
    let image = work.join(format!("bench-{label}.qcow2"));
    Store::create(
        &image,
        CreateOptions::default(),
        FormatOptions {
            key: key.cloned(),
            ..Default::default()
        },
    )
    .map_err(fail)?;
    let mut store = Store::open(
        &image,
        OpenOptions {
            key: key.cloned(),
            ..Default::default()
        },
    )
    .map_err(fail)?;
    for size in [4096usize, 65536] {
        let blobs: Vec<Vec<u8>> = (0..4).map(|i| random_bytes(size, i + 1)).collect();
        let mut t_store = Vec::new();
        let mut t_raw = Vec::new();
        let mut t_direct = Vec::new();
        let raw = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(work.join("raw"))?;
        raw.write_all_at(&vec![0u8; size * 4], 0)?;
        raw.sync_all()?;
        let aligned: Vec<PageBuf> = blobs
            .iter()
            .map(|b| {
                let mut p = PageBuf::default();
                p.reset_zeroed(size);
                p.bytes_mut().copy_from_slice(b);
                p
            })
            .collect();
        // The store writes a commit with O_DIRECT where it can; the same
        // raw write that way shows how much of the ratio that accounts for.
        // Its own file, so neither reference evicts the other's cached pages.
        // A file system may take O_DIRECT at open and refuse it at the first
        // write (EINVAL): one trial write decides, as in the image layer.
        std::fs::write(work.join("raw-direct"), vec![0u8; size * 4])?;
        let direct = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(nix::fcntl::OFlag::O_DIRECT.bits())
            .open(work.join("raw-direct"))
            .ok()
            .filter(|f| f.write_all_at(aligned[0].bytes(), 0).is_ok());
        if let Some(f) = &direct {
            f.sync_all()?;
        }
        // Interleave the three so all see the same machine state, and take
        // turns going first so none always finds the data in cache.
        for i in 0..(n + 20) as usize {
            let data = &blobs[i % blobs.len()];
            let mut store_commit = || -> std::io::Result<Duration> {
                let t = Instant::now();
                store.put("permall", data).map_err(fail)?;
                Ok(t.elapsed())
            };
            let raw_write = || -> std::io::Result<Duration> {
                let t = Instant::now();
                raw.write_all_at(data, ((i % 4) * size) as u64)?;
                raw.sync_data()?;
                Ok(t.elapsed())
            };
            let direct_write = || -> std::io::Result<Option<Duration>> {
                let Some(f) = &direct else { return Ok(None) };
                let t = Instant::now();
                f.write_all_at(aligned[i % 4].bytes(), ((i % 4) * size) as u64)?;
                f.sync_data()?;
                Ok(Some(t.elapsed()))
            };
            let (s, r, d) = match i % 3 {
                0 => (store_commit()?, raw_write()?, direct_write()?),
                1 => {
                    let r = raw_write()?;
                    let d = direct_write()?;
                    (store_commit()?, r, d)
                }
                _ => {
                    let d = direct_write()?;
                    let s = store_commit()?;
                    (s, raw_write()?, d)
                }
            };
            if i >= 20 {
                t_store.push(s);
                t_raw.push(r);
                t_direct.extend(d);
            }
        }
        let (s, r) = (median(t_store), median(t_raw));
        println!(
            "  {label:>9} {:>2} KiB: store {:8.1} us   raw pwrite+fdatasync {:8.1} us   ratio {:.3} (goal <= 1.15: {})",
            size / 1024,
            us(s),
            us(r),
            s.as_secs_f64() / r.as_secs_f64(),
            verdict(s.as_secs_f64() / r.as_secs_f64() <= 1.15)
        );
        if !t_direct.is_empty() {
            let d = median(t_direct);
            println!(
                "  {:>16}  raw with O_DIRECT {:8.1} us   store / that {:.3}",
                "",
                us(d),
                s.as_secs_f64() / d.as_secs_f64()
            );
        }
        if let Some(KeySource::Key(k)) = key {
            // What no encrypted commit can go below: raw, plus sealing the
            // bytes at all (AES-256-GCM, in a hot loop, so a lower bound).
            let mut out = vec![0u8; size];
            let sealing = median(
                (0..n as usize)
                    .map(|i| {
                        let t = Instant::now();
                        let sealed = k.seal_into(&[0; 16], "permall", 1, &blobs[i % 4], &mut out);
                        sealed.map(|_| t.elapsed())
                    })
                    .collect::<Result<_, _>>()
                    .map_err(fail)?,
            );
            println!(
                "  {:>16}  sealing alone {:8.1} us   floor (raw + sealing) / raw {:.3}",
                "",
                us(sealing),
                (r + sealing).as_secs_f64() / r.as_secs_f64()
            );
        }
    }
    Ok(())
}

fn locks(work: &Path, n: u32) -> std::io::Result<()> {
    let image = work.join("bench-encrypted.qcow2");
    let (lock, _) = tpmstate::lock::ImageLock::open(&image, true, Locking::Auto).map_err(fail)?;
    let mut fresh = Vec::new();
    for _ in 0..n {
        let t = Instant::now();
        drop(lock.acquire(LockMode::Writer, None).map_err(fail)?);
        fresh.push(t.elapsed());
    }
    let outer = lock.acquire(LockMode::Writer, None).map_err(fail)?;
    // One nested acquisition is too short to time alone: 100 per iteration.
    let reps = n.saturating_mul(100);
    let t = Instant::now();
    for _ in 0..reps {
        drop(lock.acquire(LockMode::Shared, None).map_err(fail)?);
    }
    let nested = t.elapsed() / reps;
    drop(outer);
    println!("lock acquire+release:");
    let fresh = median(fresh);
    println!(
        "  fresh writer lock {:8.2} us (goal < 20 us: {})",
        us(fresh),
        verdict(us(fresh) < 20.0)
    );
    let nested_ns = nested.as_secs_f64() * 1e9;
    println!(
        "  nested            {nested_ns:8.1} ns (goal < 100 ns: {})",
        verdict(nested_ns < 100.0)
    );
    Ok(())
}

fn claims(work: &Path, key: &KeySource, n: u32) -> std::io::Result<()> {
    println!("migration claim (exclusive lock + full validation + decryption):");
    for (label, total) in [("64 KiB", 64 * 1024usize), ("1 MiB", 1024 * 1024)] {
        let img = work.join(format!("claim-{total}.qcow2"));
        let opts = CreateOptions {
            size: 8 << 20,
            ..Default::default()
        };
        Store::create(
            &img,
            opts,
            FormatOptions {
                key: Some(key.clone()),
                area: Some(8 << 20),
                ..Default::default()
            },
        )
        .map_err(fail)?;
        let mut s = Store::open(
            &img,
            OpenOptions {
                key: Some(key.clone()),
                ..Default::default()
            },
        )
        .map_err(fail)?;
        let (permall, volatile) = (random_bytes(total * 3 / 4, 7), random_bytes(total / 4, 8));
        let mut t = s.transaction();
        t.put("permall", &permall).map_err(fail)?;
        t.put("volatilestate", &volatile).map_err(fail)?;
        t.commit().map_err(fail)?;
        drop(migration::release_outgoing(s).map_err(fail)?);
        let mut times = Vec::new();
        for _ in 0..n {
            let t = Instant::now();
            let incoming = Incoming::open_deferred(&img, Locking::Auto).map_err(fail)?;
            let claimed = incoming
                .claim(ClaimOptions {
                    key: Some(key.clone()),
                    ..Default::default()
                })
                .map_err(fail)?;
            times.push(t.elapsed());
            drop(claimed);
        }
        let claim = us(median(times));
        let goal = match total {
            t if t == 1024 * 1024 => format!("goal < 5000 us: {}", verdict(claim < 5000.0)),
            _ => "no goal; the goal is for 1 MiB".to_string(),
        };
        println!("  {label:>7}: {claim:8.0} us ({goal})");
    }
    Ok(())
}
