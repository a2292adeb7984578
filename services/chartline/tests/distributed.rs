//! The distributed deployment, for real: a private nats-server with JetStream on a free
//! port, a fresh PostgreSQL database, and each service as its own `chartline serve
//! --only …` OS process. The encounter scenario runs through NATS; an external
//! JetStream consumer sees every event once, in order; the same scenario embedded gives
//! the same event sequence; killing the billing service with SIGKILL mid-flow and
//! restarting it loses and duplicates nothing; a nats-server restart mid-flow leaves no
//! command half-applied.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use chartline::scenario::{self, Visit};
use chartline::serve_cmd::{self, ServeArgs};
use chartline_infra::bus::Bus;
use chartline_infra::store::nats::NatsEventStore;
use chartline_infra::store::read_whole_stream;
use chartline_infra::{EventStore, ReadScope};
use chartline_proto::commands::CommandReply;
use chartline_proto::{EventEnvelope, StreamId, TenantId};
use chrono::{TimeZone, Utc};
use futures::StreamExt;
use uuid::Uuid;

const BIN: &str = env!("CARGO_BIN_EXE_chartline");

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn nats_server_binary() -> String {
    for candidate in [
        "/usr/sbin/nats-server",
        "/usr/bin/nats-server",
        "/usr/local/bin/nats-server",
    ] {
        if std::path::Path::new(candidate).exists() {
            return candidate.to_string();
        }
    }
    "nats-server".to_string()
}

/// A private nats-server (so this test can restart it without disturbing others).
struct NatsServer {
    port: u16,
    dir: std::path::PathBuf,
    child: Option<Child>,
}

impl NatsServer {
    fn start() -> NatsServer {
        let dir =
            std::env::temp_dir().join(format!("chartline_t_nats_{}", Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut server = NatsServer {
            port: free_port(),
            dir,
            child: None,
        };
        server.launch();
        server
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn launch(&mut self) {
        let child = Command::new(nats_server_binary())
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server must be installed (make services installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "nats-server did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

struct Database {
    url: String,
    name: String,
}

impl Database {
    async fn create() -> Database {
        let admin = std::env::var("CHARTLINE_TEST_PG")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
        let name = format!("chartline_t_{}", Uuid::new_v4().simple());
        let pool = sqlx::PgPool::connect(&admin)
            .await
            .expect("PostgreSQL must be running (make services)");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&pool)
            .await
            .unwrap();
        let base = admin.rsplit_once('/').unwrap().0;
        Database {
            url: format!("{base}/{name}"),
            name,
        }
    }

    async fn drop_it(self) {
        let admin = std::env::var("CHARTLINE_TEST_PG")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
        if let Ok(pool) = sqlx::PgPool::connect(&admin).await {
            let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            )))
            .execute(&pool)
            .await;
        }
    }
}

/// One `chartline serve --only …` process.
struct Service {
    name: String,
    child: Child,
    done: bool,
}

impl Drop for Service {
    /// A failing test must not leave processes behind.
    fn drop(&mut self) {
        if !self.done {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn spawn_service(only: &str, nats: &str, store: &str) -> Service {
    let child = Command::new(BIN)
        .args([
            "serve",
            "--only",
            only,
            "--nats",
            nats,
            "--store",
            store,
            "--tenants",
            "default,clinic-a",
        ])
        .env("CHARTLINE_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    Service {
        name: only.to_string(),
        child,
        done: false,
    }
}

impl Service {
    fn kill_9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.done = true;
    }

    fn terminate(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                self.done = true;
                assert!(status.success(), "{} exited with {status}", self.name);
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not stop on SIGTERM",
                self.name
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn tenant() -> TenantId {
    TenantId::parse("clinic-a").unwrap()
}

fn visit() -> Visit {
    Visit {
        encounter_id: Uuid::from_u128(0xD15_7B1B_u128 << 64 | 1),
        patient_id: Uuid::from_u128(0x51),
        practitioner_id: "dr-synthetic-1".into(),
        start: Utc.with_ymd_and_hms(2026, 3, 2, 15, 0, 0).unwrap(),
        audio_fallback: true,
        ai_drafted: true,
        level: 3,
        new_patient: false,
        payer: "medicare",
        at_home: true,
    }
}

async fn send_until_accepted(bus: &Bus, step: &scenario::Step) -> CommandReply {
    // Services are separate processes that may still be subscribing: retry while
    // nobody answers (same command id, so retries are safe).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let reply = scenario::send(bus, "chartline", &tenant(), step).await;
        match &reply {
            CommandReply::Rejected { code, .. }
                if *code == chartline_proto::commands::RejectionCode::Unavailable
                    && Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            _ => return reply,
        }
    }
}

async fn wait_for<S: EventStore>(
    store: &S,
    stream: &StreamId,
    event_type: &str,
) -> Vec<EventEnvelope> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(events) = read_whole_stream(store, &tenant(), stream).await
            && events.iter().any(|e| e.event_type == event_type)
        {
            return events;
        }
        assert!(
            Instant::now() < deadline,
            "{event_type} never appeared on {stream}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Types and data of the encounter's events (what must be equal across deployments).
fn shape(events: &[EventEnvelope]) -> Vec<(String, serde_json::Value)> {
    events
        .iter()
        .map(|e| (e.event_type.clone(), e.data.clone()))
        .collect()
}

async fn embedded_run(visit: &Visit) -> Vec<(String, serde_json::Value)> {
    let dir = std::env::temp_dir().join(format!("chartline_t_{}", Uuid::new_v4().simple()));
    let args = ServeArgs::embedded(&["clinic-a"]);
    let selected = args.selected().unwrap();
    let runtime = serve_cmd::connect(
        &args,
        &format!("sqlite://{}/e.db", dir.display()),
        &selected,
    )
    .await
    .unwrap();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut tasks = serve_cmd::start(&args, &runtime, &selected, &stopped)
        .await
        .unwrap();
    for step in scenario::steps_until_signed(visit) {
        assert!(matches!(
            send_until_accepted(&runtime.bus, &step).await,
            CommandReply::Accepted { .. }
        ));
    }
    let stream = StreamId::for_aggregate("encounter", visit.encounter_id);
    wait_for(&runtime.store, &stream, "CodesAssigned").await;
    for step in scenario::steps_after_coding(visit) {
        assert!(matches!(
            send_until_accepted(&runtime.bus, &step).await,
            CommandReply::Accepted { .. }
        ));
    }
    let events = read_whole_stream(&runtime.store, &tenant(), &stream)
        .await
        .unwrap();
    let _ = stop.send(true);
    while tasks.join_next().await.is_some() {}
    let _ = std::fs::remove_dir_all(dir);
    shape(&events)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_service_its_own_process_on_nats_and_postgres() {
    let mut nats = NatsServer::start();
    let database = Database::create().await;
    let url = nats.url();
    let store_service = spawn_service("store", &url, &database.url);
    let mut services: Vec<Service> = ["scheduling", "consultation", "documentation", "relay"]
        .iter()
        .map(|only| spawn_service(only, &url, &database.url))
        .collect();

    // An external consumer, knowing only the published subjects and JSON.
    let client = async_nats::connect(&url).await.unwrap();
    let bus = Bus::Nats(client.clone());
    let store = NatsEventStore::new(client.clone());
    let v = visit();
    let stream = StreamId::for_aggregate("encounter", v.encounter_id);

    let steps = scenario::steps_until_signed(&v);
    for step in &steps {
        let reply = send_until_accepted(&bus, step).await;
        assert!(
            matches!(reply, CommandReply::Accepted { .. }),
            "{}: {reply:?}",
            step.command
        );
    }
    // Billing starts late, is killed with SIGKILL right away, and restarts.
    let billing = spawn_service("billing", &url, &database.url);
    tokio::time::sleep(Duration::from_millis(700)).await;
    billing.kill_9();
    services.push(spawn_service("billing", &url, &database.url));
    wait_for(&store, &stream, "CodesAssigned").await;

    // nats-server restarts mid-flow: commands during the outage fail fast as
    // unavailable; after it is back, services reconnect and commands succeed.
    nats.stop();
    let during = scenario::send(
        &bus,
        "chartline",
        &tenant(),
        &scenario::steps_after_coding(&v)[0],
    )
    .await;
    match &during {
        CommandReply::Rejected { code, .. } => {
            assert_eq!(
                *code,
                chartline_proto::commands::RejectionCode::Unavailable,
                "{during:?}"
            )
        }
        accepted => panic!("a command was accepted with NATS down: {accepted:?}"),
    }
    nats.launch();
    for step in scenario::steps_after_coding(&v) {
        let reply = send_until_accepted(&bus, &step).await;
        assert!(
            matches!(reply, CommandReply::Accepted { .. }),
            "{}: {reply:?}",
            step.command
        );
    }
    // The relay is killed with SIGKILL and restarted: it resumes from what JetStream holds.
    let relay_index = services.iter().position(|s| s.name == "relay").unwrap();
    services.remove(relay_index).kill_9();
    services.push(spawn_service("relay", &url, &database.url));
    let events = wait_for(&store, &stream, "FollowUpTaskCreated").await;
    let coded = events
        .iter()
        .filter(|e| e.event_type.starts_with("Codes"))
        .count();
    assert_eq!(
        coded, 1,
        "the billing restart must not duplicate the code assignment"
    );
    assert_eq!(
        events
            .iter()
            .filter(|e| e.event_type == "FollowUpTaskCreated")
            .count(),
        1
    );

    // Same scenario embedded: same event sequence (types and data).
    assert_eq!(shape(&events), embedded_run(&v).await);

    // The external JetStream consumer sees every relayed event exactly once, in log order.
    let head = store.head_position().await.unwrap();
    let all = store
        .read_all(&ReadScope::AllTenants, 0, 10_000)
        .await
        .unwrap();
    let relayable: Vec<&EventEnvelope> = all
        .iter()
        .filter(|e| e.category() != "checkpoint")
        .collect();
    let jetstream = async_nats::jetstream::new(client.clone());
    let consumer_stream = jetstream.get_stream("CHARTLINE_EVENTS").await.unwrap();
    let consumer = consumer_stream
        .create_consumer(async_nats::jetstream::consumer::pull::Config {
            durable_name: None,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut messages = consumer.messages().await.unwrap();
    let mut received = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while received.len() < relayable.len() {
        let next = tokio::time::timeout(Duration::from_secs(5), messages.next()).await;
        let Ok(Some(Ok(message))) = next else {
            assert!(
                Instant::now() < deadline,
                "relay delivered {} of {}",
                received.len(),
                relayable.len()
            );
            continue;
        };
        let envelope: EventEnvelope = serde_json::from_slice(&message.payload).unwrap();
        message.ack().await.unwrap();
        received.push(envelope);
    }
    let expected: Vec<u64> = relayable.iter().map(|e| e.global_position).collect();
    let got: Vec<u64> = received.iter().map(|e| e.global_position).collect();
    assert_eq!(
        got, expected,
        "relay order or exactly-once broken (head {head})"
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(500), messages.next())
            .await
            .is_err(),
        "a duplicate arrived after the last event"
    );

    for service in services {
        service.terminate();
    }
    store_service.terminate();
    database.drop_it().await;
}
