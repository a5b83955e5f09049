//! Structure-aware fuzzing of request decoding, bounded for the normal test suite: valid requests
//! of every advertised API and version (built with kafka-protocol, with topics, partitions, group
//! ids and a small record batch filled in) are encoded, then mutated (bit flips, truncation,
//! insertion, 1/2/4/5-byte windows overwritten with extreme values, the version swapped for
//! another one of the same API).
//!
//! In process, each mutated frame goes through the broker's decode path (header, then the body's
//! `Decodable::decode` at that version, then our RecordBatch walk for Produce) under a counting
//! allocator: no panic, and the bytes allocated at any moment stay within a small multiple of the
//! frame. Then a sample of the same frames goes to a real broker process, which must stay up,
//! keep its peak memory, and serve a real client afterwards.
//!
//! Reproducible: the cases come from a fixed seed; `SLUICE_FUZZ_SEED` (a u64) picks another and
//! `SLUICE_FUZZ_CASES` changes how many in-process cases run. A failure prints its seed and case.
//! For long runs, see the libFuzzer targets under `tests/fuzz`.

mod common;
mod hostile;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use bytes::Bytes;
use common::{topic_name, Broker};
use hostile::*;
use kafka_protocol::messages::{ApiKey, ProduceRequest, RequestHeader};
use kafka_protocol::protocol::Decodable;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};

// ---- a counting allocator, measuring only the thread that asked --------------------------------

/// Largest single allocation a decode may ask for while measured. One that trusted a declared
/// count would ask for gigabytes; refusing it aborts the test with "memory allocation failed".
const ALLOCATION_BYTES_MAX: usize = 64 << 20;

struct Counting;

thread_local! {
    static MEASURING: Cell<bool> = const { Cell::new(false) };
    /// The frame being decoded, in hex, to name it if the decode asks for too much.
    static FRAME_HEX: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
    static LIVE_BYTES: Cell<usize> = const { Cell::new(0) };
    static PEAK_BYTES: Cell<usize> = const { Cell::new(0) };
}

fn measuring() -> bool {
    MEASURING.try_with(Cell::get).unwrap_or(false)
}

fn grow(n: usize) {
    let live = LIVE_BYTES.get() + n;
    LIVE_BYTES.set(live);
    PEAK_BYTES.set(PEAK_BYTES.get().max(live));
}

/// Says which frame asked for an outsized allocation; the allocation then fails and aborts.
fn report_outsized() {
    let _ = FRAME_HEX.try_with(|h| {
        if let Ok(h) = h.try_borrow() {
            let msg = b"outsized allocation while decoding frame (hex): ";
            // SAFETY: write(2) of buffers we own; no allocation here.
            unsafe {
                libc::write(2, msg.as_ptr().cast(), msg.len());
                libc::write(2, h.as_ptr().cast(), h.len());
                libc::write(2, b"\n".as_ptr().cast(), 1);
            }
        }
    });
}

fn shrink(n: usize) {
    LIVE_BYTES.set(LIVE_BYTES.get().saturating_sub(n));
}

// SAFETY: forwards to the system allocator; the bookkeeping touches only const-initialised
// thread-local cells, which never allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if measuring() {
            if layout.size() > ALLOCATION_BYTES_MAX {
                report_outsized();
                return std::ptr::null_mut();
            }
            grow(layout.size());
        }
        System.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if measuring() {
            if layout.size() > ALLOCATION_BYTES_MAX {
                report_outsized();
                return std::ptr::null_mut();
            }
            grow(layout.size());
        }
        System.alloc_zeroed(layout)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if measuring() {
            shrink(layout.size());
        }
        System.dealloc(ptr, layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if measuring() {
            if new_size > ALLOCATION_BYTES_MAX {
                report_outsized();
                return std::ptr::null_mut();
            }
            shrink(layout.size());
            grow(new_size);
        }
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Runs `f` and returns its result with the most bytes it held allocated at once.
fn peak_bytes_of<R>(f: impl FnOnce() -> R) -> (R, usize) {
    LIVE_BYTES.set(0);
    PEAK_BYTES.set(0);
    MEASURING.set(true);
    let r = f();
    MEASURING.set(false);
    (r, PEAK_BYTES.get())
}

/// A decode may hold at most this many bytes per byte of frame (decoded structs are wider than
/// their encoding: an element of a few bytes becomes a struct of a hundred or so)...
const DECODE_BYTES_PER_FRAME_BYTE_MAX: usize = 512;
/// ...plus this much regardless of the frame.
const DECODE_BYTES_SLACK: usize = 64 << 10;

// ---- mutations ---------------------------------------------------------------------------------

/// Extreme values written over windows of the frame: lengths, counts and varints at their edges.
const EXTREMES: &[&[u8]] = &[
    &[0x00],
    &[0x7f],
    &[0x80],
    &[0xff],
    &[0x7f, 0xff],
    &[0x80, 0x00],
    &[0xff, 0xfe],
    &[0xff, 0xff],
    &[0x7f, 0xff, 0xff, 0xff],
    &[0x80, 0x00, 0x00, 0x00],
    &[0xff, 0xff, 0xff, 0xfe],
    &[0xff, 0xff, 0xff, 0xff],
    &[0xff, 0xff, 0xff, 0xff, 0x0f],
    &[0xff, 0xff, 0xff, 0xff, 0x07],
    &[0x80, 0x80, 0x80, 0x80, 0x08],
    &[0xff, 0xff, 0xff, 0xff, 0xff],
];

#[derive(Clone, Debug)]
enum Mutation {
    FlipBit(prop::sample::Index, u8),
    Truncate(prop::sample::Index),
    Insert(prop::sample::Index, Vec<u8>),
    Overwrite(prop::sample::Index, usize),
    Remove(prop::sample::Index, usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        3 => (any::<prop::sample::Index>(), 0u8..8).prop_map(|(i, b)| Mutation::FlipBit(i, b)),
        1 => any::<prop::sample::Index>().prop_map(Mutation::Truncate),
        2 => (any::<prop::sample::Index>(), prop::collection::vec(any::<u8>(), 1..8))
            .prop_map(|(i, v)| Mutation::Insert(i, v)),
        5 => (any::<prop::sample::Index>(), 0..EXTREMES.len())
            .prop_map(|(i, e)| Mutation::Overwrite(i, e)),
        1 => (any::<prop::sample::Index>(), 1usize..6).prop_map(|(i, n)| Mutation::Remove(i, n)),
    ]
}

/// Applies `m` to `b[from..]` (the bytes before `from` are left alone).
fn apply(b: &mut Vec<u8>, from: usize, m: &Mutation) {
    let span = b.len().saturating_sub(from);
    if span == 0 {
        if let Mutation::Insert(_, v) = m {
            b.extend_from_slice(v);
        }
        return;
    }
    match m {
        Mutation::FlipBit(i, bit) => b[from + i.index(span)] ^= 1 << bit,
        Mutation::Truncate(i) => b.truncate(from + i.index(span)),
        Mutation::Insert(i, v) => {
            let at = from + i.index(span + 1);
            b.splice(at..at, v.iter().copied());
        }
        Mutation::Overwrite(i, e) => {
            let at = from + i.index(span);
            let e = EXTREMES[*e];
            let end = (at + e.len()).min(b.len());
            b[at..end].copy_from_slice(&e[..end - at]);
        }
        Mutation::Remove(i, n) => {
            let at = from + i.index(span);
            let end = (at + n).min(b.len());
            b.drain(at..end);
        }
    }
}

/// One fuzz case: which request, in what shape, and what is done to it.
#[derive(Clone, Debug)]
struct Case {
    api: prop::sample::Index,
    populated: bool,
    other_header_form: bool,
    /// Stamp another version of the same API over the encoded one.
    other_version: Option<prop::sample::Index>,
    mutations: Vec<Mutation>,
}

fn case() -> impl Strategy<Value = Case> {
    (
        any::<prop::sample::Index>(),
        prop::bool::weighted(0.8),
        prop::bool::weighted(0.1),
        prop::option::weighted(0.1, any::<prop::sample::Index>()),
        prop::collection::vec(mutation(), 1..5),
    )
        .prop_map(
            |(api, populated, other_header_form, other_version, mutations)| Case {
                api,
                populated,
                other_header_form,
                other_version,
                mutations,
            },
        )
}

/// The frame payload (no length prefix) of `c`.
fn build(apis: &[(ApiKey, i16)], c: &Case) -> Vec<u8> {
    let (key, version) = apis[c.api.index(apis.len())];
    let body = if c.populated {
        populated_body(key, version)
    } else {
        encode_body(&*default_request(key), version).expect("default request encodes")
    };
    let flexible = native_flexible(key, version) != c.other_header_form;
    let mut p = request_header(key, version, 1, flexible);
    p.extend_from_slice(&body);
    if let Some(i) = &c.other_version {
        let versions: Vec<i16> = apis
            .iter()
            .filter(|(k, _)| *k == key)
            .map(|(_, v)| *v)
            .collect();
        p[2..4].copy_from_slice(&versions[i.index(versions.len())].to_be_bytes());
    }
    // API key and version stay (a frame naming an unknown API is refused before any decode).
    for m in &c.mutations {
        apply(&mut p, 4, m);
    }
    p
}

/// The broker's decode path for one frame, plus the batch walk the Produce handler makes.
fn decode_like_the_broker(frame: &[u8]) -> Result<(), String> {
    let (key, version) = decode_request(frame)?;
    if key == ApiKey::Produce {
        let mut full = Bytes::copy_from_slice(frame);
        RequestHeader::decode(&mut full, key.request_header_version(version))
            .map_err(|e| e.to_string())?;
        let req = ProduceRequest::decode(&mut full, version).map_err(|e| e.to_string())?;
        for t in &req.topic_data {
            for p in &t.partition_data {
                if let Some(records) = &p.records {
                    let _ = sluice::protocol::batch::for_each_batch(records, true, |_| {});
                }
            }
        }
    }
    Ok(())
}

fn seed() -> u64 {
    std::env::var("SLUICE_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_0009)
}

fn runner(seed: u64, cases: u32) -> TestRunner {
    let mut s = [0u8; 32];
    s[..8].copy_from_slice(&seed.to_le_bytes());
    let config = Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    };
    TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &s))
}

/// In-process cases per run (each is a few microseconds of decode).
const IN_PROCESS_CASES: u32 = 50_000;
/// Mutated frames sent to the real broker.
const BROKER_FRAMES: usize = 1_000;

#[test]
fn mutated_requests_decode_without_panic_or_outsized_allocation() {
    let apis = advertised();
    let cases = std::env::var("SLUICE_FUZZ_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(IN_PROCESS_CASES);
    let seed = seed();
    let ok = Cell::new(0u32);
    let refused = Cell::new(0u32);
    let result = runner(seed, cases).run(&case(), |c| {
        let frame = build(&apis, &c);
        FRAME_HEX.with(|h| {
            let mut h = h.borrow_mut();
            h.clear();
            for b in &frame {
                h.push_str(&format!("{b:02x}"));
            }
        });
        let (r, peak) = peak_bytes_of(|| decode_like_the_broker(&frame));
        let bound = frame.len() * DECODE_BYTES_PER_FRAME_BYTE_MAX + DECODE_BYTES_SLACK;
        prop_assert!(
            peak <= bound,
            "decoding a {}-byte frame held {peak} bytes at once (bound {bound}): {:02x?}",
            frame.len(),
            frame
        );
        match r {
            Ok(_) => ok.set(ok.get() + 1),
            Err(_) => refused.set(refused.get() + 1),
        }
        Ok(())
    });
    eprintln!(
        "fuzz seed {seed:#x}: {cases} cases, {} decoded, {} refused",
        ok.get(),
        refused.get()
    );
    if let Err(e) = result {
        panic!("seed {seed:#x}: {e}");
    }
}

#[test]
fn mutated_requests_leave_the_broker_serving() {
    let apis = advertised();
    let seed = seed();
    let mut runner = runner(seed ^ 0xb40c, BROKER_FRAMES as u32);
    let strategy = case();
    let frames: Vec<Vec<u8>> = (0..BROKER_FRAMES)
        .map(|_| {
            let c = strategy
                .new_tree(&mut runner)
                .expect("generate a case")
                .current();
            frame(&build(&apis, &c))
        })
        .collect();

    // A mutated CreateTopics may ask for many partitions; a low per-shard limit keeps what it
    // can create (and the test's disk use) small.
    let broker = Broker::options()
        .cores(2)
        .args(["--partitions-per-shard-max", "500"])
        .start();
    let pid = broker.pid().expect("broker running");
    let topic = topic_name("fuzz-requests");
    assert_serves_real_client(&broker.bootstrap(), &topic);
    let peak_before = vm_hwm_kib(pid);
    let outcomes = probe_all(broker.addr, &frames, 4);
    eprintln!(
        "fuzz seed {seed:#x}: {} mutated frames to the broker: {} answered, {} closed, \
         {} stalled; {} connections",
        outcomes.sent, outcomes.answered, outcomes.closed, outcomes.stalled, outcomes.connections
    );
    if !outcomes.stalled_requests.is_empty() {
        eprintln!(
            "stalled (api key, version): {:?}",
            outcomes.stalled_requests
        );
    }
    assert_eq!(outcomes.sent, frames.len());
    assert_alive(pid);
    assert_serves_real_client(&broker.bootstrap(), &topic);
    let peak_after = vm_hwm_kib(pid);
    eprintln!("broker VmHWM {peak_before} KiB before, {peak_after} KiB after");
    assert!(
        peak_after.saturating_sub(peak_before) < PEAK_GROWTH_KIB_MAX,
        "seed {seed:#x}: broker peak memory grew from {peak_before} KiB to {peak_after} KiB"
    );
    assert!(
        !broker.stderr().contains("panicked"),
        "seed {seed:#x}: broker panicked on a mutated request:\n{}",
        broker.stderr()
    );
}
