//! People signing in: enrollment, passwords, TOTP, recovery codes, sessions and their timeouts,
//! lockout, rate limits, the admin surface and the CLI — against the real binary, with the
//! server's clock set by the test (`VALV_TEST_CLOCK_FILE`).

use crate::harness::{last_line, run_ok, valv, Resp, Server};
use serde_json::{json, Value};
use std::io::Write as _;
use std::process::Stdio;

/// Generous limits so only the rate-limit test meets them; a short login floor so tests are fast.
pub(crate) const FAST: &str = "[auth]\nrate_per_minute = 10000\nrate_burst = 10000\nlogin_floor_ms = 0\n";
pub(crate) const PASSWORD: &str = "correct horse battery staple";
const MIN: i64 = 60_000;

/// RFC 6238 code, computed here independently of Valv's implementation.
pub(crate) fn totp(secret: &[u8], now_ms: i64) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, secret);
    let tag = ring::hmac::sign(&key, &((now_ms / 1000 / 30) as u64).to_be_bytes());
    let h = tag.as_ref();
    let o = usize::from(h[19] & 15);
    let bin = u32::from_be_bytes([h[o] & 0x7f, h[o + 1], h[o + 2], h[o + 3]]);
    format!("{:06}", bin % 1_000_000)
}

fn base32_decode(s: &str) -> Vec<u8> {
    let (mut out, mut buf, mut bits) = (Vec::new(), 0u32, 0u32);
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'2'..=b'7' => c - b'2' + 26,
            _ => panic!("not base32: {s}"),
        };
        buf = (buf << 5) | u32::from(v);
        bits += 5;
        if bits >= 8 {
            out.push((buf >> (bits - 8)) as u8);
            bits -= 8;
        }
    }
    out
}

/// The secret of an `otpauth://` URI.
pub(crate) fn secret_of(uri: &str) -> Vec<u8> {
    assert!(uri.starts_with("otpauth://totp/"), "{uri}");
    let s = uri.split("secret=").nth(1).and_then(|r| r.split('&').next()).expect("secret parameter");
    base32_decode(s)
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("time").as_millis() as i64
}

pub(crate) async fn auth(s: &Server, path: &str, token: Option<&str>, body: Value) -> Resp {
    s.request("POST", path, token, Some(&body), &[("content-type", "application/json")]).await
}

pub(crate) async fn login(s: &Server, user: &str, password: &str, code: Option<&str>) -> Resp {
    let mut body = json!({"username": user, "password": password});
    if let Some(c) = code {
        body["totp"] = json!(c);
    }
    auth(s, "/auth/login", None, body).await
}

pub(crate) fn access_token(r: &Resp) -> String {
    assert_eq!(r.status, 200, "login failed: {}", r.text);
    assert_eq!(r.json["token_type"], "Bearer");
    r.json["access_token"].as_str().expect("access_token").to_string()
}

/// Creates a user over the admin API and enrolls them (password, TOTP); returns the secret.
async fn enrolled(s: &Server, user: &str, role: &str, now: i64) -> Vec<u8> {
    let created = s.post("/admin/users", &json!({"username": user, "display_name": "Test Person", "roles": [role]})).await;
    assert_eq!(created.status, 201, "{}", created.text);
    let token = created.json["enrollment_token"].as_str().expect("token").to_string();
    let approval = s.approve(user).await.expect("approval code");
    let e = auth(s, "/auth/enroll", None, json!({"token": token, "approval_code": approval, "password": PASSWORD})).await;
    assert_eq!(e.status, 200, "{}", e.text);
    let secret = secret_of(e.json["otpauth_uri"].as_str().expect("uri"));
    let c = auth(s, "/auth/enroll/confirm", None, json!({"token": token, "totp": totp(&secret, now)})).await;
    assert_eq!(c.status, 200, "{}", c.text);
    secret
}

fn audit_export(s: &Server) -> String {
    run_ok(&s.data, &["audit", "export"])
}

#[tokio::test]
async fn enrollment_login_totp_recovery_and_logout() {
    let s = Server::start_configured("ident-flow", &[], FAST);
    let mut now = now_ms();
    s.set_clock(now);
    let created = s.post("/admin/users", &json!({"username": "anna.berg", "display_name": "Anna Berg", "roles": ["physician"], "units": ["cardiology"]})).await;
    assert_eq!(created.status, 201, "{}", created.text);
    assert_eq!(created.json["user"]["state"], "awaiting-approval");
    let token = created.json["enrollment_token"].as_str().expect("token").to_string();
    assert!(token.starts_with("valve_"));
    // Two-person rule: the token alone enrolls nobody; the creator cannot approve their own request.
    assert!(auth(&s, "/auth/enroll", None, json!({"token": token, "password": PASSWORD})).await.outcome(403).contains("approval"));
    s.request("POST", "/admin/users/anna.berg/approve", Some(&s.admin_key), None, &[]).await.outcome(403);
    let approval = s.approve("anna.berg").await.expect("approval code");
    assert!(approval.starts_with("valva_"));
    auth(&s, "/auth/enroll", None, json!({"token": token, "password": PASSWORD})).await.outcome(401);
    auth(&s, "/auth/enroll", None, json!({"token": token, "approval_code": format!("valva_{}", "00".repeat(32)), "password": PASSWORD})).await.outcome(401);

    let weak = auth(&s, "/auth/enroll", None, json!({"token": token, "approval_code": approval, "password": "password1234"})).await;
    assert!(weak.outcome(422).contains("most common"), "{}", weak.text);
    let e = auth(&s, "/auth/enroll", None, json!({"token": token, "approval_code": approval, "password": PASSWORD})).await;
    assert_eq!(e.status, 200, "{}", e.text);
    let secret = secret_of(e.json["otpauth_uri"].as_str().expect("uri"));
    assert_eq!(secret.len(), 20);
    auth(&s, "/auth/enroll/confirm", None, json!({"token": token, "totp": "000000"})).await.outcome(401);
    let c = auth(&s, "/auth/enroll/confirm", None, json!({"token": token, "totp": totp(&secret, now)})).await;
    assert_eq!(c.status, 200, "{}", c.text);
    let recovery: Vec<String> = c.json["recovery_codes"].as_array().expect("codes").iter().map(|v| v.as_str().expect("code").to_string()).collect();
    assert_eq!(recovery.len(), 10);
    auth(&s, "/auth/enroll", None, json!({"token": token, "password": PASSWORD})).await.outcome(401);

    // The code that confirmed enrollment is spent; without a code a physician cannot sign in.
    login(&s, "anna.berg", PASSWORD, None).await.outcome(401);
    login(&s, "anna.berg", PASSWORD, Some(&totp(&secret, now))).await.outcome(401);
    now += 30_000;
    s.set_clock(now);
    let code = totp(&secret, now);
    let ok = login(&s, "anna.berg", PASSWORD, Some(&code)).await;
    let session = access_token(&ok);
    assert_eq!(ok.json["expires_in"], 900);
    assert!(login(&s, "anna.berg", PASSWORD, Some(&code)).await.outcome(401).contains("not correct"), "a code works once");

    let me = s.request("GET", "/auth/me", Some(&session), None, &[]).await;
    assert_eq!((me.status, me.json["roles"][0].as_str(), me.json["mfa"].as_bool()), (200, Some("physician"), Some(true)), "{}", me.text);
    let none = s.request("GET", "/fhir/Patient", Some(&session), None, &[]).await;
    assert_eq!((none.status, none.json["total"].as_u64()), (200, Some(0)), "searches show only patients in the caller's care: none yet: {}", none.text);
    let read = s.request("GET", "/fhir/Patient/someone", Some(&session), None, &[]).await;
    assert_eq!(read.status, 403, "no read without a care relationship: {}", read.text);

    // A recovery code replaces the TOTP code once.
    let by_code = auth(&s, "/auth/login", None, json!({"username": "anna.berg", "password": PASSWORD, "recovery_code": recovery[3].to_lowercase()})).await;
    let second = access_token(&by_code);
    auth(&s, "/auth/login", None, json!({"username": "anna.berg", "password": PASSWORD, "recovery_code": recovery[3]})).await.outcome(401);
    auth(&s, "/auth/login", None, json!({"username": "anna.berg", "password": "wrong password here", "recovery_code": recovery[4]})).await.outcome(401);

    assert_eq!(s.request("POST", "/auth/logout", Some(&session), None, &[]).await.status, 204);
    s.request("GET", "/auth/me", Some(&session), None, &[]).await.outcome(401);
    assert_eq!(s.request("GET", "/auth/me", Some(&second), None, &[]).await.status, 200, "logout ends only its own session");

    let junk = s.request_raw("POST", "/auth/login", None, Some(b"{not json".to_vec()), &[("content-type", "application/json")]).await;
    assert!(junk.outcome(400).contains("malformed JSON"));

    let log = audit_export(&s);
    for reason in ["malformed JSON", "password-and-totp", "password-and-recovery-code", "wrong-or-reused-totp", "totp-missing", "wrong-recovery-code", "\"interaction\":\"logout\"", "\"interaction\":\"enroll-confirm\"", "\"interaction\":\"user-create\"", "recovery-code-use", "unknown-session"] {
        assert!(log.contains(reason), "the audit log records {reason}");
    }
    assert!(!log.contains(PASSWORD), "no password in the audit log");
}

#[tokio::test]
async fn sessions_end_when_idle_or_old() {
    let s = Server::start_configured("ident-timeouts", &[], FAST);
    let mut now = now_ms();
    s.set_clock(now);
    let secret = enrolled(&s, "nils.ek", "nurse", now).await;
    now += 30_000;
    s.set_clock(now);
    let t = access_token(&login(&s, "nils.ek", PASSWORD, Some(&totp(&secret, now))).await);
    // Active every 14 minutes: still signed in after 28.
    for _ in 0..2 {
        now += 14 * MIN;
        s.set_clock(now);
        assert_eq!(s.request("GET", "/auth/me", Some(&t), None, &[]).await.status, 200);
    }
    now += 15 * MIN;
    s.set_clock(now);
    s.request("GET", "/auth/me", Some(&t), None, &[]).await.outcome(401);

    // Activity does not extend the absolute lifetime (8 h).
    now += 30_000;
    s.set_clock(now);
    let t = access_token(&login(&s, "nils.ek", PASSWORD, Some(&totp(&secret, now))).await);
    let start = now;
    while now + 10 * MIN < start + 8 * 60 * MIN {
        now += 10 * MIN;
        s.set_clock(now);
        assert_eq!(s.request("GET", "/auth/me", Some(&t), None, &[]).await.status, 200, "at {} min", (now - start) / MIN);
    }
    now = start + 8 * 60 * MIN;
    s.set_clock(now);
    s.request("GET", "/auth/me", Some(&t), None, &[]).await.outcome(401);
    let log = audit_export(&s);
    assert!(log.contains("idle-timeout") && log.contains("session-expired"), "both timeouts are audited");
}

#[tokio::test]
async fn lockout_after_five_failures_and_unlock() {
    let s = Server::start_configured("ident-lockout", &[], FAST);
    let mut now = now_ms();
    s.set_clock(now);
    let secret = enrolled(&s, "eva.lind", "assistant", now).await;
    for _ in 0..5 {
        login(&s, "eva.lind", "not the password at all", None).await.outcome(401);
    }
    now += 30_000;
    s.set_clock(now);
    login(&s, "eva.lind", PASSWORD, Some(&totp(&secret, now))).await.outcome(401);
    let shown = s.get("/admin/users/eva.lind").await;
    assert_eq!(shown.json["state"], "locked", "{}", shown.text);
    let metrics = s.request("GET", "/metrics", None, None, &[]).await.text;
    assert!(metrics.contains("valv_lockouts_total 1"), "{metrics}");

    let unlocked = s.request("POST", "/admin/users/eva.lind/unlock", Some(&s.admin_key), None, &[]).await;
    assert_eq!(unlocked.status, 200, "{}", unlocked.text);
    now += 30_000;
    s.set_clock(now);
    access_token(&login(&s, "eva.lind", PASSWORD, Some(&totp(&secret, now))).await);

    // Lockouts expire by themselves, and the next one lasts twice as long.
    for _ in 0..5 {
        login(&s, "eva.lind", "not the password at all", None).await.outcome(401);
    }
    now += 16 * MIN;
    s.set_clock(now);
    for _ in 0..5 {
        login(&s, "eva.lind", "not the password at all", None).await.outcome(401);
    }
    now += 16 * MIN;
    s.set_clock(now);
    login(&s, "eva.lind", PASSWORD, Some(&totp(&secret, now))).await.outcome(401);
    now += 15 * MIN;
    s.set_clock(now);
    access_token(&login(&s, "eva.lind", PASSWORD, Some(&totp(&secret, now))).await);
    let log = audit_export(&s);
    assert_eq!(log.matches("\"interaction\":\"lockout\"").count(), 3, "each lockout is audited");
    assert!(log.contains("\"interaction\":\"user-unlock\"") && log.contains("\"reason\":\"locked\""));
}

#[tokio::test]
async fn rejected_passwords_say_why_and_change_ends_sessions() {
    let s = Server::start_configured("ident-passwords", &[], FAST);
    let mut now = now_ms();
    s.set_clock(now);
    let created = s.post("/admin/users", &json!({"username": "karin.holm", "display_name": "Karin Holmberg", "roles": ["auditor"]})).await;
    let token = created.json["enrollment_token"].as_str().expect("token").to_string();
    let approval = s.approve("karin.holm").await.expect("approval code");
    let table: &[(&str, &str)] = &[
        ("short1!", "too short: at least 12 characters are needed (it has 7)"),
        ("password1234", "one of the most common passwords"),
        ("qwertyuiop123", "one of the most common passwords"),
        ("karin.holm-secret-99", "contains the user name"),
        ("holmberg-is-my-name-7", "contains the user's name"),
        ("aaaaaaaaaaaaaaaa", "too easy to guess"),
        ("abcdefghijklmnop", "too easy to guess"),
        ("1234567890123456", "too easy to guess"),
    ];
    for (pw, why) in table {
        let r = auth(&s, "/auth/enroll", None, json!({"token": token, "approval_code": approval, "password": pw})).await;
        let d = r.outcome(422);
        assert!(d.contains(why), "{pw}: {d}");
    }
    let long = "x".repeat(300);
    assert!(auth(&s, "/auth/enroll", None, json!({"token": token, "approval_code": approval, "password": long})).await.outcome(422).contains("too long"));
    auth(&s, "/auth/enroll", None, json!({"token": token, "approval_code": approval})).await.outcome(400);
    auth(&s, "/auth/enroll", None, json!({"token": token, "approval_code": approval, "password": 42})).await.outcome(400);

    let e = auth(&s, "/auth/enroll", None, json!({"token": token, "approval_code": approval, "password": PASSWORD})).await;
    let secret = secret_of(e.json["otpauth_uri"].as_str().expect("uri"));
    auth(&s, "/auth/enroll/confirm", None, json!({"token": token, "totp": totp(&secret, now)})).await;
    now += 30_000;
    s.set_clock(now);
    let t1 = access_token(&login(&s, "karin.holm", PASSWORD, Some(&totp(&secret, now))).await);
    now += 30_000;
    s.set_clock(now);
    let t2 = access_token(&login(&s, "karin.holm", PASSWORD, Some(&totp(&secret, now))).await);
    now += 30_000;
    s.set_clock(now);
    let same = auth(&s, "/auth/password", Some(&t1), json!({"current_password": PASSWORD, "new_password": PASSWORD, "totp": totp(&secret, now)})).await;
    assert!(same.outcome(422).contains("used recently"), "{}", same.text);
    now += 30_000;
    s.set_clock(now);
    let changed = auth(&s, "/auth/password", Some(&t1), json!({"current_password": PASSWORD, "new_password": "violet tugboat marmalade", "totp": totp(&secret, now)})).await;
    assert_eq!(changed.status, 204, "{}", changed.text);
    for t in [&t1, &t2] {
        s.request("GET", "/auth/me", Some(t), None, &[]).await.outcome(401);
    }
    now += 30_000;
    s.set_clock(now);
    login(&s, "karin.holm", PASSWORD, Some(&totp(&secret, now))).await.outcome(401);
    access_token(&login(&s, "karin.holm", "violet tugboat marmalade", Some(&totp(&secret, now))).await);
}

#[tokio::test]
async fn unknown_user_and_wrong_password_look_the_same() {
    // The default login floor (250 ms) applies here.
    let s = Server::start_configured("ident-same", &[], "[auth]\nrate_per_minute = 10000\nrate_burst = 10000\n");
    let now = now_ms();
    s.set_clock(now);
    enrolled(&s, "olle.sten", "physician", now).await;
    let mut unknown = Vec::new();
    let mut wrong = Vec::new();
    let mut bodies = std::collections::BTreeSet::new();
    for i in 0..6 {
        for (user, times) in [("nobody.here", &mut unknown), ("olle.sten", &mut wrong)] {
            let started = std::time::Instant::now();
            let r = login(&s, user, &format!("wrong password number {i}"), Some("123456")).await;
            times.push(started.elapsed().as_secs_f64());
            assert_eq!(r.status, 401);
            assert_eq!(r.header("www-authenticate"), Some("Bearer realm=\"valv\""));
            bodies.insert(r.text.clone());
        }
    }
    assert_eq!(bodies.len(), 1, "one body for both: {bodies:?}");
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (u, w) = (median(&mut unknown), median(&mut wrong));
    assert!(u >= 0.25 && w >= 0.25, "both wait out the floor: {u} {w}");
    assert!((u - w).abs() < 0.05, "medians differ by less than 50 ms: unknown {u:.3} s, wrong password {w:.3} s");
}

#[tokio::test]
async fn rate_limit_per_address() {
    let s = Server::start_configured("ident-rate", &[], "[auth]\nrate_per_minute = 6\nrate_burst = 3\nlogin_floor_ms = 0\n");
    let now = now_ms();
    s.set_clock(now);
    for _ in 0..3 {
        login(&s, "nobody.here", "wrong password here", None).await.outcome(401);
    }
    let limited = login(&s, "nobody.here", "wrong password here", None).await;
    limited.outcome(429);
    assert_eq!(limited.header("retry-after"), Some("10"));
    login(&s, "nobody.here", "wrong password here", None).await.outcome(429);
    s.set_clock(now + 10_000);
    login(&s, "nobody.here", "wrong password here", None).await.outcome(401);
    let metrics = s.request("GET", "/metrics", None, None, &[]).await.text;
    assert!(metrics.contains("valv_auth_rate_limited_total 2"), "{metrics}");
    assert!(metrics.contains("valv_login_failures_total 4"), "{metrics}");
    let log = audit_export(&s);
    assert_eq!(log.matches("too-many-requests-from-address").count(), 1, "one audit entry per burst of refusals");
}

#[tokio::test]
async fn admin_surface_and_cli() {
    let s = Server::start_configured("ident-admin", &[], FAST);
    let mut now = now_ms();
    s.set_clock(now);
    // Scripted provisioning: the password from stdin, the otpauth URI on the last line.
    let mut child = valv()
        .arg("--data-dir")
        .arg(&s.data)
        .args(["user", "add", "--username", "per.dahl", "--role", "nurse", "--unit", "ward-3", "--name", "Per Dahl", "--password-stdin"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    child.stdin.take().expect("stdin").write_all(format!("{PASSWORD}\n").as_bytes()).expect("write");
    let out = child.wait_with_output().expect("wait");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let secret = secret_of(&last_line(&String::from_utf8_lossy(&out.stdout)));
    let t = access_token(&login(&s, "per.dahl", PASSWORD, Some(&totp(&secret, now))).await);

    let weak = valv().arg("--data-dir").arg(&s.data).args(["user", "add", "--username", "weak.one", "--role", "nurse", "--password-stdin"]).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn");
    let mut weak = weak;
    weak.stdin.take().expect("stdin").write_all(b"password1234\n").expect("write");
    let out = weak.wait_with_output().expect("wait");
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("most common"));
    assert!(!run_ok(&s.data, &["user", "list"]).contains("weak.one"), "a refused password leaves no user behind");

    let list = run_ok(&s.data, &["user", "list"]);
    assert!(list.contains("per.dahl") && list.contains("active"), "{list}");
    run_ok(&s.data, &["user", "disable", "per.dahl"]);
    s.request("GET", "/auth/me", Some(&t), None, &[]).await.outcome(401);
    now += 30_000;
    s.set_clock(now);
    login(&s, "per.dahl", PASSWORD, Some(&totp(&secret, now))).await.outcome(401);
    run_ok(&s.data, &["user", "enable", "per.dahl"]);
    now += 30_000;
    s.set_clock(now);
    let t = access_token(&login(&s, "per.dahl", PASSWORD, Some(&totp(&secret, now))).await);
    let shown: Value = serde_json::from_str(&run_ok(&s.data, &["user", "show", "per.dahl"])).expect("json");
    assert_eq!((shown["units"][0].as_str(), shown["display_name"].as_str()), (Some("ward-3"), Some("Per Dahl")));

    // Admin API: roles change ends sessions; non-admins are refused; bad input is precise.
    // A change that widens the account (a new role, a new unit) waits for a second admin.
    let roles = s.put("/admin/users/per.dahl/roles", &json!({"roles": ["nurse", "assistant"], "units": ["ward-4"]}), &[("content-type", "application/json")]).await;
    assert_eq!(roles.status, 202, "{}", roles.text);
    assert_eq!(roles.json["roles"], json!(["nurse"]), "not in force yet: {}", roles.text);
    assert_eq!(s.request("GET", "/auth/me", Some(&t), None, &[]).await.status, 200);
    s.request("POST", "/admin/users/per.dahl/approve", Some(&s.admin_key), None, &[]).await.outcome(403);
    assert_eq!(s.approve("per.dahl").await, None);
    s.request("GET", "/auth/me", Some(&t), None, &[]).await.outcome(401);
    let shown = s.get("/admin/users/per.dahl").await;
    assert_eq!((shown.json["roles"].clone(), shown.json["units"].clone()), (json!(["nurse", "assistant"]), json!(["ward-4"])), "{}", shown.text);
    s.request("POST", "/admin/users/per.dahl/approve", Some(s.approver_key()), None, &[]).await.outcome(409);
    assert!(s.put("/admin/users/per.dahl/roles", &json!({"roles": ["root"]}), &[("content-type", "application/json")]).await.outcome(400).contains("not a role"));
    assert!(s.post("/admin/users", &json!({"username": "Bad Name", "roles": ["nurse"]})).await.outcome(400).contains("user name"));
    assert_eq!(s.post("/admin/users", &json!({"username": "per.dahl", "roles": ["nurse"]})).await.status, 409);
    s.get("/admin/users/nobody.here").await.outcome(404);
    now += 30_000;
    s.set_clock(now);
    let t = access_token(&login(&s, "per.dahl", PASSWORD, Some(&totp(&secret, now))).await);
    s.request("GET", "/admin/users", Some(&t), None, &[]).await.outcome(403);
    let listed = s.get("/admin/users").await;
    assert_eq!(listed.json["users"].as_array().map(Vec::len), Some(1), "{}", listed.text);
    assert!(!listed.text.contains("argon2") && !listed.text.contains("totp_secret"), "no secrets in user listings");

    run_ok(&s.data, &["apikey", "create", "--name", "lab-import", "--role", "service", "--scope", "system/*.c"]);
    run_ok(&s.data, &["apikey", "revoke", "lab-import"]);

    // Reset MFA: sessions end, a new enrollment token is issued.
    let reset = run_ok(&s.data, &["user", "reset-mfa", "per.dahl"]);
    assert!(last_line(&reset).starts_with("valve_"), "{reset}");
    s.request("GET", "/auth/me", Some(&t), None, &[]).await.outcome(401);
    let log = audit_export(&s);
    for what in ["user-disable", "user-enable", "user-set-roles", "user-reset-mfa", "deny: no-policy-permits", "console:", "apikey-create", "apikey-revoke"] {
        assert!(log.contains(what), "audited: {what}");
    }
}

#[tokio::test]
async fn expired_passwords_are_changed_before_signing_in() {
    let s = Server::start_configured("ident-expiry", &[], &format!("{FAST}max_password_age_days = 90\n"));
    let mut now = now_ms();
    s.set_clock(now);
    let secret = enrolled(&s, "lisa.ny", "nurse", now).await;
    now += 91 * 24 * 60 * MIN;
    s.set_clock(now);
    // Wrong password: the generic answer. Right password and code: told to change it.
    login(&s, "lisa.ny", "not the password at all", Some(&totp(&secret, now))).await.outcome(401);
    let expired = login(&s, "lisa.ny", PASSWORD, Some(&totp(&secret, now))).await;
    assert!(expired.outcome(403).contains("expired"), "{}", expired.text);
    // Changing it without a session needs the same proof; wrong proofs count towards lockout.
    let wrong = auth(&s, "/auth/password", None, json!({"username": "lisa.ny", "current_password": "nope nope nope", "new_password": "amber kestrel lantern", "totp": totp(&secret, now)})).await;
    wrong.outcome(401);
    let changed = auth(&s, "/auth/password", None, json!({"username": "lisa.ny", "current_password": PASSWORD, "new_password": "amber kestrel lantern", "totp": totp(&secret, now)})).await;
    assert_eq!(changed.status, 204, "{}", changed.text);
    now += 30_000;
    s.set_clock(now);
    access_token(&login(&s, "lisa.ny", "amber kestrel lantern", Some(&totp(&secret, now))).await);
    let log = audit_export(&s);
    assert!(log.contains("password-expired") && log.contains("\"interaction\":\"password-change\""));
}

#[tokio::test]
async fn a_database_writer_cannot_enroll_a_pending_account() {
    use sha2::Digest as _;
    let s = Server::start_configured("ident-tamper", &[], FAST);
    let created = s.post("/admin/users", &json!({"username": "new.hire", "roles": ["physician"]})).await;
    assert_eq!(created.status, 201, "{}", created.text);
    // The attacker writes the hash of a token of their own into the lookup column.
    let mine = format!("valve_{}", "ab".repeat(32));
    let db = s.db();
    let n = db.execute(&format!("UPDATE users SET enrollment_hash = {}", db.blob(&sha2::Sha256::digest(mine.as_bytes()))));
    assert_eq!(n, 1);
    auth(&s, "/auth/enroll", None, json!({"token": mine, "password": PASSWORD})).await.outcome(401);
    // A role written over the sealed record's row does not open either.
    let flipped = if db.is_postgres() {
        "UPDATE users SET sealed = substring(sealed from 1 for 20) || '\\x00'::bytea || substring(sealed from 22)"
    } else {
        "UPDATE users SET sealed = CAST(substr(sealed, 1, 20) || x'00' || substr(sealed, 22) AS BLOB)"
    };
    assert!(db.execute(flipped) > 0);
    let r = s.get("/admin/users").await;
    assert_eq!(r.status, 500, "a tampered user record fails its integrity check: {}", r.text);
}
