//! Replays every committed input (`corpus/<target>/*` and `regressions/<target>/*`) through its
//! target's code, without libFuzzer: `cargo test --manifest-path fuzz/Cargo.toml`. Also checks
//! that the seeds the generator makes are what the targets expect (valid inputs stay valid).

use std::path::Path;

fn run(target: &str, data: &[u8]) {
    match target {
        "frame_decoder" => wharf_fuzz::frame_decoder::run(data),
        "request_bodies" => wharf_fuzz::request_bodies::run(data),
        "batch_validation" => wharf_fuzz::batch_validation::run(data),
        "recovery_scan" => wharf_fuzz::recovery_scan::run(data),
        other => panic!("unknown target directory {other}"),
    }
}

fn replay_dir(kind: &str) -> usize {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join(kind);
    let mut count = 0;
    let Ok(targets) = std::fs::read_dir(&root) else {
        return 0;
    };
    for target in targets {
        let target = target.expect("dir entry").path();
        let name = target
            .file_name()
            .expect("name")
            .to_string_lossy()
            .to_string();
        for input in std::fs::read_dir(&target).expect("target dir") {
            let input = input.expect("dir entry").path();
            let data = std::fs::read(&input).expect("read input");
            eprintln!("replay {}", input.display());
            run(&name, &data);
            count += 1;
        }
    }
    count
}

#[test]
fn committed_corpus_replays_clean() {
    assert!(replay_dir("corpus") > 0, "no corpus found");
}

#[test]
fn regressions_replay_clean() {
    replay_dir("regressions");
}

#[test]
fn generated_seeds_replay_clean() {
    for (target, seeds) in wharf_fuzz::seeds::all() {
        for (name, data) in seeds {
            eprintln!("seed {target}/{name}");
            run(target, &data);
        }
    }
}

#[test]
fn seed_batches_are_valid() {
    let batches = wharf_fuzz::seeds::batches(&[1, 3, 2], 10);
    let mut aligned = wharf_fuzz::batch_validation::Aligned::new();
    aligned.extend_from_slice(&batches);
    assert_eq!(wharf_fuzz::batch_validation::check_batches(&aligned), 3);
}
