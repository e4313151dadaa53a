//! Any string as a bearer JWT against a fixed JWKS (an EC P-256 key, an RSA key, an Ed25519
//! key): `jwt::verify` never panics, and it never accepts (the input cannot carry a valid
//! signature of keys the fuzzer does not hold). Also `looks_like_jwt` and the TOTP and
//! recovery-code input parsers never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use valv_identity::jwt::{self, Expect, Jwk};

fn keys() -> Vec<Jwk> {
    vec![
        Jwk { kty: "EC".into(), kid: Some("ec".into()), crv: Some("P-256".into()), x: Some("f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU".into()), y: Some("x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0".into()), ..Jwk::default() },
        Jwk { kty: "RSA".into(), kid: Some("rsa".into()), n: Some("0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw".into()), e: Some("AQAB".into()), ..Jwk::default() },
        Jwk { kty: "OKP".into(), kid: Some("ed".into()), crv: Some("Ed25519".into()), x: Some("11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo".into()), ..Jwk::default() },
    ]
}

fuzz_target!(|data: &[u8]| {
    let s = String::from_utf8_lossy(data);
    let algs: Vec<String> = jwt::ALGORITHMS.iter().map(|a| a.to_string()).collect();
    let expect = Expect { issuer: "https://idp.test", audience: "https://valv.test/fhir", algorithms: &algs, now: 1_800_000_000, leeway: 60, nonce: None };
    let _ = jwt::looks_like_jwt(&s);
    assert!(jwt::verify(&s, &keys(), &expect).is_err(), "accepted a token nobody signed: {s:?}");
    let _ = valv_identity::totp::verify(&[7; 20], &s, 1_800_000_000_000, None);
    let _ = valv_identity::codes::recovery_hash(&s);
});
