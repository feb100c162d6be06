//! `archip`: command-line parsing and dispatch only; the work lives in the crates.

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "archip",
    version,
    about = "Copy-on-write volumes over xseg, ublk and CSI"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Measure a part of the system against a baseline in the same run; prints JSON.
    Bench {
        #[command(subcommand)]
        what: Bench,
    },
}

#[derive(Subcommand)]
enum Bench {
    /// Request round trips over xseg vs a Unix socket pair, and idle CPU.
    Xseg {
        /// Round trips per scenario.
        #[arg(long, default_value_t = 200_000)]
        requests: u64,
    },
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Bench { what } => match what {
            Bench::Xseg { requests } => println!("{}", xseg::bench::run(requests)),
        },
    }
    Ok(())
}
