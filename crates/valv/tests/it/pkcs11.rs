//! The PKCS#11 key provider against a real SoftHSM2 token (Debian's `softhsm2`), initialised by
//! the test in a temporary token directory: the server starts with its KEK on the token, serves,
//! rotates to a new token key version, restarts and serves; the KEK objects are sensitive and not
//! extractable (asked of the token itself), no key file exists, and a wrong PIN stops the start
//! with a one-line reason; a token that goes away mid-run fails closed (503 for what needs it)
//! while keys already unwrapped serve out their cache lifetime.

use crate::harness::{as_env, run_ok_env, temp_dir, valv, Server};
use crate::keys::{status_env, wait_rewrapped};
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::object::{Attribute, AttributeType, ObjectClass};
use cryptoki::session::UserType;
use serde_json::json;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

const PIN: &str = "381274";

/// Debian's SoftHSM2 module.
fn module() -> PathBuf {
    ["/usr/lib/softhsm/libsofthsm2.so", "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
        .expect("SoftHSM2 is installed (apt-get install softhsm2; .ci/run does)")
}

/// A fresh token directory with one initialised token `valv`; returns the SOFTHSM2_CONF path.
fn token_dir(tag: &str) -> (PathBuf, PathBuf) {
    let dir = temp_dir(tag);
    std::fs::create_dir_all(dir.join("tokens")).expect("token dir");
    let conf = dir.join("softhsm2.conf");
    std::fs::write(&conf, format!("directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n", dir.join("tokens").display())).expect("conf");
    let out = std::process::Command::new("softhsm2-util")
        .env("SOFTHSM2_CONF", &conf)
        .args(["--init-token", "--free", "--label", "valv", "--pin", PIN, "--so-pin", "9384756"])
        .output()
        .expect("softhsm2-util (apt-get install softhsm2)");
    assert!(out.status.success(), "init token: {}", String::from_utf8_lossy(&out.stderr));
    let pin = dir.join("hsm.pin");
    std::fs::write(&pin, format!("{PIN}\n")).expect("pin file");
    std::fs::set_permissions(&pin, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    (conf, pin)
}

fn uri(pin: &Path) -> String {
    format!("pkcs11:token=valv;object=valv-kek?module-path={}&pin-source=file:{}", module().display(), pin.display())
}

/// A fresh token and what every `valv` process needs to reach it: (SOFTHSM2_CONF path, PIN
/// file, the environment variables).
fn token_env(tag: &str) -> (PathBuf, PathBuf, [(String, String); 2]) {
    let (conf, pin) = token_dir(tag);
    let vars = [("SOFTHSM2_CONF".to_string(), conf.display().to_string()), ("VALV_KEY_PROVIDER".to_string(), uri(&pin))];
    (conf, pin, vars)
}

/// What the token says of each KEK object: (id, sensitive, extractable, whether its value could be read).
fn token_keys(conf: &Path) -> Vec<(String, bool, bool, bool)> {
    // SOFTHSM2_CONF is read when the module initialises; this process has only this token set up.
    std::env::set_var("SOFTHSM2_CONF", conf);
    let p = Pkcs11::new(module()).expect("module");
    p.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)).expect("initialize");
    let slot = p.get_slots_with_token().expect("slots").into_iter().find(|s| p.get_token_info(*s).is_ok_and(|t| t.label().trim_end() == "valv")).expect("token");
    let session = p.open_ro_session(slot).expect("session");
    session.login(UserType::User, Some(&PIN.to_string().into())).expect("login");
    let handles = session.find_objects(&[Attribute::Class(ObjectClass::SECRET_KEY), Attribute::Label(b"valv-kek".to_vec())]).expect("find");
    let mut out: Vec<_> = handles
        .into_iter()
        .map(|h| {
            let attrs = session.get_attributes(h, &[AttributeType::Id, AttributeType::Sensitive, AttributeType::Extractable]).expect("attributes");
            let (mut id, mut sensitive, mut extractable) = (String::new(), false, true);
            for a in attrs {
                match a {
                    Attribute::Id(v) => id = String::from_utf8_lossy(&v).into_owned(),
                    Attribute::Sensitive(v) => sensitive = v,
                    Attribute::Extractable(v) => extractable = v,
                    _ => {}
                }
            }
            let readable = session.get_attributes(h, &[AttributeType::Value]).is_ok_and(|v| v.iter().any(|a| matches!(a, Attribute::Value(_))));
            (id, sensitive, extractable, readable)
        })
        .collect();
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_with_its_kek_on_a_softhsm2_token_serves_rotates_restarts_and_serves() {
    let (conf, pin, vars) = token_env("pkcs11-token");
    let env = as_env(&vars);
    let mut s = Server::start_everywhere("pkcs11", &env);
    assert!(!s.data.join("keys/kek.key").exists(), "no key file with a token provider");
    let p = s.post("/fhir/Patient", &json!({"resourceType": "Patient", "name": [{"family": "Tokenholm"}]})).await;
    assert_eq!(p.status, 201, "{}", p.text);
    let patient = p.id();
    let o = s.post("/fhir/Observation", &json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"}, "subject": {"reference": format!("Patient/{patient}")}})).await;
    assert_eq!(o.status, 201, "{}", o.text);

    let st = status_env(&s, &env);
    assert_eq!((st["provider"].as_str(), st["kek_id"].as_str(), st["current_version"].as_u64()), (Some("pkcs11"), Some("valv-kek"), Some(1)), "{st}");

    // Rotate on the token while the server runs: it rewraps in the background.
    let out = run_ok_env(&s.data, &["keys", "rotate"], &env);
    assert!(out.contains("version 2 is now current"), "{out}");
    let st = wait_rewrapped(&s, &env).await;
    assert_eq!(st["to_rewrap"], 0, "{st}");
    let v2 = st["versions"].as_array().expect("versions").iter().find(|v| v["version"] == 2).expect("version 2").clone();
    assert!(v2["data_keys"].as_u64().is_some_and(|n| n >= 7), "{st}");

    // Restart: nothing cached; everything reads under version 2 from the token.
    s.restart();
    assert_eq!(s.get(&format!("/fhir/Patient/{patient}")).await.status, 200);
    assert_eq!(s.get(&format!("/fhir/Observation/{}", o.id())).await.status, 200);
    run_ok_env(&s.data, &["keys", "retire", "1"], &env);
    s.restart();
    assert_eq!(s.get(&format!("/fhir/Observation/{}", o.id())).await.status, 200, "version 1 is not needed");
    s.kill9();

    // The token holds version 2 only, sensitive and never extractable: its value cannot be read.
    assert_eq!(token_keys(&conf), vec![("v2".to_string(), true, false, false)]);

    // A wrong PIN stops the start with one line, and nothing is served.
    std::fs::write(&pin, "000000\n").expect("pin");
    let out = valv().arg("--data-dir").arg(&s.data).args(["serve", "--listen", "127.0.0.1:0"]).envs(env.iter().copied()).output().expect("run valv");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("PKCS#11: logging in to 'valv'"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_that_goes_away_mid_run_fails_closed_while_cached_keys_serve_out_their_lifetime() {
    let (conf, _, vars) = token_env("pkcs11-gone");
    let env = as_env(&vars);
    let s = Server::start_everywhere("pkcs11-gone", &env);
    let p = s.post("/fhir/Patient", &json!({"resourceType": "Patient"})).await.id();
    assert_eq!(s.get(&format!("/fhir/Patient/{p}")).await.status, 200);
    // The token's objects vanish (an HSM unplugged, a token reset).
    let tokens = conf.parent().expect("dir").join("tokens");
    std::fs::remove_dir_all(&tokens).expect("remove token");
    std::fs::create_dir_all(&tokens).expect("empty token dir");
    // A new patient needs a new data key wrapped on the token: refused, nothing stored.
    let fresh = s.post("/fhir/Patient", &json!({"resourceType": "Patient", "name": [{"family": "Afterloss"}]})).await;
    assert_eq!(fresh.status, 503, "{}", fresh.text);
    assert!(fresh.text.contains("key provider"), "{}", fresh.text);
    assert_eq!(s.get("/fhir/Patient?family=Afterloss").await.total(), 0, "nothing was stored");
    // The patient whose key is cached is still served (the cache keeps keys at most 300 s).
    assert_eq!(s.get(&format!("/fhir/Patient/{p}")).await.status, 200);
}
