//! `wharf`: the broker binary. The server (`wharf serve`), topics and clients arrive with the
//! single-node broker issue; today the binary can self-test a data directory.

use std::process::ExitCode;

use wharf::dma_disk::DmaDisk;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("selftest") => {
            let dir = args
                .get(2)
                .cloned()
                .unwrap_or_else(|| "./wharf-data".to_string());
            match wharf::runtime::run_local("wharf-selftest", async move {
                DmaDisk::open(&dir).await.map(|_| dir)
            }) {
                Ok(Ok(dir)) => {
                    println!("DMA self-test passed in {dir}");
                    ExitCode::SUCCESS
                }
                Ok(Err(error)) | Err(error) => {
                    eprintln!("wharf: {error}");
                    ExitCode::FAILURE
                }
            }
        }
        Some("--version") | Some("-V") => {
            println!("wharf {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        _ => {
            eprintln!("usage: wharf selftest [DATA_DIR]    (the broker itself is not built yet)");
            ExitCode::from(2)
        }
    }
}
