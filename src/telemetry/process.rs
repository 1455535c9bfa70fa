//! Process metrics from `/proc/self`, named per the OpenTelemetry semantic conventions.
//!
//! They are observable instruments: nothing runs between collections, and each collection (a
//! Prometheus scrape or an OTLP export) reads `/proc` once per instrument. Linux only, like the
//! server's deployment targets; on a read failure the instrument reports nothing for that cycle
//! rather than a wrong value.

use std::sync::OnceLock;
use std::time::Instant;

use opentelemetry::KeyValue;
use opentelemetry::metrics::Meter;

static STARTED: OnceLock<Instant> = OnceLock::new();

/// Marks the process start for `process.uptime`. Called as early as possible by `main`; later
/// calls change nothing.
pub fn mark_start() {
    STARTED.get_or_init(Instant::now);
}

/// The fields of `/proc/self/stat` that the instruments need.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Stat {
    pub user_seconds: f64,
    pub system_seconds: f64,
    pub threads: i64,
    pub virtual_bytes: i64,
    pub resident_bytes: i64,
}

/// Parses `/proc/self/stat`. The command name (field 2) may contain spaces and parentheses, so
/// fields are counted from the last `)`.
pub(crate) fn parse_stat(text: &str, ticks_per_second: f64, page_size: i64) -> Option<Stat> {
    let rest = &text[text.rfind(')')? + 1..];
    // After the `)`, the fields start at field 3 (state); field N is index N - 3.
    let f: Vec<&str> = rest.split_ascii_whitespace().collect();
    let num = |n: usize| f.get(n - 3)?.parse::<i64>().ok();
    Some(Stat {
        user_seconds: num(14)? as f64 / ticks_per_second,
        system_seconds: num(15)? as f64 / ticks_per_second,
        threads: num(20)?,
        virtual_bytes: num(23)?,
        resident_bytes: num(24)? * page_size,
    })
}

fn read_stat() -> Option<Stat> {
    let text = std::fs::read_to_string("/proc/self/stat").ok()?;
    // SAFETY: sysconf has no preconditions and only reads a configuration value.
    let (ticks, page) = unsafe {
        (
            libc::sysconf(libc::_SC_CLK_TCK),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    if ticks <= 0 || page <= 0 {
        return None;
    }
    parse_stat(&text, ticks as f64, page)
}

/// Open file descriptors of this process.
pub fn open_fds() -> Option<i64> {
    Some(std::fs::read_dir("/proc/self/fd").ok()?.count() as i64)
}

/// Registers the process instruments on `meter`. The instruments live as long as the meter
/// provider; the returned handles need not be kept.
pub(crate) fn register(meter: &Meter) {
    mark_start();
    meter
        .f64_observable_counter("process.cpu.time")
        .with_unit("s")
        .with_description("CPU seconds used by this process, by cpu.mode.")
        .with_callback(|o| {
            if let Some(s) = read_stat() {
                o.observe(s.user_seconds, &[KeyValue::new("cpu.mode", "user")]);
                o.observe(s.system_seconds, &[KeyValue::new("cpu.mode", "system")]);
            }
        })
        .build();
    meter
        .i64_observable_up_down_counter("process.memory.usage")
        .with_unit("By")
        .with_description("Resident set size of this process.")
        .with_callback(|o| {
            if let Some(s) = read_stat() {
                o.observe(s.resident_bytes, &[]);
            }
        })
        .build();
    meter
        .i64_observable_up_down_counter("process.memory.virtual")
        .with_unit("By")
        .with_description("Virtual memory size of this process.")
        .with_callback(|o| {
            if let Some(s) = read_stat() {
                o.observe(s.virtual_bytes, &[]);
            }
        })
        .build();
    meter
        .i64_observable_up_down_counter("process.unix.file_descriptor.count")
        .with_unit("{file_descriptor}")
        .with_description("Open file descriptors of this process.")
        .with_callback(|o| {
            if let Some(n) = open_fds() {
                o.observe(n, &[]);
            }
        })
        .build();
    meter
        .i64_observable_up_down_counter("process.unix.file_descriptor.limit")
        .with_unit("{file_descriptor}")
        .with_description("The soft open-file limit (RLIMIT_NOFILE) of this process.")
        .with_callback(|o| {
            if let Some(n) = crate::limits::open_file_limit() {
                o.observe(i64::try_from(n).unwrap_or(i64::MAX), &[]);
            }
        })
        .build();
    meter
        .i64_observable_up_down_counter("process.thread.count")
        .with_unit("{thread}")
        .with_description("Threads of this process.")
        .with_callback(|o| {
            if let Some(s) = read_stat() {
                o.observe(s.threads, &[]);
            }
        })
        .build();
    meter
        .f64_observable_gauge("process.uptime")
        .with_unit("s")
        .with_description("Seconds since this process started.")
        .with_callback(|o| {
            if let Some(start) = STARTED.get() {
                o.observe(start.elapsed().as_secs_f64(), &[]);
            }
        })
        .build();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_odd_command_names() {
        let line = "4242 (ws (otel) x) S 1 4242 4242 0 -1 4194560 1000 0 0 0 250 130 0 0 20 0 \
                    7 0 12345 104857600 2560 18446744073709551615 0 0 0 0 0 0 0 0 0 0 0 0 17 1";
        let s = parse_stat(line, 100.0, 4096).unwrap();
        assert_eq!(s.user_seconds, 2.5);
        assert_eq!(s.system_seconds, 1.3);
        assert_eq!(s.threads, 7);
        assert_eq!(s.virtual_bytes, 104857600);
        assert_eq!(s.resident_bytes, 2560 * 4096);
    }

    #[test]
    fn reads_this_process() {
        let s = read_stat().expect("/proc/self/stat");
        assert!(s.threads >= 1);
        assert!(s.resident_bytes > 0);
        assert!(open_fds().unwrap() >= 3);
    }
}
