//! The one test suite every [`BlockBackend`] passes (STYLE.md §6).

use std::sync::Arc;

use super::{BlockBackend, FaultBackend, FileBackend, Mapping, MemBackend};

const SIZE: u64 = 8 << 20;

fn suite(b: Arc<dyn BlockBackend>) {
    assert_eq!(b.size_bytes(), SIZE);
    // Fresh storage reads back zeroes.
    let mut buf = vec![0xffu8; 8192];
    b.read_at(&mut buf, 0).unwrap();
    assert!(buf.iter().all(|&x| x == 0));

    // Write / read round trip, including at the very end.
    let pat: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
    b.write_at(&pat, 1 << 20).unwrap();
    b.write_at(&pat[..512], SIZE - 512).unwrap();
    let mut got = vec![0u8; 8192];
    b.read_at(&mut got, 1 << 20).unwrap();
    assert_eq!(got, pat);
    let mut last = vec![0u8; 512];
    b.read_at(&mut last, SIZE - 512).unwrap();
    assert_eq!(last, &pat[..512]);

    // Out of range is an error, never a short read or a panic.
    assert!(b.read_at(&mut last, SIZE).is_err());
    assert!(b.write_at(&pat[..1024], SIZE - 512).is_err());
    assert!(b.discard(SIZE, 512).is_err());

    // Mapping reports written data as mapped.
    let (m, n) = b.mapping(1 << 20, 8192).unwrap();
    assert_eq!(m, Mapping::Mapped);
    assert!(n > 0 && n <= 8192);

    // Discard (a whole 64 KiB, aligned for every filesystem) reads back zero and
    // shows up as deallocated.
    let big = vec![7u8; 65536];
    b.write_at(&big, 4 << 20).unwrap();
    b.discard(4 << 20, 65536).unwrap();
    let mut z = vec![1u8; 65536];
    b.read_at(&mut z, 4 << 20).unwrap();
    assert!(z.iter().all(|&x| x == 0));
    let (m, n) = b.mapping(4 << 20, 65536).unwrap();
    assert_eq!((m, n), (Mapping::Deallocated, 65536));

    // An uncached write (resync copy-in) replaces what a cached write left, and is range
    // checked like any write.
    b.write_at(&pat, 5 << 20).unwrap();
    let region: Vec<u8> = (0..65536u32).map(|i| (i % 241) as u8 ^ 0x55).collect();
    b.write_at_uncached(&region, 5 << 20).unwrap();
    b.flush().unwrap();
    let mut r = vec![0u8; 65536];
    b.read_at(&mut r, 5 << 20).unwrap();
    assert_eq!(r, region);
    assert!(b.write_at_uncached(&region, SIZE - 4096).is_err());
    assert!(b.read_uncached(5 << 20, 65536).unwrap() == region);
    assert!(b.read_uncached(SIZE - 4096, 8192).is_err());

    // A mapping never reports beyond the asked length.
    let (_, n) = b.mapping(0, 4096).unwrap();
    assert!(n > 0 && n <= 4096);

    // Concurrent writers and flushers.
    let threads: Vec<_> = (0..8u64)
        .map(|i| {
            let b = b.clone();
            std::thread::spawn(move || {
                let d = vec![i as u8 + 1; 4096];
                b.write_at(&d, (2 << 20) + i * 4096).unwrap();
                b.flush().unwrap();
                let mut r = vec![0u8; 4096];
                b.read_at(&mut r, (2 << 20) + i * 4096).unwrap();
                assert_eq!(r, d);
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

#[test]
fn mem_backend_conforms() {
    suite(Arc::new(MemBackend::new(SIZE)));
}

#[test]
fn file_backend_conforms() {
    let dir = tempfile::tempdir().unwrap();
    suite(Arc::new(
        FileBackend::open(&dir.path().join("vol"), SIZE, true).unwrap(),
    ));
}

#[test]
fn fault_backend_without_faults_conforms() {
    suite(Arc::new(FaultBackend::new(Arc::new(MemBackend::new(SIZE)))));
}
