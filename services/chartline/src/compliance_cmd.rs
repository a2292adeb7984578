//! `chartline compliance map`: prints the compliance map — every external component,
//! whether it handles PHI, its BAA coverage, and every data flow with its coverage as
//! of now (or `--at DATE`) — flagging PHI flows to uncovered components, which the
//! services refuse (docs/ehr.md, "Compliance map").
//!
//! The map comes from `--map FILE` / `CHARTLINE_COMPLIANCE_MAP` (also settable as
//! `compliance_map = "…"` in the `--config` file), else the shipped default
//! (`compliance/default.toml`).
//!
//! Exit codes: 0 every PHI flow is covered; 1 some PHI flow is blocked (uncovered);
//! 2 the map file is unreadable or invalid.

use std::fmt::Write as _;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use chartline_domain::compliance::{ComplianceMap, ComplianceView, Coverage};
use chartline_proto::compliance_map::{default_compliance_map, parse_compliance_map};
use chrono::{DateTime, NaiveDate, Utc};
use clap::Subcommand;

#[derive(Subcommand)]
pub enum ComplianceCommand {
    /// Print every component and data flow with its BAA coverage.
    Map {
        /// Compliance map TOML (default: the shipped map for the embedded deployment).
        #[arg(long = "map", env = "CHARTLINE_COMPLIANCE_MAP")]
        map: Option<std::path::PathBuf>,
        /// Evaluate coverage on this day (YYYY-MM-DD, UTC) or instant (RFC 3339).
        #[arg(long)]
        at: Option<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// The map from a file, or the shipped default.
pub fn load_map(path: Option<&Path>) -> anyhow::Result<ComplianceMap> {
    match path {
        None => Ok(default_compliance_map()),
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading the compliance map {}", path.display()))?;
            parse_compliance_map(&text)
                .with_context(|| format!("compliance map {}", path.display()))
        }
    }
}

/// `YYYY-MM-DD` (start of that UTC day) or RFC 3339.
pub fn parse_at(text: &str) -> anyhow::Result<DateTime<Utc>> {
    if let Ok(day) = NaiveDate::parse_from_str(text, "%Y-%m-%d") {
        return Ok(day.and_hms_opt(0, 0, 0).context("midnight")?.and_utc());
    }
    Ok(DateTime::parse_from_rfc3339(text)
        .with_context(|| format!("--at {text:?}: use YYYY-MM-DD or RFC 3339"))?
        .with_timezone(&Utc))
}

fn coverage_text(coverage: &Coverage) -> String {
    match coverage {
        Coverage::Covered {
            baa_effective_to: Some(to),
        } => format!("covered (BAA through {to})"),
        Coverage::Covered {
            baa_effective_to: None,
        } => "covered (BAA open-ended)".into(),
        Coverage::NotCovered { reason } => format!("NOT COVERED: {reason}"),
    }
}

/// The human-readable map.
pub fn render_table(view: &ComplianceView) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "Compliance map as of {}", view.at.to_rfc3339());
    let _ = writeln!(out, "\nComponents:");
    for c in &view.components {
        let _ = writeln!(
            out,
            "  {:<26} {:<18} phi={:<5} {}{}",
            c.id,
            c.kind.as_str(),
            c.handles_phi,
            coverage_text(&c.coverage),
            c.endpoint
                .as_deref()
                .map(|e| format!("  [{e}]"))
                .unwrap_or_default()
        );
    }
    let _ = writeln!(out, "\nData flows:");
    for f in &view.flows {
        let data: Vec<&str> = f.data.iter().map(|d| d.as_str()).collect();
        let _ = writeln!(
            out,
            "  {} {} -> {} [{}] phi={} {}",
            if f.blocked { "!!" } else { "ok" },
            f.from,
            f.to,
            data.join(", "),
            f.carries_phi,
            coverage_text(&f.coverage)
        );
    }
    let _ = writeln!(
        out,
        "\n{} PHI flow(s) to uncovered components (refused while so).",
        view.blocked_phi_flows
    );
    out
}

pub fn run(command: ComplianceCommand) -> anyhow::Result<ExitCode> {
    let ComplianceCommand::Map { map, at, json } = command;
    let map = match load_map(map.as_deref()) {
        Ok(map) => map,
        Err(error) => {
            eprintln!("error: {error:#}");
            return Ok(ExitCode::from(2));
        }
    };
    let at = match at.as_deref().map(parse_at).transpose() {
        Ok(at) => at.unwrap_or_else(Utc::now),
        Err(error) => {
            eprintln!("error: {error:#}");
            return Ok(ExitCode::from(2));
        }
    };
    let view = map.flows_at(at);
    if json {
        println!("{}", serde_json::to_string_pretty(&view)?);
    } else {
        print!("{}", render_table(&view));
    }
    Ok(if view.blocked_phi_flows == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_map_prints_every_component_and_flow_and_flags_uncovered_phi() {
        let map = load_map(None).unwrap();
        let now = parse_at("2026-11-01").unwrap();
        let table = render_table(&map.flows_at(now));
        for component in &map.components {
            assert!(table.contains(&component.id), "{table}");
        }
        assert_eq!(table.matches("\n  ok ").count(), map.flows.len(), "{table}");
        assert!(table.contains("0 PHI flow(s) to uncovered components"));

        let dir = std::env::temp_dir().join(format!("chartline_cm_{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("map.toml");
        std::fs::write(
            &path,
            r#"
[[component]]
id = "vendor-ehr"
name = "Vendor EHR"
kind = "ehr"
handles_phi = true
baa = { effective_from = "2025-01-01", effective_to = "2026-06-30" }

[[flow]]
from = "ehr-connector"
to = "vendor-ehr"
data = ["clinical_documentation"]
"#,
        )
        .unwrap();
        let map = load_map(Some(&path)).unwrap();
        let before = map.flows_at(parse_at("2026-06-30T23:00:00Z").unwrap());
        assert_eq!(before.blocked_phi_flows, 0);
        let after = map.flows_at(parse_at("2026-07-01").unwrap());
        let table = render_table(&after);
        assert!(table.contains("!! ehr-connector -> vendor-ehr"), "{table}");
        assert!(table.contains("NOT COVERED: its BAA expired after 2026-06-30"));
        let json = serde_json::to_value(&after).unwrap();
        assert_eq!(json["blocked_phi_flows"], 1);
        assert_eq!(json["flows"][0]["coverage"]["status"], "not_covered");
        std::fs::write(&path, "[[component]]\nid = \"x\"\n").unwrap();
        assert!(load_map(Some(&path)).is_err());
        let _ = std::fs::remove_dir_all(dir);
    }
}
