//! Writes the seeds of every fuzz target into `fuzz/corpus/<target>/` (run from the repository
//! root: `cargo run -p fuzz-targets --bin fuzz-seeds`). Existing files are kept.

use std::path::Path;

fn main() -> std::io::Result<()> {
    let root = Path::new("fuzz/corpus");
    let mut written = 0;
    for (n, (target, bytes)) in fuzz_targets::seeds().into_iter().enumerate() {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir)?;
        let path = dir.join(format!("seed-{n:03}"));
        if !path.exists() {
            std::fs::write(&path, bytes)?;
            written += 1;
        }
    }
    println!("{written} seeds written under {}", root.display());
    Ok(())
}
