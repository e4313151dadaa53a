//! Prints the evaluation harness's report: `cargo run --release -p valv-detect --example
//! evaluate -- [seed] [days]` (bench/run-detect.sh runs it).

use valv_detect::simulate::{self, ratio};

fn main() {
    let mut args = std::env::args().skip(1);
    let seed = args.next().and_then(|s| s.parse().ok()).unwrap_or(7);
    let days = args.next().and_then(|s| s.parse().ok()).unwrap_or(30);
    let month = simulate::simulate(seed, days);
    // Timed here: the crate itself never reads the clock.
    let started = std::time::Instant::now();
    let r = month.judge(&valv_detect::Config::default());
    let judge_seconds = started.elapsed().as_secs_f64();
    println!("simulated month: seed {seed}, {days} days, {} entries, {} patient accesses ({} legitimate ones unexplained by the record)", r.entries, r.accesses, r.unexplained_legitimate);
    println!("{:<28} {:>6} {:>7} {:>7} {:>7} {:>10} {:>10}", "rule", "cases", "caught", "alerts", "true", "recall", "precision");
    for (rule, (cases, caught, alerts, tp)) in &r.rules {
        println!("{rule:<28} {cases:>6} {caught:>7} {alerts:>7} {tp:>7} {:>10.2} {:>10.2}", ratio(*caught, *cases), ratio(*tp, *alerts));
    }
    let (cases, caught, alerts, tp) = r.snooping;
    println!("{:<28} {cases:>6} {caught:>7} {alerts:>7} {tp:>7} {:>10.2} {:>10.2}", "snooping overall", r.recall(), r.precision());
    println!("false alerts: {:.2} per 1,000 patient accesses", r.false_per_thousand);
    for (kind, s) in &r.intrusion_seconds {
        println!("intrusion {kind:<28} first alert after {}", s.map_or("never".to_string(), |s| format!("{s} s")));
    }
    println!("judged in {:.3} s: {:.0} entries/s (rules only; facts worked out beforehand)", judge_seconds, r.entries as f64 / judge_seconds.max(1e-9));
}
