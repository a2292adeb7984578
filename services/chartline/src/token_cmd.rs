//! `chartline token issue --tenant T --role R [--sub S] [--ttl 8h]`: signs an API bearer
//! token with the configured secret (`CHARTLINE_JWT_SECRET`, or the local development
//! secret in `data/dev-jwt-secret`). For operators and tests.

use std::process::ExitCode;

use chartline_api::auth::{Claims, Role, issue};
use chartline_proto::TenantId;
use clap::Subcommand;

#[derive(Subcommand)]
pub enum TokenCommand {
    /// Issue a bearer token.
    Issue {
        #[arg(long)]
        tenant: String,
        /// Repeatable: clinician, billing, auditor, ops, platform.
        #[arg(long = "role", required = true)]
        roles: Vec<String>,
        #[arg(long, default_value = "operator")]
        sub: String,
        /// Lifetime: e.g. 30m, 8h, 7d.
        #[arg(long, default_value = "8h")]
        ttl: String,
    },
}

fn parse_ttl(ttl: &str) -> Option<i64> {
    let (number, unit) = ttl.split_at(ttl.len().checked_sub(1)?);
    let number: i64 = number.parse().ok()?;
    let seconds = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3_600,
        "d" => 86_400,
        _ => return None,
    };
    (number > 0).then_some(number * seconds)
}

pub fn run(command: TokenCommand) -> anyhow::Result<ExitCode> {
    let TokenCommand::Issue {
        tenant,
        roles,
        sub,
        ttl,
    } = command;
    let tenant = TenantId::parse(&tenant)?;
    let roles = roles
        .iter()
        .map(|r| serde_json::from_value::<Role>(serde_json::Value::String(r.clone())))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| anyhow::anyhow!("roles are clinician, billing, auditor, ops, platform"))?;
    let ttl =
        parse_ttl(&ttl).ok_or_else(|| anyhow::anyhow!("--ttl must look like 30m, 8h or 7d"))?;
    let now = chrono::Utc::now().timestamp();
    let secret = chartline::serve_cmd::jwt_secret()?;
    println!(
        "{}",
        issue(
            &secret,
            &Claims {
                sub,
                tenant,
                roles,
                iat: now,
                exp: now + ttl,
            }
        )
    );
    Ok(ExitCode::SUCCESS)
}
