//! What `info`, `check` and `ls` print: a user's words first (generation,
//! last commit, encryption, blobs, space, health); the header slots, the
//! commit chain and the qcow2 layer only with `--verbose`.

use std::path::Path;
use std::time::UNIX_EPOCH;
use tpmstate::store::{CheckReport, Skipped, SlotReport, StoreInfo};

/// `n thing` or `n things`.
pub fn count(n: usize, thing: &str) -> String {
    match n {
        1 => format!("1 {thing}"),
        n => format!("{n} {thing}s"),
    }
}

/// Bytes in the larger binary unit that keeps them readable.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return count(n as usize, "byte");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// When the file at `path` was last written, as UTC: a commit writes the
/// image, so this is when the last commit (or anything else) wrote it.
fn modified(path: &Path) -> Option<String> {
    let t = std::fs::metadata(path).ok()?.modified().ok()?;
    let secs = t.duration_since(UNIX_EPOCH).ok()?.as_secs();
    Some(utc(secs))
}

/// A Unix time as `YYYY-MM-DD HH:MM:SS UTC` (the civil-from-days algorithm).
pub fn utc(secs: u64) -> String {
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let (h, m, s) = (rem / 3600, rem / 60 % 60, rem % 60);
    format!("{year:04}-{month:02}-{day:02} {h:02}:{m:02}:{s:02} UTC")
}

/// The rollback paragraph: what did not verify and what is served instead.
pub fn rollback(served: u64, skipped: &[Skipped]) -> Vec<String> {
    if skipped.is_empty() {
        return Vec::new();
    }
    let mut lines = vec![format!(
        "ROLLBACK: a newer commit than generation {served} is on disk but does not verify; generation {served}, the newest that does, is served:"
    )];
    lines.extend(skipped.iter().map(|s| format!("  {s}")));
    lines.push(
        "  After a crash during a commit this is expected (that commit never completed, and the next commit settles the store). Otherwise the image is damaged and the TPM's state has gone back in time."
            .into(),
    );
    lines
}

fn slot_line(s: &SlotReport) -> String {
    let generation = s
        .generation
        .map(|g| format!("generation {g}: "))
        .unwrap_or_default();
    format!("slot {}:         {generation}{}", s.index, s.status)
}

/// `tpmstate info`.
pub fn print_info(i: &StoreInfo, verbose: bool) {
    let newest = match i.skipped.is_empty() {
        true => "the newest commit",
        false => "a newer commit does not verify: see health",
    };
    let verified = match (i.identity_verified, i.encrypted) {
        (true, _) => "",
        (false, true) => "; it and the store id are not verified without the key",
        (false, false) => "; a plaintext store's generation is not authenticated",
    };
    let newest = format!(" ({newest}{verified})");
    println!("image:          {}", i.path.display());
    println!("format version: {}", i.format_version);
    println!("generation:     {}{newest}", i.generation);
    println!("store id:       {}", i.store_id);
    if let Some(when) = modified(&i.path) {
        println!("last written:   {when}");
    }
    match i.key_derivation.as_deref() {
        Some("raw-key") => println!("encrypted:      yes (AES-256-GCM, key from a key file)"),
        Some(k) => println!("encrypted:      yes (AES-256-GCM, key from a passphrase: {k})"),
        None => println!("encrypted:      no"),
    }
    let total: u64 = i.blobs.iter().map(|b| u64::from(b.size)).sum();
    match i.blobs.len() {
        0 if i.held_state => println!("blobs:          none now (the store has held state before)"),
        0 => println!("blobs:          none"),
        n => println!(
            "blobs:          {}, {} in all",
            count(n, "blob"),
            bytes(total)
        ),
    }
    for b in &i.blobs {
        println!("  {:>10}  {}", b.size, b.name);
    }
    println!(
        "space:          {} store area, {} used, {} free ({} at most in one run: a commit needs its new data in one run, beside the old)",
        bytes(i.area_bytes),
        bytes(i.used_bytes),
        bytes(i.free_bytes),
        bytes(i.largest_free_bytes)
    );
    let mut problems = rollback(i.generation, &i.skipped);
    if i.old_key_data {
        problems.push(OLD_KEY_DATA.into());
    }
    match problems.is_empty() {
        true => println!("health:         ok (run `tpmstate check` to verify every byte)"),
        false => {
            println!("health:         warning");
            problems.iter().for_each(|l| println!("  {l}"));
        }
    }
    if !verbose {
        return;
    }
    for s in &i.slots {
        println!("{}", slot_line(s));
    }
    println!(
        "header:         area offset {}, {} since the anchor in a slot",
        i.header_offset,
        count(i.chained_commits, "chained commit")
    );
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
    for b in &i.blobs {
        println!(
            "blob:           {} written in generation {}, {} stored at area offset {}",
            b.name, b.written_generation, b.stored_bytes, b.area_offset
        );
    }
}

const OLD_KEY_DATA: &str = "a rekey's scrub did not finish: free blocks may still hold data under the old key (the next commit zeroes them)";

/// `tpmstate check`'s text.
pub fn print_check(r: &CheckReport, verbose: bool) {
    if verbose {
        for s in &r.slots {
            println!("{}", slot_line(s));
        }
    }
    rollback(r.generation, &r.skipped)
        .iter()
        .for_each(|l| println!("{l}"));
    if r.old_key_data {
        println!("warning: {OLD_KEY_DATA}");
    }
    let what = match r.authenticated {
        true => "verified",
        false => "checksummed",
    };
    println!(
        "{}: generation {}, {}, {} {what}",
        if r.skipped.is_empty() { "ok" } else { "served" },
        r.generation,
        count(r.blobs, "blob"),
        count(r.bytes as usize, "byte")
    );
    if !r.authenticated {
        println!(
            "not verified without the key: the key check, the directory's MAC and each blob's tag (give --key-file or --passphrase-file)"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_sizes_read_as_words() {
        assert_eq!(count(1, "blob"), "1 blob");
        assert_eq!(count(0, "blob"), "0 blobs");
        assert_eq!(bytes(1), "1 byte");
        assert_eq!(bytes(4 << 20), "4.0 MiB");
        assert_eq!(bytes(1536), "1.5 KiB");
    }

    #[test]
    fn utc_dates_follow_the_calendar() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc(1_795_737_600), "2026-11-27 00:00:00 UTC");
    }
}
