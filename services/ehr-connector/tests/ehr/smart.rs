//! SMART Backend Services against the sandbox's token endpoint over real HTTP on
//! 127.0.0.1: both signing algorithms, every refusal as a typed error with nothing
//! written, token reuse and refresh, one refresh after a revocation, and secrets that
//! never print.

use std::sync::Arc;
use std::time::Duration;

use chartline_ehr_connector::client::RetryPolicy;
use chartline_ehr_connector::sandbox::smart::{RegisteredClient, SandboxSmart};
use chartline_ehr_connector::smart::{self, AssertionClaims, client_assertion, request_token};
use chartline_ehr_connector::{
    Auth, EhrEndpoint, FhirClient, SandboxConfig, SandboxEhr, SigningAlgorithm, SigningKey,
    SmartAuth, SmartConfig, SmartError,
};
use serde_json::{Value, json};
use uuid::Uuid;

/// A synthetic, test-only RSA key (generated with openssl for these tests; it protects
/// nothing).
const TEST_ONLY_RSA_KEY: &str = include_str!("../keys/TEST-ONLY-rsa2048-synthetic.pkcs8.pem");

struct SmartSandbox {
    base_url: String,
    token_url: String,
    http: reqwest::Client,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    dir: std::path::PathBuf,
}

impl Drop for SmartSandbox {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl SmartSandbox {
    async fn start(clients: Vec<RegisteredClient>, token_lifetime: Duration) -> SmartSandbox {
        chartline_ehr_connector::client::install_crypto_provider();
        let dir = std::env::temp_dir().join(format!("chartline_smart_{}", Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let sandbox = SandboxEhr::build(
            "127.0.0.1:0",
            SandboxConfig {
                database_url: format!("sqlite://{}/sandbox.db", dir.display()),
                bearer_token: None,
                smart: Some(SandboxSmart {
                    clients,
                    token_lifetime,
                }),
            },
        )
        .await
        .unwrap();
        let (base_url, token_url) = (sandbox.base_url(), sandbox.token_url());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(sandbox.run_until_stopped(async {
            let _ = stopped.await;
        }));
        SmartSandbox {
            base_url,
            token_url,
            http: reqwest::Client::new(),
            stop: Some(stop),
            dir,
        }
    }

    async fn get(&self, path: &str) -> Value {
        self.http
            .get(format!("{}{path}", self.base_url))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    async fn resources(&self) -> Value {
        self.get("/_stats").await["resources"].clone()
    }

    async fn issued(&self) -> u64 {
        self.get("/_smart/stats").await["issued"].as_u64().unwrap()
    }

    fn auth(&self, client_id: &str, key: SigningKey) -> Arc<SmartAuth> {
        Arc::new(
            SmartAuth::new(SmartConfig::new(
                client_id,
                self.token_url.clone(),
                "system/*.crus",
                key,
            ))
            .unwrap(),
        )
    }

    fn client(&self, auth: Auth) -> FhirClient {
        FhirClient::new(EhrEndpoint {
            base_url: self.base_url.clone(),
            auth,
            timeout: Duration::from_secs(5),
        })
        .unwrap()
        .with_retry(RetryPolicy {
            max_attempts: 3,
            base_delay: Duration::from_millis(10),
            max_delay: Duration::from_millis(50),
            max_retry_after: Duration::from_millis(50),
        })
    }
}

fn rsa_key() -> SigningKey {
    SigningKey::from_bytes(
        TEST_ONLY_RSA_KEY.as_bytes(),
        Some(SigningAlgorithm::Rs384),
        None,
    )
    .unwrap()
}

fn es_key() -> SigningKey {
    SigningKey::generate_es384(None).unwrap().0
}

fn registered(client_id: &str, key: &SigningKey) -> RegisteredClient {
    RegisteredClient::from_jwk_json(client_id, &key.public_jwk().to_string()).unwrap()
}

/// A minimal resource with a business key (synthetic).
fn task(value: &str) -> Value {
    json!({
        "resourceType": "Task",
        "identifier": [{"system": "urn:chartline:smart-test:task", "value": value}],
        "status": "requested",
        "intent": "order",
    })
}

#[tokio::test]
async fn es384_and_rs384_clients_obtain_a_token_and_write() {
    let (es, rs) = (es_key(), rsa_key());
    let sandbox = SmartSandbox::start(
        vec![registered("es-client", &es), registered("rs-client", &rs)],
        Duration::from_secs(300),
    )
    .await;
    let discovered = smart::discover_token_endpoint(&sandbox.base_url, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(discovered, sandbox.token_url);
    let configuration = sandbox.get("/.well-known/smart-configuration").await;
    assert_eq!(
        configuration["token_endpoint_auth_methods_supported"],
        json!(["private_key_jwt"])
    );
    assert_eq!(
        configuration["token_endpoint_auth_signing_alg_values_supported"],
        json!(["RS384", "ES384"])
    );

    // Without a token the FHIR API refuses.
    let anonymous = sandbox.client(Auth::None).upsert(&task("anon")).await;
    assert_eq!(anonymous.unwrap_err().status, Some(401));

    assert_eq!(es.algorithm(), SigningAlgorithm::Es384);
    assert_eq!(rs.algorithm(), SigningAlgorithm::Rs384);
    for (client_id, key, value) in [("es-client", es, "es-1"), ("rs-client", rs, "rs-1")] {
        let auth = sandbox.auth(client_id, key);
        let client = sandbox.client(Auth::SmartBackend(auth.clone()));
        let written = client.upsert(&task(value)).await.unwrap();
        assert_eq!(written.resource_type, "Task");
        assert!(written.changed);
        assert_eq!(auth.tokens_fetched(), 1, "{client_id}");
    }
    assert_eq!(sandbox.resources().await, json!({"Task": 2}));
    assert_eq!(sandbox.issued().await, 2);
}

#[tokio::test]
async fn a_bad_signature_wrong_aud_expired_or_replayed_assertion_is_refused_and_nothing_is_written()
{
    let registered_key = es_key();
    let kid = registered_key.kid().to_string();
    let sandbox = SmartSandbox::start(
        vec![registered("client-1", &registered_key)],
        Duration::from_secs(300),
    )
    .await;
    fn refused<T: std::fmt::Debug>(result: Result<T, SmartError>, why: &str) {
        match result {
            Err(SmartError::Rejected {
                status,
                error,
                description,
            }) => {
                assert_eq!((status, error.as_str()), (401, "invalid_client"));
                assert!(description.contains(why), "{description:?} vs {why:?}");
            }
            other => panic!("expected a rejection ({why}), got {other:?}"),
        }
    }

    // Bad signature: another key under the registered kid.
    let impostor = SigningKey::generate_es384(Some(kid.clone())).unwrap().0;
    let auth = sandbox.auth("client-1", impostor);
    refused(auth.access_token().await, "signature does not verify");
    let failure = sandbox
        .client(Auth::SmartBackend(auth.clone()))
        .upsert(&task("bad-signature"))
        .await
        .unwrap_err();
    assert!(!failure.retryable, "a refused client is dead, not retried");
    assert_eq!(failure.status, Some(401));
    assert!(
        failure.message.contains("invalid_client"),
        "{}",
        failure.message
    );

    // Wrong audience.
    let mut config = SmartConfig::new(
        "client-1",
        sandbox.token_url.clone(),
        "system/*.crus",
        registered_key,
    );
    config.audience = Some("https://some-other-ehr.example/token".into());
    let auth = Arc::new(SmartAuth::new(config.clone()).unwrap());
    refused(auth.access_token().await, "aud must be");
    assert!(
        sandbox
            .client(Auth::SmartBackend(auth))
            .upsert(&task("wrong-aud"))
            .await
            .is_err()
    );

    // Expired, too long-lived, and replayed assertions (built by hand).
    let http = reqwest::Client::new();
    let now = chrono::Utc::now().timestamp();
    let claims = |issued_at: i64, expires_at: i64| AssertionClaims {
        client_id: "client-1".into(),
        audience: sandbox.token_url.clone(),
        issued_at,
        expires_at,
        jti: Uuid::new_v4().to_string(),
    };
    let key = &config.key;
    let expired = client_assertion(key, &claims(now - 600, now - 300)).unwrap();
    refused(
        request_token(&http, &sandbox.token_url, "system/*.crus", &expired).await,
        "expired",
    );
    let too_long = client_assertion(key, &claims(now, now + 3_600)).unwrap();
    refused(
        request_token(&http, &sandbox.token_url, "system/*.crus", &too_long).await,
        "five minutes",
    );
    let good = client_assertion(key, &claims(now, now + 120)).unwrap();
    request_token(&http, &sandbox.token_url, "system/*.crus", &good)
        .await
        .expect("a valid assertion is accepted");
    refused(
        request_token(&http, &sandbox.token_url, "system/*.crus", &good).await,
        "replay",
    );
    let unknown = client_assertion(
        key,
        &AssertionClaims {
            client_id: "someone-else".into(),
            ..claims(now, now + 60)
        },
    )
    .unwrap();
    refused(
        request_token(&http, &sandbox.token_url, "system/*.crus", &unknown).await,
        "unknown client",
    );

    assert_eq!(sandbox.resources().await, json!({}), "nothing was written");
    assert_eq!(
        sandbox.issued().await,
        1,
        "only the valid assertion got a token"
    );
}

#[tokio::test]
async fn a_token_is_shared_and_reused_until_near_expiry_then_refreshed() {
    let key = es_key();
    let sandbox =
        SmartSandbox::start(vec![registered("client-1", &key)], Duration::from_secs(3)).await;
    let mut config = SmartConfig::new("client-1", sandbox.token_url.clone(), "system/*.crus", key);
    config.refresh_margin = Duration::from_secs(1);
    let auth = Arc::new(SmartAuth::new(config).unwrap());

    // 16 concurrent callers on a cold cache share one token request.
    let tokens = futures::future::join_all((0..16).map(|_| {
        let auth = auth.clone();
        async move { auth.access_token().await.unwrap() }
    }))
    .await;
    assert!(tokens.iter().all(|t| t == &tokens[0]));
    assert_eq!(auth.tokens_fetched(), 1);
    assert_eq!(sandbox.issued().await, 1);

    // Reused while more than the margin is left…
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(auth.access_token().await.unwrap() == tokens[0]);
    let client = sandbox.client(Auth::SmartBackend(auth.clone()));
    client.upsert(&task("reuse")).await.unwrap();
    assert_eq!(auth.tokens_fetched(), 1);

    // …and refreshed once less than the margin (1 s of 3 s) is left.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let refreshed = auth.access_token().await.unwrap();
    assert!(refreshed != tokens[0]);
    assert_eq!(auth.tokens_fetched(), 2);
    client.upsert(&task("refreshed")).await.unwrap();
    assert_eq!(sandbox.issued().await, 2);
    assert_eq!(sandbox.resources().await, json!({"Task": 2}));
}

#[tokio::test]
async fn a_revoked_token_causes_one_refresh_and_a_retry() {
    let key = rsa_key();
    let sandbox =
        SmartSandbox::start(vec![registered("client-1", &key)], Duration::from_secs(300)).await;
    let auth = sandbox.auth("client-1", key);
    let client = Arc::new(sandbox.client(Auth::SmartBackend(auth.clone())));
    client.upsert(&task("before")).await.unwrap();
    assert_eq!(auth.tokens_fetched(), 1);

    // The EHR revokes every token; 8 concurrent writes each meet a 401 once.
    let revoked = sandbox
        .http
        .post(format!("{}/_smart/revoke", sandbox.base_url))
        .send()
        .await
        .unwrap();
    assert_eq!(revoked.status(), 204);
    let results = futures::future::join_all((0..8).map(|i| {
        let client = client.clone();
        async move { client.upsert(&task(&format!("after-{i}"))).await }
    }))
    .await;
    for result in results {
        result.unwrap();
    }
    assert_eq!(auth.tokens_fetched(), 2, "one refresh for the whole burst");
    assert_eq!(sandbox.issued().await, 2);
    assert_eq!(sandbox.resources().await, json!({"Task": 9}));
    assert_eq!(
        client
            .stats
            .retries
            .load(std::sync::atomic::Ordering::Relaxed),
        0,
        "the retry after the refresh is immediate, not a backoff"
    );
}

#[tokio::test]
async fn debug_output_never_contains_the_key_or_the_token() {
    let key = rsa_key();
    let sandbox =
        SmartSandbox::start(vec![registered("client-1", &key)], Duration::from_secs(300)).await;
    let auth = sandbox.auth("client-1", key);
    let token = auth.access_token().await.unwrap();
    let endpoint = EhrEndpoint {
        base_url: sandbox.base_url.clone(),
        auth: Auth::SmartBackend(auth.clone()),
        timeout: Duration::from_secs(1),
    };
    let printed = format!(
        "{endpoint:?} {:?} {:?} {token:?}",
        auth.config(),
        Auth::Bearer(chartline_ehr_connector::Secret::new("static-secret"))
    );
    assert!(printed.contains("client-1"), "{printed}");
    assert!(
        !printed.contains(token.expose()),
        "the access token printed"
    );
    assert!(!printed.contains("static-secret"));
    let key_lines: Vec<&str> = TEST_ONLY_RSA_KEY
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    for line in key_lines {
        assert!(!printed.contains(line), "a line of the private key printed");
    }
    // The public modulus is not secret, but its absence shows no key material leaks.
    assert!(!printed.contains("\"n\""));
}
