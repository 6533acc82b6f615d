//! Style gates that are cheap to check by reading the source: the sans-IO crates stay sans-IO.
//!
//! `storage`, `replication`, `controller` and `groups` must not use glommio, `std::fs`, wall clocks or
//! unseeded randomness (DESIGN.md §2): that is what lets tests and the simulator run them from a seed.

use std::path::{Path, PathBuf};

const FORBIDDEN: &[(&str, &str)] = &[
    ("glommio", "the runtime belongs in `core`"),
    ("std::fs", "file access goes through the `Disk` trait"),
    ("Instant::now", "time enters as `now_ms` arguments"),
    ("SystemTime", "time enters as `now_ms` arguments"),
    ("thread_rng", "randomness enters as a seed"),
    ("rand::rng()", "randomness enters as a seed"),
    ("from_os_rng", "randomness enters as a seed"),
    ("from_entropy", "randomness enters as a seed"),
    ("std::net", "network I/O belongs in `core`"),
    ("std::thread::sleep", "no blocking in the state machines"),
];

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives in the workspace")
        .to_path_buf()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("read {}: {e}", dir.display()));
    for entry in entries {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Every line of `text` that uses a forbidden name outside a comment.
fn violations_in(text: &str, origin: &str) -> Vec<String> {
    let mut found = Vec::new();
    for (line_number, line) in text.lines().enumerate() {
        let code = line.split("//").next().unwrap_or("");
        for (needle, why) in FORBIDDEN {
            if code.contains(needle) {
                found.push(format!("{origin}:{}: `{needle}`: {why}", line_number + 1));
            }
        }
    }
    found
}

#[test]
fn sans_io_crates_use_no_runtime_clock_fs_or_unseeded_rng() {
    let root = workspace_root();
    let mut violations = Vec::new();
    let mut checked = 0;
    for krate in ["storage", "replication", "controller", "groups"] {
        let mut files = Vec::new();
        rust_files(&root.join(krate).join("src"), &mut files);
        for file in files {
            checked += 1;
            let text = std::fs::read_to_string(&file).expect("read source");
            violations.extend(violations_in(&text, &file.display().to_string()));
        }
        let manifest =
            std::fs::read_to_string(root.join(krate).join("Cargo.toml")).expect("manifest");
        if manifest
            .lines()
            .any(|l| l.trim_start().starts_with("glommio"))
        {
            violations.push(format!("{krate}/Cargo.toml depends on glommio"));
        }
    }
    assert!(
        checked >= 8,
        "found only {checked} source files: is the layout right?"
    );
    assert!(
        violations.is_empty(),
        "sans-IO violations:\n{}",
        violations.join("\n")
    );
}

#[test]
fn the_gate_flags_real_uses_and_ignores_comments() {
    let sample =
        "let t = std::time::Instant::now();\nlet f = std::fs::read(\"x\"); // glommio in a comment";
    let found = violations_in(sample, "sample");
    assert_eq!(found.len(), 2, "{found:?}");
}
