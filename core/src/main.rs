//! `wharf`: the broker (`wharf serve`) and its command-line client. See `wharf --help`.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use wharf::cli::{self, Cli, Command, Failure};
use wharf::dma_disk::DmaDisk;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => {
            let config = match cli::serve_config(&args) {
                Ok(config) => config,
                Err(error) => {
                    eprintln!("wharf: {error}");
                    return ExitCode::from(2);
                }
            };
            if args.print_config {
                print!("{}", config.to_toml());
                return ExitCode::SUCCESS;
            }
            let _ = wharf::runtime::keep_freed_memory();
            let _guard = init_logging(&config.log.format, &config.log.level);
            match wharf::server::serve(config) {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    tracing::error!(%error, "wharf failed");
                    eprintln!("wharf: {error}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Topic { command, client } => {
            client_command(async move { cli::topic(command, client).await })
        }
        Command::Cluster { command, client } => {
            client_command(async move { cli::cluster(command, client).await })
        }
        Command::Group { command, client } => {
            client_command(async move { cli::group(command, client).await })
        }
        Command::Queue { command, client } => {
            client_command(async move { cli::queue(command, client).await })
        }
        Command::Produce(args) => client_command(async move { cli::produce(args).await }),
        Command::Consume(args) => client_command(async move { cli::consume(args).await }),
        Command::Selftest { dir } => {
            let dir = dir.unwrap_or_else(|| "./wharf-data".into());
            let shown = dir.display().to_string();
            match wharf::runtime::run_local("wharf-selftest", async move {
                DmaDisk::open(&dir).await.map(|_| ())
            }) {
                Ok(Ok(())) => {
                    println!("DMA self-test passed in {shown}");
                    ExitCode::SUCCESS
                }
                Ok(Err(error)) | Err(error) => {
                    eprintln!("wharf: {error}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn client_command(future: impl std::future::Future<Output = Result<(), Failure>>) -> ExitCode {
    let _guard = init_logging("text", "warn");
    match wharf::runtime::run_local("wharf-client", future) {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(failure)) => {
            eprintln!("wharf: {}", failure.message);
            ExitCode::from(failure.exit_code)
        }
        Err(error) => {
            eprintln!("wharf: {error}");
            ExitCode::FAILURE
        }
    }
}

/// Logs go to stderr through a background writer thread, so a slow terminal or pipe never
/// blocks a reactor. `RUST_LOG` overrides `level`.
fn init_logging(format: &str, level: &str) -> tracing_appender::non_blocking::WorkerGuard {
    let (writer, guard) = tracing_appender::non_blocking(std::io::stderr());
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let json = match format {
        "json" => true,
        "text" => false,
        _ => !std::io::stderr().is_terminal(),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_thread_names(true);
    let installed = if json {
        builder.json().try_init()
    } else {
        builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init()
    };
    if let Err(error) = installed {
        eprintln!("wharf: cannot initialise logging: {error}");
    }
    guard
}
