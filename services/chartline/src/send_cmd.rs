//! `chartline send SERVICE COMMAND PAYLOAD`: one command through the real command path
//! over NATS (the way an external system sends it), printing the typed reply. Exit 0
//! when accepted, 5 when rejected, 1 when unavailable.

use std::process::ExitCode;
use std::time::Duration;

use chartline_infra::bus::Bus;
use chartline_infra::command::send_command;
use chartline_proto::commands::{CommandReply, CommandRequest, RejectionCode};
use chartline_proto::{Actor, ActorKind, TenantId};
use clap::Args;
use uuid::Uuid;

#[derive(Args)]
pub struct SendArgs {
    /// Service name (scheduling, consultation, documentation, billing, rpm, identity).
    pub service: String,
    /// Command name (schedule, check_in, …).
    pub command: String,
    /// Payload JSON: the command's fields plus the target id (encounter_id, …).
    pub payload: String,
    #[arg(
        long,
        env = "CHARTLINE_NATS_URL",
        default_value = "nats://127.0.0.1:4222"
    )]
    pub nats: String,
    #[arg(long, default_value = "default")]
    pub tenant: String,
    /// Idempotency key; re-send the same id to retry safely.
    #[arg(long)]
    pub command_id: Option<Uuid>,
    #[arg(long, default_value = "staff")]
    pub actor_kind: String,
    #[arg(long, default_value = "cli-operator")]
    pub actor_id: String,
    #[arg(long, default_value = "chartline", hide = true)]
    pub subject_root: String,
    #[arg(long, default_value_t = 10)]
    pub timeout_seconds: u64,
}

pub async fn run(args: SendArgs) -> anyhow::Result<ExitCode> {
    let tenant = TenantId::parse(&args.tenant)?;
    let payload: serde_json::Value = serde_json::from_str(&args.payload)
        .map_err(|e| anyhow::anyhow!("payload is not JSON: {e}"))?;
    let actor_kind: ActorKind =
        serde_json::from_value(serde_json::Value::String(args.actor_kind.clone()))
            .map_err(|_| anyhow::anyhow!("unknown actor kind {}", args.actor_kind))?;
    let bus = Bus::connect_nats(&args.nats).await?;
    let request = CommandRequest {
        command_id: args.command_id.unwrap_or_else(Uuid::now_v7),
        actor: Actor::new(actor_kind, args.actor_id),
        correlation_id: None,
        payload,
    };
    let reply = send_command(
        &bus,
        &args.subject_root,
        &tenant,
        &args.service,
        &args.command,
        &request,
        Duration::from_secs(args.timeout_seconds),
    )
    .await;
    println!("{}", serde_json::to_string_pretty(&reply)?);
    Ok(match reply {
        CommandReply::Accepted { .. } => ExitCode::SUCCESS,
        CommandReply::Rejected {
            code: RejectionCode::Unavailable,
            ..
        } => ExitCode::FAILURE,
        CommandReply::Rejected { .. } => ExitCode::from(5),
    })
}
