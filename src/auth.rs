//! Authentication and room permissions: a JSON Web Token on the upgrade request, verified
//! locally (no call to an identity provider on the connection path).
//!
//! Off unless a key is configured. With a key, every upgrade needs a token that verifies against
//! it and has not expired: missing or bad is 401, a room the token does not grant is 403, each
//! counted under `rejected_connections` by its own `error.type`. The token's expiry also bounds
//! the connection: when it passes, the server closes with 1008 "token expired".
//!
//! A token travels the ways a browser can send one: `Authorization: Bearer <jwt>` (non-browser
//! clients), the subprotocol pair `Sec-WebSocket-Protocol: wsotel.bearer, <jwt>` (browsers:
//! `new WebSocket(url, ["wsotel.bearer", jwt])`), the query parameter `access_token`, or the
//! cookie `wsotel_token`. The query string and the token are never logged.
//!
//! Claims: `sub` (the subject, on the connection's span and log lines, never a metric
//! attribute), `exp` (required), `rooms` (room names the token may join: exact names, `*` for
//! any, or a prefix ending in `*` such as `team-*`), `publish` (rooms it may send to, same
//! patterns; absent means every room it may join). `nbf`, `aud` and `iss` are checked when
//! configured or present.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::{HeaderMap, Uri, header};
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use crate::telemetry::RejectReason;

/// The subprotocol a browser names to carry its token in the next list entry.
pub const BEARER_PROTOCOL: &str = "wsotel.bearer";
/// The query parameter that may carry a token.
pub const QUERY_PARAMETER: &str = "access_token";
/// The cookie that may carry a token.
pub const COOKIE: &str = "wsotel_token";
/// Longest subject kept on spans and logs (it is client-signed input, but still input).
const MAX_SUBJECT: usize = 128;
/// Longest token looked at; anything longer is refused without parsing.
const MAX_TOKEN: usize = 8 * 1024;
/// Clock skew tolerated on `exp` and `nbf`.
const LEEWAY_SECS: u64 = 5;

/// Which key verifies tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// HMAC-SHA256 with the secret in this file (the file's bytes, surrounding whitespace
    /// trimmed).
    Hs256SecretFile(PathBuf),
    /// RSA-SHA256 with the PEM public key in this file.
    Rs256PublicKeyFile(PathBuf),
    /// ECDSA P-256 SHA-256 with the PEM public key in this file.
    Es256PublicKeyFile(PathBuf),
    /// The keys of a JWKS document (RS256 and ES256 keys, chosen by the token's `kid`).
    JwksFile(PathBuf),
}

/// What the authenticator checks besides the signature.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuthSettings {
    /// The verification key; `None` turns authentication off.
    pub key: Option<KeySource>,
    /// Required `aud`, when set.
    pub audience: Option<String>,
    /// Required `iss`, when set.
    pub issuer: Option<String>,
}

/// A key that cannot be loaded: a startup error.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The file cannot be read.
    #[error("{path}: {source}")]
    Read {
        /// The key file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file's content is not a usable key.
    #[error("{path}: {reason}")]
    Invalid {
        /// The key file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// Verifies tokens and says what they grant.
pub struct Authenticator {
    keys: Keys,
    validation: Validation,
}

enum Keys {
    /// One key, one algorithm.
    Single(DecodingKey, Algorithm),
    /// JWKS: keys by `kid`, each with its algorithm.
    Set(HashMap<String, (DecodingKey, Algorithm)>),
}

/// Why a token was refused at the upgrade.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthError {
    /// No token in any of the accepted places (401).
    Missing,
    /// The token does not verify, is malformed, or names an unknown key (401).
    Invalid,
    /// The token has expired (401).
    Expired,
    /// The token is valid but does not grant this room (403).
    RoomForbidden,
}

impl AuthError {
    /// The bounded `error.type` it is counted under.
    pub fn reason(self) -> RejectReason {
        match self {
            AuthError::Missing => RejectReason::TokenMissing,
            AuthError::Invalid => RejectReason::TokenInvalid,
            AuthError::Expired => RejectReason::TokenExpired,
            AuthError::RoomForbidden => RejectReason::RoomForbidden,
        }
    }

    /// The HTTP status answered.
    pub fn status(self) -> axum::http::StatusCode {
        match self {
            AuthError::RoomForbidden => axum::http::StatusCode::FORBIDDEN,
            _ => axum::http::StatusCode::UNAUTHORIZED,
        }
    }
}

/// What a verified token grants a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// `sub`, cut to 128 characters (empty when absent).
    pub subject: String,
    /// When the token expires; the connection is closed then.
    pub expires_at: SystemTime,
    rooms: Vec<String>,
    publish: Option<Vec<String>>,
}

#[derive(Deserialize)]
struct Claims {
    #[serde(default)]
    sub: Option<String>,
    exp: u64,
    #[serde(default)]
    rooms: Vec<String>,
    #[serde(default)]
    publish: Option<Vec<String>>,
}

impl Grant {
    /// Whether the token may join `room`.
    pub fn may_join(&self, room: &str) -> bool {
        matches_any(&self.rooms, room)
            || self.publish.as_ref().is_some_and(|p| matches_any(p, room))
    }

    /// Whether the token may send messages to `room`.
    pub fn may_publish(&self, room: &str) -> bool {
        match &self.publish {
            Some(p) => matches_any(p, room),
            None => matches_any(&self.rooms, room),
        }
    }

    /// Time left before the token expires (zero once it has).
    pub fn remaining(&self) -> Duration {
        self.expires_at
            .duration_since(SystemTime::now())
            .unwrap_or_default()
    }
}

fn matches_any(patterns: &[String], room: &str) -> bool {
    patterns.iter().any(|p| match p.strip_suffix('*') {
        Some(prefix) => room.starts_with(prefix),
        None => p == room,
    })
}

impl Authenticator {
    /// Loads the key `settings` name; `Ok(None)` when authentication is off.
    pub fn from_settings(settings: &AuthSettings) -> Result<Option<Self>, KeyError> {
        let Some(source) = &settings.key else {
            return Ok(None);
        };
        let (keys, algorithms) = load(source)?;
        let mut validation = Validation::new(algorithms[0]);
        validation.algorithms = algorithms;
        validation.leeway = LEEWAY_SECS;
        validation.validate_nbf = true;
        // A configured audience or issuer must be present, not only match when present.
        let mut required = vec!["exp"];
        match &settings.audience {
            Some(aud) => {
                validation.set_audience(&[aud]);
                required.push("aud");
            }
            None => validation.validate_aud = false,
        }
        if let Some(iss) = &settings.issuer {
            validation.set_issuer(&[iss]);
            required.push("iss");
        }
        validation.set_required_spec_claims(&required);
        Ok(Some(Authenticator { keys, validation }))
    }

    /// Verifies the request's token and checks it may join `room` (when joining one).
    pub fn authorize(
        &self,
        headers: &HeaderMap,
        uri: &Uri,
        room: Option<&str>,
    ) -> Result<Grant, AuthError> {
        let token = token_from(headers, uri).ok_or(AuthError::Missing)?;
        let grant = self.verify(token)?;
        match room {
            Some(room) if !grant.may_join(room) => Err(AuthError::RoomForbidden),
            _ => Ok(grant),
        }
    }

    /// Verifies a token and returns what it grants.
    pub fn verify(&self, token: &str) -> Result<Grant, AuthError> {
        if token.len() > MAX_TOKEN {
            return Err(AuthError::Invalid);
        }
        let (key, alg) = match &self.keys {
            Keys::Single(key, alg) => (key, *alg),
            Keys::Set(keys) => {
                let header = jsonwebtoken::decode_header(token).map_err(|_| AuthError::Invalid)?;
                let kid = header.kid.ok_or(AuthError::Invalid)?;
                let (key, alg) = keys.get(&kid).ok_or(AuthError::Invalid)?;
                (key, *alg)
            }
        };
        let mut validation = self.validation.clone();
        validation.algorithms = vec![alg];
        let data = jsonwebtoken::decode::<Claims>(token, key, &validation).map_err(|e| match e
            .kind()
        {
            jsonwebtoken::errors::ErrorKind::ExpiredSignature => AuthError::Expired,
            _ => AuthError::Invalid,
        })?;
        let claims = data.claims;
        // An `exp` beyond what the clock can hold is signed nonsense, not a long grant.
        let expires_at = UNIX_EPOCH
            .checked_add(Duration::from_secs(claims.exp))
            .ok_or(AuthError::Invalid)?;
        Ok(Grant {
            subject: claims
                .sub
                .unwrap_or_default()
                .chars()
                .take(MAX_SUBJECT)
                .collect(),
            expires_at,
            rooms: claims.rooms,
            publish: claims.publish,
        })
    }
}

fn load(source: &KeySource) -> Result<(Keys, Vec<Algorithm>), KeyError> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|source| KeyError::Read {
            path: path.to_owned(),
            source,
        })
    };
    let invalid = |path: &Path, reason: String| KeyError::Invalid {
        path: path.to_owned(),
        reason,
    };
    match source {
        KeySource::Hs256SecretFile(path) => {
            let bytes = read(path)?;
            let secret = bytes.trim_ascii();
            if secret.len() < 32 {
                return Err(invalid(
                    path,
                    format!(
                        "an HS256 secret needs at least 32 bytes, this one has {}",
                        secret.len()
                    ),
                ));
            }
            Ok((
                Keys::Single(DecodingKey::from_secret(secret), Algorithm::HS256),
                vec![Algorithm::HS256],
            ))
        }
        KeySource::Rs256PublicKeyFile(path) => {
            let key = DecodingKey::from_rsa_pem(&read(path)?)
                .map_err(|e| invalid(path, format!("not an RSA public key in PEM: {e}")))?;
            Ok((Keys::Single(key, Algorithm::RS256), vec![Algorithm::RS256]))
        }
        KeySource::Es256PublicKeyFile(path) => {
            let key = DecodingKey::from_ec_pem(&read(path)?)
                .map_err(|e| invalid(path, format!("not an EC public key in PEM: {e}")))?;
            Ok((Keys::Single(key, Algorithm::ES256), vec![Algorithm::ES256]))
        }
        KeySource::JwksFile(path) => {
            let set: JwkSet = serde_json::from_slice(&read(path)?)
                .map_err(|e| invalid(path, format!("not a JWKS document: {e}")))?;
            let mut keys = HashMap::new();
            for jwk in &set.keys {
                let Some(kid) = jwk.common.key_id.clone() else {
                    return Err(invalid(path, "every key needs a `kid`".into()));
                };
                let alg = match &jwk.algorithm {
                    jsonwebtoken::jwk::AlgorithmParameters::RSA(_) => Algorithm::RS256,
                    jsonwebtoken::jwk::AlgorithmParameters::EllipticCurve(p)
                        if p.curve == jsonwebtoken::jwk::EllipticCurve::P256 =>
                    {
                        Algorithm::ES256
                    }
                    _ => {
                        return Err(invalid(
                            path,
                            format!(
                                "key {kid:?}: only RSA (RS256) and P-256 (ES256) keys are accepted"
                            ),
                        ));
                    }
                };
                let key = DecodingKey::from_jwk(jwk)
                    .map_err(|e| invalid(path, format!("key {kid:?}: {e}")))?;
                keys.insert(kid, (key, alg));
            }
            if keys.is_empty() {
                return Err(invalid(path, "the JWKS has no keys".into()));
            }
            Ok((Keys::Set(keys), vec![Algorithm::RS256, Algorithm::ES256]))
        }
    }
}

/// The token a request carries, from the first place that has one: `Authorization: Bearer`,
/// the `wsotel.bearer` subprotocol pair, the `access_token` query parameter, the
/// `wsotel_token` cookie.
pub fn token_from<'a>(headers: &'a HeaderMap, uri: &'a Uri) -> Option<&'a str> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        });
    bearer
        .or_else(|| subprotocol_token(headers))
        .or_else(|| {
            uri.query()?.split('&').find_map(|pair| {
                let (k, v) = pair.split_once('=')?;
                (k == QUERY_PARAMETER).then_some(v)
            })
        })
        .or_else(|| {
            headers
                .get_all(header::COOKIE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(';'))
                .find_map(|c| {
                    let (k, v) = c.trim().split_once('=')?;
                    (k == COOKIE).then_some(v)
                })
        })
        .filter(|t| !t.is_empty())
}

/// The token in `Sec-WebSocket-Protocol: wsotel.bearer, <token>`, if that is what it says.
pub fn subprotocol_token(headers: &HeaderMap) -> Option<&str> {
    let list = headers.get(header::SEC_WEBSOCKET_PROTOCOL)?.to_str().ok()?;
    let mut items = list.split(',').map(str::trim);
    match (items.next(), items.next(), items.next()) {
        (Some(BEARER_PROTOCOL), Some(token), None) => Some(token),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header, encode};

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn authenticator() -> (Authenticator, tempfile_path::TempPath) {
        let path = tempfile_path::TempPath::with(SECRET);
        let auth = Authenticator::from_settings(&AuthSettings {
            key: Some(KeySource::Hs256SecretFile(path.0.clone())),
            ..AuthSettings::default()
        })
        .unwrap()
        .unwrap();
        (auth, path)
    }

    fn token(claims: serde_json::Value) -> String {
        encode(
            &Header::default(),
            &claims,
            &EncodingKey::from_secret(SECRET),
        )
        .unwrap()
    }

    fn now() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    /// A file removed on drop (no tempfile crate in the tree).
    mod tempfile_path {
        pub struct TempPath(pub std::path::PathBuf);
        impl TempPath {
            pub fn with(bytes: &[u8]) -> Self {
                static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
                let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let p =
                    std::env::temp_dir().join(format!("wsotel-auth-{}-{n}", std::process::id()));
                std::fs::write(&p, bytes).unwrap();
                TempPath(p)
            }
        }
        impl Drop for TempPath {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
    }

    #[test]
    fn grants_follow_the_claims() {
        let (auth, _f) = authenticator();
        let g = auth
            .verify(&token(serde_json::json!({
                "sub": "alice", "exp": now() + 60, "rooms": ["lobby", "team-*"], "publish": ["team-a"]
            })))
            .unwrap();
        assert_eq!(g.subject, "alice");
        assert!(g.may_join("lobby") && g.may_join("team-b") && !g.may_join("admin"));
        assert!(g.may_publish("team-a") && !g.may_publish("lobby"));
        let all = auth
            .verify(&token(
                serde_json::json!({"exp": now() + 60, "rooms": ["*"]}),
            ))
            .unwrap();
        assert!(
            all.may_join("x") && all.may_publish("x"),
            "publish defaults to rooms"
        );
        let none = auth
            .verify(&token(serde_json::json!({"exp": now() + 60})))
            .unwrap();
        assert!(!none.may_join("x"));
    }

    #[test]
    fn bad_tokens_are_refused_with_their_reason() {
        let (auth, _f) = authenticator();
        let expired = token(serde_json::json!({"exp": now() - 60}));
        assert_eq!(auth.verify(&expired), Err(AuthError::Expired));
        let wrong = encode(
            &Header::default(),
            &serde_json::json!({"exp": now() + 60}),
            &EncodingKey::from_secret(b"another secret, long enough 1234"),
        )
        .unwrap();
        assert_eq!(auth.verify(&wrong), Err(AuthError::Invalid));
        assert_eq!(auth.verify("not.a.jwt"), Err(AuthError::Invalid));
        let no_exp = token(serde_json::json!({"sub": "x"}));
        assert_eq!(auth.verify(&no_exp), Err(AuthError::Invalid));
        let far = token(serde_json::json!({"exp": u64::MAX}));
        assert_eq!(auth.verify(&far), Err(AuthError::Invalid), "no panic");
        // `alg: none` and a switch to another algorithm are refused.
        let none = format!(
            "{}.{}.",
            "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0", "eyJleHAiOjk5OTk5OTk5OTl9"
        );
        assert_eq!(auth.verify(&none), Err(AuthError::Invalid));
    }

    #[test]
    fn tokens_travel_the_ways_browsers_can_send_them() {
        let uri: Uri = "/ws/echo?x=1&access_token=q.t.s".parse().unwrap();
        let mut h = HeaderMap::new();
        assert_eq!(token_from(&h, &uri), Some("q.t.s"));
        h.insert(header::COOKIE, "a=b; wsotel_token=c.t.s".parse().unwrap());
        let plain: Uri = "/ws/echo".parse().unwrap();
        assert_eq!(token_from(&h, &plain), Some("c.t.s"));
        h.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            "wsotel.bearer, p.t.s".parse().unwrap(),
        );
        assert_eq!(token_from(&h, &plain), Some("p.t.s"));
        h.insert(header::AUTHORIZATION, "Bearer h.t.s".parse().unwrap());
        assert_eq!(token_from(&h, &plain), Some("h.t.s"));
        let mut other = HeaderMap::new();
        other.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            "chat.v1, p.t.s".parse().unwrap(),
        );
        assert_eq!(subprotocol_token(&other), None);
    }

    #[test]
    fn short_secrets_are_a_startup_error() {
        let f = tempfile_path::TempPath::with(b"short");
        let err = Authenticator::from_settings(&AuthSettings {
            key: Some(KeySource::Hs256SecretFile(f.0.clone())),
            ..AuthSettings::default()
        })
        .err()
        .unwrap();
        assert!(err.to_string().contains("at least 32 bytes"), "{err}");
    }
}
