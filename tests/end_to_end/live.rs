//! Subscriptions through standard, unmodified clients: graphql-ws's `createClient` (the
//! reference graphql-transport-ws implementation, in Node) and the ops dashboard in
//! headless Chromium (Debian's package, driven by playwright-core). Both live in
//! `tests/browser/`, installed by `scripts/ensure-browser.sh` (part of `make test`).
//!
//! What is proven: every notification arrives after every running projection has
//! committed its position (the client re-queries the checkpoints the moment it is
//! notified); each encounter event is delivered once, in version order; another tenant's
//! subscriber receives nothing; a connection without a token is refused in
//! `connection_init`; RPM alerts need a PHI role and each delivery is a recorded PHI
//! read; the dashboard updates without a reload.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use chartline::scenario::{self, Step};
use chartline_api::auth::Role;
use chartline_infra::store::read_whole_stream;
use chartline_proto::commands::CommandReply;
use chartline_proto::{Actor, ActorKind, StreamId};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::api::{App, gql, spawn_app, spawn_app_with, token};
use crate::embedded::{reference_visit, run_lifecycle, tenant};

fn browser_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("browser");
    assert!(
        dir.join("node_modules").exists(),
        "tests/browser/node_modules is missing: run `bash scripts/ensure-browser.sh` \
         (make test does) to install Node, Chromium and the standard clients"
    );
    dir
}

/// A Node script of `tests/browser/` whose stdout lines are JSON.
struct NodeScript {
    child: Child,
    lines: mpsc::UnboundedReceiver<Value>,
}

impl NodeScript {
    fn spawn(script: &str, args: &[String]) -> NodeScript {
        let dir = browser_dir();
        let mut child = Command::new("node")
            .arg(dir.join(script))
            .args(args)
            .current_dir(&dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("node is installed (scripts/ensure-browser.sh)");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut reader = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                let value = serde_json::from_str(&line).unwrap_or(json!({ "raw": line }));
                if tx.send(value).is_err() {
                    break;
                }
            }
        });
        NodeScript { child, lines }
    }

    /// The next line, or `None` after `wait`.
    async fn next(&mut self, wait: Duration) -> Option<Value> {
        tokio::time::timeout(wait, self.lines.recv())
            .await
            .ok()
            .flatten()
    }

    /// Lines until one matches `done` (panics with everything seen after `wait`).
    async fn until(&mut self, wait: Duration, done: impl Fn(&Value) -> bool) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next(left).await {
                Some(line) => {
                    let stop = done(&line);
                    seen.push(line);
                    if stop {
                        return seen;
                    }
                }
                None => panic!("timed out; lines so far: {seen:#?}"),
            }
        }
    }
}

fn ws_client(
    app: &App,
    token: Option<&str>,
    subscriptions: &[&str],
    probe: Option<(&str, &str)>,
) -> NodeScript {
    let mut args = vec![
        "--url".to_string(),
        format!("ws://127.0.0.1:{}/graphql", app.port),
        "--timeout-ms".into(),
        "60000".into(),
    ];
    if let Some(token) = token {
        args.extend(["--token".into(), token.to_string()]);
    }
    for query in subscriptions {
        args.extend(["--subscribe".into(), query.to_string()]);
    }
    if let Some((query, probe_token)) = probe {
        args.extend([
            "--probe".into(),
            query.into(),
            "--http".into(),
            format!("http://127.0.0.1:{}/graphql", app.port),
            "--probe-token".into(),
            probe_token.into(),
        ]);
    }
    NodeScript::spawn("ws-client.mjs", &args)
}

async fn connected(client: &mut NodeScript) {
    client
        .until(Duration::from_secs(20), |l| l["connected"] == true)
        .await;
    // graphql-ws sends its subscribe messages right after the ack; let them land.
    tokio::time::sleep(Duration::from_millis(300)).await;
}

fn min_checkpoint(probe: &Value) -> u64 {
    probe["projections"]
        .as_array()
        .unwrap_or_else(|| panic!("probe without projections: {probe}"))
        .iter()
        .filter(|p| p["state"] != "stopped")
        .map(|p| p["checkpoint"].as_u64().unwrap())
        .min()
        .expect("projections are registered")
}

const PROBE: &str = "{ projections { name state checkpoint } }";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standard_graphql_ws_client_is_notified_only_after_the_read_models_commit() {
    let app = spawn_app().await;
    let visit = reference_visit(false);
    let ops = token(&app, "clinic-a", &[Role::Ops, Role::Billing]);
    let other_tenant = token(&app, "clinic-b", &[Role::Ops, Role::Billing]);

    let encounter_sub = format!(
        "subscription {{ encounterUpdated(id: \"{}\") {{ encounterId eventType version position }} }}",
        visit.encounter_id
    );
    let billing_sub = "subscription { billingQueueChanged { streamId eventType position counts { status count } } }";
    let mut client = ws_client(
        &app,
        Some(&ops),
        &[&encounter_sub, billing_sub],
        Some((PROBE, &ops)),
    );
    let mut outsider = ws_client(
        &app,
        Some(&other_tenant),
        &[
            "subscription { events { encounterId eventType } }",
            billing_sub,
        ],
        None,
    );
    let mut anonymous = ws_client(&app, None, &[&encounter_sub], None);
    connected(&mut client).await;
    connected(&mut outsider).await;

    run_lifecycle(&app.runtime, &visit).await;
    let stream = StreamId::for_aggregate("encounter", visit.encounter_id);
    let stored = read_whole_stream(&app.runtime.store, &tenant(), &stream)
        .await
        .unwrap();
    let last_version = stored.last().unwrap().stream_version;

    let mut lines = client
        .until(Duration::from_secs(30), |l| {
            l["sub"] == 0 && l["payload"]["data"]["encounterUpdated"]["version"] == last_version
        })
        .await;
    // Printing may be reordered by the probes' round trips: `seq` is arrival order.
    lines.retain(|l| !l["payload"].is_null());
    tokio::time::sleep(Duration::from_millis(300)).await;
    while let Some(line) = client.next(Duration::from_millis(100)).await {
        lines.push(line);
    }
    lines.sort_by_key(|l| l["seq"].as_u64());
    let mut versions = Vec::new();
    let mut billing = 0;
    for line in &lines {
        assert!(line["payload"]["errors"].is_null(), "{line}");
        let data = &line["payload"]["data"];
        let (position, probe) = if line["sub"] == 0 {
            let update = &data["encounterUpdated"];
            assert_eq!(update["encounterId"], visit.encounter_id.to_string());
            versions.push(update["version"].as_u64().unwrap());
            (update["position"].as_u64().unwrap(), &line["probe"])
        } else {
            let change = &data["billingQueueChanged"];
            assert!(change["counts"].is_array(), "{line}");
            billing += 1;
            (change["position"].as_u64().unwrap(), &line["probe"])
        };
        // The notification came after every running read model had this position.
        assert!(
            min_checkpoint(probe) >= position,
            "notified of position {position} before the read models had it: {line}"
        );
    }
    // Every event of the encounter, once, in version order.
    assert_eq!(versions, (1..=last_version).collect::<Vec<_>>());
    assert!(billing >= 1, "no billingQueueChanged: {lines:#?}");

    // The other tenant's subscriber saw nothing of clinic-a.
    tokio::time::sleep(Duration::from_millis(500)).await;
    while let Some(line) = outsider.next(Duration::from_millis(100)).await {
        assert!(line["payload"].is_null(), "clinic-b received {line}");
    }
    // No token: refused in connection_init, never acknowledged.
    let refused = anonymous
        .until(Duration::from_secs(10), |l| !l["closed"].is_null())
        .await;
    assert!(
        refused.iter().all(|l| l["connected"].is_null()),
        "{refused:#?}"
    );
    let code = refused.last().unwrap()["closed"].as_u64().unwrap();
    assert_eq!(code, 4403, "refused with {refused:?}");
    let _ = client.child.kill().await;
    let _ = outsider.child.kill().await;
}

fn rpm_step(index: u32, command: &'static str, payload: Value) -> Step {
    Step {
        service: "rpm",
        command,
        actor: Actor::new(ActorKind::Device, "cuff-synthetic-1"),
        payload,
        command_id: Uuid::from_u128(0x5eed_0000_0000_0000_0000_0000_0000_0000 + index as u128),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpm_alerts_need_a_phi_role_and_every_delivery_is_a_recorded_phi_read() {
    let app = spawn_app().await;
    let patient = Uuid::now_v7();
    let enrollment = Uuid::now_v7();
    let clinician = token(&app, "clinic-a", &[Role::Clinician]);
    let ops = token(&app, "clinic-a", &[Role::Ops]);
    let sub = format!(
        "subscription {{ rpmAlert(patientId: \"{patient}\") {{ patientId enrollmentId code value unit high }} }}"
    );
    let mut allowed = ws_client(&app, Some(&clinician), &[&sub], None);
    let mut refused = ws_client(&app, Some(&ops), &[&sub], None);
    connected(&mut allowed).await;
    connected(&mut refused).await;

    let enroll = rpm_step(
        1,
        "enroll",
        json!({
            "enrollment_id": enrollment, "patient_id": patient, "device_id": "cuff-synthetic-1",
            "period_start": "2026-03-01", "time_zone": "America/Chicago",
            "thresholds": [{"code": "8480-6", "low": 90.0, "high": 160.0}],
            "at": "2026-03-01T14:00:00Z",
        }),
    );
    let readings = rpm_step(
        2,
        "record_readings",
        json!({
            "enrollment_id": enrollment, "batch_id": Uuid::now_v7(),
            "readings": [
                {"code": "8480-6", "value": 128.0, "unit": "mm[Hg]", "effective_at": "2026-03-02T13:00:00Z", "device_id": "cuff-synthetic-1"},
                {"code": "8480-6", "value": 182.0, "unit": "mm[Hg]", "effective_at": "2026-03-02T21:00:00Z", "device_id": "cuff-synthetic-1"},
            ],
            "at": "2026-03-02T21:05:00Z",
        }),
    );
    for step in [enroll, readings] {
        let reply = scenario::send(&app.runtime.bus, &app.runtime.root, &tenant(), &step).await;
        assert!(matches!(reply, CommandReply::Accepted { .. }), "{reply:?}");
    }

    let lines = allowed
        .until(Duration::from_secs(30), |l| !l["payload"].is_null())
        .await;
    let alert = &lines.last().unwrap()["payload"]["data"]["rpmAlert"];
    assert_eq!(alert["patientId"], patient.to_string());
    assert_eq!(alert["enrollmentId"], enrollment.to_string());
    assert_eq!(alert["value"], 182.0, "only the out-of-band reading alerts");
    assert_eq!(alert["high"], 160.0);
    // Ops may not see readings.
    let denied = refused
        .until(Duration::from_secs(10), |l| {
            !l["error"].is_null() || !l["payload"].is_null()
        })
        .await;
    let text = denied.last().unwrap().to_string();
    assert!(text.contains("FORBIDDEN"), "{text}");
    // The delivery is in the PHI access log.
    let auditor = token(&app, "clinic-a", &[Role::Auditor]);
    let (_, body) = gql(
        app.port,
        Some(auditor),
        "query($p: ID!) { audit { phiAccessLog(patientId: $p) { actor fields operation } } }",
        json!({"p": patient}),
    )
    .await;
    let log = body["data"]["audit"]["phiAccessLog"]
        .as_array()
        .unwrap_or_else(|| panic!("{body}"))
        .clone();
    assert!(
        log.iter().any(|entry| entry["operation"] == "rpmAlert"
            && entry["fields"].to_string().contains("rpmAlert.reading")),
        "{body}"
    );
    // The series views, raw and by the patient's local day (both readings fall on
    // 2026-03-02 in Chicago), once the projection has the batch.
    let series = "query($p: ID!, $r: SeriesResolution!) { rpmSeries(patientId: $p, code: \"8480-6\", resolution: $r) { at value min max count unit } }";
    let clinician = Some(clinician);
    let mut raw = json!(null);
    for _ in 0..100 {
        let (_, body) = gql(
            app.port,
            clinician.clone(),
            series,
            json!({"p": patient, "r": "RAW"}),
        )
        .await;
        raw = body["data"]["rpmSeries"].clone();
        if raw.as_array().is_some_and(|points| points.len() == 2) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let points = raw.as_array().unwrap_or_else(|| panic!("{raw}"));
    assert_eq!(points.len(), 2, "{raw}");
    assert_eq!(points[0]["value"], 128.0);
    assert_eq!(points[1]["value"], 182.0);
    assert_eq!(points[0]["unit"], "mm[Hg]");
    let (_, body) = gql(
        app.port,
        clinician.clone(),
        series,
        json!({"p": patient, "r": "DAILY"}),
    )
    .await;
    let daily = &body["data"]["rpmSeries"];
    assert_eq!(daily.as_array().map(Vec::len), Some(1), "{body}");
    assert_eq!(daily[0]["at"], "2026-03-02", "{body}");
    assert_eq!(daily[0]["count"], 2);
    assert_eq!(daily[0]["value"], 155.0);
    assert_eq!(
        (daily[0]["min"].clone(), daily[0]["max"].clone()),
        (json!(128.0), json!(182.0))
    );
    // Another patient's series is empty.
    let (_, body) = gql(
        app.port,
        clinician,
        series,
        json!({"p": Uuid::now_v7(), "r": "RAW"}),
    )
    .await;
    assert_eq!(body["data"]["rpmSeries"], json!([]), "{body}");
    let _ = allowed.child.kill().await;
    let _ = refused.child.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_updates_live_in_headless_chromium() {
    let app = spawn_app().await;
    let visit = reference_visit(true);
    let ops = token(&app, "clinic-a", &[Role::Ops, Role::Billing]);
    let shots = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    let shot = shots.join("dashboard.png");
    let _ = std::fs::remove_file(&shot);
    let mut page = NodeScript::spawn(
        "dashboard.mjs",
        &[
            "--url".into(),
            format!("http://127.0.0.1:{}/dashboard?token={ops}", app.port),
            "--expect".into(),
            visit.encounter_id.to_string(),
            "--screenshot".into(),
            shot.display().to_string(),
        ],
    );
    let ready = page
        .until(Duration::from_secs(60), |l| {
            l["ready"] == true || !l["error"].is_null()
        })
        .await;
    assert_eq!(ready.last().unwrap()["ready"], true, "{ready:#?}");
    run_lifecycle(&app.runtime, &visit).await;
    let done = page
        .until(Duration::from_secs(90), |l| {
            l["ok"] == true || !l["error"].is_null()
        })
        .await;
    let result = done.last().unwrap();
    assert_eq!(result["ok"], true, "{done:#?}");
    let tiles = &result["tiles"];
    assert_ne!(tiles["events"], "0", "{tiles}");
    assert_eq!(tiles["completed"], "1", "{tiles}");
    assert!(shot.exists(), "no screenshot at {}", shot.display());
    let _ = page.child.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_back_failures_reach_subscribers_and_the_reconciled_view() {
    // A sandbox EHR that wants one token; the connector presents another: every write
    // is a 401, which is dead at once (not retried) and recorded as WriteBackFailed.
    let dir = std::env::temp_dir().join(format!("chartline_ehr_{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let sandbox = chartline_ehr_connector::SandboxEhr::build(
        "127.0.0.1:0",
        chartline_ehr_connector::sandbox::SandboxConfig {
            database_url: format!("sqlite://{}/sandbox.db", dir.display()),
            bearer_token: Some("the-right-token".into()),
            smart: None,
        },
    )
    .await
    .unwrap();
    let ehr_url = sandbox.base_url();
    tokio::spawn(sandbox.run_until_stopped(std::future::pending()));
    let app = spawn_app_with(|args| {
        args.only.push("ehr".into());
        args.ehr_url = Some(ehr_url.clone());
        args.ehr_token = Some("a-wrong-token".into());
        args.ehr_component = Some("sandbox-ehr".into());
        args.ehr_reconcile_interval = Duration::ZERO;
    })
    .await;
    let ops = token(&app, "clinic-a", &[Role::Ops, Role::Platform]);
    let mut client = ws_client(
        &app,
        Some(&ops),
        &[
            "subscription { writeBackFailed { encounterId eventType artifact status message retryable } }",
        ],
        None,
    );
    connected(&mut client).await;
    // The patient's identity must be resolved before anything may reach a chart.
    let visit = reference_visit(false);
    let registration = Step {
        service: "identity",
        command: "register",
        actor: Actor::new(ActorKind::Staff, "registrar-1"),
        payload: json!({
            "patient_id": visit.patient_id,
            "demographics": {
                "given_name": "Wren", "family_name": format!("Synthetic{}", visit.patient_id.simple()),
                "birth_date": "1958-09-30", "sex": "female",
                "address_line": "7 Fictional Lane", "city": "Springfield", "state": "IL",
                "postal_code": "62704", "phone": "(217) 555-0199", "email": null,
                "time_zone": "America/Chicago",
            },
            "at": "2026-03-01T09:00:00Z",
        }),
        command_id: Uuid::now_v7(),
    };
    let reply = scenario::send(
        &app.runtime.bus,
        &app.runtime.root,
        &tenant(),
        &registration,
    )
    .await;
    assert!(matches!(reply, CommandReply::Accepted { .. }), "{reply:?}");
    run_lifecycle(&app.runtime, &visit).await;

    let lines = client
        .until(Duration::from_secs(60), |l| {
            l["payload"]["data"]["writeBackFailed"]["artifact"]["resource"] == "document_reference"
        })
        .await;
    let failures: Vec<&Value> = lines
        .iter()
        .filter_map(|l| l["payload"]["data"].get("writeBackFailed"))
        .collect();
    assert!(!failures.is_empty(), "{lines:#?}");
    for failure in &failures {
        assert_eq!(
            failure["encounterId"],
            visit.encounter_id.to_string(),
            "{failure}"
        );
        assert_eq!(failure["eventType"], "WriteBackFailed");
        assert_eq!(failure["status"], 401, "{failure}");
        assert_eq!(
            failure["retryable"], false,
            "a 401 is dead, not retried: {failure}"
        );
    }
    // The reconciled view says the same, from the read models.
    let (_, body) = gql(
        app.port,
        Some(ops.clone()),
        "query($id: ID!) { reconciledEncounter(id: $id) { ehr { artifact state } discrepancies { code } } }",
        json!({"id": visit.encounter_id}),
    )
    .await;
    let codes = body["data"]["reconciledEncounter"]["discrepancies"].to_string();
    assert!(codes.contains("WRITE_BACK_FAILED"), "{body}");

    // An operator replays the dead DocumentReference through retryWriteBack: the same
    // command path (the EHR still refuses the token, so it fails again, recorded once
    // more); the request is on the operator's account; the same commandId again
    // changes nothing; a clinician may not replay.
    let retry = "mutation($e: ID!, $c: ID!) { retryWriteBack(encounterId: $e, commandId: $c, artifact: \"document-reference\") { accepted version code message } }";
    let command_id = Uuid::now_v7();
    let vars = json!({"e": visit.encounter_id, "c": command_id});
    let (_, denied) = gql(
        app.port,
        Some(token(&app, "clinic-a", &[Role::Clinician])),
        retry,
        vars.clone(),
    )
    .await;
    assert_eq!(
        crate::api::error_code(&denied),
        Some("FORBIDDEN"),
        "{denied}"
    );
    let (_, first) = gql(app.port, Some(ops.clone()), retry, vars.clone()).await;
    assert_eq!(first["data"]["retryWriteBack"]["accepted"], true, "{first}");
    let stream = StreamId::for_aggregate("encounter", visit.encounter_id);
    let after_first = read_whole_stream(&app.runtime.store, &tenant(), &stream)
        .await
        .unwrap();
    let manual: Vec<_> = after_first
        .iter()
        .filter(|e| {
            e.event_type == "WriteBackRequested" && e.metadata.actor.id.starts_with("tester-")
        })
        .collect();
    assert_eq!(manual.len(), 1, "one request on the operator's account");
    let last_document = after_first
        .iter()
        .rev()
        .find(|e| e.data["artifact"]["resource"] == "document_reference")
        .unwrap();
    assert_eq!(last_document.event_type, "WriteBackFailed");
    assert_eq!(
        last_document.metadata.actor.id, "ehr-connector",
        "the outcome is the connector's, not the operator's"
    );
    let (_, again) = gql(app.port, Some(ops.clone()), retry, vars).await;
    assert_eq!(again["data"]["retryWriteBack"]["accepted"], true, "{again}");
    let after_again = read_whole_stream(&app.runtime.store, &tenant(), &stream)
        .await
        .unwrap();
    // (The connector may still be recording other artifacts' outcomes: compare the
    // DocumentReference's events only.)
    let document = |events: &[chartline_proto::EventEnvelope]| -> Vec<(u64, String)> {
        events
            .iter()
            .filter(|e| e.data["artifact"]["resource"] == "document_reference")
            .map(|e| (e.stream_version, e.event_type.clone()))
            .collect()
    };
    assert_eq!(
        document(&after_again),
        document(&after_first),
        "a re-sent commandId recorded something"
    );
    // Bad input changes nothing.
    let (_, bad) = gql(
        app.port,
        Some(ops.clone()),
        "mutation($e: ID!, $c: ID!) { retryWriteBack(encounterId: $e, commandId: $c, artifact: \"fax\") { accepted code } }",
        json!({"e": visit.encounter_id, "c": Uuid::now_v7()}),
    )
    .await;
    assert_eq!(bad["data"]["retryWriteBack"]["accepted"], false, "{bad}");
    assert_eq!(bad["data"]["retryWriteBack"]["code"], "validation", "{bad}");
    let _ = client.child.kill().await;
    let _ = std::fs::remove_dir_all(&dir);
}
