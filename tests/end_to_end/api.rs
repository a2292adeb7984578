//! The GraphQL API over real HTTP on loopback against the embedded deployment:
//! the auth matrix (no token, wrong role, other tenant), audit replay to every version,
//! tamper detection, the PHI access log, limits against bombs and oversized bodies, and
//! mutations through the command path.

use std::io::{Read, Write};
use std::net::TcpStream;

use chartline::scenario;
use chartline::serve_cmd::{self, Runtime, ServeArgs};
use chartline_api::auth::{Claims, Role, Secret, issue};
use chartline_api::{Api, ApiConfig};
use chartline_domain::Aggregate;
use chartline_domain::encounter::{Encounter, EncounterEvent};
use chartline_infra::AnyStore;
use chartline_infra::store::read_whole_stream;
use chartline_proto::{StreamId, TenantId};
use serde_json::{Value, json};
use tokio::sync::watch;
use uuid::Uuid;

use crate::embedded::{reference_visit, run_lifecycle};

pub(crate) struct App {
    pub(crate) runtime: Runtime,
    pub(crate) port: u16,
    secret: Secret,
    stop: watch::Sender<bool>,
    dir: std::path::PathBuf,
}

pub(crate) async fn spawn_app() -> App {
    spawn_app_with(|_| {}).await
}

/// The embedded deployment without the API component (the test builds its own API);
/// `customize` may change the serve arguments (e.g. add the EHR connector).
pub(crate) async fn spawn_app_with(customize: impl FnOnce(&mut ServeArgs)) -> App {
    let dir = std::env::temp_dir().join(format!("chartline_t_{}", Uuid::new_v4().simple()));
    let mut args = ServeArgs::embedded(&["clinic-a", "clinic-b"]);
    args.only = serve_cmd::COMPONENTS
        .iter()
        .filter(|c| !["api", "relay", "store", "ehr"].contains(c))
        .map(|c| c.to_string())
        .collect();
    customize(&mut args);
    let selected = args.selected().unwrap();
    let url = format!("sqlite://{}/events.db", dir.display());
    let runtime = serve_cmd::connect(&args, &url, &selected).await.unwrap();
    let (stop, stopped) = watch::channel(false);
    let tasks = serve_cmd::start(&args, &runtime, &selected, &stopped)
        .await
        .unwrap();
    std::mem::forget(tasks); // stopped through `stop`
    let secret = Secret::new(b"api-test-secret".to_vec());
    let api = Api::build(ApiConfig {
        listen: "127.0.0.1:0".into(),
        secret: secret.clone(),
        store: runtime.store.clone(),
        bus: runtime.bus.clone(),
        root: runtime.root.clone(),
        read_db: Some(chartline_projections::db::ReadDb::open(&url).await.unwrap()),
        compliance_map: compliance_map(),
    })
    .await
    .unwrap();
    let port = api.port();
    let mut api_stop = stopped.clone();
    tokio::spawn(api.run_until_stopped(async move {
        let _ = api_stop.changed().await;
    }));
    App {
        runtime,
        port,
        secret,
        stop,
        dir,
    }
}

impl Drop for App {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub(crate) fn token(app: &App, tenant: &str, roles: &[Role]) -> String {
    let now = chrono::Utc::now().timestamp();
    issue(
        &app.secret,
        &Claims {
            sub: format!(
                "tester-{}",
                roles
                    .first()
                    .map_or("none".into(), |r| format!("{r:?}").to_lowercase())
            ),
            tenant: TenantId::parse(tenant).unwrap(),
            roles: roles.to_vec(),
            iat: now,
            exp: now + 600,
        },
    )
}

/// A blocking HTTP/1.1 POST on loopback; returns (status, body).
fn post(port: u16, token: Option<&str>, body: &str) -> (u16, Value) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        stream,
        "POST /graphql HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n{auth}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).unwrap();
    let text = String::from_utf8_lossy(&response);
    let status: u16 = text.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    // Tolerate chunked encoding: take the JSON object inside.
    let json = body
        .find('{')
        .and_then(|start| body.rfind('}').map(|end| &body[start..=end]))
        .and_then(|b| serde_json::from_str(b).ok())
        .unwrap_or(Value::Null);
    (status, json)
}

pub(crate) async fn gql(
    port: u16,
    token: Option<String>,
    query: &str,
    variables: Value,
) -> (u16, Value) {
    let body = json!({"query": query, "variables": variables}).to_string();
    tokio::task::spawn_blocking(move || post(port, token.as_deref(), &body))
        .await
        .unwrap()
}

pub(crate) fn error_code(response: &Value) -> Option<&str> {
    response["errors"][0]["extensions"]["code"].as_str()
}

const ENCOUNTER: &str =
    "query($id: ID!) { encounter(id: $id) { id status noteStatus note coding } }";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_matrix_roles_and_tenant_isolation() {
    let app = spawn_app().await;
    let visit = reference_visit(false);
    run_lifecycle(&app.runtime, &visit).await;
    let id = json!({"id": visit.encounter_id});

    let (status, body) = gql(app.port, None, ENCOUNTER, id.clone()).await;
    assert_eq!(status, 401);
    assert_eq!(error_code(&body), Some("UNAUTHENTICATED"));
    let (status, _) = gql(app.port, Some("not.a.token".into()), ENCOUNTER, id.clone()).await;
    assert_eq!(status, 401);

    // Clinician of the tenant: sees the note.
    let (_, body) = gql(
        app.port,
        Some(token(&app, "clinic-a", &[Role::Clinician])),
        ENCOUNTER,
        id.clone(),
    )
    .await;
    assert!(body["errors"].is_null(), "{body}");
    assert_eq!(body["data"]["encounter"]["noteStatus"], "SIGNED");
    assert!(body["data"]["encounter"]["note"]["sections"]["plan"].is_string());

    // Ops: no PHI.
    let (_, body) = gql(
        app.port,
        Some(token(&app, "clinic-a", &[Role::Ops])),
        ENCOUNTER,
        id.clone(),
    )
    .await;
    assert_eq!(error_code(&body), Some("FORBIDDEN"), "{body}");
    assert!(body["data"]["encounter"]["note"].is_null());

    // Tenant B never sees tenant A's encounter, history or chain.
    let other = Some(token(&app, "clinic-b", &[Role::Clinician, Role::Auditor]));
    let (_, body) = gql(app.port, other.clone(), ENCOUNTER, id.clone()).await;
    assert!(body["data"]["encounter"].is_null(), "{body}");
    let stream = format!("encounter-{}", visit.encounter_id);
    let (_, body) = gql(
        app.port,
        other.clone(),
        "query($s: String!) { audit { history(streamId: $s) { edges { node { eventType } } } verify(streamId: $s) { eventsChecked } } }",
        json!({"s": stream}),
    )
    .await;
    assert_eq!(
        body["data"]["audit"]["history"]["edges"],
        json!([]),
        "{body}"
    );
    assert_eq!(body["data"]["audit"]["verify"]["eventsChecked"], 0);

    // Clinicians are not auditors.
    let (_, body) = gql(
        app.port,
        Some(token(&app, "clinic-a", &[Role::Clinician])),
        "query($s: String!) { audit { verify(streamId: $s) { intact } } }",
        json!({"s": stream}),
    )
    .await;
    assert_eq!(error_code(&body), Some("FORBIDDEN"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encounter_at_every_version_equals_replaying_the_first_n_events_and_verify_finds_tampering()
{
    let app = spawn_app().await;
    let visit = reference_visit(true);
    let events = run_lifecycle(&app.runtime, &visit).await;
    let auditor = Some(token(&app, "clinic-a", &[Role::Auditor]));
    let domain: Vec<EncounterEvent> = events
        .iter()
        .map(|e| chartline_proto::codec::decode(e).unwrap())
        .collect();
    for n in 1..=events.len() {
        let (_, body) = gql(
            app.port,
            auditor.clone(),
            "query($id: ID!, $v: Int!) { audit { encounterAt(id: $id, version: $v) { version encounter { version status noteStatus modalityUsed coding } } } }",
            json!({"id": visit.encounter_id, "v": n}),
        )
        .await;
        let at = &body["data"]["audit"]["encounterAt"];
        let expected = Encounter::replay(domain[..n].iter());
        assert_eq!(at["version"], n, "{body}");
        assert_eq!(at["encounter"]["status"], expected.status.as_str());
        assert_eq!(
            at["encounter"]["coding"],
            expected
                .coding
                .as_ref()
                .map_or(Value::Null, |c| serde_json::to_value(c).unwrap())
        );
    }
    let stream = format!("encounter-{}", visit.encounter_id);
    let verify = "query($s: String!) { audit { verify(streamId: $s) { intact breaks { version eventId } } } }";
    let (_, body) = gql(app.port, auditor.clone(), verify, json!({"s": stream})).await;
    assert_eq!(body["data"]["audit"]["verify"]["intact"], true, "{body}");
    let AnyStore::Sqlite(store) = &app.runtime.store else {
        panic!("embedded is SQLite")
    };
    sqlx::query("UPDATE events SET data = replace(data, 'Continue', 'Stop') WHERE stream_id = ? AND event_type = 'NoteDrafted'")
        .bind(&stream)
        .execute(store.pool())
        .await
        .unwrap();
    let (_, body) = gql(app.port, auditor, verify, json!({"s": stream})).await;
    assert_eq!(body["data"]["audit"]["verify"]["intact"], false);
    let drafted = events
        .iter()
        .find(|e| e.event_type == "NoteDrafted")
        .unwrap();
    assert_eq!(
        body["data"]["audit"]["verify"]["breaks"][0]["eventId"],
        drafted.event_id.to_string()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_phi_read_appears_in_the_access_log() {
    let app = spawn_app().await;
    let visit = reference_visit(false);
    run_lifecycle(&app.runtime, &visit).await;
    let clinician = token(&app, "clinic-a", &[Role::Clinician]);
    for _ in 0..2 {
        let (_, body) = gql(
            app.port,
            Some(clinician.clone()),
            ENCOUNTER,
            json!({"id": visit.encounter_id}),
        )
        .await;
        assert!(body["errors"].is_null(), "{body}");
    }
    // A non-PHI read is not logged.
    gql(
        app.port,
        Some(clinician.clone()),
        "query($id: ID!) { encounter(id: $id) { status } }",
        json!({"id": visit.encounter_id}),
    )
    .await;
    let (_, body) = gql(
        app.port,
        Some(token(&app, "clinic-a", &[Role::Auditor])),
        "query($p: ID!) { audit { phiAccessLog(patientId: $p) { actor fields } } }",
        json!({"p": visit.patient_id}),
    )
    .await;
    let log = body["data"]["audit"]["phiAccessLog"]
        .as_array()
        .unwrap_or_else(|| panic!("{body}"))
        .clone();
    assert_eq!(log.len(), 2, "{body}");
    assert!(log.iter().all(|entry| entry["actor"] == "tester-clinician" && entry["fields"] == json!(["note"])));
    // The log is itself a verifiable stream.
    let stream = StreamId::for_aggregate("access", visit.patient_id);
    let access = read_whole_stream(
        &app.runtime.store,
        &TenantId::parse("clinic-a").unwrap(),
        &stream,
    )
    .await
    .unwrap();
    assert_eq!(access.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bombs_and_oversized_bodies_are_refused_without_work() {
    let app = spawn_app().await;
    let auditor = Some(token(&app, "clinic-a", &[Role::Auditor]));
    let deep = format!(
        "{{ audit {{ history(streamId: \"encounter-{}\") {{ edges {{ node {{ actor {{ kind }} }} }} pageInfo {{ hasNextPage }} }} }} }}",
        Uuid::nil()
    );
    let (_, ok) = gql(app.port, auditor.clone(), &deep, json!({})).await;
    assert!(ok["errors"].is_null(), "{ok}");
    let mut bomb = String::from("{ __schema { types { fields { type { ");
    for _ in 0..20 {
        bomb.push_str("ofType { ");
    }
    bomb.push_str("name");
    bomb.push_str(&" }".repeat(25));
    let (_, body) = gql(app.port, auditor.clone(), &bomb, json!({})).await;
    let message = body["errors"][0]["message"]
        .as_str()
        .unwrap_or_default()
        .to_lowercase();
    assert!(
        message.contains("nested") || message.contains("depth"),
        "{body}"
    );
    let wide = format!(
        "{{ {} }}",
        (0..400)
            .map(|i| format!("a{i}: encounter(id: \"{}\") {{ id }}", Uuid::nil()))
            .collect::<Vec<_>>()
            .join(" ")
    );
    let (status, body) = gql(app.port, auditor.clone(), &wide, json!({})).await;
    assert!(
        status == 413
            || body["errors"][0]["message"]
                .as_str()
                .unwrap_or_default()
                .to_lowercase()
                .contains("complex"),
        "{status} {body}"
    );
    let huge = "x".repeat(chartline_api::MAX_BODY_BYTES + 10);
    let (status, _) = gql(
        app.port,
        auditor,
        &format!("{{ __typename }} # {huge}"),
        json!({}),
    )
    .await;
    assert_eq!(status, 413);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutations_go_through_the_command_path_idempotently() {
    let app = spawn_app().await;
    let visit = reference_visit(false);
    let steps = scenario::steps_until_signed(&visit);
    let mut input = steps[0].payload.clone();
    input.as_object_mut().unwrap().remove("encounter_id");
    let mutation = "mutation($e: ID!, $c: ID!, $i: JSON!) { scheduleVisit(encounterId: $e, commandId: $c, input: $i) { accepted version code message eventIds } }";
    let platform = Some(token(&app, "clinic-a", &[Role::Platform]));
    let variables = json!({"e": visit.encounter_id, "c": steps[0].command_id, "i": input});
    let (_, first) = gql(app.port, platform.clone(), mutation, variables.clone()).await;
    assert_eq!(first["data"]["scheduleVisit"]["accepted"], true, "{first}");
    let (_, again) = gql(app.port, platform, mutation, variables.clone()).await;
    assert_eq!(first["data"], again["data"]);
    let (_, ops) = gql(
        app.port,
        Some(token(&app, "clinic-a", &[Role::Ops])),
        mutation,
        variables,
    )
    .await;
    assert_eq!(error_code(&ops), Some("FORBIDDEN"));
    let sign = "mutation($e: ID!, $c: ID!, $i: JSON!) { signNote(encounterId: $e, commandId: $c, input: $i) { accepted code } }";
    let (_, rejected) = gql(
        app.port,
        Some(token(&app, "clinic-a", &[Role::Clinician])),
        sign,
        json!({"e": visit.encounter_id, "c": Uuid::now_v7(), "i": {"practitioner_id": "dr-synthetic-1", "at": "2026-03-02T16:00:00Z"}}),
    )
    .await;
    assert_eq!(
        rejected["data"]["signNote"],
        json!({"accepted": false, "code": "invariant"})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconciled_and_list_views_come_from_the_read_models() {
    let app = spawn_app().await;
    let visit = reference_visit(false);
    run_lifecycle(&app.runtime, &visit).await;
    let ops = Some(token(&app, "clinic-a", &[Role::Ops, Role::Billing]));
    // Wait until the projections caught up with the lifecycle.
    let mut caught_up = false;
    for _ in 0..100 {
        let (_, body) = gql(
            app.port,
            ops.clone(),
            "{ projections { name lagEvents openDeadLetters } }",
            json!({}),
        )
        .await;
        let list = body["data"]["projections"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if !list.is_empty() && list.iter().all(|p| p["lagEvents"] == 0) {
            assert!(list.iter().all(|p| p["openDeadLetters"] == 0), "{body}");
            caught_up = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(caught_up, "projections never caught up");
    let (_, body) = gql(app.port, ops.clone(), "{ encounters(first: 10) { edges { node { id status noteStatus codingOutcome codes } } pageInfo { hasNextPage } } }", json!({})).await;
    let edges = body["data"]["encounters"]["edges"]
        .as_array()
        .unwrap_or_else(|| panic!("{body}"))
        .clone();
    assert_eq!(edges.len(), 1);
    assert_eq!(edges[0]["node"]["id"], visit.encounter_id.to_string());
    assert_eq!(edges[0]["node"]["noteStatus"], "signed");
    assert_eq!(edges[0]["node"]["codingOutcome"], "billable");
    let (_, body) = gql(
        app.port,
        ops.clone(),
        "{ billingQueue(first: 10) { edges { node { itemId status reasons codes } } } }",
        json!({}),
    )
    .await;
    let item = &body["data"]["billingQueue"]["edges"][0]["node"];
    assert_eq!(
        item["itemId"],
        format!("encounter:{}", visit.encounter_id),
        "{body}"
    );
    // Nothing was written to an EHR in this deployment: the reconciled view says so.
    let (_, body) = gql(
        app.port,
        Some(token(&app, "clinic-a", &[Role::Platform])),
        "query($id: ID!) { reconciledEncounter(id: $id) { encounter { version } ehr { artifact state } billing { status } discrepancies { code } } }",
        json!({"id": visit.encounter_id}),
    )
    .await;
    let codes: Vec<&str> = body["data"]["reconciledEncounter"]["discrepancies"]
        .as_array()
        .unwrap_or_else(|| panic!("{body}"))
        .iter()
        .filter_map(|d| d["code"].as_str())
        .collect();
    assert!(codes.contains(&"NOTE_NOT_IN_CHART"), "{body}");
    assert!(!codes.contains(&"READ_MODEL_LAGGING"), "{body}");
    let (_, body) = gql(
        app.port,
        ops,
        "{ integrationCompleteness { encounters fullyAutomated manualTouches } }",
        json!({}),
    )
    .await;
    assert_eq!(
        body["data"]["integrationCompleteness"]["encounters"], 1,
        "{body}"
    );
    assert_eq!(body["data"]["integrationCompleteness"]["manualTouches"], 0);
    assert_eq!(
        body["data"]["integrationCompleteness"]["fullyAutomated"], 0,
        "no artifact reached an EHR"
    );
    // Another tenant's lists are empty.
    let (_, body) = gql(
        app.port,
        Some(token(&app, "clinic-b", &[Role::Ops])),
        "{ encounters { edges { node { id } } } }",
        json!({}),
    )
    .await;
    assert_eq!(body["data"]["encounters"]["edges"], json!([]), "{body}");
}

#[test]
fn committed_sdl_matches_the_code() {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../services/api/schema.graphql");
    let sdl = chartline_api::sdl();
    if std::env::var("CHARTLINE_BLESS").is_ok_and(|v| v == "1") {
        std::fs::write(&path, &sdl).unwrap();
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == sdl,
        "services/api/schema.graphql drifted from the code; regenerate with `make schemas` and commit"
    );
}

/// The shipped map plus an EHR whose BAA ended: its PHI flow must show as blocked.
fn compliance_map() -> chartline_domain::compliance::ComplianceMap {
    let extra = r#"
[[component]]
id = "legacy-ehr"
name = "Legacy EHR (BAA ended)"
kind = "ehr"
handles_phi = true
endpoint = "https://legacy.example/fhir"
baa = { effective_from = "2026-01-01", effective_to = "2026-08-31" }

[[flow]]
from = "ehr-connector"
to = "legacy-ehr"
data = ["clinical_documentation"]
"#;
    chartline_proto::compliance_map::parse_compliance_map(&format!(
        "{}\n{extra}",
        chartline_proto::compliance_map::DEFAULT_MAP.1
    ))
    .expect("valid test map")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compliance_map_shows_every_flow_and_its_coverage_at_a_moment() {
    let app = spawn_app().await;
    let query = "query($at: String) { complianceMap(at: $at) }";
    // Clinicians do not administer the map.
    let (_, body) = gql(
        app.port,
        Some(token(&app, "clinic-a", &[Role::Clinician])),
        query,
        json!({}),
    )
    .await;
    assert_eq!(error_code(&body), Some("FORBIDDEN"), "{body}");
    let ops = Some(token(&app, "clinic-a", &[Role::Ops]));
    let flow = |body: &Value, to: &str| {
        body["data"]["complianceMap"]["flows"]
            .as_array()
            .unwrap_or_else(|| panic!("{body}"))
            .iter()
            .find(|f| f["to"] == to)
            .cloned()
            .unwrap_or_else(|| panic!("no flow to {to}: {body}"))
    };
    // While the legacy BAA was in force, nothing is blocked.
    let (_, before) = gql(
        app.port,
        ops.clone(),
        query,
        json!({"at": "2026-06-01T00:00:00Z"}),
    )
    .await;
    assert_eq!(flow(&before, "legacy-ehr")["blocked"], false, "{before}");
    assert_eq!(before["data"]["complianceMap"]["blocked_phi_flows"], 0);
    // After it ended, the PHI flow to it is blocked; the sandbox EHR stays covered.
    let (_, now) = gql(app.port, ops.clone(), query, json!({})).await;
    let legacy = flow(&now, "legacy-ehr");
    assert_eq!(legacy["blocked"], true, "{now}");
    assert_eq!(legacy["carries_phi"], true);
    assert_eq!(flow(&now, "sandbox-ehr")["blocked"], false, "{now}");
    assert_eq!(now["data"]["complianceMap"]["blocked_phi_flows"], 1);
    let (_, bad) = gql(app.port, ops, query, json!({"at": "yesterday"})).await;
    assert_eq!(error_code(&bad), Some("BAD_USER_INPUT"), "{bad}");
}
