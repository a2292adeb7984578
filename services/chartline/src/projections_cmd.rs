//! `chartline projections …` (placeholder until the projections work lands).

use clap::{Args, Subcommand};

#[derive(Args, Clone)]
pub struct ProjectionArgs {}

#[derive(Subcommand)]
pub enum ProjectionsCommand {
    /// Name, checkpoint, lag, rate and dead letters of every projection.
    Status,
}

pub async fn run(
    _store: crate::store_cmd::StoreArgs,
    _args: ProjectionArgs,
    command: ProjectionsCommand,
) -> anyhow::Result<std::process::ExitCode> {
    match command {
        ProjectionsCommand::Status => anyhow::bail!("projections: not built yet"),
    }
}
