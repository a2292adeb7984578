//! `chartline fhir …` and `chartline sandbox-ehr`: the EHR connector's operator CLI.
//!
//! - `fhir export --encounter ID` prints the FHIR R4 `transaction` Bundle of what the
//!   connector writes for that encounter (read from the event store; nothing is sent);
//!   `fhir export --patient ID --rpm` the patient's RPM readings as Observations.
//! - `fhir retry --encounter ID --artifact NAME --ehr-url URL` replays one write-back
//!   (after a dead one was fixed) and records the outcome.
//! - `fhir reconcile [--since DURATION] --ehr-url URL` reads back what the EHR holds for
//!   artifacts acknowledged within DURATION (default 24h), records `EhrDriftDetected`
//!   for each new difference and prints every open one.
//! - `sandbox-ehr` runs the stand-in FHIR server (not a real EHR; see docs/ehr.md).
//!
//! Exit codes: 0 ok; 1 unavailable/internal or the write failed; 2 bad input or unknown
//! encounter; 3 (`reconcile`) drift is open in the EHR.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use chartline_ehr_connector::fhir::{EncounterRecord, parse_artifact, transaction_bundle};
use chartline_ehr_connector::sandbox::smart::{RegisteredClient, SandboxSmart};
use chartline_ehr_connector::{
    Connector, EhrEndpoint, FhirClient, JobOutcome, SandboxConfig, SandboxEhr,
};
use chartline_infra::AnyStore;
use chartline_infra::store::{DEFAULT_STORE_URL, read_whole_stream};
use chartline_proto::codec::decode;
use chartline_proto::{StreamId, TenantId};
use clap::{Args, Subcommand};
use uuid::Uuid;

const EXIT_BAD_INPUT: u8 = 2;
const EXIT_DRIFT: u8 = 3;

#[derive(Subcommand)]
pub enum EhrCommand {
    /// FHIR R4 views of recorded encounters, and write-back replays.
    #[command(subcommand)]
    Fhir(FhirCommand),
    /// Run the sandbox EHR: a stand-in FHIR R4 server with fault injection (not a real EHR).
    SandboxEhr(SandboxArgs),
}

#[derive(Subcommand)]
pub enum FhirCommand {
    /// Print a transaction Bundle: an encounter's resources (`--encounter ID`), or a
    /// patient's RPM readings as vital-signs Observations (`--patient ID --rpm`).
    Export {
        #[arg(long, required_unless_present = "patient", conflicts_with = "patient")]
        encounter: Option<Uuid>,
        #[arg(long, requires = "rpm")]
        patient: Option<Uuid>,
        /// With --patient: export RPM Observations.
        #[arg(long, requires = "patient")]
        rpm: bool,
        #[arg(long, default_value = "default")]
        tenant: String,
        #[arg(long = "store", env = "CHARTLINE_STORE_URL", default_value = DEFAULT_STORE_URL)]
        store: String,
    },
    /// Read back what the EHR holds for recently acknowledged artifacts; record and
    /// print drift (deleted, status changed, changed by someone else, note missing).
    Reconcile {
        /// Check artifacts acknowledged within this long (90s, 15m, 24h, 7d).
        #[arg(long, default_value = "24h", value_parser = chartline_ehr_connector::reconcile::parse_duration)]
        since: Duration,
        #[arg(long = "store", env = "CHARTLINE_STORE_URL", default_value = DEFAULT_STORE_URL)]
        store: String,
        #[arg(long, env = "CHARTLINE_EHR_URL")]
        ehr_url: String,
        #[arg(long, env = "CHARTLINE_EHR_TOKEN", hide_env_values = true)]
        ehr_token: Option<String>,
        #[command(flatten)]
        ehr_smart: chartline::serve_cmd::EhrSmartArgs,
    },
    /// Replay one write-back now (e.g. after fixing what made it dead).
    Retry {
        #[arg(long)]
        encounter: Uuid,
        /// appointment | encounter | document-reference | charge-item | task:<uuid>
        #[arg(long)]
        artifact: String,
        #[arg(long, default_value = "default")]
        tenant: String,
        #[arg(long = "store", env = "CHARTLINE_STORE_URL", default_value = DEFAULT_STORE_URL)]
        store: String,
        #[arg(long, env = "CHARTLINE_EHR_URL")]
        ehr_url: String,
        #[arg(long, env = "CHARTLINE_EHR_TOKEN", hide_env_values = true)]
        ehr_token: Option<String>,
        #[command(flatten)]
        ehr_smart: chartline::serve_cmd::EhrSmartArgs,
    },
}

#[derive(Args)]
pub struct SandboxArgs {
    #[arg(long, default_value = "127.0.0.1:8090")]
    pub listen: String,
    /// SQLite database of the sandbox (its own, not the event store).
    #[arg(long = "db", default_value = "sqlite://data/sandbox-ehr.db")]
    pub database: String,
    /// Require this static bearer token on FHIR requests.
    #[arg(long, env = "CHARTLINE_SANDBOX_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Register a SMART Backend Services client, `CLIENT_ID=JWK_FILE` (a public JWK or
    /// JWKS); repeatable. With any, FHIR requests need an access token from
    /// `POST /auth/token`.
    #[arg(long = "smart-client", value_name = "CLIENT_ID=JWK_FILE")]
    pub smart_clients: Vec<String>,
    /// Lifetime of issued SMART access tokens, in seconds.
    #[arg(long, default_value_t = 300)]
    pub smart_token_lifetime: u64,
}

pub async fn run(command: EhrCommand) -> anyhow::Result<ExitCode> {
    match command {
        EhrCommand::Fhir(FhirCommand::Export {
            encounter,
            patient,
            rpm: _,
            tenant,
            store,
        }) => match (encounter, patient) {
            (Some(encounter), _) => export(encounter, &tenant, &store).await,
            (None, Some(patient)) => export_rpm(patient, &tenant, &store).await,
            (None, None) => Ok(ExitCode::from(EXIT_BAD_INPUT)),
        },
        EhrCommand::Fhir(FhirCommand::Retry {
            encounter,
            artifact,
            tenant,
            store,
            ehr_url,
            ehr_token,
            ehr_smart,
        }) => {
            let Some(artifact) = parse_artifact(&artifact) else {
                eprintln!("unknown artifact {artifact:?}");
                return Ok(ExitCode::from(EXIT_BAD_INPUT));
            };
            let tenant = TenantId::parse(&tenant)?;
            let (store, client) = open_connector(&store, ehr_url, ehr_token, &ehr_smart).await?;
            let outcome = Connector::new(store, client)
                .retry_write_back(&tenant, encounter, artifact)
                .await;
            println!("{outcome:?}");
            Ok(match outcome {
                JobOutcome::Acknowledged { .. } | JobOutcome::UpToDate => ExitCode::SUCCESS,
                JobOutcome::NotDue | JobOutcome::Parked(_) => ExitCode::from(EXIT_BAD_INPUT),
                _ => ExitCode::FAILURE,
            })
        }
        EhrCommand::Fhir(FhirCommand::Reconcile {
            since,
            store,
            ehr_url,
            ehr_token,
            ehr_smart,
        }) => {
            let (store, client) = open_connector(&store, ehr_url, ehr_token, &ehr_smart).await?;
            let connector = Connector::new(store.clone(), client);
            let mut reconciler =
                chartline_ehr_connector::reconcile::Reconciler::new(store, connector);
            let report = reconciler.run_once(since, chrono::Utc::now()).await;
            println!(
                "checked {} encounters, {} acknowledged artifacts: {} drift findings open, {} newly recorded",
                report.encounters,
                report.artifacts,
                report.drift.len(),
                report.recorded()
            );
            for drift in &report.drift {
                println!(
                    "{} encounter {} {} ({} v{}): {} {}: expected {:?}, found {:?}{}",
                    drift.tenant,
                    drift.encounter_id,
                    drift.artifact,
                    drift.acknowledged,
                    drift.acknowledged_version,
                    serde_json::to_string(&drift.finding.kind)?.trim_matches('"'),
                    drift.finding.resource,
                    drift.finding.expected,
                    drift.finding.found,
                    if drift.new { " (recorded now)" } else { "" }
                );
            }
            for error in &report.errors {
                eprintln!("error: {error}");
            }
            Ok(if !report.errors.is_empty() {
                ExitCode::FAILURE
            } else if !report.drift.is_empty() {
                ExitCode::from(EXIT_DRIFT)
            } else {
                ExitCode::SUCCESS
            })
        }
        EhrCommand::SandboxEhr(args) => {
            let mut clients = Vec::new();
            for registration in &args.smart_clients {
                let Some((client_id, path)) = registration.split_once('=') else {
                    eprintln!("--smart-client wants CLIENT_ID=JWK_FILE, got {registration:?}");
                    return Ok(ExitCode::from(EXIT_BAD_INPUT));
                };
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading the JWK file {path}"))?;
                clients.push(
                    RegisteredClient::from_jwk_json(client_id, &text)
                        .map_err(anyhow::Error::msg)
                        .with_context(|| path.to_string())?,
                );
            }
            let smart = (!clients.is_empty()).then(|| SandboxSmart {
                clients,
                token_lifetime: Duration::from_secs(args.smart_token_lifetime),
            });
            let sandbox = SandboxEhr::build(
                &args.listen,
                SandboxConfig {
                    database_url: args.database.clone(),
                    bearer_token: args.token,
                    smart,
                },
            )
            .await
            .map_err(anyhow::Error::msg)?;
            eprintln!(
                "sandbox EHR (a stand-in, not a real EHR) serving FHIR R4 at {} with {}",
                sandbox.base_url(),
                args.database
            );
            sandbox
                .run_until_stopped(chartline::serve_cmd::termination())
                .await?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn export(encounter: Uuid, tenant: &str, store_url: &str) -> anyhow::Result<ExitCode> {
    let tenant = TenantId::parse(tenant)?;
    let store = AnyStore::open(store_url)
        .await
        .with_context(|| format!("opening event store {store_url}"))?;
    let stream = StreamId::for_aggregate("encounter", encounter);
    let history = read_whole_stream(&store, &tenant, &stream).await?;
    if history.is_empty() {
        eprintln!("no encounter {encounter} in tenant {tenant}");
        return Ok(ExitCode::from(EXIT_BAD_INPUT));
    }
    let events = history
        .iter()
        .map(decode)
        .collect::<Result<Vec<_>, _>>()
        .context("decoding the encounter stream")?;
    let record = EncounterRecord::from_events(tenant.as_str(), &events);
    println!(
        "{}",
        serde_json::to_string_pretty(&transaction_bundle(&record))?
    );
    Ok(ExitCode::SUCCESS)
}

async fn export_rpm(patient: Uuid, tenant: &str, store_url: &str) -> anyhow::Result<ExitCode> {
    let tenant = TenantId::parse(tenant)?;
    let store = AnyStore::open(store_url)
        .await
        .with_context(|| format!("opening event store {store_url}"))?;
    let observations =
        chartline_ehr_connector::reactor::patient_rpm_observations(&store, &tenant, patient)
            .await
            .map_err(anyhow::Error::msg)?;
    println!(
        "{}",
        serde_json::to_string_pretty(&chartline_ehr_connector::fhir::bundle_of(&observations))?
    );
    Ok(ExitCode::SUCCESS)
}

/// The event store and an authenticated FHIR client, as `fhir retry` and `fhir
/// reconcile` both need them.
async fn open_connector(
    store: &str,
    ehr_url: String,
    ehr_token: Option<String>,
    ehr_smart: &chartline::serve_cmd::EhrSmartArgs,
) -> anyhow::Result<(AnyStore, FhirClient)> {
    let store = AnyStore::open(store)
        .await
        .context("opening the event store")?;
    let auth = ehr_smart.auth(&ehr_url, ehr_token.as_deref(), None).await?;
    let client = FhirClient::new(EhrEndpoint {
        base_url: ehr_url,
        auth,
        timeout: Duration::from_secs(10),
    })?;
    Ok((store, client))
}
