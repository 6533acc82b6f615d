//! Writes the seed corpus of every target to `fuzz/corpus/<target>/<name>` (see
//! `wharf_fuzz::seeds`). Run from anywhere: `cargo run --manifest-path fuzz/Cargo.toml --example
//! gen_corpus`. Existing files of the same name are overwritten; other corpus entries are kept.

use std::path::Path;

fn main() -> std::io::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    for (target, seeds) in wharf_fuzz::seeds::all() {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir)?;
        for (name, bytes) in &seeds {
            std::fs::write(dir.join(format!("seed-{name}")), bytes)?;
        }
        println!("{target}: {} seeds in {}", seeds.len(), dir.display());
    }
    Ok(())
}
