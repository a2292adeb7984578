//! `chartline`: the single binary that composes every Chartline service and operator tool.
//!
//! Subcommands are thin: they parse arguments, build the pieces from `infra`,
//! `projections` and the domain, and print results. Business rules never live here.

#![forbid(unsafe_code)]

/// mimalloc instead of glibc malloc: read_all, rebuilds and the API decode millions of
/// small JSON values, and pages decoded on one thread are freed on another; measured
/// +30 % PostgreSQL read_all, +30 % SQLite 10-event appends (docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod bench_api;
mod bench_cmd;
mod bench_commands;
mod bench_ehr;
mod billing_cmd;
mod config;
mod demo_cmd;
mod ehr_cmd;
mod identity_cmd;
mod projections_cmd;
mod send_cmd;
mod soak_cmd;
mod token_cmd;

use chartline::serve_cmd;
mod store_cmd;

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
    /// Event store operations: append, read, verify, stats.
    Store {
        #[command(flatten)]
        args: store_cmd::StoreArgs,
        #[command(subcommand)]
        command: store_cmd::StoreCommand,
    },
    /// Projections: status, rebuild, dead letters.
    Projections {
        #[command(flatten)]
        store: store_cmd::StoreArgs,
        #[command(flatten)]
        args: projections_cmd::ProjectionArgs,
        #[command(subcommand)]
        command: projections_cmd::ProjectionsCommand,
    },
    /// Run services: all in one process (embedded default) or a subset (`--only`, `--nats`).
    Serve {
        #[command(flatten)]
        store: store_cmd::StoreArgs,
        #[command(flatten)]
        args: serve_cmd::ServeArgs,
    },
    /// A synthetic clinic day through the real command path, a summary, then serve.
    Demo {
        #[command(flatten)]
        store: store_cmd::StoreArgs,
        #[command(flatten)]
        args: demo_cmd::DemoArgs,
    },
    /// API bearer tokens for operators and tests.
    #[command(subcommand)]
    Token(token_cmd::TokenCommand),
    /// Send one command through the command path and print the reply.
    Send(send_cmd::SendArgs),
    /// Benchmarks (release mode; see `make bench`).
    #[command(subcommand)]
    Bench(bench_cmd::BenchCommand),
    /// The load and fault suite (`make soak`): the distributed deployment under load and
    /// chaos, then the invariants. Exit 1 when any fails.
    Soak(soak_cmd::SoakArgs),
    /// The compliance map: components, BAA coverage, data flows (`compliance map`).
    #[command(subcommand)]
    Compliance(chartline::compliance_cmd::ComplianceCommand),
    /// EHR write-back: `fhir export|retry`, and `sandbox-ehr` (a stand-in FHIR server).
    #[command(flatten)]
    Ehr(ehr_cmd::EhrCommand),
}

/// Runs an async command on a multi-threaded runtime.
fn block_on<F: std::future::Future<Output = anyhow::Result<std::process::ExitCode>>>(
    future: F,
) -> anyhow::Result<std::process::ExitCode> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(future)
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CHARTLINE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

fn main() -> std::process::ExitCode {
    let mut args: Vec<String> = std::env::args().collect();
    let mut command = <Cli as clap::CommandFactory>::command();
    if let Some(path) = config::take_config_path(&mut args) {
        let applied = std::fs::read_to_string(&path)
            .map_err(anyhow::Error::from)
            .and_then(|text| config::assignments(&text, |v| std::env::var_os(v).is_some()));
        match applied {
            Ok(assignments) => command = config::apply_as_defaults(command, &assignments),
            Err(error) => {
                eprintln!("error: config file {}: {error:#}", path.display());
                return std::process::ExitCode::from(2);
            }
        }
    }
    let cli = match <Cli as clap::FromArgMatches>::from_arg_matches(&command.get_matches_from(args))
    {
        Ok(cli) => cli,
        Err(error) => error.exit(),
    };
    init_tracing();
    let result = match cli.command {
        Command::Store { args, command } => block_on(store_cmd::run(args, command)),
        Command::Projections {
            store,
            args,
            command,
        } => block_on(projections_cmd::run(store, args, command)),
        Command::Bench(command) => block_on(bench_cmd::run(command)),
        Command::Ehr(command) => block_on(ehr_cmd::run(command)),
        Command::Compliance(command) => chartline::compliance_cmd::run(command),
        Command::Serve { store, args } => block_on(serve_cmd::run(args, store.url)),
        Command::Send(args) => block_on(send_cmd::run(args)),
        Command::Soak(args) => block_on(soak_cmd::run(args)),
        Command::Token(command) => token_cmd::run(command),
        Command::Demo { store, args } => block_on(demo_cmd::run(args, store.url)),
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
