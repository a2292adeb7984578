//! `chartline bench …` (placeholder until the store benchmark lands).

use clap::Subcommand;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Event store throughput and latency on SQLite and PostgreSQL.
    Store,
}

pub async fn run(command: BenchCommand) -> anyhow::Result<std::process::ExitCode> {
    match command {
        BenchCommand::Store => anyhow::bail!("bench store: not built yet"),
    }
}
