//! `chartline billing …` (placeholder until the billing-rules work lands).

use clap::Subcommand;

#[derive(Subcommand)]
pub enum BillingCommand {
    /// Evaluate one scenario or an array of scenarios from a JSON file (`-` = stdin).
    Evaluate { file: String },
}

pub fn run(command: BillingCommand) -> anyhow::Result<std::process::ExitCode> {
    match command {
        BillingCommand::Evaluate { file } => anyhow::bail!("billing evaluate {file}: not built yet"),
    }
}
