//! The cost of one access decision (`valv_policy::decide`) over a directory of realistic size.
//!
//!   cargo run --release -p valv-policy --example decide [ITERATIONS] [PATIENTS]
//!   (defaults: 20000 10000)
//!
//! The directory: two care providers (a hospital with two wards, a clinic with one unit),
//! `PATIENTS` patients, each with an active CareTeam; 1,000 of them name the measured physician's
//! Practitioner (the rest name 200 other physicians), and a few Consents (blocks, a cross-provider
//! permit, a withdrawn one). The time of each decision is passed in (`Question::now`); the clock
//! is read only to measure.
//!
//! Scenarios, each timed call by call after a warm-up:
//!   permit     a physician reads an Observation of a patient in their care
//!   deny       the same physician, a patient of their hospital not in their care
//!   block      a patient in their care whose Consent blocks them
//!   service    a service with SMART scopes `system/*.rs` reads an Observation
//! and, to see where the time goes, the two halves of the permit decision: the facts from the
//! directory (`facts`, itself mostly `Directory::actors` + `Directory::relation`) and the Cedar
//! evaluation on them (`Engine::evaluate`, a hit in its verdict cache); then the uncached Cedar
//! evaluation, paid once per combination of facts. bench/README.md has figures.

use serde_json::{json, Value};
use std::hint::black_box;
use std::time::Instant;
use valv_policy::{decide, facts, Action, Decision, Directory, Engine, Question, Scopes, Settings, Subject, Target};

/// 2026-05-28, as in the crate's tests.
const NOW: i64 = 1_780_000_000_000;
/// Patients in the measured physician's care.
const IN_CARE: usize = 1_000;
const OTHER_PHYSICIANS: usize = 200;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let iterations: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(20_000).max(1);
    let patients: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(10_000).max(IN_CARE + 10);
    let warmup = (iterations / 10).max(100);

    println!("== machine");
    println!("cpu: {} x {} (available parallelism); memory: {}; kernel {}", cpu_model(), nproc(), mem_total(), kernel());
    println!("load average at start: {}", load_average());
    println!("date: {}", valv_fhir::date::format_instant(wall_ms()));
    println!("command: cargo run --release -p valv-policy --example decide -- {iterations} {patients}   (argv: {})", args.join(" "));
    println!("profile: {}", if cfg!(debug_assertions) { "debug (numbers meaningless; use --release)" } else { "release" });

    let t = Instant::now();
    let engine = Engine::with_defaults().expect("the default policies load");
    let engine_ms = t.elapsed().as_secs_f64() * 1e3;
    let t = Instant::now();
    let (dir, counts) = directory(patients);
    let dir_ms = t.elapsed().as_secs_f64() * 1e3;
    println!("== setup");
    println!("engine: {} policies, built in {engine_ms:.1} ms", engine.policies().len());
    println!(
        "directory: {} patients, {} care teams ({IN_CARE} naming the physician), {} consents, {} organisations; built in {dir_ms:.0} ms",
        counts.patients,
        dir.care_team_count(),
        counts.consents,
        counts.orgs
    );

    let physician = Subject { roles: vec!["physician".into()], practitioner: Some("dr-0".into()), units: vec!["ward-a1".into()], ..Subject::default() };
    let service = Subject {
        roles: vec!["service".into()],
        scopes: Some(Scopes::parse("system/*.rs").expect("the scope parses")),
        is_service: true,
        ..Subject::default()
    };
    let in_care = patient_id(IN_CARE / 2);
    let not_in_care = patient_id(IN_CARE + (patients - IN_CARE) / 3);
    let blocked = patient_id(1);
    let scenarios: Vec<(&str, &Subject, Question<'_>, bool, &[&str])> = vec![
        ("permit: physician, patient in care", &physician, q(&in_care, "TREAT"), true, &["clinical-read"]),
        ("deny: physician, patient not in care", &physician, q(&not_in_care, "TREAT"), false, &[]),
        ("deny: patient in care, Consent block", &physician, q(&blocked, "TREAT"), false, &["patient-block"]),
        ("permit: service, system/*.rs", &service, q(&in_care, "HOPERAT"), true, &["service-scopes"]),
    ];

    // Every scenario must decide as described, or its timing means nothing.
    for (name, s, question, permit, rules) in &scenarios {
        let d = decide(&engine, &dir, s, question, Settings::default());
        check(name, &d, *permit, rules);
    }

    println!("== one decide() call, {iterations} timed calls per scenario after {warmup} warm-up calls (µs)");
    println!("{:<42} {:>8} {:>8} {:>8} {:>8} {:>8}", "scenario", "p50", "p99", "mean", "min", "max");
    let mut p50s = Vec::new();
    for (name, s, question, _, _) in &scenarios {
        let st = time(warmup, iterations, || {
            black_box(decide(black_box(&engine), black_box(&dir), black_box(s), black_box(question), Settings::default()));
        });
        st.print(name);
        p50s.push(st.p50);
    }

    // Where the time of the permit decision goes.
    println!("== the permit decision in parts (µs)");
    let (s, question) = (&physician, &scenarios[0].2);
    let f = facts(&dir, s, question, Settings::default());
    let actors = dir.actors(s.practitioner.as_deref(), &s.units);
    time(warmup, iterations, || {
        black_box(facts(black_box(&dir), black_box(s), black_box(question), Settings::default()));
    })
    .print("facts(): directory lookups");
    time(warmup, iterations, || {
        black_box(dir.actors(black_box(s.practitioner.as_deref()), black_box(&s.units)));
    })
    .print("  Directory::actors");
    time(warmup, iterations, || {
        black_box(dir.relation(black_box(&actors), black_box(&s.units), black_box(in_care.as_str()), "Observation", NOW));
    })
    .print("  Directory::relation");
    time(warmup, iterations, || {
        black_box(engine.evaluate(black_box(&s.roles), Some(Action::Read), Target::Type("Observation"), black_box(&f)));
    })
    .print("Engine::evaluate: Cedar request + authorize");

    // What the cache saves: Cedar's own evaluation, paid once per role set, action, type and
    // combination of facts (the first request of its kind after a start).
    println!("== uncached: a combination of facts met for the first time (µs)");
    time(warmup, iterations, || {
        black_box(engine.evaluate_uncached(black_box(&s.roles), Some(Action::Read), Target::Type("Observation"), black_box(&f)));
    })
    .print("Engine::evaluate_uncached (Cedar authorize)");

    let worst = p50s.iter().copied().fold(0.0, f64::max);
    println!("== target: p50 <= 20 µs per decision: {} (highest p50 {worst:.2} µs)", if worst <= 20.0 { "met" } else { "NOT met" });
    println!("load average at end: {}", load_average());
}

/// Reading an Observation of `patient`.
fn q<'a>(patient: &'a str, purpose: &'a str) -> Question<'a> {
    Question { action: Action::Read, resource_type: "Observation", patient: Some(patient), now: NOW, purpose, file_scan: None }
}

struct Stats {
    p50: f64,
    p99: f64,
    mean: f64,
    min: f64,
    max: f64,
}

impl Stats {
    fn print(&self, name: &str) {
        println!("{name:<42} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>8.1}", self.p50, self.p99, self.mean, self.min, self.max);
    }
}

/// Times `f` call by call: `warmup` untimed calls, then `n` timed ones.
fn time(warmup: usize, n: usize, mut f: impl FnMut()) -> Stats {
    for _ in 0..warmup {
        f();
    }
    let mut ns: Vec<u64> = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        f();
        ns.push(u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX));
    }
    ns.sort_unstable();
    let at = |q: f64| ns[((ns.len() as f64 * q).ceil() as usize).clamp(1, ns.len()) - 1] as f64 / 1e3;
    Stats {
        p50: at(0.50),
        p99: at(0.99),
        mean: ns.iter().map(|&x| x as f64).sum::<f64>() / ns.len() as f64 / 1e3,
        min: ns[0] as f64 / 1e3,
        max: ns[ns.len() - 1] as f64 / 1e3,
    }
}

fn check(name: &str, d: &Decision, permit: bool, rules: &[&str]) {
    if d.permit != permit || d.rules != rules {
        eprintln!("decide: scenario '{name}' decided {} ({:?}), expected permit={permit} rules={rules:?}", d.reason(), d.facts);
        std::process::exit(1);
    }
}





fn patient_id(i: usize) -> String {
    format!("p{i:05}")
}

struct Counts {
    patients: usize,
    consents: usize,
    orgs: usize,
}

/// The world: provider "hospital-a" (wards a1, a2) and provider "clinic-b" (unit b1); patients
/// 0..IN_CARE in the care of Practitioner/dr-0 (ward a1), the rest in others' care; 90% managed
/// by the hospital's wards, 10% by the clinic.
fn directory(patients: usize) -> (Directory, Counts) {
    let mut d = Directory::default();
    let mut put = |t: &str, id: &str, body: Value| d.apply(t, id, 1, Some(&body));
    let org = |part_of: Option<&str>| match part_of {
        Some(p) => json!({"resourceType": "Organization", "active": true, "partOf": {"reference": format!("Organization/{p}")}}),
        None => json!({"resourceType": "Organization", "active": true}),
    };
    put("Organization", "hospital-a", org(None));
    put("Organization", "ward-a1", org(Some("hospital-a")));
    put("Organization", "ward-a2", org(Some("hospital-a")));
    put("Organization", "clinic-b", org(None));
    put("Organization", "unit-b1", org(Some("clinic-b")));
    let team = |patient: &str, members: &[(String, &str)]| {
        let participant: Vec<Value> = members
            .iter()
            .map(|(m, role)| json!({"member": {"reference": m}, "role": [{"coding": [{"system": "http://snomed.info/sct", "code": role}]}]}))
            .collect();
        json!({"resourceType": "CareTeam", "status": "active", "subject": {"reference": format!("Patient/{patient}")},
               "period": {"start": "2025-01-01"}, "participant": participant})
    };
    for i in 0..patients {
        let p = patient_id(i);
        let managing = match i % 10 {
            9 if i >= IN_CARE => "unit-b1",
            n if n % 2 == 0 => "ward-a1",
            _ => "ward-a2",
        };
        put("Patient", &p, json!({"resourceType": "Patient", "active": true, "managingOrganization": {"reference": format!("Organization/{managing}")}}));
        let members = if i < IN_CARE {
            vec![("Practitioner/dr-0".to_string(), "309343006"), (format!("Practitioner/nurse-{}", i % 20), "106292003")]
        } else {
            vec![(format!("Practitioner/dr-{}", 1 + i % OTHER_PHYSICIANS), "309343006")]
        };
        put("CareTeam", &format!("t-{p}"), team(&p, &members));
    }
    let privacy = json!({"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}]});
    let consent = |patient: &str, status: &str, provision: Value| {
        json!({"resourceType": "Consent", "status": status, "scope": privacy, "patient": {"reference": format!("Patient/{patient}")}, "provision": provision})
    };
    let actor = |r: &str| json!([{"reference": {"reference": r}}]);
    let consents = [
        // The measured block: patient 1 (in dr-0's care) denies dr-0 everything.
        consent(&patient_id(1), "active", json!({"type": "deny", "actor": actor("Practitioner/dr-0")})),
        // Blocks of other physicians, and of a ward for clinical data only.
        consent(&patient_id(2), "active", json!({"type": "deny", "actor": actor("Practitioner/dr-7")})),
        consent(&patient_id(IN_CARE + 5), "active", json!({"type": "permit", "provision": [{"type": "deny", "actor": actor("Organization/ward-a2"), "class": [{"code": "Clinical"}]}]})),
        // A clinic patient lets the hospital read.
        consent(&patient_id(IN_CARE + 9), "active", json!({"type": "permit", "actor": actor("Organization/hospital-a")})),
        // A withdrawn block (counts for nothing).
        consent(&patient_id(3), "inactive", json!({"type": "deny", "actor": actor("Practitioner/dr-0")})),
        // A consent of another scope (not privacy): ignored.
        json!({"resourceType": "Consent", "status": "active", "scope": {"coding": [{"code": "research"}]},
               "patient": {"reference": format!("Patient/{}", patient_id(4))}, "provision": {"type": "deny"}}),
    ];
    let n = consents.len();
    for (i, c) in consents.into_iter().enumerate() {
        put("Consent", &format!("c{i}"), c);
    }
    (d, Counts { patients, consents: n, orgs: 5 })
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

fn cpu_model() -> String {
    read("/proc/cpuinfo")
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}

fn nproc() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0)
}

fn mem_total() -> String {
    read("/proc/meminfo")
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map(|kb| format!("{:.1} GiB (MemTotal)", kb / 1024.0 / 1024.0))
        .unwrap_or_else(|| "unknown".into())
}

fn kernel() -> String {
    read("/proc/sys/kernel/osrelease").trim().to_string()
}

fn load_average() -> String {
    read("/proc/loadavg").split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}

fn wall_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}
