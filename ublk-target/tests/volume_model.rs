//! The volume's request handling against a byte-array model, through a real
//! cache stack and a real origin file, with caches small enough that every
//! request sequence churns them. Runs on hosts without the ublk driver.

use std::sync::Arc;

use canopy_cache::{CacheConfig, CacheStack, HashKind, Medium, TierConfig};
use canopy_origin::OriginStore;
use canopy_ublk::volume::{CacheMode, Op, Volume};
use proptest::prelude::*;

const CHUNK: usize = 4096;
const SIZE: u64 = 40 * CHUNK as u64 + 1536; // a partial last chunk on purpose

fn volume(dir: &tempfile::TempDir, mode: CacheMode) -> Volume {
    let origin = OriginStore::open(&dir.path().join("origin"), Some(SIZE), CHUNK).expect("origin");
    let cfg = CacheConfig {
        chunk_size: CHUNK,
        tiers: vec![
            TierConfig {
                medium: Medium::Memory,
                groups: 2,
                ways: 2,
                hash: HashKind::Modulo,
            },
            TierConfig {
                medium: Medium::Disk {
                    path: dir.path().join("tier1"),
                },
                groups: 3,
                ways: 2,
                hash: HashKind::Mix { key: 99 },
            },
        ],
        victim_capacity: 3,
        // As the daemon builds it (`cache_layout`).
        admission: true,
        prefault: false,
    };
    Volume::new(
        Arc::new(CacheStack::new(cfg, Arc::new(origin)).expect("cache")),
        mode,
    )
}

#[derive(Clone, Debug)]
enum Req {
    Read(u64, usize),
    Write(u64, usize, u8, bool),
    Flush,
    Discard(u64, usize),
    Zeroes(u64, usize),
}

fn range() -> impl Strategy<Value = (u64, usize)> {
    // Sector-granular, crossing chunk boundaries, up to 3 chunks long.
    let sectors = SIZE / 512;
    (0..sectors).prop_flat_map(move |start| {
        let max = (sectors - start).min(3 * CHUNK as u64 / 512);
        (Just(start * 512), (0..=max).prop_map(|n| n as usize * 512))
    })
}

fn req() -> impl Strategy<Value = Req> {
    prop_oneof![
        3 => range().prop_map(|(o, l)| Req::Read(o, l)),
        4 => (range(), any::<u8>(), any::<bool>()).prop_map(|((o, l), b, f)| Req::Write(o, l, b, f)),
        1 => Just(Req::Flush),
        1 => range().prop_map(|(o, l)| Req::Discard(o, l)),
        1 => range().prop_map(|(o, l)| Req::Zeroes(o, l)),
    ]
}

fn origin_bytes(dir: &tempfile::TempDir) -> Vec<u8> {
    std::fs::read(dir.path().join("origin")).expect("read origin")
}

fn run(mode: CacheMode, reqs: Vec<Req>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let vol = volume(&dir, mode);
    let mut model = vec![0u8; SIZE as usize];
    let mut buf = vec![0u8; 3 * CHUNK];
    for (step, r) in reqs.into_iter().enumerate() {
        match r {
            Req::Read(o, l) => {
                let res = vol.handle(Some(Op::Read), o, l, &mut buf);
                assert_eq!(res, l as i32, "step {step}: read result");
                assert_eq!(
                    &buf[..l],
                    &model[o as usize..o as usize + l],
                    "step {step}: read {o}+{l}"
                );
            }
            Req::Write(o, l, byte, fua) => {
                let data: Vec<u8> = (0..l).map(|i| byte.wrapping_add(i as u8)).collect();
                buf[..l].copy_from_slice(&data);
                let res = vol.handle(Some(Op::Write { fua }), o, l, &mut buf);
                assert_eq!(res, l as i32, "step {step}: write result");
                model[o as usize..o as usize + l].copy_from_slice(&data);
                if fua || mode == CacheMode::Writethrough {
                    // Acknowledged => on the origin (what survives a daemon crash).
                    let disk = origin_bytes(&dir);
                    assert_eq!(
                        &disk[o as usize..o as usize + l],
                        &data[..],
                        "step {step}: write-through"
                    );
                }
            }
            Req::Flush => {
                assert_eq!(vol.handle(Some(Op::Flush), 0, 0, &mut buf), 0);
                assert_eq!(origin_bytes(&dir), model, "step {step}: origin after flush");
            }
            Req::Discard(o, l) | Req::Zeroes(o, l) => {
                let op = if matches!(r, Req::Discard(..)) {
                    Op::Discard
                } else {
                    Op::WriteZeroes
                };
                assert_eq!(
                    vol.handle(Some(op), o, l, &mut buf),
                    l as i32,
                    "step {step}: zero"
                );
                model[o as usize..o as usize + l].fill(0);
            }
        }
        if mode == CacheMode::Writethrough {
            // Nothing acknowledged may be held only in the cache.
            assert_eq!(
                vol.cache().dirty_count(),
                0,
                "step {step}: dirty chunks in writethrough mode"
            );
        }
    }
    assert_eq!(vol.handle(Some(Op::Flush), 0, 0, &mut buf), 0);
    assert_eq!(origin_bytes(&dir), model, "origin after the final flush");
    assert_eq!(vol.errors(), 0);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn writeback_matches_model(reqs in proptest::collection::vec(req(), 1..120)) {
        run(CacheMode::Writeback, reqs);
    }

    #[test]
    fn writethrough_matches_model(reqs in proptest::collection::vec(req(), 1..120)) {
        run(CacheMode::Writethrough, reqs);
    }
}

#[test]
fn bad_requests_get_errors_not_panics() {
    let dir = tempfile::tempdir().expect("tempdir");
    let vol = volume(&dir, CacheMode::Writeback);
    let mut buf = vec![0u8; CHUNK];
    // Past the end, overflowing, larger than the buffer, unknown opcode.
    assert_eq!(
        vol.handle(Some(Op::Read), SIZE, 512, &mut buf),
        -libc::EINVAL
    );
    assert_eq!(
        vol.handle(
            Some(Op::Write { fua: false }),
            u64::MAX - 100,
            512,
            &mut buf
        ),
        -libc::EINVAL
    );
    assert_eq!(
        vol.handle(Some(Op::Read), 0, 2 * CHUNK, &mut buf),
        -libc::EINVAL
    );
    assert_eq!(vol.handle(None, 0, 512, &mut buf), -libc::EOPNOTSUPP);
    // Zero-length reads and writes (pre-flush requests) succeed with 0.
    assert_eq!(vol.handle(Some(Op::Write { fua: true }), 0, 0, &mut buf), 0);
    assert_eq!(vol.handle(Some(Op::Read), 4096, 0, &mut buf), 0);
    assert_eq!(vol.handle(Some(Op::Flush), 0, 0, &mut buf), 0);
}

#[test]
fn decodes_ublk_opcodes() {
    use libublk::sys;
    assert_eq!(Op::from_ublk(sys::UBLK_IO_OP_READ), Some(Op::Read));
    assert_eq!(
        Op::from_ublk(sys::UBLK_IO_OP_WRITE | sys::UBLK_IO_F_FUA),
        Some(Op::Write { fua: true })
    );
    assert_eq!(Op::from_ublk(sys::UBLK_IO_OP_FLUSH), Some(Op::Flush));
    assert_eq!(Op::from_ublk(sys::UBLK_IO_OP_DISCARD), Some(Op::Discard));
    assert_eq!(
        Op::from_ublk(sys::UBLK_IO_OP_WRITE_ZEROES),
        Some(Op::WriteZeroes)
    );
    assert_eq!(Op::from_ublk(sys::UBLK_IO_OP_WRITE_SAME), None);
    assert_eq!(Op::from_ublk(sys::UBLK_IO_OP_ZONE_APPEND), None);
}
