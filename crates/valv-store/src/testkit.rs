//! What the backends' tests share: a stored version to write, and checks every `Store` must pass
//! the same way.

use crate::{Expect, Filter, Store, StoreError, StoredVersion, Write};
use std::sync::Arc;

/// Version `v` of Patient `id`, owned by itself, with a body of `v` bytes repeated.
pub fn version(id: &str, v: u64) -> StoredVersion {
    StoredVersion { resource_type: "Patient".into(), id: id.into(), version: v, patient: Some(id.into()), deleted: false, last_updated: v as i64, body: vec![v as u8; 40] }
}

/// Sixteen concurrent creates of different ids under one condition, each create's tokens meeting
/// it: exactly one commits, the others fail with [`StoreError::Matched`]; a condition nothing
/// meets lets a create through.
pub async fn concurrent_conditional_creates_make_one(store: Arc<dyn Store>) {
    let unless = Filter { resource_type: "Patient".into(), token_groups: vec![vec![[6; 16]]], ..Filter::default() };
    let tasks: Vec<_> = (0..16)
        .map(|i| {
            let (s, unless) = (store.clone(), unless.clone());
            tokio::spawn(async move {
                s.commit(vec![Write { expect: Expect::Absent, version: version(&format!("c{i}"), 1), tokens: vec![[6; 16]], sealed_with: None, unless: Some(unless) }]).await
            })
        })
        .collect();
    let mut outcomes = Vec::new();
    for t in tasks {
        outcomes.push(t.await.expect("task"));
    }
    assert_eq!(outcomes.iter().filter(|o| o.is_ok()).count(), 1, "{outcomes:?}");
    assert!(outcomes.iter().all(|o| o.is_ok() || matches!(o, Err(StoreError::Matched(_)))), "{outcomes:?}");
    assert_eq!(store.search(&unless).await.expect("search").len(), 1);
    let other = Filter { token_groups: vec![vec![[7; 16]]], ..unless.clone() };
    store.commit(vec![Write { expect: Expect::Absent, version: version("d", 1), tokens: vec![[6; 16]], sealed_with: None, unless: Some(other) }]).await.expect("create");
}

/// Files: recorded only under the patient's current key, once per Binary; listed for scanning
/// until scanned; their keys replaced with the patient's key and only all at once; forgotten by
/// an erasure, which hands back their objects.
pub async fn files_are_recorded_resealed_and_erased(store: Arc<dyn Store>) {
    use crate::{FileRow, WrappedKey};
    let key = |b: u8| WrappedKey { provider: "file".into(), kek_id: "file-1".into(), kek_version: 1, ciphertext: vec![b; 60] };
    let row = |binary: &str, object: &str| FileRow {
        binary_id: binary.into(),
        object: object.into(),
        patient: "p1".into(),
        sealed_key: vec![7; 60],
        size: 5,
        sha256: [3; 32],
        scan: "pending".into(),
        created: 2,
    };
    store.put_key_if_absent("patient:p1", &key(1), 1).await.expect("key");
    let a = row("b-1", "0123456789abcdef0001");
    assert!(matches!(store.put_file(&a, &key(9).ciphertext).await, Err(StoreError::KeyChanged(_))), "sealed under a key that is not stored");
    assert_eq!(store.file("b-1").await.expect("read"), None, "nothing recorded");
    store.put_file(&a, &key(1).ciphertext).await.expect("put");
    assert!(matches!(store.put_file(&row("b-1", "0123456789abcdef0002"), &key(1).ciphertext).await, Err(StoreError::Conflict(_))), "one file per Binary");
    assert_eq!(store.file("b-1").await.expect("read"), Some(a.clone()));
    let b = row("b-2", "0123456789abcdef0003");
    store.put_file(&b, &key(1).ciphertext).await.expect("put");

    assert_eq!(store.files_to_scan(10).await.expect("pending").len(), 2);
    assert!(store.set_file_scan(&a.object, "clean").await.expect("scan"));
    assert!(!store.set_file_scan("0123456789abcdef9999", "clean").await.expect("scan"));
    assert_eq!(store.files_to_scan(10).await.expect("pending"), vec![b.clone()]);
    assert_eq!(store.file("b-1").await.expect("read").map(|f| f.scan), Some("clean".into()));

    let objects: Vec<String> = store.patient_files("p1").await.expect("files").into_iter().map(|f| f.object).collect();
    assert_eq!(objects, [a.object.clone(), b.object.clone()]);
    let partial = [(a.object.clone(), vec![8; 60])];
    assert!(matches!(store.replace_patient_key("p1", &key(1), &key(2), &[], &partial, 3).await, Err(StoreError::Conflict(_))), "a file left out");
    assert_eq!(store.get_key("patient:p1").await.expect("key"), Some(key(1)), "nothing changed");
    let all = [(a.object.clone(), vec![8; 60]), (b.object.clone(), vec![9; 60])];
    store.replace_patient_key("p1", &key(1), &key(2), &[], &all, 3).await.expect("rotate");
    assert_eq!(store.file("b-2").await.expect("read").map(|f| f.sealed_key), Some(vec![9; 60]));

    let c = row("b-3", "0123456789abcdef0004");
    store.put_file(&c, &key(2).ciphertext).await.expect("put under the new key");
    assert!(store.delete_file(&c.object).await.expect("delete"));
    assert_eq!(store.file("b-3").await.expect("read"), None);

    let erased = store.erase_patient("p1", 4).await.expect("erase");
    let mut gone = erased.objects;
    gone.sort();
    assert_eq!(gone, [a.object, b.object]);
    assert!(store.patient_files("p1").await.expect("files").is_empty());
    assert!(store.put_file(&row("b-4", "0123456789abcdef0005"), &key(2).ciphertext).await.is_err(), "nothing under an erased patient");
}

/// Tickets: eight concurrent uses of a two-use ticket spend exactly two; an expired, used-up or
/// revoked ticket is handed back refused with its row; an unknown one is `None`.
pub async fn tickets_are_spent_atomically(store: Arc<dyn Store>) {
    use crate::TicketRow;
    let ticket = |b: u8, expires: i64| TicketRow {
        hash: [b; 32],
        id: format!("t{b}"),
        binary_id: "b-1".into(),
        version: 1,
        agent: "u-1".into(),
        purpose: "TREAT".into(),
        expires,
        uses: 2,
        used: 0,
        revoked: false,
        created: 1,
        mac: vec![b; 32],
    };
    store.put_ticket(&ticket(1, 1_000)).await.expect("put");
    let uses = (0..8).map(|_| {
        let s = store.clone();
        tokio::spawn(async move { s.use_ticket(&[1; 32], 500).await.expect("use").is_some_and(|(_, ok)| ok) })
    });
    let mut granted = 0;
    for u in uses {
        granted += usize::from(u.await.expect("task"));
    }
    assert_eq!(granted, 2, "exactly the uses it allows");
    let (row, ok) = store.use_ticket(&[1; 32], 500).await.expect("use").expect("known");
    assert!(!ok && row.used == 2 && row.id == "t1");
    assert_eq!(store.use_ticket(&[9; 32], 500).await.expect("use"), None);

    store.put_ticket(&ticket(2, 1_000)).await.expect("put");
    assert!(matches!(store.use_ticket(&[2; 32], 1_000).await.expect("use"), Some((_, false))), "expired at its expiry");
    store.put_ticket(&ticket(3, 1_000)).await.expect("put");
    assert!(store.revoke_ticket(&[3; 32]).await.expect("revoke"));
    assert!(!store.revoke_ticket(&[3; 32]).await.expect("revoke"), "once");
    assert!(matches!(store.use_ticket(&[3; 32], 10).await.expect("use"), Some((t, false)) if t.revoked));
    store.put_ticket(&ticket(4, 1_000)).await.expect("put");
    assert_eq!(store.revoke_tickets("b-1", "u-1").await.expect("revoke"), 3, "every one not revoked yet (1, 2 and 4)");
    assert!(matches!(store.use_ticket(&[4; 32], 10).await.expect("use"), Some((_, false))));
    assert_eq!(store.delete_tickets_before(1_001).await.expect("delete"), 4);
}

/// Uploads: a part is recorded only on top of the count it was received after (two requests
/// racing with the same offset: one wins); expired sessions are listed; deleted once.
pub async fn uploads_advance_only_from_where_they_are(store: Arc<dyn Store>) {
    use crate::UploadRow;
    let u = UploadRow {
        id: "u1".into(),
        binary_id: "b1".into(),
        object: "0123456789abcdef".into(),
        patient: "p1".into(),
        agent: "a1".into(),
        sealed_key: vec![1; 60],
        content_type: "application/dicom".into(),
        length: 100,
        received: 0,
        parts: 0,
        created: 1,
        expires: 50,
    };
    store.put_upload(&u).await.expect("put");
    assert_eq!(store.upload("u1").await.expect("read"), Some(u.clone()));
    assert!(store.advance_upload("u1", 0, 40, 1).await.expect("advance"));
    assert!(!store.advance_upload("u1", 0, 40, 1).await.expect("advance"), "a second part at the same offset is refused");
    assert!(store.advance_upload("u1", 40, 100, 2).await.expect("advance"));
    let now = store.upload("u1").await.expect("read").expect("there");
    assert_eq!((now.received, now.parts), (100, 2));
    assert!(store.expired_uploads(50, 10).await.expect("expired").is_empty(), "not before its expiry");
    assert_eq!(store.expired_uploads(51, 10).await.expect("expired").len(), 1);
    assert!(store.delete_upload("u1").await.expect("delete"));
    assert!(!store.delete_upload("u1").await.expect("delete"));
    assert_eq!(store.upload("u1").await.expect("read"), None);
}

pub async fn detection_saves_alerts_with_its_progress_once(store: Arc<dyn Store>) {
    use crate::{AlertRow, DetectionRow};
    let alert = |id: &str, time: i64| AlertRow { id: id.into(), time, rule: "mfa-failures".into(), severity: "high".into(), sealed: vec![7; 40] };
    assert_eq!(store.detection().await.expect("read"), None);
    let first = DetectionRow { next: 10, state_at: 0, state: vec![1, 2] };
    assert!(store.save_detection(None, &first, &[alert("4-mfa-failures", 100)]).await.expect("save"));
    assert!(!store.save_detection(None, &first, &[alert("5-x", 100)]).await.expect("save"), "a second first save is refused");
    let second = DetectionRow { next: 20, state_at: 10, state: vec![3] };
    assert!(!store.save_detection(Some(5), &second, &[alert("12-x", 200)]).await.expect("save"), "a stale position is refused");
    // The same alert again (a replay) changes nothing; a new one is added.
    assert!(store.save_detection(Some(10), &second, &[alert("4-mfa-failures", 999), alert("12-mfa-failures", 200)]).await.expect("save"));
    assert_eq!(store.detection().await.expect("read"), Some(second));
    // Two alerts of one entry share a time: paging goes by time and id, skipping neither.
    let third = DetectionRow { next: 30, state_at: 20, state: vec![4] };
    assert!(store.save_detection(Some(20), &third, &[alert("12-credential-stuffing", 200)]).await.expect("save"));
    let all = store.alerts(None, 10).await.expect("list");
    assert_eq!(all.iter().map(|a| (a.id.as_str(), a.time)).collect::<Vec<_>>(), [("12-mfa-failures", 200), ("12-credential-stuffing", 200), ("4-mfa-failures", 100)]);
    let first = store.alerts(None, 1).await.expect("page");
    let second = store.alerts(Some((first[0].time, &first[0].id)), 1).await.expect("page");
    assert_eq!(second[0].id, "12-credential-stuffing", "the one with the same time, not skipped");
    assert_eq!(store.alerts(Some((200, "12-credential-stuffing")), 10).await.expect("list").len(), 1);
    assert_eq!(store.alert("4-mfa-failures").await.expect("read").map(|a| a.time), Some(100));
    assert_eq!(store.alert("5-x").await.expect("read"), None, "nothing of a refused save");
}

pub async fn cases_change_by_version_only(store: Arc<dyn Store>) {
    use crate::CaseRow;
    let case = |kind: &str, id: &str, version: u64, sealed: u8| CaseRow { kind: kind.into(), id: id.into(), version, sealed: vec![sealed; 8] };
    store.put_case(&case("incident", "i1", 1, 1)).await.expect("create");
    assert!(matches!(store.put_case(&case("incident", "i1", 1, 2)).await, Err(StoreError::Conflict(_))), "created twice");
    store.put_case(&case("review", "i1", 1, 3)).await.expect("same id, another kind");
    store.put_case(&case("incident", "i1", 2, 4)).await.expect("change");
    assert!(matches!(store.put_case(&case("incident", "i1", 2, 5)).await, Err(StoreError::Conflict(_))), "a stale change");
    assert!(matches!(store.put_case(&case("incident", "i9", 2, 5)).await, Err(StoreError::Conflict(_))), "changing what does not exist");
    store.put_case(&case("incident", "i0", 1, 6)).await.expect("create");
    assert_eq!(store.case("incident", "i1").await.expect("read"), Some(case("incident", "i1", 2, 4)));
    assert_eq!(store.case("incident", "nope").await.expect("read"), None);
    let ids: Vec<_> = store.cases("incident").await.expect("list").into_iter().map(|k| (k.id, k.version)).collect();
    assert_eq!(ids, [("i0".to_string(), 1), ("i1".to_string(), 2)]);
    assert_eq!(store.cases("review").await.expect("list").len(), 1);
}

pub async fn a_patients_entries_come_page_by_page(store: Arc<dyn Store>) {
    use crate::AuditRow;
    // Entries 0..12: patient A on even indices, B on odd ones, none on every third.
    let rows = (0..12u8)
        .map(|i| AuditRow { leaf_hash: [i; 32], sealed: vec![i; 4], patient_token: (i % 3 != 2).then_some([if i % 2 == 0 { 0xA } else { 0xB }; 16]), query_sealed: None })
        .collect();
    let first = store.append_audit(rows).await.expect("append");
    let at = |i: u64| first + i;
    let page = |range: std::ops::Range<u64>, limit: usize, newest_first: bool| {
        let store = store.clone();
        async move {
            let rows = store.audit_entries_for(&[0xA; 16], range, limit, newest_first).await.expect("page");
            rows.into_iter().map(|(i, r)| (i - first, r.sealed[0])).collect::<Vec<_>>()
        }
    };
    let a: Vec<(u64, u8)> = [0, 4, 6, 10].iter().map(|&i| (i, i as u8)).collect();
    assert_eq!(page(at(0)..u64::MAX, 100, false).await, a, "every entry of A, in order");
    assert_eq!(page(at(0)..u64::MAX, 2, false).await, a[..2], "the first page");
    assert_eq!(page(at(5)..u64::MAX, 2, false).await, a[2..], "the next page, after the last shown");
    assert_eq!(page(at(0)..at(10), 3, true).await, vec![(6, 6), (4, 4), (0, 0)], "newest first, below an index");
    assert_eq!(page(at(11)..u64::MAX, 5, false).await, vec![], "nothing beyond");
    assert_eq!(store.audit_entries_for(&[0xC; 16], 0..u64::MAX, 5, false).await.expect("page").len(), 0, "another patient's token finds nothing");
}
