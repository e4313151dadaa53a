//! The PostgreSQL backend against a throwaway PostgreSQL 15 cluster ([`super::testdb`]).

use valv_testpg::Cluster;
use super::*;
use crate::{ApiKeyRecord, AuditRow, AuditTile, Duty, Expect, Filter, Store, StoredCheckpoint, StoredVersion, WrappedKey, Write};

fn settings(pg: &Cluster, role: &str) -> Settings {
    Settings { url: pg.url(role), pool_size: 4, ..Settings::default() }
}

/// The schema made by the owner, the serving role granted; returns the serving role's store.
async fn migrated(pg: &Cluster) -> PgStore {
    let owner = PgStore::open(&settings(pg, "valv_owner")).await.expect("owner");
    assert_eq!(owner.migrate(Some("valv_app")).await.expect("grant"), newest_version());
    PgStore::open(&settings(pg, "valv_app")).await.expect("app")
}

async fn raw(pg: &Cluster, role: &str) -> tokio_postgres::Client {
    let (client, connection) = tokio_postgres::connect(&pg.url(role), tokio_postgres::NoTls).await.expect("connect");
    tokio::spawn(connection);
    client
}

fn entry(n: u8) -> AuditRow {
    AuditRow { leaf_hash: [n; 32], sealed: vec![n; 40], patient_token: None, query_sealed: None }
}

use crate::testkit::version;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_serving_role_appends_and_reads_the_audit_log_but_can_never_change_it() {
    let pg = Cluster::start();
    // The serving role may not make the schema: start says what to run.
    let refused = PgStore::open(&settings(&pg, "valv_app")).await.err().expect("refused").to_string();
    assert!(refused.contains("valv migrate"), "{refused}");
    let app = migrated(&pg).await;
    assert_eq!(app.append_audit(vec![entry(1), entry(2)]).await.expect("append"), 0);
    assert_eq!(app.append_audit(vec![entry(3)]).await.expect("append"), 2);
    assert_eq!(app.audit_size().await.expect("size"), 3);
    let read = app.audit_entries(1, 10).await.expect("read");
    assert_eq!(read.iter().map(|(i, r)| (*i, r.leaf_hash[0])).collect::<Vec<_>>(), [(1, 2), (2, 3)]);

    let client = raw(&pg, "valv_app").await;
    for (sql, refusal) in [
        ("UPDATE audit_entries SET sealed = '\\x00' WHERE idx = 0", "permission denied"),
        ("DELETE FROM audit_entries WHERE idx = 0", "permission denied"),
        ("TRUNCATE audit_entries", "permission denied"),
        ("UPDATE audit_checkpoints SET note = ''", "permission denied"),
        ("DELETE FROM erasures", "permission denied"),
        ("DELETE FROM versions", "permission denied"),
        ("ALTER TABLE audit_entries DISABLE TRIGGER audit_entries_no_change", "must be owner"),
        ("DROP TABLE audit_entries", "must be owner"),
        ("CREATE TABLE audit_shadow (idx BIGINT)", "permission denied"),
    ] {
        let err = client.batch_execute(sql).await.expect_err(sql);
        assert!(err.as_db_error().is_some_and(|d| d.message().contains(refusal)), "{sql}: {err:?}");
    }
    // The owner is refused too, by the triggers; only disabling them first (an act visible
    // in the catalog) lets a change through, and `valv audit verify` catches that.
    let owner = raw(&pg, "valv_owner").await;
    for sql in ["UPDATE audit_entries SET sealed = '\\x00' WHERE idx = 0", "DELETE FROM audit_entries", "TRUNCATE audit_entries"] {
        let err = owner.batch_execute(sql).await.expect_err(sql);
        assert!(err.as_db_error().is_some_and(|d| d.message().contains("append-only")), "{sql}: {err:?}");
    }
    assert_eq!(app.audit_entries(0, 3).await.expect("read")[0].1.sealed, vec![1; 40], "nothing changed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_from_many_servers_get_consecutive_indices_each_once() {
    let pg = Cluster::start();
    drop(migrated(&pg).await);
    let mut tasks = Vec::new();
    for server in 0..3u8 {
        let s = settings(&pg, "valv_app");
        tasks.push(tokio::spawn(async move {
            let store = Arc::new(PgStore::open(&s).await.expect("open"));
            // Concurrent appends within one server share group commits.
            let appends: Vec<_> = (0..20u8)
                .map(|i| {
                    let store = store.clone();
                    tokio::spawn(async move { store.append_audit(vec![entry(server * 20 + i), entry(server * 20 + i)]).await.expect("append") })
                })
                .collect();
            let mut firsts = Vec::new();
            for a in appends {
                firsts.push(a.await.expect("append task"));
            }
            firsts
        }));
    }
    let mut firsts = Vec::new();
    for t in tasks {
        firsts.extend(t.await.expect("task"));
    }
    firsts.sort_unstable();
    assert_eq!(firsts, (0..60).map(|i| i * 2).collect::<Vec<u64>>(), "every append got its own two indices");
    let store = PgStore::open(&settings(&pg, "valv_app")).await.expect("open");
    let all = store.audit_entries(0, 1000).await.expect("read");
    assert_eq!(all.len(), 120);
    assert!(all.iter().enumerate().all(|(i, (idx, _))| *idx == i as u64), "no gap");
    assert!(all.chunks(2).all(|pair| pair[0].1.leaf_hash == pair[1].1.leaf_hash), "an append's entries are adjacent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_stored_once_rewrapped_by_compare_and_swap_and_never_again_after_an_erasure() {
    let pg = Cluster::start();
    let app = migrated(&pg).await;
    let key = |v: u32, b: u8| WrappedKey { provider: "file".into(), kek_id: "file-1".into(), kek_version: v, ciphertext: vec![b; 60] };
    assert_eq!(app.get_key("patient:0").await.expect("get"), None);
    for i in 0..5u8 {
        assert_eq!(app.put_key_if_absent(&format!("patient:{i}"), &key(1, i), 10 + i64::from(i)).await.expect("put"), key(1, i));
    }
    assert_eq!(app.put_key_if_absent("patient:1", &key(1, 99), 6).await.expect("put"), key(1, 1), "the first one stays");
    assert_eq!(app.key_created("patient:1").await.expect("created"), Some(11));
    let stale = app.keys_not_under("file", "file-1", 2, 3).await.expect("stale");
    assert_eq!(stale.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(), ["patient:0", "patient:1", "patient:2"]);
    // patient:1 was moved by someone else meanwhile: left alone.
    app.rewrap_keys(&[("patient:1".into(), key(1, 1), key(2, 101))], 50).await.expect("other");
    let changes: Vec<_> = stale.into_iter().map(|(n, old)| (n, old.clone(), key(2, old.ciphertext[0] + 200))).collect();
    assert_eq!(app.rewrap_keys(&changes, 60).await.expect("rewrap"), 2);
    assert_eq!(app.get_key("patient:1").await.expect("get"), Some(key(2, 101)));
    let census: Vec<_> = app.key_census().await.expect("census").iter().map(|c| (c.kek_version, c.keys, c.oldest_wrap)).collect();
    assert_eq!(census, [(1, 2, 13), (2, 3, 50)]);

    let erased = app.erase_patient("3", 70).await.expect("erase");
    assert_eq!((erased.seq, erased.key_destroyed), (1, true));
    assert!(matches!(app.put_key_if_absent("patient:3", &key(2, 7), 80).await, Err(StoreError::Gone(_))));
    assert!(matches!(app.erase_patient("3", 90).await, Err(StoreError::Conflict(_))), "once");
    assert_eq!(app.erasures(0).await.expect("erasures").len(), 1);
    let owner = PgStore::open(&settings(&pg, "valv_owner")).await.expect("owner");
    for bad in ["valv_app; DROP TABLE data_keys", "Valv", "", "a-b"] {
        assert!(owner.migrate(Some(bad)).await.is_err(), "{bad}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_conditional_creates_of_one_condition_make_one_row() {
    let pg = Cluster::start();
    crate::testkit::concurrent_conditional_creates_make_one(Arc::new(migrated(&pg).await)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_advance_only_from_where_they_are() {
    let pg = Cluster::start();
    crate::testkit::uploads_advance_only_from_where_they_are(Arc::new(migrated(&pg).await)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn detection_progress_alerts_and_cases() {
    let pg = Cluster::start();
    let store: Arc<dyn crate::Store> = Arc::new(migrated(&pg).await);
    crate::testkit::detection_saves_alerts_with_its_progress_once(store.clone()).await;
    crate::testkit::cases_change_by_version_only(store.clone()).await;
    crate::testkit::a_patients_entries_come_page_by_page(store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tickets_are_spent_atomically() {
    let pg = Cluster::start();
    crate::testkit::tickets_are_spent_atomically(Arc::new(migrated(&pg).await)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_are_recorded_resealed_and_erased() {
    let pg = Cluster::start();
    crate::testkit::files_are_recorded_resealed_and_erased(Arc::new(migrated(&pg).await)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_check_versions_atomically_and_tokens_follow_the_current_version() {
    let pg = Cluster::start();
    let store = Arc::new(migrated(&pg).await);
    let w = |expect, v: StoredVersion, tokens: Vec<[u8; 16]>| Write { expect, version: v, tokens, sealed_with: None, unless: None };
    store.commit(vec![w(Expect::Absent, version("a", 1), vec![[1; 16]])]).await.expect("create");
    assert!(matches!(store.commit(vec![w(Expect::Absent, version("a", 1), vec![])]).await, Err(StoreError::Conflict(_))));
    store.commit(vec![w(Expect::Version(1), version("a", 2), vec![[2; 16]])]).await.expect("update");
    assert!(matches!(store.commit(vec![w(Expect::Version(1), version("a", 2), vec![])]).await, Err(StoreError::Conflict(_))));
    assert!(matches!(store.commit(vec![w(Expect::Version(1), version("zz", 2), vec![])]).await, Err(StoreError::NotFound(_))));
    let mixed = store.commit(vec![w(Expect::Absent, version("b", 1), vec![]), w(Expect::Version(7), version("a", 8), vec![])]).await;
    assert!(mixed.is_err());
    assert!(store.locate("Patient", "b").await.expect("locate").is_none(), "nothing of a failed request stays");
    let search = |t: u8| Filter { resource_type: "Patient".into(), token_groups: vec![vec![[t; 16], [9; 16]]], ..Filter::default() };
    assert_eq!(store.search(&search(2)).await.expect("search").len(), 1);
    assert!(store.search(&search(1)).await.expect("search").is_empty(), "old tokens are gone");
    let (history, total) = store.history("Patient", Some("a"), 0, 10).await.expect("history");
    assert_eq!((total, history[0].version), (2, 2));
    let (_, of_type) = store.history("Patient", None, 0, 0).await.expect("history");
    assert_eq!((store.version_count("Patient").await.expect("count"), of_type, store.version_count("Observation").await.expect("count")), (2, 2, 0));
    assert_eq!(store.read_current("Patient", "a").await.expect("read").map(|v| v.version), Some(2));
    assert_eq!(store.read_version("Patient", "a", 1).await.expect("read").map(|v| v.body), Some(vec![1; 40]));

    // Concurrent creates of one id: exactly one wins; the others conflict.
    let tasks: Vec<_> = (0..16)
        .map(|i| {
            let s = store.clone();
            let id = if i % 4 == 0 { "shared".to_string() } else { format!("p{i}") };
            tokio::spawn(async move { s.commit(vec![Write { expect: Expect::Absent, version: version(&id, 1), tokens: vec![[5; 16]], sealed_with: None, unless: None }]).await.is_ok() })
        })
        .collect();
    let mut ok = 0;
    for t in tasks {
        ok += usize::from(t.await.expect("task"));
    }
    assert_eq!(ok, 12 + 1);

    // An erasure removes the patient's tokens and keeps their versions.
    let erased = store.erase_patient("a", 100).await.expect("erase");
    assert_eq!((erased.resources, erased.versions, erased.tokens, erased.key_destroyed), (1, 2, 1, false));
    assert!(store.search(&search(2)).await.expect("search").is_empty());

    // A pointer moved by someone writing the database is an integrity failure.
    raw(&pg, "valv_owner").await.batch_execute("UPDATE resources SET version = 7 WHERE id = 'p1'").await.expect("tamper");
    assert!(matches!(store.read_current("Patient", "p1").await, Err(StoreError::Integrity(_))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_to_another_machine_is_refused_and_an_unreachable_database_fails_then_recovers() {
    let s = |url: &str| Settings { url: url.into(), pool_size: 2, ..Settings::default() };
    let err = PgStore::open(&s("host=db.example.org user=valv dbname=valv")).await.err().expect("refused").to_string();
    assert!(err.contains("without TLS"), "{err}");
    let err = PgStore::open(&Settings { password: Some("x".into()), ..s("postgresql://valv:secret@127.0.0.1/valv") }).await.err().expect("refused").to_string();
    assert!(err.contains("given twice") && !err.contains("secret"), "{err}");

    let pg = Cluster::start();
    let store = migrated(&pg).await;
    store.ping().await.expect("up");
    pg.stop();
    let down = store.ping().await.expect_err("down").to_string();
    assert!(down.starts_with("storage backend: PostgreSQL"), "{down}");
    let refused = store.append_audit(vec![entry(1)]).await.expect_err("fail closed").to_string();
    assert!(refused.starts_with("storage backend: PostgreSQL") && !refused.contains("backend: storage backend"), "{refused}");
    pg.start_again();
    store.ping().await.expect("reconnected without a restart");
    assert_eq!(store.append_audit(vec![entry(1)]).await.expect("append"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_server_leads_each_duty_and_another_takes_over_when_it_is_gone() {
    let pg = Cluster::start();
    let first = migrated(&pg).await;
    let second = PgStore::open(&settings(&pg, "valv_app")).await.expect("second");
    assert!(first.lead(Duty::Integration).await.expect("ask"), "the first to ask leads");
    assert!(!second.lead(Duty::Integration).await.expect("ask"), "one leader at a time");
    assert!(first.lead(Duty::Integration).await.expect("ask"), "and it keeps leading");
    // Each duty has a leader of its own: the second may detect while the first integrates.
    assert!(second.lead(Duty::Detection).await.expect("ask"), "the first to ask for detection leads it");
    assert!(!first.lead(Duty::Detection).await.expect("ask"), "one detector at a time");
    assert!(first.lead(Duty::Integration).await.expect("ask"), "the first still integrates");
    // The same checkpoint saved twice (a leader that lost its lock mid-step) is no error; a
    // different one for the same size is.
    let cp = StoredCheckpoint { size: 0, root: [1; 32], note: "note".into() };
    first.save_checkpoint(&cp).await.expect("save");
    second.save_checkpoint(&cp).await.expect("the same again");
    assert!(matches!(second.save_checkpoint(&StoredCheckpoint { note: "other".into(), ..cp.clone() }).await, Err(StoreError::Conflict(_))));
    // A tile never shrinks.
    let tile = |n: u8| AuditTile { level: 0, index: 0, hashes: (0..n).map(|i| [i; 32]).collect() };
    first.put_audit_tiles(vec![tile(5)]).await.expect("put");
    second.put_audit_tiles(vec![tile(3)]).await.expect("put");
    assert_eq!(first.audit_tiles(&[(0, 0)]).await.expect("read")[0].hashes.len(), 5);
    drop(first);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !second.lead(Duty::Integration).await.expect("ask") {
        assert!(std::time::Instant::now() < deadline, "the second takes over once the first is gone");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(second.lead(Duty::Detection).await.expect("ask"), "and still detects");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_api_key_is_refused_by_every_server_at_once_and_nothing_is_cached_unheard() {
    let pg = Cluster::start();
    let (one, two) = (migrated(&pg).await, PgStore::open(&settings(&pg, "valv_app")).await.expect("second server"));
    let until_listening = std::time::Instant::now();
    while !(one.credentials.is_listening() && two.credentials.is_listening()) {
        assert!(until_listening.elapsed() < std::time::Duration::from_secs(5), "both listen for credential changes");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let key = |n: u8| ApiKeyRecord { id: format!("k{n}"), name: format!("key {n}"), role: "service".into(), hash: [n; 32], created: 1, revoked: None, mac: vec![n; 32], scopes: String::new() };
    one.insert_api_key(&key(1)).await.expect("insert");
    one.insert_api_key(&key(2)).await.expect("insert");
    // Read once into each server's cache, then served from there.
    for store in [&one, &two] {
        assert_eq!(store.find_api_key(&[1; 32]).await.expect("find").expect("known").revoked, None);
        assert!(store.credentials.get(&[1; 32]).is_some(), "cached");
        assert!(store.find_api_key(&[9; 32]).await.expect("find").is_none());
        assert!(store.credentials.get(&[9; 32]).is_none(), "unknown keys are not cached");
    }
    // Revoked through one server: that one refuses at once, the other as its notification lands.
    assert!(one.revoke_api_key("k1", 2, &[7; 32]).await.expect("revoke"));
    assert_eq!(one.find_api_key(&[1; 32]).await.expect("find").expect("known").revoked, Some(2));
    let revoked = std::time::Instant::now();
    while two.find_api_key(&[1; 32]).await.expect("find").expect("known").revoked.is_none() {
        assert!(revoked.elapsed() < std::time::Duration::from_secs(1), "the other server still accepts a revoked key");
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    println!("the other server saw the revocation after {} µs", revoked.elapsed().as_micros());
    // An edit by hand (the owner, behind Valv's back) empties the caches too.
    assert!(two.find_api_key(&[2; 32]).await.expect("find").is_some() && two.credentials.get(&[2; 32]).is_some());
    raw(&pg, "valv_owner").await.batch_execute("UPDATE api_keys SET role = 'admin' WHERE id = 'k2'").await.expect("edit");
    let edited = std::time::Instant::now();
    while two.find_api_key(&[2; 32]).await.expect("find").expect("known").role != "admin" {
        assert!(edited.elapsed() < std::time::Duration::from_secs(1), "an edit in the database is served from a stale cache");
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    // Without its listening connection a server caches nothing, and listens again afterwards.
    raw(&pg, "postgres")
        .await
        .batch_execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query LIKE 'LISTEN%' OR query = 'SELECT 1' AND application_name = 'valv'")
        .await
        .expect("terminate");
    let lost = std::time::Instant::now();
    while two.credentials.is_listening() {
        assert!(lost.elapsed() < std::time::Duration::from_secs(10), "the lost listener is noticed");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(two.find_api_key(&[2; 32]).await.expect("find").is_some());
    assert!(two.credentials.get(&[2; 32]).is_none(), "nothing is cached while nobody listens");
    while !two.credentials.is_listening() {
        assert!(lost.elapsed() < std::time::Duration::from_secs(10), "listening again after the loss");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creates_in_one_statement_are_all_or_nothing() {
    let pg = Cluster::start();
    let store = migrated(&pg).await;
    let key = WrappedKey { provider: "file".into(), kek_id: "file-1".into(), kek_version: 1, ciphertext: vec![3; 60] };
    store.put_key_if_absent("patient:k", &key, 1).await.expect("key");
    let wrapped: Vec<u8> = raw(&pg, "valv_owner").await.query_one("SELECT wrapped FROM data_keys WHERE name = 'patient:k'", &[]).await.expect("wrapped").get(0);
    let sealed = |id: &str, with: &[u8]| {
        let mut v = version(id, 1);
        v.patient = Some("k".into());
        Write { expect: Expect::Absent, version: v, tokens: vec![[id.len() as u8; 16], [7; 16]], sealed_with: Some(with.into()), unless: None }
    };
    // Rows of a table, or search tokens ("tokens": the entries the GIN index is built from).
    let count = |table: &'static str| {
        let pg = &pg;
        let from = if table == "tokens" { "resources, unnest(valv_tokens(tokens))" } else { table };
        async move { raw(pg, "valv_owner").await.query_one(&format!("SELECT count(*) FROM {from}"), &[]).await.expect("count").get::<_, i64>(0) }
    };
    store.commit(vec![sealed("one", &wrapped), sealed("three", &wrapped)]).await.expect("two creates");
    assert_eq!((count("resources").await, count("versions").await, count("tokens").await), (2, 2, 4));
    // One resource that exists, one a key that changed, one id twice: each fails whole.
    for (writes, says) in [
        (vec![sealed("two", &wrapped), sealed("one", &wrapped)], "Patient/one already exists"),
        (vec![sealed("two", &wrapped), sealed("four", &[9; 8])], "the data key of patient k"),
        (vec![sealed("two", &wrapped), sealed("two", &wrapped)], "Patient/two already exists"),
    ] {
        let err = store.commit(writes).await.expect_err(says);
        assert!(matches!(err, StoreError::Conflict(_) | StoreError::KeyChanged(_)) && err.to_string().contains(says), "{err}");
        assert_eq!((count("resources").await, count("versions").await, count("tokens").await), (2, 2, 4), "nothing of it stays: {says}");
    }
    assert_eq!(store.read_current("Patient", "three").await.expect("read").map(|v| v.version), Some(1));
    let found = store.search(&Filter { resource_type: "Patient".into(), token_groups: vec![vec![[5; 16]]], ..Filter::default() }).await.expect("search");
    assert_eq!(found.iter().map(|l| l.id.as_str()).collect::<Vec<_>>(), ["three"], "tokens belong to their own resource");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn searches_use_the_gin_index_of_the_token_lists() {
    let pg = Cluster::start();
    let store = migrated(&pg).await;
    // Patients among many Observations, each with a token of its own and one shared by all: the
    // type's own index is then selective too, and the planner must still use the token index.
    let writes: Vec<Write> = (0..2_200u32)
        .map(|n| {
            let mut own = [0u8; 16];
            own[..4].copy_from_slice(&n.to_be_bytes());
            let mut v = version(&format!("p{n}"), 1);
            if n >= 200 {
                v.resource_type = "Observation".into();
            }
            Write { expect: Expect::Absent, version: v, tokens: vec![own, [0xff; 16]], sealed_with: None, unless: None }
        })
        .collect();
    store.commit(writes).await.expect("creates");
    let client = raw(&pg, "valv_owner").await;
    client.batch_execute("ANALYZE resources").await.expect("analyze");
    let mut own = [0u8; 16];
    own[..4].copy_from_slice(&123u32.to_be_bytes());
    // As the server runs it: one generic plan for every binding (pool.rs).
    client.batch_execute("SET plan_cache_mode = force_generic_plan").await.expect("generic plans");
    // With a LIMIT too (a page of a search, a conditional create's check): a generic plan does
    // not know how many rows are asked for and might walk the primary key instead.
    for limit in [None, Some(1), Some(1001)] {
        let filter = Filter { resource_type: "Patient".into(), token_groups: vec![vec![own]], limit, ..Filter::default() };
        let (sql, args) = store::search_sql(&filter);
        let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = args.iter().map(|a| a.as_ref() as &(dyn tokio_postgres::types::ToSql + Sync)).collect();
        let plan: Vec<String> = client.query(&format!("EXPLAIN {sql}"), &params).await.expect("explain").iter().map(|r| r.get(0)).collect();
        assert!(plan.iter().any(|l| l.contains("resources_tokens")), "the search reads the GIN index (limit {limit:?}): {plan:#?}");
        let found = store.search(&filter).await.expect("search");
        assert_eq!(found.iter().map(|l| l.id.as_str()).collect::<Vec<_>>(), ["p123"]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn version_3_indexes_the_token_lists_of_a_version_2_database() {
    let pg = Cluster::start();
    let owner = raw(&pg, "valv_owner").await;
    owner.batch_execute("CREATE TABLE valv_schema (version INTEGER NOT NULL)").await.expect("schema table");
    for (version, sql) in schema::MIGRATIONS.iter().filter(|(v, _)| *v <= 2) {
        owner.batch_execute(sql).await.expect("an earlier migration");
        owner.execute("INSERT INTO valv_schema (version) VALUES ($1)", &[version]).await.expect("its version");
    }
    // A resource as a version-2 server stored it: the token list, and a row per token.
    let list = [[1u8; 16], [2u8; 16]].concat();
    owner
        .execute("INSERT INTO resources (type, id, version, deleted, patient, last_updated, tokens) VALUES ('Patient', 'old', 1, false, 'old', 1, $1)", &[&list])
        .await
        .expect("resource");
    owner.batch_execute("INSERT INTO search_tokens (token, rid, patient) SELECT t, 1, 'old' FROM unnest(ARRAY['\\x01010101010101010101010101010101'::bytea, '\\x02020202020202020202020202020202'::bytea]) AS t").await.expect("token rows");
    let app = migrated(&pg).await;
    let found = app.search(&Filter { resource_type: "Patient".into(), token_groups: vec![vec![[2; 16]]], ..Filter::default() }).await.expect("search");
    assert_eq!(found.iter().map(|l| l.id.as_str()).collect::<Vec<_>>(), ["old"], "found through the index built from the stored list");
    let left: bool = owner.query_one("SELECT to_regclass('search_tokens') IS NULL", &[]).await.expect("catalog").get(0);
    assert!(left, "the table of token rows is gone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_creates_share_groups_and_keep_their_own_outcomes() {
    let pg = Cluster::start();
    let store = Arc::new(migrated(&pg).await);
    let create = |id: String| Write { expect: Expect::Absent, version: version(&id, 1), tokens: vec![[1; 16]], sealed_with: None, unless: None };
    store.commit(vec![create("taken".into())]).await.expect("first");
    // Many at once: groups form.
    let mut wave = tokio::task::JoinSet::new();
    for n in 0..64 {
        let store = store.clone();
        wave.spawn(async move { store.commit(vec![create(format!("w{n}"))]).await });
    }
    while let Some(joined) = wave.join_next().await {
        joined.expect("task").expect("written");
    }
    assert!(store.creates.grouped() > 0, "some requests were written together");
    // Again, one of them naming a resource that exists.
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..64 {
        let store = store.clone();
        let id = if n == 40 { "taken".to_string() } else { format!("p{n}") };
        let writes = vec![create(id.clone()), create(format!("{id}-b"))];
        tasks.spawn(async move { (id, store.commit(writes).await) });
    }
    let mut made = 0;
    while let Some(joined) = tasks.join_next().await {
        let (id, outcome) = joined.expect("task");
        if id == "taken" {
            assert!(matches!(outcome, Err(StoreError::Conflict(_))), "the request naming an existing resource fails alone: {outcome:?}");
        } else {
            outcome.expect("the others are written");
            made += 1;
        }
    }
    assert_eq!(made, 63);
    assert!(store.read_current("Patient", "p63-b").await.expect("read").is_some());
    assert!(store.read_current("Patient", "taken-b").await.expect("read").is_none(), "nothing of the failed request stays");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_reads_by_id_each_get_their_own_resource() {
    let pg = Cluster::start();
    let store = Arc::new(migrated(&pg).await);
    let create = |id: String| Write { expect: Expect::Absent, version: version(&id, 1), tokens: vec![], sealed_with: None, unless: None };
    store.commit((0..32).map(|n| create(format!("r{n}"))).collect()).await.expect("created");
    // Reads of present and absent ids at once: gathered into shared statements, each answered
    // with its own row or none.
    let mut reads = tokio::task::JoinSet::new();
    for n in 0..64 {
        let store = store.clone();
        reads.spawn(async move { (n, store.read_current("Patient", &format!("r{n}")).await.expect("read")) });
    }
    while let Some(joined) = reads.join_next().await {
        let (n, found) = joined.expect("task");
        assert_eq!(found.map(|v| v.id), (n < 32).then(|| format!("r{n}")), "read {n}");
    }
}
