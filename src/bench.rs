//! `tpmstate bench`: commit latency beside raw pwrite+fdatasync.
pub fn run(_dir: &std::path::Path, _iterations: u32) -> std::io::Result<()> {
    Ok(())
}
