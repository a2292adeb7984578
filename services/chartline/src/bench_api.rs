//! `chartline bench api`: the GraphQL API over real HTTP and WebSocket on loopback,
//! against the embedded deployment (SQLite, in-process bus, read models in the same
//! file), with its load generator in the same process (so the figures include the
//! client's cost on this 2-core machine).
//!
//! Figures (issue 9): `encounter(id)` queries/s (target ≥ 5,000), a 50-item `encounters`
//! page queries/s, audit `history` of a 200-event stream queries/s, `encounterAt` of a
//! 200-event stream latency p50/p99 (target p99 < 5 ms), and subscription fan-out: 1,000
//! graphql-transport-ws clients subscribed to `events`, each notification's delay from
//! the event's commit (`recordedAt`) to its arrival at every client (target p99 <
//! 200 ms; it includes waiting for the read models, which is the contract).

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use chartline::scenario::{self, Step};
use chartline::serve_cmd::{self, Runtime, ServeArgs};
use chartline_api::auth::{Claims, Role, Secret, issue};
use chartline_api::{Api, ApiConfig};
use chartline_proto::commands::CommandReply;
use chartline_proto::{Actor, ActorKind, TenantId};
use clap::Args;
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use uuid::Uuid;

use crate::bench_commands::{figure, percentile, report};

#[derive(Args)]
pub struct ApiBenchArgs {
    /// Encounters seeded before measuring (7 events each).
    #[arg(long, default_value_t = 200)]
    encounters: u64,
    /// Events on the audited encounter's stream.
    #[arg(long, default_value_t = 200)]
    stream_events: u64,
    /// Seconds per query-throughput run.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// HTTP clients in flight at once.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// `encounterAt` calls timed one at a time.
    #[arg(long, default_value_t = 1_000)]
    encounter_at_calls: usize,
    /// WebSocket subscribers of the fan-out run.
    #[arg(long, default_value_t = 1_000)]
    subscribers: usize,
    /// Events appended (one every 100 ms) during the fan-out run.
    #[arg(long, default_value_t = 20)]
    fanout_events: usize,
    #[arg(long, default_value = "target/bench/api.json")]
    out: String,
}

struct Deployment {
    runtime: Runtime,
    port: u16,
    secret: Secret,
    _stop: watch::Sender<bool>,
    dir: std::path::PathBuf,
}

async fn deploy() -> anyhow::Result<Deployment> {
    let dir = std::env::temp_dir().join(format!("chartline_bench_api_{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir)?;
    let mut args = ServeArgs::embedded(&["bench"]);
    args.only = serve_cmd::COMPONENTS
        .iter()
        .filter(|c| !["api", "relay", "store", "ehr"].contains(c))
        .map(|c| c.to_string())
        .collect();
    let selected = args.selected()?;
    let url = format!("sqlite://{}/events.db", dir.display());
    let runtime = serve_cmd::connect(&args, &url, &selected).await?;
    let (stop, stopped) = watch::channel(false);
    let tasks = serve_cmd::start(&args, &runtime, &selected, &stopped).await?;
    std::mem::forget(tasks); // they end with the process
    let secret = Secret::new(Uuid::new_v4().as_bytes().to_vec());
    let api = Api::build(ApiConfig {
        listen: "127.0.0.1:0".into(),
        secret: secret.clone(),
        store: runtime.store.clone(),
        bus: runtime.bus.clone(),
        root: runtime.root.clone(),
        read_db: Some(chartline_projections::db::ReadDb::open(&url).await?),
        compliance_map: chartline_proto::compliance_map::default_compliance_map(),
    })
    .await?;
    let port = api.port();
    let mut api_stop = stopped.clone();
    tokio::spawn(api.run_until_stopped(async move {
        let _ = api_stop.changed().await;
    }));
    Ok(Deployment {
        runtime,
        port,
        secret,
        _stop: stop,
        dir,
    })
}

fn token(deployment: &Deployment, roles: &[Role]) -> String {
    let now = chrono::Utc::now().timestamp();
    issue(
        &deployment.secret,
        &Claims {
            sub: "bench".into(),
            tenant: TenantId::parse("bench").expect("valid tenant"),
            roles: roles.to_vec(),
            iat: now,
            exp: now + 3_600,
        },
    )
}

async fn send(runtime: &Runtime, step: &Step) -> anyhow::Result<CommandReply> {
    let tenant = TenantId::parse("bench")?;
    let reply = scenario::send(&runtime.bus, &runtime.root, &tenant, step).await;
    anyhow::ensure!(
        matches!(reply, CommandReply::Accepted { .. }),
        "{}: {reply:?}",
        step.command
    );
    Ok(reply)
}

/// Seeds `encounters` signed visits and one visit with `stream_events` events (addenda).
async fn seed(deployment: &Deployment, args: &ApiBenchArgs) -> anyhow::Result<(Uuid, Vec<Uuid>)> {
    let day = chrono::Utc::now() - chrono::Duration::days(2);
    let mut seeded = Vec::new();
    for index in 0..args.encounters {
        let visit = scenario::synthetic_visit(11, index, day);
        seeded.push(visit.encounter_id);
        for step in scenario::steps_until_signed(&visit) {
            send(&deployment.runtime, &step).await?;
        }
    }
    let visit = scenario::synthetic_visit(12, 0, day);
    let steps = scenario::steps_until_signed(&visit);
    let mut events = steps.len() as u64;
    for step in &steps {
        send(&deployment.runtime, step).await?;
    }
    let clinician = Actor::new(ActorKind::Clinician, visit.practitioner_id.clone());
    let mut n = 0u32;
    while events < args.stream_events {
        n += 1;
        send(
            &deployment.runtime,
            &addendum(visit.encounter_id, &clinician, n, visit.start),
        )
        .await?;
        events += 1;
    }
    Ok((visit.encounter_id, seeded))
}

fn addendum(
    encounter: Uuid,
    clinician: &Actor,
    n: u32,
    start: chrono::DateTime<chrono::Utc>,
) -> Step {
    Step {
        service: "documentation",
        command: "add_addendum",
        actor: clinician.clone(),
        payload: json!({
            "encounter_id": encounter,
            "author_id": clinician.id,
            "text": format!("Addendum {n}: synthetic follow-up remark."),
            "at": (start + chrono::Duration::minutes(40) + chrono::Duration::seconds(n as i64)).to_rfc3339(),
        }),
        command_id: Uuid::new_v4(),
    }
}

/// Waits until every projection has caught up with the store.
async fn caught_up(
    deployment: &Deployment,
    client: &reqwest::Client,
    ops: &str,
) -> anyhow::Result<()> {
    for _ in 0..600 {
        let body = post(
            client,
            deployment.port,
            ops,
            "{ projections { lagEvents } }",
        )
        .await?;
        let list = body["data"]["projections"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if !list.is_empty() && list.iter().all(|p| p["lagEvents"] == 0) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("projections did not catch up within 60 s")
}

async fn post(
    client: &reqwest::Client,
    port: u16,
    token: &str,
    query: &str,
) -> anyhow::Result<Value> {
    let response = client
        .post(format!("http://127.0.0.1:{port}/graphql"))
        .bearer_auth(token)
        .json(&json!({ "query": query }))
        .send()
        .await?;
    Ok(response.json().await?)
}

/// A minimal HTTP/1.1 keep-alive client for the throughput runs: the request bytes are
/// built once and the response is only checked (status 200, no `"errors"`), so the
/// load generator — which shares the 2 cores with the server — costs as little as
/// possible. The server does exactly the work it does for any client.
struct RawClient {
    stream: tokio::io::BufStream<tokio::net::TcpStream>,
    request: Vec<u8>,
}

impl RawClient {
    async fn connect(port: u16, token: &str, query: &str) -> anyhow::Result<RawClient> {
        let body = json!({ "query": query }).to_string();
        let request = format!(
            "POST /graphql HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes();
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        tcp.set_nodelay(true)?;
        Ok(RawClient {
            stream: tokio::io::BufStream::new(tcp),
            request,
        })
    }

    /// One request; returns the response body.
    async fn call(&mut self) -> anyhow::Result<Vec<u8>> {
        use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
        self.stream.write_all(&self.request).await?;
        self.stream.flush().await?;
        let mut line = String::new();
        self.stream.read_line(&mut line).await?;
        anyhow::ensure!(line.starts_with("HTTP/1.1 200"), "status line {line:?}");
        let mut length = None;
        let mut chunked = false;
        loop {
            line.clear();
            self.stream.read_line(&mut line).await?;
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            let lower = header.to_ascii_lowercase();
            if let Some(value) = lower.strip_prefix("content-length:") {
                length = Some(value.trim().parse::<usize>()?);
            } else if lower.starts_with("transfer-encoding:") && lower.contains("chunked") {
                chunked = true;
            }
        }
        let mut body = Vec::new();
        if let Some(length) = length {
            body.resize(length, 0);
            self.stream.read_exact(&mut body).await?;
        } else if chunked {
            loop {
                line.clear();
                self.stream.read_line(&mut line).await?;
                let size = usize::from_str_radix(line.trim(), 16)?;
                let start = body.len();
                body.resize(start + size + 2, 0);
                self.stream.read_exact(&mut body[start..]).await?;
                body.truncate(start + size);
                if size == 0 {
                    break;
                }
            }
        } else {
            anyhow::bail!("a response without a length");
        }
        Ok(body)
    }
}

/// Queries/s of one query, `concurrency` clients for `seconds`; every response must be
/// error-free.
async fn throughput(
    client: &reqwest::Client,
    port: u16,
    token: &str,
    query: &str,
    args: &ApiBenchArgs,
) -> anyhow::Result<f64> {
    let done = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut workers = Vec::new();
    // The response must be right: checked in full once, then cheaply.
    let body = post(client, port, token, query).await?;
    anyhow::ensure!(body["errors"].is_null(), "query failed: {body}");
    for _ in 0..args.concurrency {
        let mut raw = RawClient::connect(port, token, query).await?;
        let (done, count) = (done.clone(), count.clone());
        workers.push(tokio::spawn(async move {
            while !done.load(Ordering::Relaxed) {
                let body = raw.call().await?;
                anyhow::ensure!(
                    !body.windows(9).any(|w| w == b"\"errors\":"),
                    "query failed: {}",
                    String::from_utf8_lossy(&body)
                );
                count.fetch_add(1, Ordering::Relaxed);
            }
            Ok(())
        }));
    }
    tokio::time::sleep(Duration::from_secs(args.seconds)).await;
    done.store(true, Ordering::Relaxed);
    for worker in workers {
        worker.await??;
    }
    Ok(count.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64())
}

/// One graphql-transport-ws subscriber of `events`: returns each notification's delay
/// after its `recordedAt`, in ms, once `expected` notifications arrived.
async fn subscriber(
    port: u16,
    token: String,
    expected: usize,
    ready: tokio::sync::mpsc::Sender<()>,
) -> anyhow::Result<Vec<f64>> {
    let mut request = format!("ws://127.0.0.1:{port}/graphql").into_client_request()?;
    request.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        "graphql-transport-ws".parse().expect("header value"),
    );
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let (mut socket, _) = tokio_tungstenite::client_async(request, tcp).await?;
    let init =
        json!({"type": "connection_init", "payload": {"Authorization": format!("Bearer {token}")}});
    socket.send(Message::text(init.to_string())).await?;
    let subscribe = json!({"id": "1", "type": "subscribe", "payload": {"query": "subscription { events { position recordedAt } }"}});
    let mut delays = Vec::with_capacity(expected);
    while let Some(message) = socket.next().await {
        let Message::Text(text) = message? else {
            continue;
        };
        let message: Value = serde_json::from_str(&text)?;
        match message["type"].as_str() {
            Some("connection_ack") => {
                socket.send(Message::text(subscribe.to_string())).await?;
                let _ = ready.send(()).await;
            }
            Some("next") => {
                let at = message["payload"]["data"]["events"]["recordedAt"]
                    .as_str()
                    .context("a notification without recordedAt")?;
                let at = chrono::DateTime::parse_from_rfc3339(at)?;
                let delay = chrono::Utc::now().signed_duration_since(at);
                delays.push(delay.num_microseconds().unwrap_or(i64::MAX) as f64 / 1_000.0);
                if delays.len() == expected {
                    break;
                }
            }
            Some("ping") => socket.send(Message::text(r#"{"type":"pong"}"#)).await?,
            Some("error") => anyhow::bail!("subscription error: {message}"),
            _ => {}
        }
    }
    anyhow::ensure!(
        delays.len() == expected,
        "the socket closed after {} notifications",
        delays.len()
    );
    Ok(delays)
}

pub async fn run(args: ApiBenchArgs) -> anyhow::Result<ExitCode> {
    let deployment = deploy().await?;
    chartline_ehr_connector::client::install_crypto_provider();
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.concurrency * 2)
        .build()?;
    let ops = token(&deployment, &[Role::Ops, Role::Platform]);
    let auditor = token(&deployment, &[Role::Auditor]);
    eprintln!(
        "seeding {} encounters and a {}-event stream…",
        args.encounters, args.stream_events
    );
    let (audited, seeded) = seed(&deployment, &args).await?;
    caught_up(&deployment, &client, &ops).await?;
    let one = seeded[seeded.len() / 2];
    let mut figures = Vec::new();

    eprintln!("encounter(id)…");
    let q =
        format!("{{ encounter(id: \"{one}\") {{ id status version noteStatus modalityUsed }} }}");
    let rate = throughput(&client, deployment.port, &ops, &q, &args).await?;
    figures.push(figure(
        "encounter_by_id",
        "encounter(id) queries/s (event-sourced state, non-PHI fields)",
        rate,
        "queries/s",
        Some((">=", 5_000.0)),
    ));

    eprintln!("encounters(first: 50)…");
    let q = "{ encounters(first: 50) { edges { node { id status noteStatus } } pageInfo { hasNextPage endCursor } } }";
    let rate = throughput(&client, deployment.port, &ops, q, &args).await?;
    figures.push(figure(
        "encounters_page_50",
        "a 50-item encounters page, queries/s (read model)",
        rate,
        "queries/s",
        None,
    ));

    eprintln!("audit history…");
    let q = format!(
        "{{ audit {{ history(streamId: \"encounter-{audited}\", first: {}) {{ edges {{ node {{ eventType version position hash }} }} }} }} }}",
        args.stream_events
    );
    let probe = post(&client, deployment.port, &auditor, &q).await?;
    let edges = probe["data"]["audit"]["history"]["edges"]
        .as_array()
        .map_or(0, Vec::len) as u64;
    anyhow::ensure!(
        edges == args.stream_events,
        "history returned {edges} events: {probe}"
    );
    let rate = throughput(&client, deployment.port, &auditor, &q, &args).await?;
    figures.push(figure(
        "audit_history_200",
        &format!(
            "audit history of a {}-event stream, queries/s",
            args.stream_events
        ),
        rate,
        "queries/s",
        None,
    ));

    eprintln!("encounterAt…");
    let mut latencies = Vec::with_capacity(args.encounter_at_calls);
    for call in 0..args.encounter_at_calls {
        let version = 1 + (call as u64 * 37) % args.stream_events;
        let q = format!(
            "{{ audit {{ encounterAt(id: \"{audited}\", version: {version}) {{ version }} }} }}"
        );
        let started = Instant::now();
        let body = post(&client, deployment.port, &auditor, &q).await?;
        latencies.push(started.elapsed());
        anyhow::ensure!(body["errors"].is_null(), "encounterAt failed: {body}");
    }
    latencies.sort();
    figures.push(figure(
        "encounter_at_p50",
        &format!(
            "encounterAt of a {}-event stream, p50 (HTTP round trip)",
            args.stream_events
        ),
        percentile(&latencies, 0.50),
        "ms",
        None,
    ));
    figures.push(figure(
        "encounter_at_p99",
        &format!(
            "encounterAt of a {}-event stream, p99 (HTTP round trip)",
            args.stream_events
        ),
        percentile(&latencies, 0.99),
        "ms",
        Some(("<", 5.0)),
    ));

    eprintln!("fan-out to {} subscribers…", args.subscribers);
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel(args.subscribers);
    let mut subscribers = Vec::with_capacity(args.subscribers);
    for _ in 0..args.subscribers {
        subscribers.push(tokio::spawn(subscriber(
            deployment.port,
            ops.clone(),
            args.fanout_events,
            ready_tx.clone(),
        )));
    }
    for _ in 0..args.subscribers {
        tokio::time::timeout(Duration::from_secs(60), ready_rx.recv())
            .await
            .context("subscribers did not connect within 60 s")?;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let clinician = Actor::new(ActorKind::Clinician, "dr-bench");
    let start = chrono::Utc::now();
    for n in 0..args.fanout_events {
        send(
            &deployment.runtime,
            &addendum(audited, &clinician, 10_000 + n as u32, start),
        )
        .await?;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut delays = Vec::new();
    for subscriber in subscribers {
        let received = tokio::time::timeout(Duration::from_secs(60), subscriber)
            .await
            .context("a subscriber missed notifications")???;
        delays.extend(
            received
                .into_iter()
                .map(|ms| Duration::from_micros((ms.max(0.0) * 1_000.0) as u64)),
        );
    }
    delays.sort();
    figures.push(figure(
        "fanout_deliveries",
        "notifications delivered (subscribers × events)",
        delays.len() as f64,
        "notifications",
        Some((">=", (args.subscribers * args.fanout_events) as f64)),
    ));
    figures.push(figure(
        "fanout_p50",
        &format!(
            "commit → arrival at each of {} subscribers, p50",
            args.subscribers
        ),
        percentile(&delays, 0.50),
        "ms",
        None,
    ));
    figures.push(figure(
        "fanout_p99",
        &format!(
            "commit → arrival at each of {} subscribers, p99",
            args.subscribers
        ),
        percentile(&delays, 0.99),
        "ms",
        Some(("<", 200.0)),
    ));

    let _ = std::fs::remove_dir_all(&deployment.dir);
    drop(deployment.runtime);
    report("api", &figures, &args.out)?;
    Ok(ExitCode::SUCCESS)
}
