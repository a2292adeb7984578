//! `chartline`: the single binary that composes every Chartline service and operator tool.
//!
//! Subcommands are thin: they parse arguments, build the pieces from `infra`,
//! `projections` and the domain, and print results. Business rules never live here.

#![forbid(unsafe_code)]

mod billing_cmd;
mod identity_cmd;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "chartline",
    version,
    about = "Telehealth-to-EHR integration platform (event-sourced)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Billing rules: evaluate scenarios against the effective-dated policy.
    #[command(subcommand)]
    Billing(billing_cmd::BillingCommand),
    /// Patient identity matching for evaluation and bulk onboarding.
    #[command(subcommand)]
    Identity(identity_cmd::IdentityCommand),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Billing(command) => billing_cmd::run(command),
        Command::Identity(command) => identity_cmd::run(command),
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
