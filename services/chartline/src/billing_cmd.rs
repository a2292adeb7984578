//! `chartline billing …`: evaluate billing scenarios against the shipped, bitemporal
//! policy history without any store, and list the policy versions.
//!
//! Thin by design: JSON in, the pure evaluator from `chartline-domain`, JSON out. Bad
//! input exits with status 2 and a message naming the scenario and field; nothing is
//! printed to stdout then, so a pipeline never sees half a batch.

use std::io::Read;
use std::process::ExitCode;

use anyhow::Context;
use chartline_domain::billing::{
    Decision, EvaluationError, PolicyHistory, RuleSet, Scenario, evaluate,
};
use chartline_proto::billing_policy::shipped_policy_history;
use chrono::NaiveDate;
use clap::Subcommand;
use serde::Serialize;
use serde_json::{Value, json};

#[derive(Subcommand)]
pub enum BillingCommand {
    /// Evaluate one scenario or an array of scenarios from a JSON file (`-` = stdin).
    Evaluate {
        /// JSON file with one scenario object or an array of them; `-` reads stdin.
        file: String,
        /// Evaluate with the policy as it was known on this day (YYYY-MM-DD).
        /// Default: today (UTC).
        #[arg(long, value_parser = parse_day)]
        known_at: Option<NaiveDate>,
    },
    /// The recorded billing decisions of a real encounter: codes, policy version, rule
    /// trace, hold reasons, revisions and release, oldest first.
    Explain {
        #[arg(long)]
        encounter: uuid::Uuid,
        #[arg(long, default_value = "default")]
        tenant: String,
        /// Event store URL (default: the embedded SQLite file).
        #[arg(long = "store", env = "CHARTLINE_STORE_URL", default_value = chartline_infra::store::DEFAULT_STORE_URL)]
        store: String,
        #[arg(long)]
        json: bool,
    },
    /// List the policy versions: number, recorded date, rule set changed, rule counts.
    Policies {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

fn parse_day(text: &str) -> Result<NaiveDate, String> {
    NaiveDate::parse_from_str(text, "%Y-%m-%d")
        .map_err(|_| format!("{text:?} is not a calendar date YYYY-MM-DD"))
}

/// Exit status for rejected input (as `EX_DATAERR`-style tools do, distinct from 1).
const BAD_INPUT: u8 = 2;

/// `billing explain`: reads the encounter's coding events from the store.
fn explain(
    encounter: uuid::Uuid,
    tenant: &str,
    store_url: &str,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let tenant = chartline_proto::TenantId::parse(tenant)?;
    let stream = chartline_proto::StreamId::for_aggregate("encounter", encounter);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let decisions = runtime.block_on(async {
        let store = chartline_infra::AnyStore::open(store_url).await?;
        anyhow::Ok(chartline_billing::recorded_decisions(&store, &tenant, &stream).await?)
    })?;
    if decisions.is_empty() {
        eprintln!("error: no billing decision is recorded for {stream} (tenant {tenant})");
        return Ok(ExitCode::from(BAD_INPUT));
    }
    if json {
        let list: Vec<_> = decisions
            .iter()
            .map(|e| {
                serde_json::json!({
                    "event_type": e.event_type,
                    "version": e.stream_version,
                    "recorded_at": e.recorded_at,
                    "actor": e.metadata.actor,
                    "decision": e.data,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(ExitCode::SUCCESS);
    }
    for event in &decisions {
        let data = &event.data;
        println!(
            "{} (stream version {}, recorded {}, by {} {})",
            event.event_type,
            event.stream_version,
            event.recorded_at.to_rfc3339(),
            serde_json::to_value(event.metadata.actor.kind)?
                .as_str()
                .unwrap_or_default(),
            event.metadata.actor.id
        );
        if event.event_type == "ChargeReleased" {
            println!("  released codes {}", data["codes"]);
            continue;
        }
        println!("  policy version {}", data["policy_version"]);
        println!(
            "  outcome        {}",
            data["outcome"]["outcome"].as_str().unwrap_or("?")
        );
        if let Some(codes) = data["outcome"]["codes"].as_array() {
            for code in codes {
                println!(
                    "    {} modifiers {} POS {} units {}",
                    code["code"].as_str().unwrap_or_default(),
                    code["modifiers"],
                    code["pos"].as_str().unwrap_or_default(),
                    code["units"]
                );
            }
        }
        if let Some(reasons) = data["outcome"]["reasons"].as_array() {
            for reason in reasons {
                println!("    reason: {}", reason.as_str().unwrap_or_default());
            }
        }
        if let Some(trace) = data["rule_trace"].as_array() {
            println!("  rule trace");
            for rule in trace {
                println!("    {}", rule.as_str().unwrap_or_default());
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn run(command: BillingCommand) -> anyhow::Result<ExitCode> {
    let history = shipped_policy_history().context("loading the shipped billing policy")?;
    match command {
        BillingCommand::Evaluate { file, known_at } => {
            let known_at = known_at.unwrap_or_else(|| chrono::Utc::now().date_naive());
            let text = read_input(&file)?;
            match evaluate_text(&text, &history, known_at)? {
                Ok(output) => {
                    println!("{}", serde_json::to_string_pretty(&output)?);
                    Ok(ExitCode::SUCCESS)
                }
                Err(errors) => {
                    for error in errors {
                        eprintln!("error: {error}");
                    }
                    Ok(ExitCode::from(BAD_INPUT))
                }
            }
        }
        BillingCommand::Explain {
            encounter,
            tenant,
            store,
            json,
        } => explain(encounter, &tenant, &store, json),
        BillingCommand::Policies { json } => {
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&policies_json(&history))?
                );
            } else {
                print!("{}", policies_table(&history));
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn read_input(file: &str) -> anyhow::Result<String> {
    let mut text = String::new();
    if file == "-" {
        std::io::stdin()
            .read_to_string(&mut text)
            .context("reading scenarios from stdin")?;
    } else {
        text = std::fs::read_to_string(file).with_context(|| format!("reading {file}"))?;
    }
    Ok(text)
}

/// What `evaluate` prints: one decision for one scenario, an array for an array.
#[derive(Serialize)]
#[serde(untagged)]
enum Evaluated {
    Single(Decision),
    Batch(Vec<Decision>),
}

/// Evaluates every scenario in `text`. On bad input: `Ok(Err(messages))` with every
/// message (prefixed with the array index for batches) and no decisions. A policy that
/// cannot answer (none known on `known_at`, or defective) is an `Err`.
fn evaluate_text(
    text: &str,
    history: &PolicyHistory,
    known_at: NaiveDate,
) -> anyhow::Result<Result<Evaluated, Vec<String>>> {
    let input: Value = match serde_json::from_str(text) {
        Ok(input) => input,
        Err(error) => return Ok(Err(vec![format!("input is not JSON: {error}")])),
    };
    let (items, batch) = match input {
        Value::Array(items) => (items, true),
        single => (vec![single], false),
    };
    let mut decisions = Vec::with_capacity(items.len());
    let mut errors = Vec::new();
    for (index, item) in items.iter().enumerate() {
        let prefix = if batch {
            format!("scenario [{index}]: ")
        } else {
            String::new()
        };
        let decision = Scenario::from_json(item)
            .map_err(Into::into)
            .and_then(|scenario| evaluate(&scenario, history, known_at));
        match decision {
            Ok(decision) => decisions.push(decision),
            Err(EvaluationError::InvalidScenario(error)) => errors.push(format!("{prefix}{error}")),
            // Not the input's fault: no policy known then, or a defective policy.
            Err(error) => anyhow::bail!("{prefix}{error}"),
        }
    }
    if !errors.is_empty() {
        return Ok(Err(errors));
    }
    Ok(Ok(match (batch, decisions.pop()) {
        (false, Some(decision)) => Evaluated::Single(decision),
        (_, last) => {
            decisions.extend(last);
            Evaluated::Batch(decisions)
        }
    }))
}

fn policies_json(history: &PolicyHistory) -> Value {
    Value::Array(
        history
            .versions()
            .iter()
            .map(|version| {
                json!({
                    "version": version.version,
                    "recorded_at": version.recorded_at,
                    "changed_rule_set": version.changed_rule_set.as_str(),
                    "summary": version.summary,
                    "rule_count": version.rules.len(),
                    "medicare_rules": version.rule_count(RuleSet::Medicare),
                    "commercial_default_rules": version.rule_count(RuleSet::CommercialDefault),
                })
            })
            .collect(),
    )
}

fn policies_table(history: &PolicyHistory) -> String {
    let mut out = String::from("version  recorded_at  rule_set            rules  summary\n");
    for version in history.versions() {
        out.push_str(&format!(
            "{:>7}  {}   {:<18}  {:>5}  {}\n",
            version.version,
            version.recorded_at,
            version.changed_rule_set.as_str(),
            version.rules.len(),
            version.summary
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn day(text: &str) -> NaiveDate {
        parse_day(text).unwrap()
    }

    fn history() -> PolicyHistory {
        shipped_policy_history().unwrap()
    }

    fn decisions(input: &str, known_at: &str) -> Value {
        match evaluate_text(input, &history(), day(known_at)).unwrap() {
            Ok(evaluated) => serde_json::to_value(evaluated).unwrap(),
            Err(errors) => panic!("unexpected bad input: {errors:?}"),
        }
    }

    fn bad_input(input: &str) -> Vec<String> {
        match evaluate_text(input, &history(), day("2026-03-01")).unwrap() {
            Ok(_) => panic!("expected bad input"),
            Err(errors) => errors,
        }
    }

    #[test]
    fn evaluates_a_batch_with_the_policy_known_then() {
        let input = r#"[
          {"date_of_service":"2025-10-15","payer":"medicare","service":"e_m_visit",
           "patient_status":"established","level":3,"modality":"video",
           "patient_location":"home","site":"physician_office"},
          {"date_of_service":"2025-10-15","payer":"commercial","service":"e_m_visit",
           "patient_status":"established","level":3,"modality":"video",
           "patient_location":"home","site":"physician_office"}
        ]"#;
        let output = decisions(input, "2025-10-15");
        assert_eq!(output[0]["outcome"], "hold");
        assert_eq!(output[0]["policy_version"], 4);
        assert_eq!(output[1]["outcome"], "billable");
        assert_eq!(
            output[1]["codes"],
            json!([{"code":"99213","modifiers":["95"],"pos":"10","units":1}])
        );
        let later = decisions(input, "2025-11-20");
        assert_eq!(later[0]["outcome"], "billable");
        assert_eq!(later[0]["policy_version"], 7);
    }

    #[test]
    fn bad_input_names_the_index_and_field_and_returns_no_decisions() {
        let input = r#"[
          {"date_of_service":"2025-06-01","payer":"medicare","service":"virtual_check_in",
           "patient_status":"established","modality":"audio_only",
           "patient_location":"home","site":"physician_office"},
          {"date_of_service":"2025-06-01","payer":"medicare","service":"e_m_visit",
           "patient_status":"established","level":7,"modality":"video",
           "patient_location":"home","site":"physician_office"}
        ]"#;
        let errors = bad_input(input);
        assert_eq!(
            errors,
            vec!["scenario [1]: field `level`: E/M level 7 is not 1-5".to_owned()]
        );
        let errors = bad_input("{");
        assert!(errors[0].starts_with("input is not JSON"), "{errors:?}");
        let single = r#"{"date_of_service":"2025-06-01","payer":"medicare","service":"rpm_month"}"#;
        assert_eq!(
            bad_input(single),
            vec!["field `site` is missing".to_owned()]
        );
    }

    #[test]
    fn no_policy_known_then_is_not_an_input_error() {
        let scenario = r#"{"date_of_service":"2025-06-01","payer":"medicare","service":"virtual_check_in",
           "patient_status":"established","modality":"video","patient_location":"home",
           "site":"physician_office"}"#;
        let error = evaluate_text(scenario, &history(), day("2024-12-31"))
            .err()
            .unwrap();
        assert_eq!(
            error.to_string(),
            "no billing policy was known on 2024-12-31 (the first version was recorded 2025-01-01)"
        );
        let single = decisions(scenario, "2025-06-01");
        assert_eq!(single["codes"][0]["code"], "98016");
    }

    #[test]
    fn policies_lists_every_version() {
        let table = policies_table(&history());
        assert_eq!(table.lines().count(), 10, "{table}");
        let listed = policies_json(&history());
        assert_eq!(listed[8]["version"], 9);
        assert_eq!(listed[8]["recorded_at"], "2026-02-03");
    }
}
