//! Commit latency against blob size, 1 KiB to 1 MiB: a durable store
//! commit (plaintext and encrypted) against raw `pwrite` + `fdatasync` of
//! the same bytes to a preallocated file in the same directory, measured
//! in one run, interleaved; and the AEAD's own seal throughput (the key's
//! `seal_into`, which is what a commit runs) in memory. Prints medians,
//! p99s and ratios; with `TPMSTATE_PLOT_DIR` set, draws
//! `commit-latency.svg` there. Not a test: nothing is asserted.
//!
//! ```sh
//! TPMSTATE_PLOT_DIR=docs/plots cargo bench --bench commit_sizes
//! ```

#[path = "plot.rs"]
mod plot;

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};
use tpmstate::image::CreateOptions;
use tpmstate::store::FormatOptions;
use tpmstate::{Key, KeySource, OpenOptions, Store};

const SIZES: [usize; 6] = [1 << 10, 4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20];

fn bytes(len: usize, seed: u64) -> Vec<u8> {
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

fn pct(v: &mut [Duration], p: f64) -> f64 {
    v.sort();
    v[((v.len() - 1) as f64 * p) as usize].as_secs_f64() * 1e6
}

fn store(dir: &Path, key: Option<&KeySource>, label: &str) -> Store {
    let image = dir.join(format!("{label}.qcow2"));
    let create = CreateOptions {
        size: 64 << 20,
        ..Default::default()
    };
    let format = FormatOptions {
        key: key.cloned(),
        area: Some(16 << 20),
        ..Default::default()
    };
    Store::create(&image, create, format).unwrap();
    let opts = OpenOptions {
        key: key.cloned(),
        ..Default::default()
    };
    Store::open(&image, opts).unwrap()
}

/// Medians and p99s (us) of `n` commits of `size` bytes, per kind.
struct Row {
    size: usize,
    raw: (f64, f64),
    plain: (f64, f64),
    encrypted: (f64, f64),
}

fn measure(dir: &Path, size: usize, n: usize, stores: &mut [Store; 2]) -> Row {
    let blobs: Vec<Vec<u8>> = (0..4).map(|i| bytes(size, i + 7)).collect();
    let raw = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(dir.join("raw"))
        .unwrap();
    raw.write_all_at(&vec![0u8; size * 4], 0).unwrap();
    raw.sync_all().unwrap();
    let mut times: [Vec<Duration>; 3] = Default::default();
    for i in 0..n + 10 {
        let data = &blobs[i % blobs.len()];
        // Take turns going first, so none always finds the disk idle.
        for k in 0..3 {
            let which = (i + k) % 3;
            let t = Instant::now();
            match which {
                0 => {
                    raw.write_all_at(data, ((i % 4) * size) as u64).unwrap();
                    raw.sync_data().unwrap();
                }
                s => {
                    stores[s - 1].put("permall", data).unwrap();
                }
            }
            if i >= 10 {
                times[which].push(t.elapsed());
            }
        }
    }
    let [mut r, mut p, mut e] = times;
    Row {
        size,
        raw: (pct(&mut r, 0.5), pct(&mut r, 0.99)),
        plain: (pct(&mut p, 0.5), pct(&mut p, 0.99)),
        encrypted: (pct(&mut e, 0.5), pct(&mut e, 0.99)),
    }
}

/// The key's seal throughput in memory, GB/s, for `size`-byte blobs.
fn seal_throughput(key: &Key, size: usize, smoke: bool) -> f64 {
    let plain = bytes(size, 3);
    let mut out = vec![0u8; size];
    let id = [5u8; 16];
    let (mut done, start) = (0usize, Instant::now());
    let span = Duration::from_millis(if smoke { 20 } else { 700 });
    while start.elapsed() < span {
        key.seal_into(&id, "permall", 2, &plain, &mut out).unwrap();
        done += size;
    }
    done as f64 / start.elapsed().as_secs_f64() / 1e9
}

fn label(size: usize) -> String {
    match size {
        s if s >= 1 << 20 => format!("{} MiB", s >> 20),
        s => format!("{} KiB", s >> 10),
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    // `cargo test --all-targets` runs this without `--bench`, unoptimized:
    // a few commits of each kind then, as a smoke test, and no chart.
    let smoke = !std::env::args().any(|a| a == "--bench");
    let n: usize = match smoke {
        true => 3,
        false => std::env::var("TPMSTATE_BENCH_COMMITS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(200),
    };
    let dir = tempfile::Builder::new()
        .prefix("tpmstate-commit-sizes")
        .tempdir_in("/var/tmp")
        .unwrap();
    let key = Key::generate();
    let source = KeySource::Key(key.clone());
    let mut stores = [
        store(dir.path(), None, "plain"),
        store(dir.path(), Some(&source), "encrypted"),
    ];
    println!(
        "commit latency against blob size: {n} commits each, {}",
        dir.path().display()
    );
    println!(
        "{:>8} | {:>9} {:>9} | {:>9} {:>9} {:>6} | {:>9} {:>9} {:>6}",
        "size", "raw p50", "p99", "plain p50", "p99", "ratio", "enc p50", "p99", "ratio"
    );
    let mut rows = Vec::new();
    for size in SIZES {
        let r = measure(dir.path(), size, n, &mut stores);
        println!(
            "{:>8} | {:>9.0} {:>9.0} | {:>9.0} {:>9.0} {:>5.2}x | {:>9.0} {:>9.0} {:>5.2}x",
            label(size),
            r.raw.0,
            r.raw.1,
            r.plain.0,
            r.plain.1,
            r.plain.0 / r.raw.0,
            r.encrypted.0,
            r.encrypted.1,
            r.encrypted.0 / r.raw.0
        );
        rows.push(r);
    }
    println!("\nseal throughput in memory (AES-256-GCM, aes-gcm crate, one core):");
    for size in [64 << 10, 1 << 20] {
        println!(
            "  {:>8}: {:.2} GB/s",
            label(size),
            seal_throughput(&key, size, smoke)
        );
    }
    if let Some(path) = plot::target("commit-latency.svg").filter(|_| !smoke) {
        let series = |name: &str, f: &dyn Fn(&Row) -> f64| {
            (
                name.to_string(),
                rows.iter().map(|r| (r.size as f64, f(r))).collect(),
            )
        };
        let svg = plot::lines(
            "Durable commit latency against blob size (median)",
            "blob size",
            "microseconds",
            &[
                series("raw pwrite + fdatasync", &|r| r.raw.0),
                series("store, plaintext", &|r| r.plain.0),
                series("store, encrypted", &|r| r.encrypted.0),
                series("store, encrypted, p99", &|r| r.encrypted.1),
            ],
            |x| label(x as usize),
        );
        std::fs::write(&path, svg).unwrap();
        println!("\nwrote {}", path.display());
    }
}
