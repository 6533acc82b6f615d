#[test]
fn one() {
    let path = std::env::var("WHARF_FUZZ_INPUT").expect("WHARF_FUZZ_INPUT");
    let data = std::fs::read(&path).expect("read");
    let target = std::env::var("WHARF_FUZZ_TARGET").expect("WHARF_FUZZ_TARGET");
    match target.as_str() {
        "frame_decoder" => wharf_fuzz::frame_decoder::run(&data),
        "request_bodies" => wharf_fuzz::request_bodies::run(&data),
        "batch_validation" => wharf_fuzz::batch_validation::run(&data),
        "recovery_scan" => wharf_fuzz::recovery_scan::run(&data),
        other => panic!("unknown target {other}"),
    }
}
