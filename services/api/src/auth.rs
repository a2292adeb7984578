//! Bearer tokens: HS256 JWTs carrying the tenant, the subject and the roles.
//!
//! Signing is HMAC-SHA-256 from the RustCrypto `hmac` crate; the JWT framing (base64url
//! header.claims.signature) is a few lines here. Verification is constant-time, rejects
//! any `alg` but HS256, and checks expiry. The secret is a [`Secret`], which never
//! prints.

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chartline_proto::TenantId;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

/// A signing secret. `Debug`/`Display` print a placeholder, never the value.
#[derive(Clone)]
pub struct Secret(Vec<u8>);

impl Secret {
    pub fn new(bytes: impl Into<Vec<u8>>) -> Self {
        Secret(bytes.into())
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(**redacted**)")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, async_graphql::Enum)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Sees PHI of their tenant's patients; documents and signs.
    Clinician,
    /// Sees and changes coding; no clinical note text.
    Billing,
    /// Audit replay, chain verification, PHI access log; PHI reads are recorded.
    Auditor,
    /// Operational state: projections, queues, failures. No PHI.
    Ops,
    /// Integrations: commands and non-PHI views.
    Platform,
}

impl Role {
    pub fn sees_phi(self) -> bool {
        matches!(self, Role::Clinician | Role::Auditor)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub tenant: TenantId,
    pub roles: Vec<Role>,
    pub iat: i64,
    pub exp: i64,
}

impl Claims {
    pub fn has(&self, role: Role) -> bool {
        self.roles.contains(&role)
    }

    pub fn has_any(&self, roles: &[Role]) -> bool {
        roles.iter().any(|r| self.has(*r))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing bearer token")]
    Missing,
    #[error("malformed token")]
    Malformed,
    #[error("bad token signature")]
    BadSignature,
    #[error("unsupported token algorithm")]
    Algorithm,
    #[error("token expired")]
    Expired,
}

fn mac(secret: &Secret) -> Hmac<Sha256> {
    Hmac::<Sha256>::new_from_slice(&secret.0).expect("HMAC takes keys of any size")
}

pub fn issue(secret: &Secret, claims: &Claims) -> String {
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let body = URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).expect("claims serialize"));
    let signing_input = format!("{header}.{body}");
    let mut mac = mac(secret);
    mac.update(signing_input.as_bytes());
    let signature = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
    format!("{signing_input}.{signature}")
}

pub fn verify(secret: &Secret, token: &str, now: i64) -> Result<Claims, AuthError> {
    let mut parts = token.split('.');
    let (Some(header), Some(body), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(AuthError::Malformed);
    };
    let header: serde_json::Value = URL_SAFE_NO_PAD
        .decode(header)
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .ok_or(AuthError::Malformed)?;
    if header["alg"] != "HS256" {
        return Err(AuthError::Algorithm);
    }
    let signature = URL_SAFE_NO_PAD
        .decode(signature)
        .map_err(|_| AuthError::Malformed)?;
    let mut mac = mac(secret);
    mac.update(format!("{}.{body}", token.split('.').next().unwrap_or_default()).as_bytes());
    mac.verify_slice(&signature)
        .map_err(|_| AuthError::BadSignature)?;
    let claims: Claims = URL_SAFE_NO_PAD
        .decode(body)
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .ok_or(AuthError::Malformed)?;
    if claims.exp <= now {
        return Err(AuthError::Expired);
    }
    Ok(claims)
}

/// Extracts the token from an `Authorization: Bearer …` header value.
pub fn bearer(header: Option<&str>) -> Result<&str, AuthError> {
    header
        .and_then(|h| {
            h.strip_prefix("Bearer ")
                .or_else(|| h.strip_prefix("bearer "))
        })
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or(AuthError::Missing)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(exp: i64) -> Claims {
        Claims {
            sub: "dr-1".into(),
            tenant: TenantId::parse("clinic-a").unwrap(),
            roles: vec![Role::Clinician],
            iat: 0,
            exp,
        }
    }

    #[test]
    fn tokens_round_trip_and_reject_tampering() {
        let secret = Secret::new(b"test-secret".to_vec());
        let token = issue(&secret, &claims(100));
        assert_eq!(verify(&secret, &token, 50).unwrap(), claims(100));
        assert_eq!(verify(&secret, &token, 100), Err(AuthError::Expired));
        assert_eq!(
            verify(&Secret::new(b"other".to_vec()), &token, 50),
            Err(AuthError::BadSignature)
        );
        // Swap in claims for another tenant, keep the signature: rejected.
        let forged_body = URL_SAFE_NO_PAD.encode(
            serde_json::to_vec(&Claims {
                tenant: TenantId::parse("clinic-b").unwrap(),
                ..claims(100)
            })
            .unwrap(),
        );
        let mut parts: Vec<&str> = token.split('.').collect();
        parts[1] = &forged_body;
        assert_eq!(
            verify(&secret, &parts.join("."), 50),
            Err(AuthError::BadSignature)
        );
        let none_alg = format!(
            "{}.{}.",
            URL_SAFE_NO_PAD.encode(br#"{"alg":"none"}"#),
            token.split('.').nth(1).unwrap()
        );
        assert_eq!(verify(&secret, &none_alg, 50), Err(AuthError::Algorithm));
        assert_eq!(format!("{secret:?}"), "Secret(**redacted**)");
    }
}
