//! `chartline identity …` (placeholder until the identity-matching work lands).

use clap::Subcommand;

#[derive(Subcommand)]
pub enum IdentityCommand {
    /// Match records from a CSV file.
    Match { #[arg(long)] records: String },
}

pub fn run(command: IdentityCommand) -> anyhow::Result<std::process::ExitCode> {
    match command {
        IdentityCommand::Match { records } => anyhow::bail!("identity match {records}: not built yet"),
    }
}
