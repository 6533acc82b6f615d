//! `wharf-loadgen`: the load generator. Not built yet (issue 4: it needs the broker of issue 3).

use std::process::ExitCode;

fn main() -> ExitCode {
    eprintln!("wharf-loadgen: not implemented yet; it arrives with the load generator issue");
    ExitCode::from(2)
}
