//! `chartline serve`: runs Chartline's services, all in one process on the embedded
//! default (SQLite file + in-process bus, no servers) or any subset as its own OS
//! process in a distributed deployment (`--nats`, PostgreSQL store). Any mix of
//! processes forms one system: they meet on NATS subjects and in the event store.
//!
//! Configuration: flags > `CHARTLINE_*` environment variables > defaults.
//! Shutdown: SIGTERM or Ctrl-C stops intake and drains in-flight commands.

use std::collections::BTreeSet;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use chartline_infra::bus::Bus;
use chartline_infra::checkpoint::system_tenant;
use chartline_infra::relay::{RelayConfig, run_relay};
use chartline_infra::store::nats::NatsEventStore;
use chartline_infra::{AnyStore, EventStore};
use chartline_proto::TenantId;
use clap::Args;
use tokio::sync::watch;
use tokio::task::JoinSet;

/// Every component `serve` knows, in start order.
pub const COMPONENTS: &[&str] = &[
    "store",
    "scheduling",
    "consultation",
    "documentation",
    "billing",
    "rpm",
    "identity",
    "identity-matcher",
    "relay",
    "projections",
    "api",
    "ehr",
];

#[derive(Args, Clone)]
pub struct ServeArgs {
    /// Comma-separated components to run (default: all). Any of: store, scheduling,
    /// consultation, documentation, billing, rpm, identity, identity-matcher, relay,
    /// projections, ehr, api.
    #[arg(long, env = "CHARTLINE_ONLY", value_delimiter = ',')]
    pub only: Vec<String>,
    /// NATS URL. Without it, everything runs in this process on an in-process bus.
    #[arg(long, env = "CHARTLINE_NATS_URL")]
    pub nats: Option<String>,
    /// HTTP listen address of the API (used once the API component runs here).
    #[arg(long, env = "CHARTLINE_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: String,
    /// Tenants to register at start (comma-separated).
    #[arg(
        long,
        env = "CHARTLINE_TENANTS",
        value_delimiter = ',',
        default_value = "default"
    )]
    pub tenants: Vec<String>,
    /// NATS subject root (tests isolate themselves with their own).
    #[arg(
        long,
        env = "CHARTLINE_SUBJECT_ROOT",
        default_value = "chartline",
        hide = true
    )]
    pub subject_root: String,
    /// Read-model database (default: the store's database; required with a NATS store).
    #[arg(long, env = "CHARTLINE_READ_STORE")]
    pub read_store: Option<String>,
    /// JetStream stream the relay publishes to.
    #[arg(
        long,
        env = "CHARTLINE_EVENTS_STREAM",
        default_value = "CHARTLINE_EVENTS",
        hide = true
    )]
    pub events_stream: String,
    /// FHIR R4 base URL the EHR connector writes to. `sandbox` (the default) starts an
    /// in-process sandbox EHR on a free port — a stand-in, not a real EHR (docs/ehr.md).
    /// Unset (programmatic embedded runs): no connector.
    #[arg(long, env = "CHARTLINE_EHR_URL", default_value = "sandbox")]
    pub ehr_url: Option<String>,
    /// Static bearer token sent to the EHR.
    #[arg(long, env = "CHARTLINE_EHR_TOKEN", hide_env_values = true)]
    pub ehr_token: Option<String>,
    /// How often the EHR reconciliation job reads back recently acknowledged artifacts
    /// and records drift (90s, 15m, …; 0 = off). Runs with component `ehr`.
    #[arg(long, env = "CHARTLINE_EHR_RECONCILE_INTERVAL", default_value = "60s", value_parser = chartline_ehr_connector::reconcile::parse_duration)]
    pub ehr_reconcile_interval: Duration,
    /// How far back reconciliation looks: artifacts acknowledged within this long.
    #[arg(long, env = "CHARTLINE_EHR_RECONCILE_WINDOW", default_value = "24h", value_parser = chartline_ehr_connector::reconcile::parse_duration)]
    pub ehr_reconcile_window: Duration,
    #[command(flatten)]
    pub ehr_smart: EhrSmartArgs,
    /// Compliance map TOML (default: the shipped `compliance/default.toml`). The EHR
    /// connector refuses to send PHI to an EHR whose BAA is not in effect.
    #[arg(long, env = "CHARTLINE_COMPLIANCE_MAP")]
    pub compliance_map: Option<std::path::PathBuf>,
    /// This EHR's component id in the compliance map (default: `sandbox-ehr` for the
    /// sandbox, else the EHR component whose `endpoint` is the EHR URL).
    #[arg(long, env = "CHARTLINE_EHR_COMPONENT")]
    pub ehr_component: Option<String>,
}

/// SMART Backend Services authorization to the EHR (instead of a static token). With
/// `--ehr-url sandbox`, the in-process sandbox registers this client's public key and
/// requires SMART tokens.
#[derive(Args, Clone, Default)]
pub struct EhrSmartArgs {
    /// Client id registered with the EHR's authorization server; enables SMART.
    #[arg(
        long,
        env = "CHARTLINE_EHR_SMART_CLIENT_ID",
        requires = "ehr_smart_key"
    )]
    pub ehr_smart_client_id: Option<String>,
    /// Private signing key: PKCS#8 PEM or DER (RSA ≥ 2048 bits or EC P-384). Never printed.
    #[arg(
        long,
        env = "CHARTLINE_EHR_SMART_KEY",
        requires = "ehr_smart_client_id"
    )]
    pub ehr_smart_key: Option<std::path::PathBuf>,
    /// RS384 or ES384 (default: from the key type).
    #[arg(long, env = "CHARTLINE_EHR_SMART_ALG")]
    pub ehr_smart_alg: Option<String>,
    /// Key id sent as the JWT `kid` (default: the key's RFC 7638 thumbprint).
    #[arg(long, env = "CHARTLINE_EHR_SMART_KID")]
    pub ehr_smart_kid: Option<String>,
    /// Token endpoint (default: discovered from `<ehr-url>/.well-known/smart-configuration`).
    #[arg(long, env = "CHARTLINE_EHR_SMART_TOKEN_URL")]
    pub ehr_smart_token_url: Option<String>,
    /// Scopes requested (SMART v2 `system/` scopes).
    #[arg(
        long,
        env = "CHARTLINE_EHR_SMART_SCOPE",
        default_value = "system/*.crus"
    )]
    pub ehr_smart_scope: String,
}

impl EhrSmartArgs {
    pub fn enabled(&self) -> bool {
        self.ehr_smart_client_id.is_some()
    }

    /// The signing key named by the flags (a start-up error when unusable).
    pub fn signing_key(&self) -> anyhow::Result<Option<chartline_ehr_connector::SigningKey>> {
        let (Some(_), Some(path)) = (&self.ehr_smart_client_id, &self.ehr_smart_key) else {
            return Ok(None);
        };
        let algorithm = self
            .ehr_smart_alg
            .as_deref()
            .map(str::parse::<chartline_ehr_connector::SigningAlgorithm>)
            .transpose()?;
        Ok(Some(chartline_ehr_connector::SigningKey::load(
            path,
            algorithm,
            self.ehr_smart_kid.clone(),
        )?))
    }

    /// How the connector authorizes: SMART when a client id is set, else the static
    /// token, else nothing. Discovers the token endpoint when it is not given.
    pub async fn auth(
        &self,
        base_url: &str,
        static_token: Option<&str>,
        token_url: Option<String>,
    ) -> anyhow::Result<chartline_ehr_connector::Auth> {
        use chartline_ehr_connector::{Auth, SmartAuth, SmartConfig, smart};
        let Some(key) = self.signing_key()? else {
            return Ok(Auth::bearer(static_token));
        };
        let client_id = self.ehr_smart_client_id.clone().unwrap_or_default();
        let token_url = match token_url.or_else(|| self.ehr_smart_token_url.clone()) {
            Some(url) => url,
            None => smart::discover_token_endpoint(base_url, Duration::from_secs(10))
                .await
                .context("discovering the SMART token endpoint (or pass --ehr-smart-token-url)")?,
        };
        let config = SmartConfig::new(client_id, token_url, self.ehr_smart_scope.clone(), key);
        tracing::info!(?config, "EHR authorization: SMART Backend Services");
        Ok(Auth::SmartBackend(std::sync::Arc::new(SmartAuth::new(
            config,
        )?)))
    }
}

/// A running deployment: the bus and store every component uses.
pub struct Runtime {
    pub bus: Bus,
    pub store: AnyStore,
    pub root: String,
    /// The database URL this process opened (empty when the store is reached over NATS).
    pub store_url: String,
}

impl ServeArgs {
    /// Everything in one process on the in-process bus (demo, tests), API on a free port.
    pub fn embedded(tenants: &[&str]) -> ServeArgs {
        ServeArgs {
            only: vec![],
            nats: None,
            listen: "127.0.0.1:0".into(),
            tenants: tenants.iter().map(|t| t.to_string()).collect(),
            subject_root: chartline_proto::subjects::ROOT.into(),
            read_store: None,
            events_stream: chartline_proto::subjects::EVENTS_STREAM.into(),
            ehr_url: None,
            ehr_token: None,
            ehr_reconcile_interval: Duration::from_secs(60),
            ehr_reconcile_window: Duration::from_secs(24 * 3_600),
            ehr_smart: EhrSmartArgs::default(),
            compliance_map: None,
            ehr_component: None,
        }
    }

    pub fn selected(&self) -> anyhow::Result<BTreeSet<&'static str>> {
        if self.only.is_empty() {
            let mut all: BTreeSet<&'static str> = COMPONENTS.iter().copied().collect();
            if self.nats.is_none() {
                all.remove("relay"); // nothing to relay to without NATS
            }
            if self.ehr_url.is_none() {
                all.remove("ehr"); // no EHR configured
            }
            return Ok(all);
        }
        self.only
            .iter()
            .map(|name| {
                COMPONENTS
                    .iter()
                    .copied()
                    .find(|c| *c == name.trim())
                    .with_context(|| format!("unknown component {name:?}; known: {COMPONENTS:?}"))
            })
            .collect()
    }
}

/// Opens the bus and the store as the selected components need them: a process that
/// runs the store component (or has no NATS) opens the database itself; any other
/// process reaches the store service over NATS.
pub async fn connect(
    args: &ServeArgs,
    store_url: &str,
    selected: &BTreeSet<&str>,
) -> anyhow::Result<Runtime> {
    let bus = match &args.nats {
        Some(url) => Bus::connect_nats(url).await?,
        None => Bus::in_process(),
    };
    let store = match (&args.nats, selected.contains("store")) {
        (Some(_), false) => {
            let client = bus.nats_client().expect("NATS bus").clone();
            AnyStore::Nats(NatsEventStore::new(client).with_root(args.subject_root.clone()))
        }
        _ => AnyStore::open(store_url)
            .await
            .with_context(|| format!("opening event store {store_url}"))?,
    };
    let store_url = match store {
        AnyStore::Nats(_) => String::new(),
        _ => store_url.to_string(),
    };
    Ok(Runtime {
        bus,
        store,
        root: args.subject_root.clone(),
        store_url,
    })
}

fn shutdown_signal(
    receiver: &watch::Receiver<bool>,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    let mut receiver = receiver.clone();
    async move {
        while !*receiver.borrow() {
            if receiver.changed().await.is_err() {
                return;
            }
        }
    }
}

/// Starts the selected components; returns their tasks. Shut them down by sending
/// `true` on the watch.
pub async fn start(
    args: &ServeArgs,
    runtime: &Runtime,
    selected: &BTreeSet<&str>,
    stop: &watch::Receiver<bool>,
) -> anyhow::Result<JoinSet<(String, anyhow::Result<()>)>> {
    let mut tasks = JoinSet::new();
    let store = runtime.store.clone();
    let root = runtime.root.clone();

    if selected.contains("store")
        && let Some(client) = runtime.bus.nats_client()
    {
        let (client, backing, service_root, stop) = (
            client.clone(),
            store.clone(),
            root.clone(),
            shutdown_signal(stop),
        );
        tasks.spawn(async move {
            let result = chartline_store::run(client, backing, &service_root, stop).await;
            ("store".to_string(), result.map_err(anyhow::Error::from))
        });
        wait_for_store(&runtime.bus, &root).await?;
    }
    if matches!(runtime.store, AnyStore::Nats(_)) {
        // The store service may be another process that is still starting.
        wait_for_store(&runtime.bus, &root).await?;
    }
    // Tenants and the billing policy exist before any command is taken. A store that
    // is briefly unreachable (NATS restarting) is waited for, not fatal.
    let mut tenants = vec![system_tenant()];
    for tenant in &args.tenants {
        tenants.push(TenantId::parse(tenant.trim())?);
    }
    for tenant in &tenants {
        retry_while_unavailable(|| store.ensure_tenant(tenant)).await?;
    }

    macro_rules! command_service {
        ($name:literal, $run:path) => {
            if selected.contains($name) {
                let (bus, store, root, stop) = (
                    runtime.bus.clone(),
                    store.clone(),
                    root.clone(),
                    shutdown_signal(stop),
                );
                tasks.spawn(async move {
                    let result = $run(bus, store, &root, stop).await;
                    ($name.to_string(), result.map_err(anyhow::Error::from))
                });
            }
        };
    }
    command_service!("scheduling", chartline_scheduling::run);
    command_service!("consultation", chartline_consultation::run);
    command_service!("documentation", chartline_documentation::run);
    command_service!("rpm", chartline_rpm::run);
    command_service!("identity", chartline_identity::run);
    command_service!("billing", chartline_billing::run_commands);
    // Ready only when every command service answers: a probe gets `unknown_command`
    // once the service has subscribed (and `NoResponders` before).
    for service in [
        "scheduling",
        "consultation",
        "documentation",
        "rpm",
        "identity",
        "billing",
    ] {
        if selected.contains(service) {
            wait_for_service(&runtime.bus, &root, service).await?;
        }
    }

    if selected.contains("identity-matcher") {
        let (store, wake, stop) = (store.clone(), store.head_watch(), shutdown_signal(stop));
        tasks.spawn(async move {
            let result = chartline_identity::run_reactor(store, wake, stop).await;
            (
                "identity-reactor".to_string(),
                result.map_err(anyhow::Error::msg),
            )
        });
    }
    if selected.contains("billing") {
        let mut changes = chartline_proto::billing_policy::SHIPPED_POLICY_FILES
            .iter()
            .map(|(path, text)| chartline_proto::billing_policy::parse_policy_file(path, text))
            .collect::<Result<Vec<_>, _>>()
            .context("loading the shipped billing policy")?;
        changes.sort_by_key(|change| change.version);
        retry_while_unavailable(|| chartline_billing::publish_policy(&store, &changes))
            .await
            .context("recording the billing policy on policy-billing")?;
        let (store, wake, stop) = (store.clone(), store.head_watch(), shutdown_signal(stop));
        tasks.spawn(async move {
            let result = chartline_billing::run_reactor(store, wake, stop).await;
            (
                "billing-reactor".to_string(),
                result.map_err(anyhow::Error::msg),
            )
        });
    }
    if selected.contains("projections") || selected.contains("api") {
        let read_url = match (&args.read_store, &runtime.store) {
            (Some(url), _) => url.clone(),
            (None, AnyStore::Nats(_)) => {
                bail!("projections and the API need --read-store with a NATS store")
            }
            (None, _) => runtime.store_url.clone(),
        };
        let read_db = chartline_projections::db::ReadDb::open(&read_url)
            .await
            .with_context(|| format!("opening read-model database {read_url}"))?;
        if selected.contains("projections") {
            let mut runner = chartline_projections::engine::ProjectionRunner::new(
                store.clone(),
                read_db.clone(),
            )
            .await
            .context("starting projections")?;
            let stop = shutdown_signal(stop);
            tasks.spawn(async move {
                let result = runner.run_until(stop).await;
                (
                    "projections".to_string(),
                    result.map_err(anyhow::Error::from),
                )
            });
        }
        if selected.contains("api") {
            let api = chartline_api::Api::build(chartline_api::ApiConfig {
                listen: args.listen.clone(),
                secret: jwt_secret()?,
                store: store.clone(),
                bus: runtime.bus.clone(),
                root: root.clone(),
                read_db: Some(read_db),
                compliance_map: crate::compliance_cmd::load_map(args.compliance_map.as_deref())?,
            })
            .await
            .with_context(|| format!("starting the API on {}", args.listen))?;
            eprintln!(
                "chartline API on http://127.0.0.1:{}/graphiql (dashboard: /dashboard)",
                api.port()
            );
            let stop = shutdown_signal(stop);
            tasks.spawn(async move { ("api".to_string(), api.run_until_stopped(stop).await) });
        }
    }
    if selected.contains("ehr") {
        let mut base_url = args
            .ehr_url
            .clone()
            .context("the ehr component needs --ehr-url (a FHIR base URL, or `sandbox`)")?;
        let mut sandbox_token_url = None;
        if base_url == "sandbox" {
            let database = sandbox_database(&runtime.store_url);
            // With SMART flags, the sandbox registers this client's public key.
            let smart = match (
                args.ehr_smart.signing_key()?,
                &args.ehr_smart.ehr_smart_client_id,
            ) {
                (Some(key), Some(client_id)) => {
                    Some(chartline_ehr_connector::sandbox::smart::SandboxSmart {
                        clients: vec![chartline_ehr_connector::sandbox::smart::RegisteredClient {
                            client_id: client_id.clone(),
                            keys: vec![key.public_jwk()],
                        }],
                        ..Default::default()
                    })
                }
                _ => None,
            };
            let sandbox = chartline_ehr_connector::SandboxEhr::build(
                "127.0.0.1:0",
                chartline_ehr_connector::SandboxConfig {
                    database_url: database,
                    bearer_token: args.ehr_token.clone(),
                    smart,
                },
            )
            .await
            .map_err(anyhow::Error::msg)?;
            base_url = sandbox.base_url();
            if args.ehr_smart.enabled() {
                sandbox_token_url = Some(sandbox.token_url());
            }
            eprintln!("sandbox EHR (a stand-in, not a real EHR) at {base_url}");
            let stop = shutdown_signal(stop);
            tasks.spawn(async move {
                let result = sandbox.run_until_stopped(stop).await;
                (
                    "sandbox-ehr".to_string(),
                    result.map_err(anyhow::Error::from),
                )
            });
        }
        let auth = args
            .ehr_smart
            .auth(&base_url, args.ehr_token.as_deref(), sandbox_token_url)
            .await?;
        let client =
            chartline_ehr_connector::FhirClient::new(chartline_ehr_connector::EhrEndpoint {
                base_url: base_url.clone(),
                auth,
                timeout: Duration::from_secs(10),
            })?;
        let map = crate::compliance_cmd::load_map(args.compliance_map.as_deref())?;
        let component = match (&args.ehr_component, args.ehr_url.as_deref()) {
            (Some(component), _) => component.clone(),
            (None, Some("sandbox")) => "sandbox-ehr".to_string(),
            (None, _) => map
                .components
                .iter()
                .find(|c| {
                    c.kind == chartline_domain::compliance::ComponentKind::Ehr
                        && c.endpoint.as_deref().map(|e| e.trim_end_matches('/'))
                            == Some(base_url.trim_end_matches('/'))
                })
                .map_or_else(|| base_url.clone(), |c| c.id.clone()),
        };
        if !matches!(
            map.coverage(&component, chrono::Utc::now()),
            chartline_domain::compliance::Coverage::Covered { .. }
        ) {
            eprintln!(
                "warning: the EHR ({component}) is not covered for PHI in the compliance map now; write-backs will be blocked (chartline compliance map)"
            );
        }
        let connector = chartline_ehr_connector::Connector::new(store.clone(), client)
            .with_compliance(std::sync::Arc::new(map), &component);
        if !args.ehr_reconcile_interval.is_zero() {
            let reconciler = chartline_ehr_connector::reconcile::Reconciler::new(
                store.clone(),
                connector.clone(),
            );
            let (interval, window) = (args.ehr_reconcile_interval, args.ehr_reconcile_window);
            let stop = shutdown_signal(stop);
            tasks.spawn(async move {
                let result = reconciler.run(interval, window, stop).await;
                (
                    "ehr-reconcile".to_string(),
                    result.map_err(anyhow::Error::msg),
                )
            });
        }
        // `retry_write_back` on <root>.cmd.<tenant>.ehr.* (GraphQL retryWriteBack).
        let (commands, bus, command_root, command_stop) = (
            connector.clone(),
            runtime.bus.clone(),
            root.clone(),
            shutdown_signal(stop),
        );
        tasks.spawn(async move {
            let result = chartline_ehr_connector::commands::serve(
                bus,
                commands,
                &command_root,
                command_stop,
            )
            .await;
            (
                "ehr-commands".to_string(),
                result.map_err(anyhow::Error::from),
            )
        });
        let (wake, stop) = (store.head_watch(), shutdown_signal(stop));
        tasks.spawn(async move {
            let result = connector.run(wake, 16, stop).await;
            ("ehr".to_string(), result.map_err(anyhow::Error::msg))
        });
    }
    if selected.contains("relay") {
        let Some(client) = runtime.bus.nats_client() else {
            bail!("the relay needs --nats");
        };
        let config = RelayConfig {
            root: root.clone(),
            stream_name: args.events_stream.clone(),
            ..RelayConfig::default()
        };
        let (client, store, wake, stop) = (
            client.clone(),
            store.clone(),
            store.head_watch(),
            shutdown_signal(stop),
        );
        tasks.spawn(async move {
            let result = run_relay(store, client, config, wake, stop).await;
            ("relay".to_string(), result.map_err(anyhow::Error::from))
        });
    }
    Ok(tasks)
}

/// The sandbox EHR's SQLite file: next to the event store's file, or under `data/`.
pub fn sandbox_database(store_url: &str) -> String {
    match store_url.strip_prefix("sqlite://") {
        Some(path) => format!(
            "sqlite://{}",
            std::path::Path::new(path)
                .with_file_name("sandbox-ehr.db")
                .display()
        ),
        None => "sqlite://data/sandbox-ehr.db".to_string(),
    }
}

/// The token signing secret: `CHARTLINE_JWT_SECRET`, or a random one kept in
/// `data/dev-jwt-secret` (created on first use, mode 0600) for local development.
pub fn jwt_secret() -> anyhow::Result<chartline_api::Secret> {
    if let Ok(secret) = std::env::var("CHARTLINE_JWT_SECRET")
        && !secret.is_empty()
    {
        return Ok(chartline_api::Secret::new(secret.into_bytes()));
    }
    let path = std::path::Path::new("data/dev-jwt-secret");
    if let Ok(existing) = std::fs::read(path)
        && !existing.is_empty()
    {
        return Ok(chartline_api::Secret::new(existing));
    }
    std::fs::create_dir_all("data")?;
    let fresh = format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    );
    std::fs::write(path, &fresh)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    }
    Ok(chartline_api::Secret::new(fresh.into_bytes()))
}

/// Retries a store operation while the store is unavailable (bounded: 60 s).
async fn retry_while_unavailable<T, F, Fut>(
    mut operation: F,
) -> Result<T, chartline_infra::StoreError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, chartline_infra::StoreError>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        match operation().await {
            Err(error) if error.is_retryable() && tokio::time::Instant::now() < deadline => {
                tracing::warn!(%error, "start-up: event store unavailable; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            other => return other,
        }
    }
}

/// Waits until a command service answers on the bus.
async fn wait_for_service(bus: &Bus, root: &str, service: &str) -> anyhow::Result<()> {
    let subject = format!(
        "{root}.cmd.{}.{service}.readiness_probe",
        chartline_infra::checkpoint::SYSTEM_TENANT
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while tokio::time::Instant::now() < deadline {
        match bus
            .request(&subject, b"{}".to_vec(), Duration::from_secs(2))
            .await
        {
            Ok(_) => return Ok(()),
            Err(chartline_infra::bus::BusError::NoResponders(_)) => {
                tokio::time::sleep(Duration::from_millis(10)).await
            }
            Err(error) => bail!("{service} did not become ready: {error}"),
        }
    }
    bail!("{service} did not answer within 30 s")
}

/// Waits until the store service answers (it subscribes asynchronously).
async fn wait_for_store(bus: &Bus, root: &str) -> anyhow::Result<()> {
    let Some(client) = bus.nats_client() else {
        return Ok(());
    };
    let probe = NatsEventStore::new(client.clone()).with_root(root.to_string());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while tokio::time::Instant::now() < deadline {
        if probe.head_position().await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("no event store service answered on NATS within 60 s")
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn termination() {
    #[cfg(unix)]
    {
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .expect("install SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

pub async fn run(args: ServeArgs, store_url: String) -> anyhow::Result<ExitCode> {
    let selected = args.selected()?;
    let runtime = connect(&args, &store_url, &selected).await?;
    let (stop_tx, stop) = watch::channel(false);
    let mut tasks = start(&args, &runtime, &selected, &stop).await?;
    eprintln!(
        "chartline serving [{}] on {} with store {} ({})",
        selected.iter().copied().collect::<Vec<_>>().join(","),
        args.nats.as_deref().unwrap_or("the in-process bus"),
        if matches!(runtime.store, AnyStore::Nats(_)) {
            "over NATS"
        } else {
            store_url.as_str()
        },
        runtime.store.backend(),
    );
    // Stop on a signal, or when a component fails.
    let failed = tokio::select! {
        _ = termination() => None,
        Some(done) = tasks.join_next() => Some(done),
    };
    let _ = stop_tx.send(true);
    let mut exit = ExitCode::SUCCESS;
    if let Some(done) = failed {
        match done {
            Ok((name, Err(error))) => {
                eprintln!("component {name} failed: {error:#}");
                exit = ExitCode::FAILURE;
            }
            Ok((name, Ok(()))) => eprintln!("component {name} stopped"),
            Err(error) => {
                eprintln!("a component panicked: {error}");
                exit = ExitCode::FAILURE;
            }
        }
    }
    while let Some(done) = tasks.join_next().await {
        if let Ok((name, Err(error))) = done {
            eprintln!("component {name} stopped with an error: {error:#}");
            exit = ExitCode::FAILURE;
        }
    }
    eprintln!("chartline stopped");
    Ok(exit)
}
