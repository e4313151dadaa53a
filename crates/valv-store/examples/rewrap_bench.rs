//! KEK rotation benchmark: data keys rewrapped per second under a new KEK version, through the
//! same `rewrap_batch` the server and `valv keys rotate --wait` use (batches of 2,000, each one
//! durable transaction), with the provider `VALV_KEY_PROVIDER` names (`file`, the default: a key
//! file made here; or a `pkcs11:` or `aws-kms:` URI). Run with
//! `cargo run --release -p valv-store --example rewrap_bench -- [KEYS] [ROUNDS]` (defaults
//! 100000 3); `bench/run-keys.sh` wraps it, sets up a SoftHSM2 token and prints the machine.

use std::time::Instant;
use valv_crypto::{DataKey, KeyProvider, LocalKeyProvider};
use valv_keys::Keys;
use valv_store::rewrap::{remaining, rewrap_batch};
use valv_store::sqlite::SqliteStore;
use valv_store::vault::random_bytes;

const BATCH: usize = 2000;

/// A database with `n` wrapped patient keys, written in one transaction (the seeding is not timed).
fn seed(path: &std::path::Path, provider: &dyn KeyProvider, n: usize) {
    drop(SqliteStore::open(path).expect("create the schema"));
    let mut conn = rusqlite::Connection::open(path).expect("open");
    let tx = conn.transaction().expect("transaction");
    {
        let mut insert = tx
            .prepare("INSERT INTO data_keys (name, provider, kek_id, kek_version, wrapped, created, wrapped_at) VALUES (?1, ?2, ?3, ?4, ?5, 0, 0)")
            .expect("prepare");
        for i in 0..n {
            let name = format!("patient:{i:08}");
            let w = provider.wrap(&DataKey::from_bytes(random_bytes().expect("random")), &name, random_bytes().expect("random")).expect("wrap");
            insert.execute(rusqlite::params![name, w.provider, w.kek_id, w.kek_version, w.ciphertext]).expect("insert");
        }
    }
    tx.commit().expect("commit");
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<usize> = std::env::args().skip(1).map(|a| a.parse().expect("a number")).collect();
    let (keys_arg, rounds) = (args.first().copied().unwrap_or(100_000), args.get(1).copied().unwrap_or(3));
    let dir = std::env::temp_dir().join(format!("valv-rewrap-bench-{}", u64::from_le_bytes(random_bytes().expect("random"))));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("valv.db");
    let key_file = dir.join("kek.key");
    {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt;
        let text = LocalKeyProvider::generate(random_bytes().expect("random")).to_file_text();
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&key_file).expect("key file");
        f.write_all(text.as_bytes()).expect("write");
    }
    let uri = std::env::var("VALV_KEY_PROVIDER").unwrap_or_else(|_| "file".into());
    let keys = Keys::open(&uri, &key_file, &dir, true).expect("key provider");
    let provider = keys.provider();
    println!("provider: {}", keys.describe());
    let seeding = Instant::now();
    seed(&path, &*provider, keys_arg);
    println!("seeded {keys_arg} wrapped keys in {:.1} s ({:.0} wraps/s)", seeding.elapsed().as_secs_f64(), keys_arg as f64 / seeding.elapsed().as_secs_f64());
    let store = SqliteStore::open(&path).expect("open");
    let mut rates = Vec::new();
    for round in 1..=rounds {
        keys.rotate().expect("rotate");
        assert_eq!(remaining(&store, &*provider).await.expect("census"), keys_arg as u64);
        let started = Instant::now();
        let mut done = 0;
        loop {
            let batch = rewrap_batch(&store, &*provider, BATCH, round as i64).await.expect("batch");
            done += batch.rewrapped;
            if batch.done(BATCH) {
                break;
            }
        }
        let secs = started.elapsed().as_secs_f64();
        assert_eq!((done, remaining(&store, &*provider).await.expect("census")), (keys_arg, 0));
        rates.push(keys_arg as f64 / secs);
        println!("round {round}: {keys_arg} data keys rewrapped under KEK version {} in {secs:.2} s ({:.0} keys/s)", provider.current_version(), keys_arg as f64 / secs);
    }
    rates.sort_by(f64::total_cmp);
    println!("median: {:.0} keys/s over {rounds} rounds (batches of {BATCH}, one durable transaction each)", rates[rates.len() / 2]);
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
}
