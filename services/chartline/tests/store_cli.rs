//! The `chartline store` CLI as an operator uses it, as real OS processes: exit codes for
//! conflicts, bad input and broken chains, and crash atomicity — `kill -9` in the middle
//! of a 1,000-event batch leaves the batch entirely there or entirely absent, on SQLite
//! and on PostgreSQL, and the chain still verifies.

use std::process::{Command, Output, Stdio};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_chartline");

fn chartline(store: &str, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(["store", "--store", store])
        .args(args)
        .output()
        .expect("run chartline")
}

fn temp_sqlite() -> (String, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("chartline_t_{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    (format!("sqlite://{}/events.db", dir.display()), dir)
}

fn stats_events(store: &str) -> u64 {
    let output = chartline(store, &["stats"]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stats: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    stats["events"].as_u64().unwrap()
}

#[test]
fn exit_codes_tell_conflict_bad_input_and_broken_chain_apart() {
    let (store, dir) = temp_sqlite();
    let stream = format!("encounter-{}", uuid::Uuid::new_v4());
    let ok = chartline(
        &store,
        &[
            "append",
            "--stream",
            &stream,
            "--expected",
            "none",
            "--type",
            "Scheduled",
            "--data",
            "{\"n\":1}",
        ],
    );
    assert!(ok.status.success());
    let conflict = chartline(
        &store,
        &[
            "append",
            "--stream",
            &stream,
            "--expected",
            "none",
            "--type",
            "Scheduled",
            "--data",
            "{}",
        ],
    );
    assert_eq!(conflict.status.code(), Some(3));
    let stderr = String::from_utf8_lossy(&conflict.stderr);
    assert!(
        stderr.contains("expected version no stream, actual 1"),
        "{stderr}"
    );
    for bad in [
        vec![
            "append",
            "--stream",
            "not a stream",
            "--type",
            "X",
            "--data",
            "{}",
        ],
        vec![
            "append", "--stream", &stream, "--type", "X", "--data", "{nope",
        ],
        vec![
            "append",
            "--stream",
            &stream,
            "--type",
            "X",
            "--data",
            "{}",
            "--tenant",
            "unknown-clinic",
        ],
        vec![
            "append", "--stream", &stream, "--type", "bad.type", "--data", "{}",
        ],
        vec![
            "append",
            "--stream",
            &stream,
            "--expected",
            "minus-one",
            "--type",
            "X",
            "--data",
            "{}",
        ],
    ] {
        let output = chartline(&store, &bad);
        assert_eq!(
            output.status.code(),
            Some(2),
            "{bad:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    assert_eq!(stats_events(&store), 1, "bad input stored something");
    assert!(chartline(&store, &["verify"]).status.success());

    // Tamper with the stored row: verify names the event and exits 4.
    execute_sql(&store, "UPDATE events SET data = '{\"n\":2}'");
    let verify = chartline(&store, &["verify"]);
    assert_eq!(verify.status.code(), Some(4));
    let stdout = String::from_utf8_lossy(&verify.stdout);
    assert!(
        stdout.contains(&format!("BROKEN {stream} version 1")),
        "{stdout}"
    );

    // Delete a whole stream that is not the log's newest: verify reports the gap.
    for _ in 0..2 {
        let other = format!("encounter-{}", uuid::Uuid::new_v4());
        let appended = chartline(
            &store,
            &[
                "append",
                "--stream",
                &other,
                "--type",
                "Scheduled",
                "--data",
                "{}",
            ],
        );
        assert!(appended.status.success());
    }
    execute_sql(&store, "DELETE FROM events WHERE global_position = 2");
    let verify = chartline(&store, &["verify"]);
    assert_eq!(verify.status.code(), Some(4));
    let stdout = String::from_utf8_lossy(&verify.stdout);
    assert!(stdout.contains("MISSING positions 2..=2"), "{stdout}");
    let _ = std::fs::remove_dir_all(dir);
}

/// Runs one statement on the store's SQLite file, as someone with file access could.
fn execute_sql(store: &str, statement: &'static str) {
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        let pool = sqlx::SqlitePool::connect(&format!("{store}?mode=rw"))
            .await
            .unwrap();
        sqlx::query(statement).execute(&pool).await.unwrap();
    });
}

/// Starts a 1,000-event single-batch append and kills it with SIGKILL after `delay`.
fn kill_mid_batch(store: &str, delay: Duration) {
    let mut child = Command::new(BIN)
        .args([
            "store",
            "--store",
            store,
            "bulk-append",
            "--events",
            "1000",
            "--batch",
            "1000",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(delay);
    let _ = child.kill(); // SIGKILL
    let _ = child.wait();
}

fn crash_leaves_whole_batches(store: &str) {
    // Time one uninterrupted run, then spread the kills over 0..1.2× that time so some
    // land before, some during and some after the commit, whatever the machine's speed.
    // A later run can be slower than the timed one (other tests share the cores): if
    // no kill has landed after the commit yet, the delays go on growing (× 1.5, up to
    // 10× the timed run) until one does.
    let started = std::time::Instant::now();
    let full = Command::new(BIN)
        .args([
            "store",
            "--store",
            store,
            "bulk-append",
            "--events",
            "1000",
            "--batch",
            "1000",
        ])
        .output()
        .unwrap();
    assert!(full.status.success());
    let full_run = started.elapsed();
    let mut outcomes = std::collections::BTreeSet::new();
    let mut previous = stats_events(store);
    assert_eq!(previous, 1000);
    let mut delay = Duration::ZERO;
    for step in 0u32.. {
        delay = if step < 24 {
            full_run * 6 * step / (5 * 24)
        } else if outcomes.len() < 2 && delay < full_run * 10 {
            delay * 3 / 2
        } else {
            break;
        };
        kill_mid_batch(store, delay);
        let events = stats_events(store);
        assert_eq!(
            events % 1000,
            0,
            "a partial batch survived a kill -9: {events} events"
        );
        outcomes.insert(events > previous);
        previous = events;
        let verify = chartline(store, &["verify"]);
        assert!(
            verify.status.success(),
            "{}",
            String::from_utf8_lossy(&verify.stdout)
        );
    }
    // The kills landed on both sides of the commit at least once.
    assert_eq!(
        outcomes.len(),
        2,
        "kills never straddled the commit: {outcomes:?}"
    );
}

#[test]
fn kill_9_during_a_1000_event_batch_is_all_or_nothing_on_sqlite() {
    let (store, dir) = temp_sqlite();
    assert!(chartline(&store, &["stats"]).status.success());
    crash_leaves_whole_batches(&store);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn kill_9_during_a_1000_event_batch_is_all_or_nothing_on_postgres() {
    let admin = std::env::var("CHARTLINE_TEST_PG")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let name = format!("chartline_t_{}", uuid::Uuid::new_v4().simple());
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let pool = sqlx::PgPool::connect(&admin)
            .await
            .expect("PostgreSQL must be running (make services)");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&pool)
            .await
            .unwrap();
    });
    let base = admin.rsplit_once('/').unwrap().0;
    let store = format!("{base}/{name}");
    assert!(chartline(&store, &["stats"]).status.success());
    crash_leaves_whole_batches(&store);
    runtime.block_on(async {
        let pool = sqlx::PgPool::connect(&admin).await.unwrap();
        let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
        )))
        .execute(&pool)
        .await;
    });
}

#[test]
fn billing_explain_prints_the_recorded_decision_of_a_demo_encounter() {
    let (store, dir) = temp_sqlite();
    let demo = Command::new(BIN)
        .args([
            "demo",
            "--exit",
            "--encounters",
            "6",
            "--seed",
            "3",
            "--store",
            &store,
        ])
        .current_dir(&dir)
        .output()
        .unwrap();
    assert!(
        demo.status.success(),
        "{}",
        String::from_utf8_lossy(&demo.stderr)
    );
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let encounter: String = runtime.block_on(async {
        let pool = sqlx::SqlitePool::connect(&store).await.unwrap();
        sqlx::query_scalar(
            "SELECT substr(stream_id, 11) FROM events WHERE event_type = 'CodesAssigned' LIMIT 1",
        )
        .fetch_one(&pool)
        .await
        .unwrap()
    });
    let explain = Command::new(BIN)
        .args([
            "billing",
            "explain",
            "--encounter",
            &encounter,
            "--tenant",
            "demo-clinic",
            "--store",
            &store,
        ])
        .output()
        .unwrap();
    assert!(
        explain.status.success(),
        "{}",
        String::from_utf8_lossy(&explain.stderr)
    );
    let text = String::from_utf8_lossy(&explain.stdout);
    assert!(
        text.contains("CodesAssigned")
            && text.contains("policy version")
            && text.contains("rule trace"),
        "{text}"
    );
    let missing = Command::new(BIN)
        .args([
            "billing",
            "explain",
            "--encounter",
            &uuid::Uuid::new_v4().to_string(),
            "--tenant",
            "demo-clinic",
            "--store",
            &store,
        ])
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(2));
    let _ = std::fs::remove_dir_all(dir);
}

/// `chartline demo --exit --encounters 200 --seed 7`: the numbers it prints are the
/// numbers stored (checked against the event store and the read models directly).
#[test]
fn demo_summary_matches_the_store() {
    let (store, dir) = temp_sqlite();
    let summary_path = dir.join("summary.json");
    let demo = Command::new(BIN)
        .args([
            "demo",
            "--exit",
            "--encounters",
            "200",
            "--seed",
            "7",
            "--listen",
            "127.0.0.1:0",
            "--store",
            &store,
        ])
        .arg("--summary-json")
        .arg(&summary_path)
        .current_dir(&dir)
        .output()
        .unwrap();
    assert!(
        demo.status.success(),
        "{}",
        String::from_utf8_lossy(&demo.stderr)
    );
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&summary_path).unwrap()).unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let count = |sql: &str| -> i64 {
        let sql = sql.to_string();
        let store = store.clone();
        runtime.block_on(async move {
            let pool = sqlx::SqlitePool::connect(&store).await.unwrap();
            sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
                .fetch_one(&pool)
                .await
                .unwrap()
        })
    };
    let tenant = "tenant_id = 'demo-clinic'";
    let events_of = |event_type: &str| {
        count(&format!(
            "SELECT COUNT(*) FROM events WHERE {tenant} AND event_type = '{event_type}'"
        ))
    };
    assert_eq!(summary["encounters"], 200);
    assert_eq!(
        summary["completed"].as_i64().unwrap(),
        events_of("NoteSigned")
    );
    assert_eq!(
        summary["cancelled"].as_i64().unwrap(),
        events_of("Cancelled")
    );
    assert_eq!(summary["no_show"].as_i64().unwrap(), events_of("NoShow"));
    let decisions = total(&summary["billing_decisions"]);
    assert_eq!(decisions, events_of("CodesAssigned"));
    assert_eq!(
        summary["ehr_acknowledged"].as_i64().unwrap(),
        events_of("WriteBackSucceeded")
    );
    assert!(
        summary["ehr_acknowledged"].as_i64().unwrap() > 0,
        "nothing reached the sandbox EHR"
    );
    assert_eq!(
        summary["ehr_write_backs"]["acknowledged"].as_i64().unwrap(),
        count(
            "SELECT COUNT(*) FROM ehr_writeback WHERE tenant = 'demo-clinic' AND state = 'acknowledged'"
        )
    );
    let reviews = summary["identity"]["MatchReviewRequested"]
        .as_i64()
        .unwrap_or(0);
    assert_eq!(reviews, events_of("MatchReviewRequested"));
    assert!(
        reviews >= summary["twins"].as_i64().unwrap(),
        "every twin must go to review"
    );
    let queue = total(&summary["billing_queue"]);
    assert_eq!(
        queue,
        count("SELECT COUNT(*) FROM billing_queue WHERE tenant = 'demo-clinic'")
    );
    // RPM: the month of readings, its alerts and its billing periods are what is stored.
    assert!(summary["rpm_enrolled"].as_i64().unwrap() > 0);
    assert_eq!(
        summary["rpm_enrolled"].as_i64().unwrap(),
        events_of("Enrolled")
    );
    assert_eq!(
        summary["rpm_alerts"].as_i64().unwrap(),
        events_of("ThresholdBreached")
    );
    assert!(summary["rpm_alerts"].as_i64().unwrap() > 0);
    let rpm_items = total(&summary["rpm_billing"]);
    assert_eq!(
        rpm_items,
        count(
            "SELECT COUNT(*) FROM billing_queue WHERE tenant = 'demo-clinic' AND kind LIKE 'rpm%'"
        )
    );
    let rpm_billing = summary["rpm_billing"].to_string();
    for expected in ["held", "99454", "99445", "99457"] {
        assert!(
            rpm_billing.contains(expected),
            "{expected} missing: {rpm_billing}"
        );
    }
    // EHR faults were injected and the connector rode them out: every artifact of a
    // patient whose identity is resolved was acknowledged, none is dead.
    let faults = total(&summary["ehr_faults_injected"]);
    assert!(faults > 0, "no EHR faults were injected");
    assert!(
        summary["ehr_write_backs"]["dead"].is_null(),
        "{}",
        summary["ehr_write_backs"]
    );
    assert!(
        summary["ehr_write_backs"]["failed"].is_null(),
        "{}",
        summary["ehr_write_backs"]
    );
    // What is still pending waits for a human's identity review, not for the connector
    // (the demo settled before it stopped, and stopped the EHR last).
    assert_eq!(
        count(
            "SELECT COUNT(*) FROM ehr_writeback w JOIN encounter_view e ON e.encounter_id = w.encounter_id \
             WHERE w.tenant = 'demo-clinic' AND w.state = 'pending' AND NOT EXISTS (SELECT 1 FROM identity_review r \
             WHERE r.patient_id = e.patient_id AND r.status = 'open')"
        ),
        0,
        "write-backs left pending for patients whose identity is resolved"
    );
    assert_eq!(summary["manual_code_picks"], 0);
    assert_eq!(summary["projection_lag"], 0);
    assert_eq!(summary["chains_intact"], true);
    // (With --exit the services stop before the summary is read, so every count is final.)
    assert_eq!(
        summary["tenant_events"].as_i64().unwrap(),
        count(&format!("SELECT COUNT(*) FROM events WHERE {tenant}"))
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// The sum of a summary's `{name: count}` object.
fn total(counts: &serde_json::Value) -> i64 {
    counts
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_i64().unwrap())
        .sum()
}
