//! `chartline soak` (what `make soak` runs): the distributed deployment under a steady
//! command load while a chaos driver kills and restarts services, restarts nats-server
//! and PostgreSQL and injects EHR faults; then, after a bounded settle, it checks the
//! invariants and prints its figures. Loopback only, bounded in time.
//!
//! Shape of a run:
//! - its own nats-server (JetStream, store directory under the run directory) on a free
//!   port, owned by this process so it can be restarted without disturbing anything
//!   else; a fresh PostgreSQL database (dropped and recreated) on the PostgreSQL given
//!   by `--pg-url`, restarted with `--pg-restart-command`; a `chartline sandbox-ehr`;
//!   and every component (`serve_cmd::COMPONENTS`) as its own `chartline serve --only …`
//!   process, supervised (an unplanned exit is restarted and counted);
//! - a load driver: synthetic visits (register, then the seven lifecycle steps) at a
//!   fixed rate, every command sent over NATS through the real command path and retried
//!   with its command id while `unavailable`/`conflict`; every 25th visit also sends a
//!   command the domain must refuse. Each final reply is recorded;
//! - a chaos driver, every `--chaos-interval` seconds (±30 %), in a fixed cycle with a
//!   random victim: kill -9 a service, an EHR fault window, restart nats-server, kill -9
//!   a service, restart PostgreSQL. The time until the system accepts commands again
//!   (and the killed service answers) is its recovery time.
//!
//! Invariants checked at the end (exit 1 when any fails):
//! 1. every accepted command's events are in the store exactly once (by causation id =
//!    command id, equal to the reply's event ids), and no rejected command has events;
//! 2. every stream's hash chain verifies;
//! 3. every read model equals a from-scratch rebuild (into a second, fresh database);
//! 4. no EHR duplicates (no business identifier held by two resources in the sandbox),
//!    and the connector did write (artifacts acknowledged, none blocked);
//! 5. memory did not grow: for each process alive through the middle and last thirds of
//!    the load phase, mean RSS of the last third ≤ middle third × tolerance + slack;
//! 6. the relay published each relayable event once to JetStream.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use chartline::scenario::{self, Step};
use chartline::serve_cmd::COMPONENTS;
use chartline_infra::bus::Bus;
use chartline_infra::command::send_command;
use chartline_infra::{AnyStore, EventStore, ReadScope};
use chartline_projections::models::standard_projections;
use chartline_projections::{Cell, ProjectionRunner, ReadDb, RunnerConfig};
use chartline_proto::commands::{CommandReply, CommandRequest, RejectionCode};
use chartline_proto::{Actor, ActorKind, TenantId};
use chrono::{TimeZone, Utc};
use clap::Args;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use uuid::Uuid;

const TENANT: &str = "soak";
const ROOT: &str = "chartline";

#[derive(Args, Clone)]
pub struct SoakArgs {
    /// Seconds of load and chaos (the settle and the checks come after).
    #[arg(long, env = "SOAK_SECS", default_value_t = 300)]
    pub seconds: u64,
    /// Target commands per second of the load driver.
    #[arg(long, env = "SOAK_RATE", default_value_t = 40.0)]
    pub rate: f64,
    /// Seconds between chaos actions (jittered ±30 %); 0 disables chaos.
    #[arg(long, env = "SOAK_CHAOS_INTERVAL", default_value_t = 20)]
    pub chaos_interval: u64,
    /// Upper bound of the settle phase (seconds).
    #[arg(long, default_value_t = 180)]
    pub settle_seconds: u64,
    /// Seed of the load and the chaos (default: from the clock).
    #[arg(long, env = "SOAK_SEED")]
    pub seed: Option<u64>,
    /// PostgreSQL admin URL (any database); the soak databases are created next to it.
    #[arg(
        long,
        env = "SOAK_PG_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    pub pg_url: String,
    /// Shell command that restarts that PostgreSQL (chaos).
    #[arg(
        long,
        env = "SOAK_PG_RESTART",
        default_value = "pg_ctlcluster 15 main restart"
    )]
    pub pg_restart_command: String,
    /// Name of the event-store database (dropped and recreated); the rebuild comparison
    /// uses `<name>_rebuild`.
    #[arg(long, default_value = "chartline_soak")]
    pub database: String,
    #[arg(
        long,
        env = "SOAK_NATS_SERVER",
        default_value = "/usr/sbin/nats-server"
    )]
    pub nats_server: String,
    /// Run directory: logs, the nats-server store, the sandbox EHR database, report.json.
    #[arg(long, default_value = "target/soak")]
    pub dir: PathBuf,
    /// Memory: the last third's mean RSS may exceed the middle third's by this factor…
    #[arg(long, default_value_t = 1.25)]
    pub memory_tolerance: f64,
    /// …plus this many MiB.
    #[arg(long, default_value_t = 16)]
    pub memory_slack_mib: u64,
}

// ---------------------------------------------------------------------------------------
// Invariant checkers (pure; unit-tested below)
// ---------------------------------------------------------------------------------------

/// The final answer a command got.
#[derive(Debug, Clone)]
pub enum Outcome {
    Accepted {
        event_ids: Vec<Uuid>,
    },
    Rejected(RejectionCode),
    /// Still `unavailable`/`conflict` after every retry; resent during the settle.
    Unresolved(Box<Step>),
}

#[derive(Debug, Clone)]
pub struct Record {
    pub command_id: Uuid,
    pub command: &'static str,
    /// The domain must refuse it (a deliberately invalid command).
    pub must_be_rejected: bool,
    pub outcome: Outcome,
}

#[derive(Debug, Default)]
pub struct CommandCheck {
    pub accepted: u64,
    pub rejected: u64,
    pub exactly_once: u64,
    pub problems: Vec<String>,
}

/// Invariant 1: `stored` maps causation id → ids of the stored events it caused.
pub fn check_commands(records: &[Record], stored: &HashMap<Uuid, Vec<Uuid>>) -> CommandCheck {
    let mut check = CommandCheck::default();
    for record in records {
        let found = stored.get(&record.command_id).cloned().unwrap_or_default();
        match &record.outcome {
            Outcome::Accepted { event_ids } => {
                check.accepted += 1;
                let (mut want, mut got) = (event_ids.clone(), found.clone());
                want.sort();
                got.sort();
                if want == got {
                    check.exactly_once += 1;
                } else if got.len() > want.len() {
                    check.problems.push(format!(
                        "{} {}: {} events stored, the reply named {} (duplicated)",
                        record.command,
                        record.command_id,
                        got.len(),
                        want.len()
                    ));
                } else {
                    check.problems.push(format!(
                        "{} {}: the reply named {:?}, the store holds {:?} (lost or different)",
                        record.command, record.command_id, want, got
                    ));
                }
                if record.must_be_rejected {
                    check.problems.push(format!(
                        "{} {}: accepted, but the domain must refuse it",
                        record.command, record.command_id
                    ));
                }
            }
            Outcome::Rejected(code) => {
                check.rejected += 1;
                if !found.is_empty() {
                    check.problems.push(format!(
                        "{} {}: rejected ({code:?}) but {} events carry its id",
                        record.command,
                        record.command_id,
                        found.len()
                    ));
                }
            }
            Outcome::Unresolved(_) => check.problems.push(format!(
                "{} {}: no definitive reply even after the settle",
                record.command, record.command_id
            )),
        }
    }
    check
}

/// Invariant 3: the first differences between two dumps of the same tables.
pub fn compare_dumps(
    live: &[(String, Vec<Vec<Cell>>)],
    rebuilt: &[(String, Vec<Vec<Cell>>)],
) -> Vec<String> {
    let mut differences = Vec::new();
    for ((table, a), (_, b)) in live.iter().zip(rebuilt) {
        if a.len() != b.len() {
            differences.push(format!(
                "{table}: {} live rows, {} rebuilt",
                a.len(),
                b.len()
            ));
        }
        if let Some((index, (row_a, row_b))) =
            a.iter().zip(b).enumerate().find(|(_, (x, y))| x != y)
        {
            differences.push(format!(
                "{table}: row {index} differs: live {row_a:?} rebuilt {row_b:?}"
            ));
        }
    }
    differences
}

/// Invariant 4: duplicate business identifiers reported by the sandbox's `/_stats`.
pub fn ehr_duplicates(stats: &Value) -> Vec<String> {
    stats["duplicates"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|d| format!("{} {} ×{}", d["resourceType"], d["key"], d["count"]))
        .collect()
}

#[derive(Debug, Clone, PartialEq)]
pub struct MemoryVerdict {
    pub middle_mib: f64,
    pub last_mib: f64,
    pub grew: bool,
}

/// Invariant 5 for one process: `samples` are `(seconds since the load started, RSS
/// KiB)` of one process instance. `None` when it was not alive through the middle and
/// last thirds of the load phase (restarted by chaos), so it cannot be judged.
pub fn judge_memory(
    samples: &[(f64, u64)],
    load_seconds: f64,
    tolerance: f64,
    slack_mib: f64,
) -> Option<MemoryVerdict> {
    let third = load_seconds / 3.0;
    let first = samples.first()?.0;
    if first > third + 3.0 {
        return None;
    }
    let mean = |from: f64, to: f64| {
        let picked: Vec<f64> = samples
            .iter()
            .filter(|(t, _)| *t >= from && *t < to)
            .map(|(_, kib)| *kib as f64 / 1024.0)
            .collect();
        (picked.len() >= 2).then(|| picked.iter().sum::<f64>() / picked.len() as f64)
    };
    let middle_mib = mean(third, 2.0 * third)?;
    let last_mib = mean(2.0 * third, load_seconds)?;
    Some(MemoryVerdict {
        middle_mib,
        last_mib,
        grew: last_mib > middle_mib * tolerance + slack_mib,
    })
}

// ---------------------------------------------------------------------------------------
// Processes
// ---------------------------------------------------------------------------------------

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

async fn wait_port(port: u16, what: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        anyhow::ensure!(Instant::now() < deadline, "{what} did not open port {port}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

fn terminate(child: &mut Child, grace: Duration) -> bool {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    false
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
}

/// One process instance's RSS samples: when it started, `(seconds since the load
/// started, KiB)`.
type Instance = (Instant, Vec<(f64, u64)>);

struct Member {
    child: Option<Child>,
    started: Instant,
    kills: u32,
    unplanned_exits: Vec<String>,
}

/// The supervised `chartline` processes (every component and the sandbox EHR).
struct Fleet {
    bin: PathBuf,
    logs: PathBuf,
    nats_url: String,
    store_url: String,
    api_port: u16,
    sandbox_port: u16,
    sandbox_db: String,
    jwt_secret: String,
    members: BTreeMap<&'static str, Member>,
    /// RSS samples: component → (instance start, samples (t, KiB)).
    rss: BTreeMap<&'static str, Vec<Instance>>,
}

impl Fleet {
    fn spawn(&mut self, component: &'static str) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.logs.join(format!("{component}.log")))?;
        let mut command = Command::new(&self.bin);
        if component == "sandbox-ehr" {
            command.args([
                "sandbox-ehr",
                "--listen",
                &format!("127.0.0.1:{}", self.sandbox_port),
                "--db",
                &self.sandbox_db,
            ]);
        } else {
            command.args([
                "serve",
                "--only",
                component,
                "--nats",
                &self.nats_url,
                "--store",
                &self.store_url,
                "--tenants",
                TENANT,
            ]);
            match component {
                "projections" => {
                    command.args(["--read-store", &self.store_url]);
                }
                "api" => {
                    command.args([
                        "--read-store",
                        &self.store_url,
                        "--listen",
                        &format!("127.0.0.1:{}", self.api_port),
                    ]);
                }
                "ehr" => {
                    command.args([
                        "--ehr-url",
                        &format!("http://127.0.0.1:{}", self.sandbox_port),
                        // The sandbox is the shipped compliance map's covered EHR; an
                        // unlisted URL would (rightly) have every PHI write blocked.
                        "--ehr-component",
                        "sandbox-ehr",
                    ]);
                }
                _ => {}
            }
        }
        let child = command
            .env("CHARTLINE_LOG", "warn")
            .env("CHARTLINE_JWT_SECRET", &self.jwt_secret)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("spawning {component}"))?;
        let member = self.members.entry(component).or_insert(Member {
            child: None,
            started: Instant::now(),
            kills: 0,
            unplanned_exits: vec![],
        });
        member.child = Some(child);
        member.started = Instant::now();
        self.rss
            .entry(component)
            .or_default()
            .push((member.started, vec![]));
        Ok(())
    }

    fn kill_9(&mut self, component: &str) {
        if let Some(member) = self.members.get_mut(component)
            && let Some(mut child) = member.child.take()
        {
            let _ = child.kill();
            let _ = child.wait();
            member.kills += 1;
        }
    }

    /// Restarts members that exited on their own (a supervisor's job); returns them.
    fn reap(&mut self, since_load: Option<Instant>) -> Vec<&'static str> {
        let mut exited = vec![];
        for (name, member) in &mut self.members {
            if let Some(child) = &mut member.child
                && let Ok(Some(status)) = child.try_wait()
            {
                let at = since_load.map_or(0.0, |t| t.elapsed().as_secs_f64());
                member
                    .unplanned_exits
                    .push(format!("{status} at {at:.0} s"));
                member.child = None;
                exited.push(*name);
            }
        }
        for name in exited.iter().copied() {
            if let Err(error) = self.spawn(name) {
                eprintln!("soak: restarting {name}: {error:#}");
            }
        }
        exited
    }

    fn sample_rss(&mut self, load_started: Instant) {
        let t = load_started.elapsed().as_secs_f64();
        for (name, member) in &self.members {
            if let Some(child) = &member.child
                && let Some(kib) = rss_kib(child.id())
                && let Some(series) = self.rss.get_mut(name)
                && let Some((_, samples)) = series.last_mut()
            {
                samples.push((t, kib));
            }
        }
    }
}

/// The soak's own nats-server (same binary and flags as scripts/ensure-services.sh).
struct NatsServer {
    binary: String,
    port: u16,
    dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl NatsServer {
    async fn launch(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = Command::new(&self.binary)
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
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", self.binary))?;
        self.child = Some(child);
        wait_port(self.port, "nats-server").await
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            terminate(&mut child, Duration::from_secs(10));
        }
    }
}

// ---------------------------------------------------------------------------------------
// HTTP (the sandbox's fault and stats endpoints, the API's readiness)
// ---------------------------------------------------------------------------------------

async fn http(method: &str, port: u16, path: &str, body: &str) -> anyhow::Result<(u16, String)> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        anyhow::Ok(String::from_utf8_lossy(&response).into_owned())
    };
    let text = tokio::time::timeout(Duration::from_secs(15), exchange).await??;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("malformed HTTP reply")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("no HTTP status")?;
    Ok((status, body.to_string()))
}

// ---------------------------------------------------------------------------------------
// Load
// ---------------------------------------------------------------------------------------

#[derive(Default)]
struct Counters {
    attempts: AtomicU64,
    retries: AtomicU64,
    visits_started: AtomicU64,
    visits_shed: AtomicU64,
}

struct Load {
    bus: Bus,
    tenant: TenantId,
    records: Mutex<Vec<Record>>,
    counters: Counters,
    stop: AtomicBool,
    seed: u64,
}

impl Load {
    /// Sends until a definitive reply (retrying `unavailable`/`conflict` with the same
    /// command id for up to 90 s); records it.
    async fn send(&self, step: &Step, must_be_rejected: bool) -> Outcome {
        let outcome = self.send_definitive(step, Duration::from_secs(90)).await;
        self.records.lock().expect("records").push(Record {
            command_id: step.command_id,
            command: step.command,
            must_be_rejected,
            outcome: outcome.clone(),
        });
        outcome
    }

    async fn send_definitive(&self, step: &Step, give_up: Duration) -> Outcome {
        let started = Instant::now();
        let mut backoff = Duration::from_millis(100);
        loop {
            self.counters.attempts.fetch_add(1, Ordering::Relaxed);
            let request = CommandRequest {
                command_id: step.command_id,
                actor: step.actor.clone(),
                correlation_id: None,
                payload: step.payload.clone(),
            };
            let reply = send_command(
                &self.bus,
                ROOT,
                &self.tenant,
                step.service,
                step.command,
                &request,
                Duration::from_secs(5),
            )
            .await;
            match reply {
                CommandReply::Accepted { event_ids, .. } => {
                    return Outcome::Accepted { event_ids };
                }
                CommandReply::Rejected {
                    code: RejectionCode::Unavailable | RejectionCode::Conflict,
                    ..
                } if started.elapsed() < give_up => {
                    self.counters.retries.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
                CommandReply::Rejected {
                    code: RejectionCode::Unavailable | RejectionCode::Conflict,
                    ..
                } => return Outcome::Unresolved(Box::new(step.clone())),
                CommandReply::Rejected { code, .. } => return Outcome::Rejected(code),
            }
        }
    }

    /// One synthetic visit: the patient registers, then the seven lifecycle steps; every
    /// 25th visit also tries to sign before any note exists (must be refused).
    async fn visit(&self, index: u64) {
        let day = Utc
            .with_ymd_and_hms(2026, 3, 2, 0, 0, 0)
            .single()
            .expect("day");
        let visit = scenario::synthetic_visit(self.seed, index, day);
        if !matches!(
            self.send(&registration(&visit, self.seed), false).await,
            Outcome::Accepted { .. }
        ) {
            return;
        }
        for (position, step) in scenario::steps_until_signed(&visit).iter().enumerate() {
            if self.stop.load(Ordering::Relaxed) {
                return;
            }
            if !matches!(self.send(step, false).await, Outcome::Accepted { .. }) {
                return;
            }
            if position == 0 && index.is_multiple_of(25) {
                let mut premature = step.clone();
                premature.command = "sign_note";
                premature.service = "documentation";
                premature.command_id = Uuid::new_v4();
                premature.payload = json!({
                    "encounter_id": visit.encounter_id,
                    "practitioner_id": visit.practitioner_id,
                    "at": (visit.start + chrono::Duration::minutes(1)).to_rfc3339(),
                });
                self.send(&premature, true).await;
            }
        }
    }
}

/// A synthetic registration with distinct demographics (no twins: every patient is new).
fn registration(visit: &scenario::Visit, seed: u64) -> Step {
    let (h, l) = visit.patient_id.as_u64_pair();
    let demographics = json!({
        "given_name": format!("Soak{:04x}", (h ^ seed) & 0xFFFF),
        "family_name": format!("Synthfam{:06}", l % 1_000_000),
        "birth_date": format!("19{:02}-{:02}-{:02}", 30 + h % 70, 1 + (h >> 8) % 12, 1 + (h >> 16) % 28),
        "sex": if h % 2 == 0 { "female" } else { "male" },
        "address_line": format!("{} Synthetic Street", 1 + (h >> 24) % 9_000),
        "city": "Springfield",
        "state": "IL",
        "postal_code": format!("62{:03}", (h >> 32) % 1_000),
        "phone": format!("(217) 555-{:04}", (h >> 40) % 10_000),
        "email": null,
        "time_zone": "America/Chicago",
    });
    Step {
        service: "identity",
        command: "register",
        actor: Actor::new(ActorKind::Service, "telehealth-intake"),
        payload: json!({
            "patient_id": visit.patient_id,
            "demographics": demographics,
            "at": (visit.start - chrono::Duration::days(3)).to_rfc3339(),
        }),
        command_id: Uuid::from_u64_pair(h, 0x50A4),
    }
}

// ---------------------------------------------------------------------------------------
// Chaos
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy)]
enum Action {
    KillService,
    EhrFaults,
    RestartNats,
    RestartPostgres,
}

const CYCLE: [Action; 5] = [
    Action::KillService,
    Action::EhrFaults,
    Action::RestartNats,
    Action::KillService,
    Action::RestartPostgres,
];

struct ChaosLog {
    at_seconds: f64,
    action: String,
    recovery: Option<Duration>,
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Waits until the command path works end to end: a fresh probe patient's registration
/// (recorded like any other command) is accepted, and `service` (if any) answers.
async fn recovered(load: &Load, service: Option<&str>, limit: Duration) -> Option<Duration> {
    let started = Instant::now();
    if let Some(service) = service {
        let subject = format!(
            "{ROOT}.cmd.{}.{service}.readiness_probe",
            chartline_infra::checkpoint::SYSTEM_TENANT
        );
        while load
            .bus
            .request(&subject, b"{}".to_vec(), Duration::from_secs(2))
            .await
            .is_err()
        {
            if started.elapsed() > limit {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let day = Utc.with_ymd_and_hms(2026, 2, 1, 0, 0, 0).single()?;
    let probe = scenario::synthetic_visit(load.seed ^ 0x9B0BE, rand_index(), day);
    let step = registration(&probe, load.seed);
    let remaining = limit.saturating_sub(started.elapsed());
    let outcome = load.send_definitive(&step, remaining).await;
    load.records.lock().expect("records").push(Record {
        command_id: step.command_id,
        command: step.command,
        must_be_rejected: false,
        outcome: outcome.clone(),
    });
    matches!(outcome, Outcome::Accepted { .. }).then(|| started.elapsed())
}

/// What the reactors have done so far, read from the read models, JetStream and the
/// API: a restarted reactor has recovered once its figure moves past its value at the
/// kill (the load keeps giving it work).
struct Progress {
    event_store: AnyStore,
    read_db: ReadDb,
    jetstream: async_nats::jetstream::Context,
    api_port: u16,
}

impl Progress {
    async fn of(&self, component: &str) -> Option<u64> {
        match component {
            "projections" => {
                chartline_projections::engine::status(&self.event_store, &self.read_db)
                    .await
                    .ok()?
                    .iter()
                    .map(|s| s.checkpoint)
                    .min()
            }
            "relay" => {
                let mut stream = self.jetstream.get_stream("CHARTLINE_EVENTS").await.ok()?;
                Some(stream.info().await.ok()?.state.messages)
            }
            "ehr" => ehr_states(&self.read_db).await.get("acknowledged").copied(),
            "api" => match http("GET", self.api_port, "/readyz", "").await {
                Ok((200, _)) => Some(1),
                _ => Some(0),
            },
            _ => None,
        }
    }

    /// Waits until `component`'s figure exceeds `baseline` (the API: until it is ready).
    async fn moved_past(&self, component: &str, baseline: Option<u64>, limit: Duration) -> bool {
        let started = Instant::now();
        let baseline = if component == "api" {
            Some(0)
        } else {
            baseline
        };
        let Some(baseline) = baseline else {
            return true;
        };
        while started.elapsed() < limit {
            if self.of(component).await.is_some_and(|now| now > baseline) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        false
    }

    /// Waits until no EHR write-back waits for a retry (after a fault window).
    async fn ehr_backlog_cleared(&self, limit: Duration) -> Option<Duration> {
        let started = Instant::now();
        while started.elapsed() < limit {
            if ehr_states(&self.read_db)
                .await
                .get("failed")
                .copied()
                .unwrap_or(0)
                == 0
            {
                return Some(started.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        None
    }
}

fn rand_index() -> u64 {
    Uuid::new_v4().as_u64_pair().0
}

// ---------------------------------------------------------------------------------------
// The run
// ---------------------------------------------------------------------------------------

fn database_url(admin: &str, name: &str) -> String {
    let base = admin.rsplit_once('/').map_or(admin, |(base, _)| base);
    format!("{base}/{name}")
}

async fn recreate_database(admin: &str, name: &str) -> anyhow::Result<()> {
    let pool = sqlx::PgPool::connect(admin)
        .await
        .with_context(|| format!("PostgreSQL at {admin}"))?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
    )))
    .execute(&pool)
    .await?;
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&pool)
        .await?;
    pool.close().await;
    Ok(())
}

async fn dump_all(db: &ReadDb) -> anyhow::Result<Vec<(String, Vec<Vec<Cell>>)>> {
    let mut out = Vec::new();
    for factory in standard_projections() {
        for spec in factory().tables() {
            out.push((spec.name.to_string(), db.dump(spec, spec.name).await?));
        }
    }
    Ok(out)
}

async fn ehr_states(db: &ReadDb) -> BTreeMap<String, u64> {
    use chartline_projections::db::Kind;
    let rows = db
        .fetch(
            "SELECT state, COUNT(*) FROM ehr_writeback GROUP BY state",
            &[],
            &[Kind::Text, Kind::Int],
        )
        .await
        .unwrap_or_default();
    rows.into_iter()
        .filter_map(|row| match (&row[0], &row[1]) {
            (Cell::Text(state), Cell::Int(n)) => Some((state.clone(), *n as u64)),
            _ => None,
        })
        .collect()
}

struct Verdict {
    name: &'static str,
    pass: bool,
    detail: String,
}

pub async fn run(args: SoakArgs) -> anyhow::Result<ExitCode> {
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(7, |d| d.as_nanos() as u64)
    });
    let dir = &args.dir;
    let _ = std::fs::remove_dir_all(dir);
    for sub in ["logs", "nats"] {
        std::fs::create_dir_all(dir.join(sub))?;
    }
    let dir = std::fs::canonicalize(dir)?;
    let store_url = database_url(&args.pg_url, &args.database);
    let rebuild_name = format!("{}_rebuild", args.database);
    recreate_database(&args.pg_url, &args.database).await?;
    recreate_database(&args.pg_url, &rebuild_name).await?;

    let mut nats = NatsServer {
        binary: args.nats_server.clone(),
        port: free_port()?,
        dir: dir.join("nats"),
        log: dir.join("logs").join("nats-server.log"),
        child: None,
    };
    nats.launch().await?;
    let nats_url = format!("nats://127.0.0.1:{}", nats.port);
    let fleet = Arc::new(Mutex::new(Fleet {
        bin: std::env::current_exe().context("locating the chartline binary")?,
        logs: dir.join("logs"),
        nats_url: nats_url.clone(),
        store_url: store_url.clone(),
        api_port: free_port()?,
        sandbox_port: free_port()?,
        sandbox_db: format!("sqlite://{}", dir.join("sandbox-ehr.db").display()),
        jwt_secret: format!("{}{}", Uuid::new_v4().simple(), Uuid::new_v4().simple()),
        members: BTreeMap::new(),
        rss: BTreeMap::new(),
    }));
    println!(
        "chartline soak: {} s of load at {} commands/s, chaos every ~{} s, seed {seed}",
        args.seconds, args.rate, args.chaos_interval
    );
    println!(
        "  nats-server {nats_url} (own, store {}), store {store_url}, logs {}",
        nats.dir.display(),
        dir.join("logs").display()
    );

    // Start-up: sandbox EHR, the store, then every other component.
    let (api_port, sandbox_port) = {
        let mut fleet = fleet.lock().expect("fleet");
        fleet.spawn("sandbox-ehr")?;
        fleet.spawn("store")?;
        (fleet.api_port, fleet.sandbox_port)
    };
    wait_port(sandbox_port, "sandbox EHR").await?;
    let bus = Bus::connect_nats(&nats_url).await?;
    let probe_store =
        chartline_infra::store::nats::NatsEventStore::new(bus.nats_client().expect("NATS").clone());
    let deadline = Instant::now() + Duration::from_secs(60);
    while probe_store.head_position().await.is_err() {
        anyhow::ensure!(Instant::now() < deadline, "the store service did not start");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for component in COMPONENTS.iter().filter(|c| **c != "store") {
        fleet.lock().expect("fleet").spawn(component)?;
        // The read-model migrations of projections and api must not race.
        if *component == "projections" {
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    }
    let load = Arc::new(Load {
        bus: bus.clone(),
        tenant: TenantId::parse(TENANT)?,
        records: Mutex::new(Vec::new()),
        counters: Counters::default(),
        stop: AtomicBool::new(false),
        seed,
    });
    for service in [
        "scheduling",
        "consultation",
        "documentation",
        "billing",
        "rpm",
        "identity",
    ] {
        anyhow::ensure!(
            recovered(&load, Some(service), Duration::from_secs(60))
                .await
                .is_some(),
            "{service} did not become ready"
        );
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while !matches!(http("GET", api_port, "/readyz", "").await, Ok((200, _))) {
        anyhow::ensure!(Instant::now() < deadline, "the API did not become ready");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!(
        "  all {} components up; load and chaos start",
        COMPONENTS.len()
    );

    // Supervisor and RSS sampler.
    let load_started = Instant::now();
    let load_seconds = args.seconds as f64;
    let supervising = Arc::new(AtomicBool::new(true));
    let supervisor = {
        let (fleet, supervising) = (fleet.clone(), supervising.clone());
        tokio::spawn(async move {
            let mut tick = 0u64;
            while supervising.load(Ordering::Relaxed) {
                {
                    let mut fleet = fleet.lock().expect("fleet");
                    for name in fleet.reap(Some(load_started)) {
                        eprintln!(
                            "soak: {name} exited unplanned at {:.0} s; restarted",
                            load_started.elapsed().as_secs_f64()
                        );
                    }
                    if tick.is_multiple_of(4) {
                        fleet.sample_rss(load_started);
                    }
                }
                tick += 1;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    };

    // Load driver.
    let load_end = load_started + Duration::from_secs(args.seconds);
    let driver = {
        let load = load.clone();
        let rate = args.rate.max(0.1);
        tokio::spawn(async move {
            let in_flight = Arc::new(tokio::sync::Semaphore::new(400));
            let mut visits = tokio::task::JoinSet::new();
            // 8 commands per visit (register + 7 steps).
            let mut ticker = tokio::time::interval(Duration::from_secs_f64(8.0 / rate));
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            let mut index = 0u64;
            while Instant::now() < load_end {
                ticker.tick().await;
                let Ok(permit) = in_flight.clone().try_acquire_owned() else {
                    load.counters.visits_shed.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                load.counters.visits_started.fetch_add(1, Ordering::Relaxed);
                let load = load.clone();
                let this = index;
                visits.spawn(async move {
                    let _permit = permit;
                    load.visit(this).await;
                });
                index += 1;
                while visits.try_join_next().is_some() {}
            }
            load.stop.store(true, Ordering::Relaxed);
            while visits.join_next().await.is_some() {}
        })
    };

    // Chaos driver.
    let progress = Progress {
        event_store: AnyStore::open(&store_url).await?,
        read_db: ReadDb::open(&store_url).await?,
        jetstream: async_nats::jetstream::new(bus.nats_client().expect("NATS").clone()),
        api_port,
    };
    let mut chaos_log: Vec<ChaosLog> = Vec::new();
    let mut rng = Rng(seed ^ 0x000C_4A05);
    let mut fault_windows = 0u32;
    let mut faults_injected: BTreeMap<String, u64> = BTreeMap::new();
    let mut cycle = 0usize;
    let victims: Vec<&'static str> = COMPONENTS.to_vec();
    loop {
        if args.chaos_interval == 0 {
            break;
        }
        let pause = args.chaos_interval as f64 * (0.7 + 0.6 * rng.unit());
        let at = Instant::now() + Duration::from_secs_f64(pause);
        if at + Duration::from_secs(5) >= load_end {
            break;
        }
        tokio::time::sleep_until(at.into()).await;
        let at_seconds = load_started.elapsed().as_secs_f64();
        let action = CYCLE[cycle % CYCLE.len()];
        cycle += 1;
        let (description, recovery) = match action {
            Action::KillService => {
                let victim = victims[(rng.next() % victims.len() as u64) as usize];
                let started = Instant::now();
                let baseline = progress.of(victim).await;
                fleet.lock().expect("fleet").kill_9(victim);
                tokio::time::sleep(Duration::from_millis(500)).await;
                fleet.lock().expect("fleet").spawn(victim)?;
                let service = matches!(
                    victim,
                    "scheduling"
                        | "consultation"
                        | "documentation"
                        | "billing"
                        | "rpm"
                        | "identity"
                )
                .then_some(victim);
                let recovery = match recovered(&load, service, Duration::from_secs(120)).await {
                    Some(_)
                        if progress
                            .moved_past(victim, baseline, Duration::from_secs(120))
                            .await =>
                    {
                        Some(started.elapsed())
                    }
                    _ => None,
                };
                (format!("kill -9 {victim}, restarted"), recovery)
            }
            Action::EhrFaults => {
                fault_windows += 1;
                let faults = json!({
                    "error_rate": 0.3,
                    "kinds": ["500", "503", "429", "timeout", "drop"],
                    "seed": rng.next() % 1_000_000,
                    "timeout_ms": 2_000,
                });
                let set = http("POST", sandbox_port, "/_faults", &faults.to_string()).await;
                let window = (args.chaos_interval as f64 * 0.6).max(2.0);
                tokio::time::sleep(Duration::from_secs_f64(window)).await;
                if let Ok((200, body)) = http("GET", sandbox_port, "/_faults", "").await
                    && let Ok(state) = serde_json::from_str::<Value>(&body)
                    && let Some(injected) = state["injected"].as_object()
                {
                    for (kind, n) in injected {
                        *faults_injected.entry(kind.clone()).or_default() +=
                            n.as_u64().unwrap_or(0);
                    }
                }
                let _ = http("DELETE", sandbox_port, "/_faults", "").await;
                (
                    format!(
                        "EHR faults 30% for {window:.0} s{}; the retry backlog cleared",
                        if set.is_ok() { "" } else { " (could not set)" }
                    ),
                    progress.ehr_backlog_cleared(Duration::from_secs(120)).await,
                )
            }
            Action::RestartNats => {
                let started = Instant::now();
                nats.stop();
                tokio::time::sleep(Duration::from_secs(1)).await;
                nats.launch().await?;
                let recovery = recovered(&load, None, Duration::from_secs(120))
                    .await
                    .map(|_| started.elapsed());
                ("restart nats-server".to_string(), recovery)
            }
            Action::RestartPostgres => {
                let started = Instant::now();
                let status = tokio::process::Command::new("sh")
                    .args(["-c", &args.pg_restart_command])
                    .stdout(Stdio::null())
                    .status()
                    .await;
                let ok = status.as_ref().is_ok_and(|s| s.success());
                let recovery = recovered(&load, None, Duration::from_secs(120))
                    .await
                    .map(|_| started.elapsed());
                (
                    format!(
                        "restart PostgreSQL{}",
                        if ok { "" } else { " (restart command FAILED)" }
                    ),
                    recovery,
                )
            }
        };
        println!(
            "  [{at_seconds:>5.0} s] {description}: recovered {}",
            recovery.map_or("NEVER (120 s)".to_string(), |d| format!(
                "in {:.2} s",
                d.as_secs_f64()
            ))
        );
        chaos_log.push(ChaosLog {
            at_seconds,
            action: description,
            recovery,
        });
    }
    driver.await?;
    let load_elapsed = load_started.elapsed().as_secs_f64();
    let _ = http("DELETE", sandbox_port, "/_faults", "").await;
    println!("  load stopped after {load_elapsed:.0} s; settling");

    // Settle: resend unresolved commands, then wait for the reactors, projections, the
    // EHR write-back and the relay to go quiet (bounded).
    let settle_started = Instant::now();
    let settle_end = settle_started + Duration::from_secs(args.settle_seconds);
    let unresolved: Vec<usize> = load
        .records
        .lock()
        .expect("records")
        .iter()
        .enumerate()
        .filter(|(_, r)| matches!(r.outcome, Outcome::Unresolved(_)))
        .map(|(i, _)| i)
        .collect();
    let resent = unresolved.len();
    for index in unresolved {
        let step = match &load.records.lock().expect("records")[index].outcome {
            Outcome::Unresolved(step) => (**step).clone(),
            _ => continue,
        };
        let remaining = settle_end.saturating_duration_since(Instant::now());
        let outcome = load.send_definitive(&step, remaining).await;
        load.records.lock().expect("records")[index].outcome = outcome;
    }
    let Progress {
        event_store,
        read_db,
        jetstream,
        ..
    } = progress;
    let (mut relayable, mut counted_to) = (0u64, 0u64);
    let mut previous: Option<(u64, BTreeMap<String, u64>, u64)> = None;
    let mut quiet_since = Instant::now();
    let mut settled = false;
    let mut last_status = String::new();
    while Instant::now() < settle_end {
        let head = event_store.head_position().await.unwrap_or(0);
        loop {
            let page = event_store
                .read_all(&ReadScope::AllTenants, counted_to, 5_000)
                .await
                .unwrap_or_default();
            let Some(last) = page.last() else { break };
            counted_to = last.global_position;
            relayable += page.iter().filter(|e| e.category() != "checkpoint").count() as u64;
        }
        let lag = chartline_projections::engine::status(&event_store, &read_db)
            .await
            .map(|s| s.iter().map(|p| p.lag_events).max().unwrap_or(0))
            .unwrap_or(u64::MAX);
        let states = ehr_states(&read_db).await;
        let in_flight =
            states.get("sent").copied().unwrap_or(0) + states.get("failed").copied().unwrap_or(0);
        let relayed = match jetstream.get_stream("CHARTLINE_EVENTS").await {
            Ok(mut stream) => stream.info().await.map_or(0, |i| i.state.messages),
            Err(_) => 0,
        };
        let now = (head, states.clone(), relayed);
        if previous.as_ref() != Some(&now) {
            quiet_since = Instant::now();
        }
        previous = Some(now);
        last_status = format!(
            "head {head}, projection lag {lag}, EHR in flight {in_flight} {states:?}, relayed {relayed}/{relayable}"
        );
        if lag == 0
            && in_flight == 0
            && relayed == relayable
            && quiet_since.elapsed() >= Duration::from_secs(5)
        {
            settled = true;
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let settle_seconds = settle_started.elapsed().as_secs_f64();
    println!(
        "  {} after {settle_seconds:.0} s: {last_status}",
        if settled { "settled" } else { "NOT settled" }
    );

    // Stop every service (SIGTERM, as an orchestrator would), then check.
    supervising.store(false, Ordering::Relaxed);
    supervisor.await?;
    // Writers first, then the projections once they have read the last event (a
    // reactor may append while it stops), the store last.
    let mut not_stopping = Vec::new();
    let stop = |names: &[&'static str], not_stopping: &mut Vec<&'static str>| {
        let mut fleet = fleet.lock().expect("fleet");
        for name in names {
            if let Some(mut child) = fleet.members.get_mut(name).and_then(|m| m.child.take())
                && !terminate(&mut child, Duration::from_secs(20))
            {
                not_stopping.push(*name);
            }
        }
    };
    let writers: Vec<&'static str> = COMPONENTS
        .iter()
        .copied()
        .filter(|c| !matches!(*c, "store" | "projections"))
        .collect();
    stop(&writers, &mut not_stopping);
    let caught_up_by = Instant::now() + Duration::from_secs(30);
    while Instant::now() < caught_up_by
        && chartline_projections::engine::status(&event_store, &read_db)
            .await
            .map(|s| s.iter().any(|p| p.lag_events > 0))
            .unwrap_or(true)
    {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop(&["projections", "store"], &mut not_stopping);
    let mut verdicts: Vec<Verdict> = Vec::new();

    // 1. Commands: exactly once, nothing for rejected ones.
    let mut by_causation: HashMap<Uuid, Vec<Uuid>> = HashMap::new();
    let mut after = 0;
    let mut total_events = 0u64;
    let mut relayable_final = 0u64;
    loop {
        let page = event_store
            .read_all(&ReadScope::AllTenants, after, 5_000)
            .await?;
        let Some(last) = page.last() else { break };
        after = last.global_position;
        total_events += page.len() as u64;
        relayable_final += page.iter().filter(|e| e.category() != "checkpoint").count() as u64;
        for event in page {
            if let Some(causation) = event.metadata.causation_id {
                by_causation
                    .entry(causation)
                    .or_default()
                    .push(event.event_id);
            }
        }
    }
    let records = load.records.lock().expect("records").clone();
    let commands = check_commands(&records, &by_causation);
    let mut rejected_by_code: BTreeMap<String, u64> = BTreeMap::new();
    for record in &records {
        if let Outcome::Rejected(code) = &record.outcome {
            *rejected_by_code.entry(format!("{code:?}")).or_default() += 1;
        }
    }
    verdicts.push(Verdict {
        name: "1. accepted commands' events exactly once; none for rejected",
        pass: commands.problems.is_empty(),
        detail: format!(
            "{} accepted, {} exactly once; {} rejected {rejected_by_code:?}{}",
            commands.accepted,
            commands.exactly_once,
            commands.rejected,
            first_problems(&commands.problems)
        ),
    });

    // 2. Hash chains.
    let verify = event_store.verify_all(&ReadScope::AllTenants).await?;
    verdicts.push(Verdict {
        name: "2. every stream's hash chain verifies",
        pass: verify.is_intact(),
        detail: format!(
            "{} streams, {} events verified; {} broken{}",
            verify.streams_checked,
            verify.events_checked,
            verify.breaks.len(),
            verify.breaks.first().map_or(String::new(), |b| format!(
                " (first: {} v{} {})",
                b.stream_id, b.stream_version, b.reason
            ))
        ),
    });

    // 3. Read models = a from-scratch rebuild in a fresh database.
    let live_status = chartline_projections::engine::status(&event_store, &read_db).await?;
    let live = dump_all(&read_db).await?;
    let rebuild_db = ReadDb::open(&database_url(&args.pg_url, &rebuild_name)).await?;
    let rebuild_started = Instant::now();
    let mut runner = ProjectionRunner::with_projections(
        event_store.clone(),
        rebuild_db.clone(),
        standard_projections(),
        RunnerConfig::default(),
    )
    .await?;
    let report = runner.catch_up().await?;
    let rebuilt = dump_all(&rebuild_db).await?;
    let differences = compare_dumps(&live, &rebuilt);
    let rows: usize = live.iter().map(|(_, rows)| rows.len()).sum();
    let lagging: Vec<String> = live_status
        .iter()
        .filter(|s| s.lag_events > 0 || s.dead_letters_open > 0 || s.status != "running")
        .map(|s| {
            format!(
                "{} lag {} dead {} {}",
                s.name, s.lag_events, s.dead_letters_open, s.status
            )
        })
        .collect();
    verdicts.push(Verdict {
        name: "3. every read model equals a from-scratch rebuild",
        pass: differences.is_empty() && lagging.is_empty(),
        detail: format!(
            "{} tables, {rows} rows compared; rebuild of {} events took {:.1} s; {}{}",
            live.len(),
            report.events,
            rebuild_started.elapsed().as_secs_f64(),
            if lagging.is_empty() {
                "all projections at the head, no dead letters".to_string()
            } else {
                format!("not caught up / dead letters: {lagging:?}")
            },
            first_problems(&differences)
        ),
    });

    // 4. EHR duplicates.
    let stats: Value = match http("GET", sandbox_port, "/_stats", "").await {
        Ok((200, body)) => serde_json::from_str(&body).unwrap_or(Value::Null),
        _ => Value::Null,
    };
    let duplicates = ehr_duplicates(&stats);
    let ehr = ehr_states(&read_db).await;
    // The check means something only if the connector wrote: artifacts acknowledged,
    // none blocked by the compliance map.
    let acknowledged = ehr.get("acknowledged").copied().unwrap_or(0);
    let blocked = ehr.get("blocked").copied().unwrap_or(0);
    verdicts.push(Verdict {
        name: "4. no EHR duplicates",
        pass: !stats.is_null() && duplicates.is_empty() && acknowledged > 0 && blocked == 0,
        detail: format!(
            "sandbox resources {}; write-backs by state {ehr:?}; faults injected {faults_injected:?} in {fault_windows} windows{}",
            stats["resources"],
            first_problems(&duplicates)
        ),
    });

    // 5. Memory.
    let mut memory_lines = Vec::new();
    let mut grew = Vec::new();
    let mut judged = 0;
    {
        let fleet = fleet.lock().expect("fleet");
        for (name, instances) in &fleet.rss {
            let Some((_, samples)) = instances.last() else {
                continue;
            };
            let loaded: Vec<(f64, u64)> = samples
                .iter()
                .copied()
                .filter(|(t, _)| *t <= load_seconds)
                .collect();
            let peak = samples.iter().map(|(_, k)| *k).max().unwrap_or(0) as f64 / 1024.0;
            match judge_memory(
                &loaded,
                load_seconds,
                args.memory_tolerance,
                args.memory_slack_mib as f64,
            ) {
                Some(verdict) => {
                    judged += 1;
                    if verdict.grew {
                        grew.push(*name);
                    }
                    memory_lines.push(format!(
                        "{name:<17} middle {:>7.1} MiB  last {:>7.1} MiB  ({:+.1}%)  peak {peak:>7.1} MiB{}",
                        verdict.middle_mib,
                        verdict.last_mib,
                        (verdict.last_mib / verdict.middle_mib - 1.0) * 100.0,
                        if verdict.grew { "  GREW" } else { "" }
                    ));
                }
                None => memory_lines.push(format!(
                    "{name:<17} restarted by chaos in the last two thirds ({} instances): not judged; peak {peak:.1} MiB",
                    instances.len()
                )),
            }
        }
    }
    verdicts.push(Verdict {
        name: "5. memory did not grow",
        pass: grew.is_empty() && judged >= 3,
        detail: format!(
            "{judged} processes judged (last third ≤ middle third × {} + {} MiB){}",
            args.memory_tolerance,
            args.memory_slack_mib,
            if grew.is_empty() {
                String::new()
            } else {
                format!("; grew: {grew:?}")
            }
        ),
    });

    // 6. Relay.
    let relayed = match jetstream.get_stream("CHARTLINE_EVENTS").await {
        Ok(mut stream) => stream.info().await.map_or(0, |i| i.state.messages),
        Err(_) => 0,
    };
    verdicts.push(Verdict {
        name: "6. relay: each relayable event once on JetStream",
        pass: relayed == relayable_final,
        detail: format!("{relayed} messages for {relayable_final} relayable events"),
    });

    // Shut down what the soak owns.
    {
        let mut fleet = fleet.lock().expect("fleet");
        if let Some(mut child) = fleet
            .members
            .get_mut("sandbox-ehr")
            .and_then(|m| m.child.take())
        {
            terminate(&mut child, Duration::from_secs(10));
        }
    }
    nats.stop();
    rebuild_db.close().await;
    read_db.close().await;

    // Figures.
    let accepted = commands.accepted;
    let attempts = load.counters.attempts.load(Ordering::Relaxed);
    let recoveries: Vec<f64> = chaos_log
        .iter()
        .filter(|c| !c.action.starts_with("EHR"))
        .filter_map(|c| c.recovery.map(|d| d.as_secs_f64()))
        .collect();
    let never = chaos_log.iter().filter(|c| c.recovery.is_none()).count();
    let (kills, unplanned): (u32, Vec<String>) = {
        let fleet = fleet.lock().expect("fleet");
        (
            fleet.members.values().map(|m| m.kills).sum(),
            fleet
                .members
                .iter()
                .flat_map(|(name, m)| {
                    m.unplanned_exits
                        .iter()
                        .map(move |e| format!("{name}: {e}"))
                })
                .collect(),
        )
    };
    println!();
    println!(
        "Chartline soak (seed {seed}, {load_elapsed:.0} s of load, settle {settle_seconds:.0} s):"
    );
    println!(
        "  commands           {} final replies ({accepted} accepted, {} rejected), {attempts} sends incl. {} retries; {:.1} accepted/s",
        records.len(),
        commands.rejected,
        load.counters.retries.load(Ordering::Relaxed),
        accepted as f64 / load_elapsed.max(1.0)
    );
    println!(
        "  visits             {} started, {} starts shed while 400 were in flight; {resent} unresolved commands resent in the settle",
        load.counters.visits_started.load(Ordering::Relaxed),
        load.counters.visits_shed.load(Ordering::Relaxed)
    );
    println!("  event store        {total_events} events");
    println!(
        "  chaos              {} actions ({kills} kill -9, {} nats-server restarts, {} PostgreSQL restarts, {fault_windows} EHR fault windows); {never} never recovered",
        chaos_log.len(),
        chaos_log
            .iter()
            .filter(|c| c.action.contains("nats"))
            .count(),
        chaos_log
            .iter()
            .filter(|c| c.action.contains("PostgreSQL"))
            .count(),
    );
    if !recoveries.is_empty() {
        let mut sorted = recoveries.clone();
        sorted.sort_by(f64::total_cmp);
        println!(
            "  recovery           median {:.2} s, max {:.2} s (action → a command accepted end to end)",
            sorted[sorted.len() / 2],
            sorted[sorted.len() - 1]
        );
    }
    println!(
        "  unplanned exits    {}",
        if unplanned.is_empty() {
            "none".to_string()
        } else {
            unplanned.join("; ")
        }
    );
    if !not_stopping.is_empty() {
        println!("  did not stop on SIGTERM within 20 s: {not_stopping:?}");
    }
    println!("  RSS (mean over the middle vs last third of the load phase):");
    for line in &memory_lines {
        println!("    {line}");
    }
    println!("Invariants:");
    let mut all_pass = settled;
    for verdict in &verdicts {
        all_pass &= verdict.pass;
        println!(
            "  [{}] {}\n         {}",
            if verdict.pass { "pass" } else { "FAIL" },
            verdict.name,
            verdict.detail
        );
    }
    if !settled {
        println!(
            "  [FAIL] the system did not settle within {} s",
            args.settle_seconds
        );
    }
    let report_json = json!({
        "seed": seed,
        "load_seconds": load_elapsed,
        "settle_seconds": settle_seconds,
        "settled": settled,
        "commands": {"final": records.len(), "accepted": accepted, "rejected": rejected_by_code, "sends": attempts},
        "events": total_events,
        "chaos": chaos_log.iter().map(|c| json!({"at": c.at_seconds, "action": c.action, "recovery_seconds": c.recovery.map(|d| d.as_secs_f64())})).collect::<Vec<_>>(),
        "unplanned_exits": unplanned,
        "memory": memory_lines,
        "invariants": verdicts.iter().map(|v| json!({"name": v.name, "pass": v.pass, "detail": v.detail})).collect::<Vec<_>>(),
        "pass": all_pass,
    });
    std::fs::write(
        dir.join("report.json"),
        serde_json::to_string_pretty(&report_json)?,
    )?;
    println!(
        "{} (report: {})",
        if all_pass {
            "SOAK PASSED"
        } else {
            "SOAK FAILED"
        },
        dir.join("report.json").display()
    );
    Ok(if all_pass {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn first_problems(problems: &[String]) -> String {
    if problems.is_empty() {
        return String::new();
    }
    let shown: Vec<&str> = problems.iter().take(5).map(String::as_str).collect();
    format!(
        "\n         problems ({}): {}",
        problems.len(),
        shown.join("\n           ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: u128, outcome: Outcome) -> Record {
        Record {
            command_id: Uuid::from_u128(id),
            command: "schedule",
            must_be_rejected: false,
            outcome,
        }
    }

    #[test]
    fn commands_exactly_once_lost_duplicated_and_rejected_with_events() {
        let (e1, e2, e3) = (
            Uuid::from_u128(11),
            Uuid::from_u128(12),
            Uuid::from_u128(13),
        );
        let records = vec![
            record(
                1,
                Outcome::Accepted {
                    event_ids: vec![e1],
                },
            ),
            record(
                2,
                Outcome::Accepted {
                    event_ids: vec![e2],
                },
            ),
            record(
                3,
                Outcome::Accepted {
                    event_ids: vec![e3],
                },
            ),
            record(4, Outcome::Rejected(RejectionCode::Invariant)),
            record(5, Outcome::Rejected(RejectionCode::Invariant)),
        ];
        let mut stored = HashMap::new();
        stored.insert(Uuid::from_u128(1), vec![e1]);
        stored.insert(Uuid::from_u128(2), vec![e2, Uuid::from_u128(99)]); // duplicated
        // 3 lost
        stored.insert(Uuid::from_u128(5), vec![Uuid::from_u128(98)]); // rejected, yet stored
        let check = check_commands(&records, &stored);
        assert_eq!(
            (check.accepted, check.rejected, check.exactly_once),
            (3, 2, 1)
        );
        assert_eq!(check.problems.len(), 3, "{:?}", check.problems);
        assert!(check.problems[0].contains("duplicated"));
        assert!(check.problems[1].contains("lost"));
        assert!(check.problems[2].contains("rejected"));
    }

    #[test]
    fn an_unresolved_command_or_an_accepted_invalid_one_fails() {
        let mut invalid = record(1, Outcome::Accepted { event_ids: vec![] });
        invalid.must_be_rejected = true;
        let step = scenario::steps_until_signed(&scenario::synthetic_visit(
            1,
            1,
            Utc.with_ymd_and_hms(2026, 3, 2, 0, 0, 0).unwrap(),
        ))[0]
            .clone();
        let records = vec![invalid, record(2, Outcome::Unresolved(Box::new(step)))];
        let check = check_commands(&records, &HashMap::new());
        assert_eq!(check.problems.len(), 2, "{:?}", check.problems);
    }

    #[test]
    fn dumps_differ_by_row_and_by_count() {
        let row = |n: i64| vec![Cell::Int(n)];
        let live = vec![("t".to_string(), vec![row(1), row(2)])];
        assert!(compare_dumps(&live, &live.clone()).is_empty());
        let other = vec![("t".to_string(), vec![row(1), row(3)])];
        assert_eq!(compare_dumps(&live, &other).len(), 1);
        let shorter = vec![("t".to_string(), vec![row(1)])];
        assert_eq!(compare_dumps(&live, &shorter).len(), 1);
    }

    #[test]
    fn sandbox_duplicates_are_reported() {
        let clean = json!({"resources": {"Encounter": 3}, "duplicates": []});
        assert!(ehr_duplicates(&clean).is_empty());
        let dirty = json!({"duplicates": [{"resourceType": "Task", "key": "identifier=urn:x|1", "count": 2}]});
        assert_eq!(ehr_duplicates(&dirty).len(), 1);
    }

    #[test]
    fn memory_growth_is_judged_over_the_middle_and_last_thirds() {
        let flat: Vec<(f64, u64)> = (0..90).map(|s| (s as f64, 50_000)).collect();
        let verdict = judge_memory(&flat, 90.0, 1.25, 16.0).unwrap();
        assert!(!verdict.grew);
        // A leak: +3 MiB per second (the last third's mean is ~1.5 × the middle's).
        let leaking: Vec<(f64, u64)> = (0..90)
            .map(|s| (s as f64, 50_000 + s * 3 * 1_024))
            .collect();
        assert!(judge_memory(&leaking, 90.0, 1.25, 16.0).unwrap().grew);
        // An instance started in the last two thirds cannot be judged.
        let late: Vec<(f64, u64)> = (50..90).map(|s| (s as f64, 50_000)).collect();
        assert_eq!(judge_memory(&late, 90.0, 1.25, 16.0), None);
    }
}
