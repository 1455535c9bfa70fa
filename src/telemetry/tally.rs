//! Per-thread tallies of the per-message instruments, folded into the SDK at collection.
//!
//! A message used to cost four bound counter adds and three histogram records in the SDK, and
//! every one of them landed on state shared by all connections of the route: an atomic per
//! counter and a mutex per histogram point, once per metric reader. With two worker threads
//! on two cores those cache lines bounced on every message (perf put SDK aggregation at 20% of
//! the server's CPU with one reader and 33% with two, at 16 messages in flight).
//!
//! Here each thread records into its own [`Shard`] of the route: plain loads and stores, no
//! lock prefix, no cache line shared with another writer. A shard is written by one thread at a
//! time and read by the collector under a sequence lock, so a reader never sees a bucket's count
//! without its sum. When a metric reader collects (a `/metrics` scrape, an OTLP export, the last
//! export at shutdown), the SDK first runs the observable callbacks, and one of them calls
//! [`Tally::flush`]: the increments since the last flush go into the route's bound SDK
//! counters and its histogram totals, then the SDK aggregates as before. Every collection therefore sees every message
//! recorded before it started, once; a connection closing changes nothing (shards belong to
//! threads, not connections), and a thread that exits hands its shard to the next thread.
//!
//! Histograms keep, per bucket, a count and a sum, plus each shard's smallest and largest value
//! ever. A flush hands over, per bucket, how many values arrived and their sum, with the shard's
//! smallest and largest: the sink adds them to the route's running [`Cumulative`] totals, so a
//! flush costs the same whether a thousand values arrived or a million. `/metrics` and the OTLP
//! export read those totals (module `message_histograms`): the SDK's histograms take one value
//! at a time, which cost three records per message per reader.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering, fence};
use std::sync::{Mutex, OnceLock};

use super::instruments::buckets;

/// Threads that get a shard of their own; a thread beyond them shares one behind a mutex.
const SLOTS: usize = 64;

/// Buckets of `websocket.server.message.size`.
pub(crate) const SIZE_BUCKETS: usize = buckets::MESSAGE_BYTES.len() + 1;
/// Buckets of `websocket.server.message.duration`.
pub(crate) const DURATION_BUCKETS: usize = buckets::MESSAGE_SECONDS.len() + 1;

/// One route's tallies: a shard per thread that recorded on it.
pub(crate) struct Tally {
    slots: Box<[OnceLock<Box<Shard>>]>,
    /// Shared by the threads past [`SLOTS`] (and a thread recording while its thread-locals are
    /// being torn down); the mutex keeps its writer single.
    overflow: Mutex<()>,
    overflow_shard: Shard,
    /// What the last flush took from each shard (index [`SLOTS`] is the overflow shard), and
    /// the lock that keeps two metric readers from flushing at once.
    flushed: Mutex<Vec<Option<Box<Counts>>>>,
}

impl Default for Tally {
    fn default() -> Self {
        Tally {
            slots: (0..SLOTS).map(|_| OnceLock::new()).collect(),
            overflow: Mutex::new(()),
            overflow_shard: Shard::default(),
            flushed: Mutex::new((0..=SLOTS).map(|_| None).collect()),
        }
    }
}

impl Tally {
    /// Records on the calling thread's shard.
    #[inline]
    pub(crate) fn record(&self, f: impl FnOnce(&Cells)) {
        let slot = thread_slot();
        match self.slots.get(slot) {
            Some(shard) => shard.get_or_init(Box::default).write(f),
            None => {
                let _single_writer = self.overflow.lock().unwrap_or_else(|e| e.into_inner());
                self.overflow_shard.write(f);
            }
        }
    }

    /// Hands every increment since the last flush to `sink`, once.
    pub(crate) fn flush(&self, sink: &mut impl Sink) {
        let mut flushed = self.flushed.lock().unwrap_or_else(|e| e.into_inner());
        let shards = self
            .slots
            .iter()
            .map(|s| s.get().map(|b| &**b))
            .chain(std::iter::once(Some(&self.overflow_shard)));
        for (shard, last) in shards.zip(flushed.iter_mut()) {
            let Some(shard) = shard else { continue };
            let now = shard.read();
            let last = last.get_or_insert_with(|| Box::new(Counts::default()));
            now.fold_into(last, sink);
            **last = now;
        }
    }
}

/// Where a flush puts what it took: the route's bound SDK counters and histogram totals (or a
/// test's record).
pub(crate) trait Sink {
    /// `websocket.server.messages` of `[direction][message type]` grew by `n`.
    fn messages(&mut self, direction: usize, kind: usize, n: u64);
    /// `websocket.server.io` of `direction` grew by `n` bytes.
    fn io(&mut self, direction: usize, n: u64);
    /// Payload sizes that arrived for `websocket.server.message.size` of `direction`.
    fn sizes(&mut self, direction: usize, added: &Cumulative<SIZE_BUCKETS>);
    /// Handling times, in nanoseconds, for `websocket.server.message.duration`.
    fn durations(&mut self, added: &Cumulative<DURATION_BUCKETS>);
}

/// A histogram's totals: per bucket counts, the exact sum (a `u128` of bytes or nanoseconds
/// does not wrap in any process's lifetime), the smallest and the largest value. What a flush
/// hands over (the values since the last one, with the shard's extremes) and what the route
/// keeps since the process started.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) struct Cumulative<const N: usize> {
    pub(crate) counts: [u64; N],
    pub(crate) sum: u128,
    /// `u64::MAX` while empty.
    pub(crate) min: u64,
    pub(crate) max: u64,
}

impl<const N: usize> Default for Cumulative<N> {
    fn default() -> Self {
        Cumulative {
            counts: [0; N],
            sum: 0,
            min: u64::MAX,
            max: 0,
        }
    }
}

impl<const N: usize> Cumulative<N> {
    /// Values counted.
    pub(crate) fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Takes in `other`'s values.
    pub(crate) fn add(&mut self, other: &Cumulative<N>) {
        for (c, o) in self.counts.iter_mut().zip(&other.counts) {
            *c += o;
        }
        self.sum += other.sum;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
    }
}

/// The cells one thread writes. Only its writer changes them, with a load and a store (the
/// collector only reads), so an add is two plain moves.
#[derive(Default)]
pub(crate) struct Cells {
    messages: [[AtomicU64; 5]; 2],
    io: [AtomicU64; 2],
    size: [Histogram<SIZE_BUCKETS>; 2],
    duration: Histogram<DURATION_BUCKETS>,
}

impl Cells {
    #[inline]
    pub(crate) fn message(&self, direction: usize, kind: usize) {
        bump(&self.messages[direction][kind], 1);
    }

    #[inline]
    pub(crate) fn data(&self, direction: usize, len: u64, bucket: usize) {
        bump(&self.io[direction], len);
        self.size[direction].record(bucket, len);
    }

    #[inline]
    pub(crate) fn duration(&self, nanos: u64, bucket: usize) {
        self.duration.record(bucket, nanos);
    }
}

/// `buckets::MESSAGE_BYTES` as integers (a test holds them equal).
const SIZE_BOUNDS: [u64; SIZE_BUCKETS - 1] =
    [16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576];

/// `buckets::MESSAGE_SECONDS` in nanoseconds (a test holds them equal).
const DURATION_BOUNDS: [u64; DURATION_BUCKETS - 1] = [
    5_000,
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    1_000_000_000,
];

/// The bucket of a payload of `len` bytes.
#[inline]
pub(crate) fn size_bucket(len: u64) -> usize {
    bucket_of(&SIZE_BOUNDS, len)
}

/// The bucket of a handling time of `nanos`.
#[inline]
pub(crate) fn duration_bucket(nanos: u64) -> usize {
    bucket_of(&DURATION_BOUNDS, nanos)
}

/// Nanoseconds as seconds, the unit the duration histogram is published in.
#[cfg(test)]
pub(crate) fn seconds(nanos: u64) -> f64 {
    nanos as f64 / 1e9
}

/// Bucket `i` holds `bounds[i - 1] < v <= bounds[i]` (OpenTelemetry's explicit buckets, and
/// Prometheus' `le`): the number of bounds below `v`. A branch-free count over a dozen
/// integers; comparing floats in a binary search was half of the cost of recording a
/// handling time.
#[inline]
fn bucket_of<const N: usize>(bounds: &[u64; N], v: u64) -> usize {
    bounds.iter().map(|&b| usize::from(b < v)).sum()
}

#[inline]
fn bump(cell: &AtomicU64, n: u64) {
    cell.store(
        cell.load(Ordering::Relaxed).wrapping_add(n),
        Ordering::Relaxed,
    );
}

struct Histogram<const N: usize> {
    count: [AtomicU64; N],
    sum: [AtomicU64; N],
    min: AtomicU64,
    max: AtomicU64,
}

impl<const N: usize> Default for Histogram<N> {
    fn default() -> Self {
        Histogram {
            count: std::array::from_fn(|_| AtomicU64::new(0)),
            sum: std::array::from_fn(|_| AtomicU64::new(0)),
            min: AtomicU64::new(u64::MAX),
            max: AtomicU64::new(0),
        }
    }
}

impl<const N: usize> Histogram<N> {
    #[inline]
    fn record(&self, bucket: usize, v: u64) {
        bump(&self.count[bucket], 1);
        bump(&self.sum[bucket], v);
        if v < self.min.load(Ordering::Relaxed) {
            self.min.store(v, Ordering::Relaxed);
        }
        if v > self.max.load(Ordering::Relaxed) {
            self.max.store(v, Ordering::Relaxed);
        }
    }

    fn read(&self) -> HistogramCounts<N> {
        HistogramCounts {
            count: self.count.each_ref().map(|c| c.load(Ordering::Relaxed)),
            sum: self.sum.each_ref().map(|c| c.load(Ordering::Relaxed)),
            min: self.min.load(Ordering::Relaxed),
            max: self.max.load(Ordering::Relaxed),
        }
    }
}

/// A shard: its cells and the sequence number that tells a reader whether it read them whole
/// (odd while a write is under way).
#[derive(Default)]
#[repr(align(128))] // a shard never shares a cache line (or its prefetched pair) with another
struct Shard {
    seq: AtomicU64,
    cells: Cells,
}

impl Shard {
    /// The single writer's update, as a sequence-lock write.
    #[inline]
    fn write(&self, f: impl FnOnce(&Cells)) {
        let seq = self.seq.load(Ordering::Relaxed);
        self.seq.store(seq.wrapping_add(1), Ordering::Relaxed);
        fence(Ordering::Release);
        f(&self.cells);
        self.seq.store(seq.wrapping_add(2), Ordering::Release);
    }

    /// A consistent copy of the cells: read again if a write overlapped the read.
    fn read(&self) -> Counts {
        let mut spins = 0u32;
        loop {
            let before = self.seq.load(Ordering::Acquire);
            if before & 1 == 0 {
                let c = &self.cells;
                let counts = Counts {
                    messages: c
                        .messages
                        .each_ref()
                        .map(|d| d.each_ref().map(|m| m.load(Ordering::Relaxed))),
                    io: c.io.each_ref().map(|m| m.load(Ordering::Relaxed)),
                    size: c.size.each_ref().map(Histogram::read),
                    duration: c.duration.read(),
                };
                fence(Ordering::Acquire);
                if self.seq.load(Ordering::Relaxed) == before {
                    return counts;
                }
            }
            // The writer is inside a write of a few stores; if it was preempted there, let it
            // finish rather than spin through its time slice.
            spins += 1;
            if spins < 64 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
    }
}

/// A plain copy of a shard's cells.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Default)]
struct Counts {
    messages: [[u64; 5]; 2],
    io: [u64; 2],
    size: [HistogramCounts<SIZE_BUCKETS>; 2],
    duration: HistogramCounts<DURATION_BUCKETS>,
}

impl Counts {
    /// Hands `sink` what `self` has that `last` (the previous copy of the same shard) had not.
    /// Differences wrap, as the cells do: a sum of nanoseconds may pass `u64::MAX` in a
    /// long-lived process, and the increment since the last copy is still right.
    fn fold_into(&self, last: &Counts, sink: &mut impl Sink) {
        for (d, (now, then)) in self.messages.iter().zip(&last.messages).enumerate() {
            for (k, (now, then)) in now.iter().zip(then).enumerate() {
                let n = now.wrapping_sub(*then);
                if n > 0 {
                    sink.messages(d, k, n);
                }
            }
        }
        for (d, (now, then)) in self.io.iter().zip(&last.io).enumerate() {
            let n = now.wrapping_sub(*then);
            if n > 0 {
                sink.io(d, n);
            }
        }
        for (d, (now, then)) in self.size.iter().zip(&last.size).enumerate() {
            if let Some(added) = now.since(then) {
                sink.sizes(d, &added);
            }
        }
        if let Some(added) = self.duration.since(&last.duration) {
            sink.durations(&added);
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct HistogramCounts<const N: usize> {
    count: [u64; N],
    sum: [u64; N],
    min: u64,
    max: u64,
}

impl<const N: usize> Default for HistogramCounts<N> {
    fn default() -> Self {
        HistogramCounts {
            count: [0; N],
            sum: [0; N],
            min: u64::MAX,
            max: 0,
        }
    }
}

impl<const N: usize> HistogramCounts<N> {
    /// What arrived since `last` (the previous copy of the same shard), with the shard's
    /// extremes so far; `None` when nothing did.
    fn since(&self, last: &Self) -> Option<Cumulative<N>> {
        let mut added = Cumulative {
            min: self.min,
            max: self.max,
            ..Cumulative::default()
        };
        for b in 0..N {
            added.counts[b] = self.count[b].wrapping_sub(last.count[b]);
            added.sum += u128::from(self.sum[b].wrapping_sub(last.sum[b]));
        }
        (added.count() > 0).then_some(added)
    }
}

thread_local! {
    static SLOT: Slot = Slot::claim();
}

/// Slots free for the next thread, and the next never-used one.
static FREE: Mutex<Vec<usize>> = Mutex::new(Vec::new());
static NEXT: AtomicUsize = AtomicUsize::new(0);

/// The calling thread's slot: one of `0..SLOTS` held by this thread alone, or past them.
#[inline]
pub(crate) fn thread_slot() -> usize {
    // While the thread's locals are torn down: the overflow shard, behind its mutex.
    SLOT.try_with(|s| s.0.get()).unwrap_or(usize::MAX)
}

/// A thread's claim on a slot, given back when the thread ends. The free list's mutex orders
/// the old thread's last writes before the new thread's first.
struct Slot(Cell<usize>);

impl Slot {
    fn claim() -> Self {
        let reused = FREE.lock().unwrap_or_else(|e| e.into_inner()).pop();
        Slot(Cell::new(
            reused.unwrap_or_else(|| NEXT.fetch_add(1, Ordering::Relaxed)),
        ))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let slot = self.0.get();
        if slot < SLOTS {
            FREE.lock().unwrap_or_else(|e| e.into_inner()).push(slot);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Record {
        messages: [[u64; 5]; 2],
        io: [u64; 2],
        sizes: [Cumulative<SIZE_BUCKETS>; 2],
        durations: Cumulative<DURATION_BUCKETS>,
        flushes_with_sizes: usize,
    }

    impl Sink for Record {
        fn messages(&mut self, d: usize, k: usize, n: u64) {
            self.messages[d][k] += n;
        }
        fn io(&mut self, d: usize, n: u64) {
            self.io[d] += n;
        }
        fn sizes(&mut self, d: usize, added: &Cumulative<SIZE_BUCKETS>) {
            self.sizes[d].add(added);
            self.flushes_with_sizes += 1;
        }
        fn durations(&mut self, added: &Cumulative<DURATION_BUCKETS>) {
            self.durations.add(added);
        }
    }

    fn send(tally: &Tally, len: u64) {
        tally.record(|c| {
            c.message(1, 0);
            c.data(1, len, size_bucket(len));
        });
    }

    /// What recording `values` one by one into a histogram would keep.
    fn summary<const N: usize>(values: &[u64], bucket: fn(u64) -> usize) -> Cumulative<N> {
        let mut h = Cumulative::default();
        for &v in values {
            h.counts[bucket(v)] += 1;
            h.sum += u128::from(v);
            h.min = h.min.min(v);
            h.max = h.max.max(v);
        }
        h
    }

    #[test]
    fn a_flush_hands_over_each_increment_once_with_exact_buckets_sum_min_and_max() {
        let tally = Tally::default();
        let mut sink = Record::default();
        let first = [100, 17, 64, 3000, 65, 100_000];
        for len in first {
            send(&tally, len);
        }
        tally.flush(&mut sink);
        let second = [5, 70, 70, 71, 2_000_000];
        for len in second {
            send(&tally, len);
        }
        tally.flush(&mut sink);
        tally.flush(&mut sink); // nothing new: nothing handed over
        assert_eq!(sink.flushes_with_sizes, 2);

        let all: Vec<u64> = first.iter().chain(&second).copied().collect();
        assert_eq!(sink.messages[1][0], 11);
        assert_eq!(sink.io[1], all.iter().sum::<u64>());
        assert_eq!(sink.sizes[1].count(), 11);
        assert_eq!(sink.sizes[1], summary(&all, size_bucket));
        assert_eq!(sink.sizes[0], Cumulative::default());
        assert_eq!(sink.io[0], 0);
    }

    /// The integer bounds are the published ones, and place every value where comparing it,
    /// in the published unit, against the published bounds would.
    #[test]
    fn integer_bounds_place_values_as_the_published_bounds_do() {
        let float = |bounds: &[f64], v: f64| bounds.partition_point(|&b| b < v);
        assert_eq!(
            SIZE_BOUNDS.map(|b| b as f64).to_vec(),
            buckets::MESSAGE_BYTES.to_vec()
        );
        assert_eq!(
            DURATION_BOUNDS.map(|b| b as f64 / 1e9).to_vec(),
            buckets::MESSAGE_SECONDS.to_vec()
        );
        for b in SIZE_BOUNDS {
            for v in [b - 1, b, b + 1, b * 3 / 2] {
                assert_eq!(
                    size_bucket(v),
                    float(buckets::MESSAGE_BYTES, v as f64),
                    "{v} B"
                );
            }
        }
        for b in DURATION_BOUNDS {
            for v in [b - 1, b, b + 1, b * 3 / 2] {
                assert_eq!(
                    duration_bucket(v),
                    float(buckets::MESSAGE_SECONDS, seconds(v)),
                    "{v} ns"
                );
            }
        }
        assert_eq!(size_bucket(0), 0);
        assert_eq!(size_bucket(u64::MAX), SIZE_BUCKETS - 1);
        assert_eq!(duration_bucket(u64::MAX), DURATION_BUCKETS - 1);
    }

    #[test]
    fn durations_keep_their_buckets_through_the_conversion_to_seconds() {
        let tally = Tally::default();
        let mut sink = Record::default();
        // Values on and just past bucket bounds (5 us, 10 us, 1 ms) and in between.
        let nanos = [
            5_000,
            5_001,
            9_999,
            10_000,
            10_001,
            999_999,
            1_000_000,
            7,
            2_000_000_000,
        ];
        for n in nanos {
            tally.record(|c| c.duration(n, duration_bucket(n)));
            tally.flush(&mut sink);
        }
        for n in [6_000, 6_001, 6_002, 9_000] {
            tally.record(|c| c.duration(n, duration_bucket(n)));
        }
        tally.flush(&mut sink);
        let all: Vec<u64> = nanos
            .iter()
            .chain(&[6_000, 6_001, 6_002, 9_000])
            .copied()
            .collect();
        assert_eq!(sink.durations, summary(&all, duration_bucket));
    }

    #[test]
    fn threads_record_on_their_own_shards_and_every_increment_is_collected_while_they_run() {
        let tally = std::sync::Arc::new(Tally::default());
        let writers: Vec<_> = (0..4)
            .map(|t| {
                let tally = tally.clone();
                std::thread::spawn(move || {
                    for i in 0..50_000u64 {
                        send(&tally, 1 + (i + t) % 5000);
                    }
                })
            })
            .collect();
        // Collect while the writers run, as a scrape would.
        let mut sink = Record::default();
        while !writers.iter().all(|w| w.is_finished()) {
            tally.flush(&mut sink);
        }
        for w in writers {
            w.join().unwrap();
        }
        tally.flush(&mut sink);
        let all: Vec<u64> = (0..4u64)
            .flat_map(|t| (0..50_000u64).map(move |i| 1 + (i + t) % 5000))
            .collect();
        assert_eq!(sink.messages[1][0], 200_000);
        assert_eq!(sink.io[1], all.iter().sum::<u64>());
        assert_eq!(sink.sizes[1], summary(&all, size_bucket));
    }

    #[test]
    fn a_thread_that_ends_hands_its_slot_to_the_next() {
        let tally = std::sync::Arc::new(Tally::default());
        for _ in 0..(SLOTS * 2) {
            let t = tally.clone();
            std::thread::spawn(move || send(&t, 10)).join().unwrap();
        }
        let mut sink = Record::default();
        tally.flush(&mut sink);
        assert_eq!(sink.messages[1][0], (SLOTS * 2) as u64);
        assert_eq!(sink.sizes[1], summary(&[10; SLOTS * 2], size_bucket));
    }
}
