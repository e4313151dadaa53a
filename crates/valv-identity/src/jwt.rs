//! JSON Web Tokens from an OpenID provider (RFC 7519, signed with JWS, RFC 7515): the signature
//! against the provider's published keys (RFC 7517), then issuer, audience, expiry, not-before,
//! nonce and the second-factor claims. Only asymmetric algorithms on an allow-list are accepted:
//! `none` and the HMAC algorithms never are (a provider's public key must not become an HMAC
//! secret), and a key is used only for the algorithm family of its type.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ring::signature::{self, RsaPublicKeyComponents, UnparsedPublicKey};
use serde::Deserialize;
use serde_json::{Map, Value};

/// Algorithms Valv can verify; a provider's allow-list is a subset.
pub const ALGORITHMS: &[&str] = &["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA"];

/// A public key from a JWKS document.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
pub struct Jwk {
    pub kty: String,
    #[serde(default)]
    pub kid: Option<String>,
    #[serde(default)]
    pub alg: Option<String>,
    #[serde(default, rename = "use")]
    pub use_: Option<String>,
    #[serde(default)]
    pub n: Option<String>,
    #[serde(default)]
    pub e: Option<String>,
    #[serde(default)]
    pub crv: Option<String>,
    #[serde(default)]
    pub x: Option<String>,
    #[serde(default)]
    pub y: Option<String>,
}

/// A JWKS document (`{"keys": [...]}`); keys of unknown types are kept and never match.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Jwks {
    pub keys: Vec<Jwk>,
}

/// What a token must satisfy.
#[derive(Debug, Clone)]
pub struct Expect<'a> {
    pub issuer: &'a str,
    /// One of the token's audiences must be this.
    pub audience: &'a str,
    pub algorithms: &'a [String],
    /// Seconds since the epoch.
    pub now: i64,
    /// Clock skew tolerated on `exp` and `nbf`.
    pub leeway: i64,
    /// For ID tokens from a sign-in this server started.
    pub nonce: Option<&'a str>,
}

/// Why a token was refused (the audit log records it; the caller gets a generic 401).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    #[error("not a signed JWT: {0}")]
    Malformed(&'static str),
    #[error("algorithm '{0}' is not allowed")]
    Algorithm(String),
    #[error("no key of the provider has id {0:?}")]
    UnknownKey(Option<String>),
    #[error("the signature does not verify")]
    Signature,
    #[error("issued by '{0}', not by the configured provider")]
    Issuer(String),
    #[error("not meant for this server (audience)")]
    Audience,
    #[error("expired")]
    Expired,
    #[error("not valid yet")]
    NotYetValid,
    #[error("the nonce does not match the sign-in")]
    Nonce,
}

impl JwtError {
    /// A short reason for the audit log.
    pub fn reason(&self) -> &'static str {
        match self {
            JwtError::Malformed(_) => "jwt-malformed",
            JwtError::Algorithm(_) => "jwt-algorithm-not-allowed",
            JwtError::UnknownKey(_) => "jwt-unknown-key",
            JwtError::Signature => "jwt-bad-signature",
            JwtError::Issuer(_) => "jwt-wrong-issuer",
            JwtError::Audience => "jwt-wrong-audience",
            JwtError::Expired => "jwt-expired",
            JwtError::NotYetValid => "jwt-not-yet-valid",
            JwtError::Nonce => "jwt-nonce-mismatch",
        }
    }
}

#[derive(Deserialize)]
struct Header {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default)]
    crit: Option<Value>,
}

fn b64(part: &str) -> Result<Vec<u8>, JwtError> {
    URL_SAFE_NO_PAD.decode(part).map_err(|_| JwtError::Malformed("a part is not base64url"))
}

/// Whether `token` has the shape of a compact JWS (three base64url parts, a JSON header).
pub fn looks_like_jwt(token: &str) -> bool {
    token.starts_with("eyJ") && token.split('.').count() == 3
}

/// The claims of `token` if it is signed by one of `keys` and satisfies `expect`.
pub fn verify(token: &str, keys: &[Jwk], expect: &Expect<'_>) -> Result<Map<String, Value>, JwtError> {
    if token.len() > 16 * 1024 {
        return Err(JwtError::Malformed("longer than 16 KiB"));
    }
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(s), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(JwtError::Malformed("not three parts"));
    };
    let header: Header = serde_json::from_slice(&b64(h)?).map_err(|_| JwtError::Malformed("header is not JSON"))?;
    if header.crit.is_some() {
        return Err(JwtError::Malformed("critical header extensions are not supported"));
    }
    if !ALGORITHMS.contains(&header.alg.as_str()) || !expect.algorithms.contains(&header.alg) {
        return Err(JwtError::Algorithm(header.alg));
    }
    let signature = b64(s)?;
    let signed = &token.as_bytes()[..h.len() + 1 + p.len()];
    let candidates: Vec<&Jwk> = keys
        .iter()
        .filter(|k| header.kid.is_none() || k.kid == header.kid)
        .filter(|k| k.alg.as_deref().is_none_or(|a| a == header.alg))
        .filter(|k| k.use_.as_deref().is_none_or(|u| u == "sig"))
        .collect();
    if candidates.is_empty() {
        return Err(JwtError::UnknownKey(header.kid));
    }
    if !candidates.iter().any(|k| verifies(k, &header.alg, signed, &signature)) {
        return Err(JwtError::Signature);
    }
    let claims: Map<String, Value> = serde_json::from_slice(&b64(p)?).map_err(|_| JwtError::Malformed("claims are not a JSON object"))?;
    check_claims(&claims, expect)?;
    Ok(claims)
}

fn check_claims(claims: &Map<String, Value>, expect: &Expect<'_>) -> Result<(), JwtError> {
    let iss = claims.get("iss").and_then(Value::as_str).unwrap_or("");
    if iss != expect.issuer {
        return Err(JwtError::Issuer(iss.chars().take(200).collect()));
    }
    let audience_ok = match claims.get("aud") {
        Some(Value::String(a)) => a == expect.audience,
        Some(Value::Array(list)) => list.iter().any(|a| a.as_str() == Some(expect.audience)),
        _ => false,
    };
    if !audience_ok {
        return Err(JwtError::Audience);
    }
    let exp = claims.get("exp").and_then(Value::as_i64).ok_or(JwtError::Malformed("no exp claim"))?;
    if expect.now >= exp.saturating_add(expect.leeway) {
        return Err(JwtError::Expired);
    }
    if claims.get("nbf").and_then(Value::as_i64).is_some_and(|nbf| nbf > expect.now.saturating_add(expect.leeway)) {
        return Err(JwtError::NotYetValid);
    }
    if let Some(nonce) = expect.nonce {
        if claims.get("nonce").and_then(Value::as_str) != Some(nonce) {
            return Err(JwtError::Nonce);
        }
    }
    Ok(())
}

fn verifies(key: &Jwk, alg: &str, message: &[u8], sig: &[u8]) -> bool {
    let bytes = |v: &Option<String>| v.as_deref().and_then(|s| URL_SAFE_NO_PAD.decode(s).ok());
    match (key.kty.as_str(), alg) {
        ("RSA", "RS256" | "RS384" | "RS512" | "PS256" | "PS384" | "PS512") => {
            let (Some(n), Some(e)) = (bytes(&key.n), bytes(&key.e)) else { return false };
            let params: &signature::RsaParameters = match alg {
                "RS256" => &signature::RSA_PKCS1_2048_8192_SHA256,
                "RS384" => &signature::RSA_PKCS1_2048_8192_SHA384,
                "RS512" => &signature::RSA_PKCS1_2048_8192_SHA512,
                "PS256" => &signature::RSA_PSS_2048_8192_SHA256,
                "PS384" => &signature::RSA_PSS_2048_8192_SHA384,
                _ => &signature::RSA_PSS_2048_8192_SHA512,
            };
            RsaPublicKeyComponents { n: &n, e: &e }.verify(params, message, sig).is_ok()
        }
        ("EC", "ES256" | "ES384") => {
            let (want_crv, len, params) = match alg {
                "ES256" => ("P-256", 32, &signature::ECDSA_P256_SHA256_FIXED),
                _ => ("P-384", 48, &signature::ECDSA_P384_SHA384_FIXED),
            };
            let (Some(x), Some(y)) = (bytes(&key.x), bytes(&key.y)) else { return false };
            if key.crv.as_deref() != Some(want_crv) || x.len() != len || y.len() != len {
                return false;
            }
            let point: Vec<u8> = std::iter::once(4u8).chain(x).chain(y).collect();
            UnparsedPublicKey::new(params, point).verify(message, sig).is_ok()
        }
        ("OKP", "EdDSA") => {
            let Some(x) = bytes(&key.x) else { return false };
            key.crv.as_deref() == Some("Ed25519") && UnparsedPublicKey::new(&signature::ED25519, x).verify(message, sig).is_ok()
        }
        _ => false,
    }
}

/// Whether the claims show a second factor: `amr` holds one of `amr_values`, or `acr` is one of
/// `acr_values`.
pub fn has_second_factor(claims: &Map<String, Value>, amr_values: &[String], acr_values: &[String]) -> bool {
    let amr = claims.get("amr").and_then(Value::as_array).is_some_and(|a| a.iter().filter_map(Value::as_str).any(|m| amr_values.iter().any(|v| v == m)));
    let acr = claims.get("acr").and_then(Value::as_str).is_some_and(|a| acr_values.iter().any(|v| v == a));
    amr || acr
}

/// Strings of a claim that is a string or a list of strings (roles, groups, units).
pub fn strings(claims: &Map<String, Value>, name: &str) -> Vec<String> {
    match claims.get(name) {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).map(str::to_string).collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::rand::SystemRandom;
    use ring::signature::{EcdsaKeyPair, Ed25519KeyPair, KeyPair};

    fn enc(v: &Value) -> String {
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).expect("json"))
    }

    struct Es256 {
        pair: EcdsaKeyPair,
        jwk: Jwk,
    }

    fn es256(kid: &str) -> Es256 {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, &rng).expect("key");
        let pair = EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng).expect("pair");
        let public = pair.public_key().as_ref();
        let jwk = Jwk {
            kty: "EC".into(),
            kid: Some(kid.into()),
            crv: Some("P-256".into()),
            x: Some(URL_SAFE_NO_PAD.encode(&public[1..33])),
            y: Some(URL_SAFE_NO_PAD.encode(&public[33..65])),
            ..Jwk::default()
        };
        Es256 { pair, jwk }
    }

    fn sign(key: &Es256, header: &Value, claims: &Value) -> String {
        let input = format!("{}.{}", enc(header), enc(claims));
        let sig = key.pair.sign(&SystemRandom::new(), input.as_bytes()).expect("sign");
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()))
    }

    fn claims(now: i64) -> Value {
        serde_json::json!({"iss": "https://idp.test", "aud": ["https://valv.test/fhir"], "sub": "u1", "exp": now + 300, "iat": now, "amr": ["pwd", "otp"]})
    }

    fn algs() -> Vec<String> {
        vec!["ES256".into(), "RS256".into(), "EdDSA".into()]
    }

    fn expect(now: i64, algs: &[String]) -> Expect<'_> {
        Expect { issuer: "https://idp.test", audience: "https://valv.test/fhir", algorithms: algs, now, leeway: 60, nonce: None }
    }

    #[test]
    fn good_token_and_every_refusal() {
        let now = 1_800_000_000;
        let k = es256("k1");
        let keys = vec![k.jwk.clone()];
        let a = algs();
        let header = serde_json::json!({"alg": "ES256", "kid": "k1", "typ": "JWT"});
        let good = sign(&k, &header, &claims(now));
        assert!(looks_like_jwt(&good));
        let c = verify(&good, &keys, &expect(now, &a)).expect("valid");
        assert!(has_second_factor(&c, &["otp".into()], &[]));
        assert!(!has_second_factor(&c, &["hwk".into()], &[]));

        let mut wrong_aud = claims(now);
        wrong_aud["aud"] = serde_json::json!("https://other.test");
        assert_eq!(verify(&sign(&k, &header, &wrong_aud), &keys, &expect(now, &a)), Err(JwtError::Audience));
        let mut wrong_iss = claims(now);
        wrong_iss["iss"] = serde_json::json!("https://evil.test");
        assert!(matches!(verify(&sign(&k, &header, &wrong_iss), &keys, &expect(now, &a)), Err(JwtError::Issuer(_))));
        assert_eq!(verify(&good, &keys, &expect(now + 361, &a)), Err(JwtError::Expired));
        let mut future = claims(now);
        future["nbf"] = serde_json::json!(now + 600);
        assert_eq!(verify(&sign(&k, &header, &future), &keys, &expect(now, &a)), Err(JwtError::NotYetValid));

        // alg none: an unsigned token with a valid-looking body.
        let none = format!("{}.{}.", enc(&serde_json::json!({"alg": "none"})), enc(&claims(now)));
        assert_eq!(verify(&none, &keys, &expect(now, &a)), Err(JwtError::Algorithm("none".into())));
        let hs = format!("{}.{}.c2ln", enc(&serde_json::json!({"alg": "HS256", "kid": "k1"})), enc(&claims(now)));
        assert_eq!(verify(&hs, &keys, &expect(now, &a)), Err(JwtError::Algorithm("HS256".into())));
        // A token signed by another key under the same kid (forged), and one with an unknown kid.
        let forger = es256("k1");
        assert_eq!(verify(&sign(&forger, &header, &claims(now)), &keys, &expect(now, &a)), Err(JwtError::Signature));
        let other_kid = serde_json::json!({"alg": "ES256", "kid": "k2"});
        assert_eq!(verify(&sign(&k, &other_kid, &claims(now)), &keys, &expect(now, &a)), Err(JwtError::UnknownKey(Some("k2".into()))));
        // Claims edited after signing.
        let mut parts: Vec<&str> = good.split('.').collect();
        let edited = enc(&serde_json::json!({"iss": "https://idp.test", "aud": "https://valv.test/fhir", "exp": now + 9999, "roles": ["admin"]}));
        parts[1] = &edited;
        assert_eq!(verify(&parts.join("."), &keys, &expect(now, &a)), Err(JwtError::Signature));
        // An allowed algorithm not on this provider's list.
        let only_rs = vec!["RS256".to_string()];
        assert_eq!(verify(&good, &keys, &expect(now, &only_rs)), Err(JwtError::Algorithm("ES256".into())));
        // Nonce of an ID token.
        let mut with_nonce = claims(now);
        with_nonce["nonce"] = serde_json::json!("n-1");
        let t = sign(&k, &header, &with_nonce);
        let mut e = expect(now, &a);
        e.nonce = Some("n-1");
        assert!(verify(&t, &keys, &e).is_ok());
        e.nonce = Some("n-2");
        assert_eq!(verify(&t, &keys, &e), Err(JwtError::Nonce));
        for junk in ["", "a.b", "eyJ.eyJ.x.y", "eyJhbGciOiJFUzI1NiJ9.!!!.x"] {
            assert!(matches!(verify(junk, &keys, &expect(now, &a)), Err(JwtError::Malformed(_) | JwtError::UnknownKey(_) | JwtError::Signature)), "{junk}");
        }
    }

    #[test]
    fn ed25519_and_key_type_confusion() {
        let now = 1_800_000_000;
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).expect("key");
        let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).expect("pair");
        let jwk = Jwk { kty: "OKP".into(), crv: Some("Ed25519".into()), kid: Some("ed".into()), x: Some(URL_SAFE_NO_PAD.encode(pair.public_key().as_ref())), ..Jwk::default() };
        let input = format!("{}.{}", enc(&serde_json::json!({"alg": "EdDSA", "kid": "ed"})), enc(&claims(now)));
        let token = format!("{input}.{}", URL_SAFE_NO_PAD.encode(pair.sign(input.as_bytes()).as_ref()));
        let a = algs();
        assert!(verify(&token, std::slice::from_ref(&jwk), &expect(now, &a)).is_ok());
        // The same signature presented as ES256 with the Ed25519 key: the key type does not fit.
        let confused = format!("{}.{}.{}", enc(&serde_json::json!({"alg": "ES256", "kid": "ed"})), enc(&claims(now)), token.split('.').nth(2).unwrap_or(""));
        assert_eq!(verify(&confused, &[jwk], &expect(now, &a)), Err(JwtError::Signature));
    }

    #[test]
    fn claim_lists() {
        let c: Map<String, Value> = serde_json::from_value(serde_json::json!({"roles": ["nurse", 3], "unit": "ward-1"})).expect("map");
        assert_eq!(strings(&c, "roles"), vec!["nurse"]);
        assert_eq!(strings(&c, "unit"), vec!["ward-1"]);
        assert!(strings(&c, "none").is_empty());
    }
}
