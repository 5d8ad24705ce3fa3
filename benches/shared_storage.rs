//! Commits and claims through a GlusterFS mount (the test bed of
//! `tests/shared_storage.rs`: a server and two hosts in network namespaces
//! on this machine), beside raw `pwrite` + `fdatasync` of the same bytes to
//! a preallocated file on the same mount, measured in one run, interleaved.
//! Needs root and glusterfs-server; prints medians and ratios. Not a test:
//! nothing is asserted.
//!
//! ```sh
//! cargo bench --bench shared_storage
//! ```

#[path = "../tests/common/gluster.rs"]
#[allow(dead_code)]
mod gluster;

use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};
use tpmstate::migration::{self, ClaimOptions, Incoming};
use tpmstate::{Locking, OpenOptions, Store};

fn median_us(v: &mut [Duration]) -> f64 {
    v.sort();
    v[v.len() / 2].as_secs_f64() * 1e6
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    // `cargo test --all-targets` runs this without `--bench`: a few of each
    // then, as a smoke test.
    let smoke = !std::env::args().any(|a| a == "--bench");
    let n = if smoke { 3 } else { 200 };
    let Some(bed) = gluster::Bed::up(&gluster::OPTIONS) else {
        return;
    };
    let image = bed.a.join("bench.qcow2");
    Store::create(&image, Default::default(), Default::default()).unwrap();
    let mut store = Store::open(&image, OpenOptions::default()).unwrap();
    let raw = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(bed.a.join("raw"))
        .unwrap();
    raw.set_len(1 << 20).unwrap();
    raw.sync_all().unwrap();
    println!("through a GlusterFS mount (FUSE, loopback veth): {n} of each, 4 KiB");
    let blob = vec![0x5au8; 4096];
    let (mut commits, mut raws) = (Vec::new(), Vec::new());
    for i in 0..n {
        let t = Instant::now();
        store.put("permall", &blob).unwrap();
        commits.push(t.elapsed());
        let t = Instant::now();
        raw.write_all_at(&blob, (i as u64 % 64) * 4096).unwrap();
        raw.sync_data().unwrap();
        raws.push(t.elapsed());
    }
    let (c, r) = (median_us(&mut commits), median_us(&mut raws));
    println!(
        "  store commit {c:8.1} us   raw pwrite+fdatasync {r:8.1} us   ratio {:.2}",
        c / r
    );
    let on_b = bed.b.join("bench.qcow2");
    let mut claims = Vec::new();
    for _ in 0..n.min(20) {
        let released = migration::release_outgoing(store).unwrap();
        let t = Instant::now();
        let claimed = Incoming::open_deferred(&on_b, Locking::Auto)
            .unwrap()
            .claim(ClaimOptions::default())
            .unwrap();
        claims.push(t.elapsed());
        drop(claimed);
        store = match released.reclaim(Duration::from_secs(5)) {
            Ok(s) => s,
            Err(e) => panic!("reclaim: {}", e.error()),
        };
    }
    println!(
        "  claim on host B (exclusive lock, full validation, 4 MiB area): {:8.1} us",
        median_us(&mut claims)
    );
}
