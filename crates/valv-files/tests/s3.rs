//! The S3 backend against a real S3-compatible server started here (Garage, single node): the
//! object-store contract, multipart uploads across part boundaries, and sealed files whose
//! bytes — read back through the S3 API and from Garage's own folders — hold nothing planted.

use std::sync::Arc;
use valv_crypto::stream::{Randomness, SEGMENT};
use valv_crypto::{Aad, DataKey};
use valv_files::s3::{S3Settings, PART, S3};
use valv_files::sealed::{SealedReader, SealedWriter};
use valv_files::{testkit, ObjectStore};
use valv_testgarage::Garage;

fn connect(g: &Garage, prefix: &str) -> S3 {
    let settings = S3Settings { bucket: g.bucket.clone(), region: g.region.clone(), endpoint: Some(g.endpoint.clone()), ca_file: None, prefix: prefix.into() };
    S3::connect(&settings, g.key_id.clone(), g.secret.clone(), None).expect("connect")
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() { out.extend(walk(&p)) } else { out.push(p) }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garage_holds_sealed_objects_as_the_local_directory_does() {
    let g = Garage::start();
    let store = connect(&g, "valv/");
    testkit::behaves_as_an_object_store(&store).await;

    // Three parts (the last short), written in pieces that straddle the part boundaries.
    let big: Vec<u8> = (0..2 * PART + 12_345).map(|i| (i % 251) as u8).collect();
    let name = "abcdef0123456789-0000-0000-0000-000000000001";
    let mut w = store.create(name).await.expect("create");
    for piece in big.chunks(3_000_001) {
        w.write(piece).await.expect("write");
    }
    assert_eq!(w.finish().await.expect("finish"), big.len() as u64);
    assert_eq!(store.size(name).await.expect("size"), Some(big.len() as u64));
    for (a, b) in [(0, 10), (PART - 5, PART + 5), (2 * PART - 1, 2 * PART + 12_345), (0, 2 * PART + 12_345)] {
        assert_eq!(store.read_range(name, a as u64, b as u64).await.expect("range"), big[a..b], "{a}..{b}");
    }
    // A multipart write dropped half way leaves no object.
    let half = "abcdef0123456789-0000-0000-0000-000000000002";
    let mut w = store.create(half).await.expect("create");
    w.write(&big[..PART + 1]).await.expect("a part goes out");
    drop(w);
    assert_eq!(store.size(half).await.expect("size"), None);

    // A sealed file with a planted canary: nothing of it in the bucket or in Garage's folders.
    let canary = b"CANARY-CT-Bergstrom-19550101-7788-";
    let plain: Vec<u8> = canary.iter().copied().cycle().take(5 * SEGMENT + 77).collect();
    let store: Arc<dyn ObjectStore> = Arc::new(store);
    let key = DataKey::from_bytes([5; 32]);
    let ctx = Aad { purpose: "file", resource_type: "Binary", id: "b1", version: 1, patient: "p1" };
    let sealed_name = "abcdef0123456789-0000-0000-0000-000000000003";
    let mut w = SealedWriter::create(&*store, sealed_name, &key, &ctx, &Randomness { salt: [1; 16], nonce_prefix: [2; 7] }).await.expect("create");
    for piece in plain.chunks(40_000) {
        w.write(piece).await.expect("write");
    }
    let written = w.finish().await.expect("finish");
    let size = store.size(sealed_name).await.expect("size").expect("stored");
    assert_eq!(size, written.sealed_len);
    let in_bucket = store.read_range(sealed_name, 0, size).await.expect("read back through the S3 API");
    assert!(!canary.windows(8).any(|w| contains(&in_bucket, w)), "canary bytes in the bucket");
    for f in walk(g.files()) {
        let bytes = std::fs::read(&f).unwrap_or_default();
        assert!(!canary.windows(8).any(|w| contains(&bytes, w)), "canary bytes in {}", f.display());
    }
    let r = SealedReader::open(store.clone(), sealed_name, &key, &ctx).await.expect("open");
    assert_eq!(r.range(SEGMENT as u64 - 3, 3 * SEGMENT as u64 + 3).await.expect("range"), plain[SEGMENT - 3..3 * SEGMENT + 3]);

    // Replaced in the bucket with one flipped byte: that segment fails, loudly.
    let mut tampered = in_bucket.clone();
    tampered[31 + 2 * (SEGMENT + 16) + 9] ^= 1;
    store.delete(sealed_name).await.expect("delete");
    let mut w = store.create(sealed_name).await.expect("create");
    w.write(&tampered).await.expect("write");
    w.finish().await.expect("finish");
    let r = SealedReader::open(store.clone(), sealed_name, &key, &ctx).await.expect("open");
    assert!(r.segment(2).await.is_err());
    assert!(r.range(0, r.plaintext_len).await.is_err());
    assert_eq!(r.range(0, 10).await.expect("segment 0 is intact"), plain[..10]);

    // Names are checked before anything is sent; another prefix sees nothing of these.
    let other = connect(&g, "elsewhere/");
    assert_eq!(other.size(sealed_name).await.expect("size"), None);
}
