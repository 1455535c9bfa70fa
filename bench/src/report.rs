//! The result of a run: a human summary, or exactly one JSON object with `--json`.

use std::io::Write;

use serde_json::{Map, Value, json};

use crate::cli::Common;
use crate::run::{Edges, Failures, Window};
use crate::scrape::Scrapes;

/// What a mode measured, with its failures.
pub struct Report {
    fields: Map<String, Value>,
    lines: Vec<String>,
    errors: Vec<String>,
    error_count: u64,
}

impl Report {
    pub fn new(mode: &str) -> Self {
        let mut fields = Map::new();
        fields.insert("mode".into(), mode.into());
        Report {
            fields,
            lines: Vec::new(),
            errors: Vec::new(),
            error_count: 0,
        }
    }

    pub fn set(&mut self, key: &str, value: impl Into<Value>) {
        self.fields.insert(key.into(), value.into());
    }

    /// A field as set (tests read reports back).
    #[cfg(test)]
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.fields.get(key)
    }

    pub fn line(&mut self, line: impl Into<String>) {
        self.lines.push(line.into());
    }

    pub fn error(&mut self, msg: impl Into<String>) {
        self.error_count += 1;
        if self.errors.len() < 10 {
            self.errors.push(msg.into());
        }
    }

    /// Takes over the failures the tasks recorded.
    pub fn failures(&mut self, f: &Failures) {
        self.error_count += f.count();
        for s in f.samples() {
            if self.errors.len() < 10 {
                self.errors.push(s);
            }
        }
    }

    pub fn ok(&self) -> bool {
        self.error_count == 0
    }

    /// The fields every load mode reports: settings, measured time, server and client CPU,
    /// and `work` (the mode's unit of work done inside the window) per second and per server
    /// CPU-second.
    pub fn common(
        &mut self,
        common: &Common,
        window: &Window,
        edges: &Edges,
        scrapes: Option<Scrapes>,
        work: u64,
        unit: &str,
    ) {
        let secs = window.measured().as_secs_f64();
        self.set("url", common.url.as_str());
        self.set(
            "warmup_s",
            window
                .measure_start
                .duration_since(window.start)
                .as_secs_f64(),
        );
        self.set("duration_s", secs);
        self.set(
            "rate_limit",
            common.rate.map(Value::from).unwrap_or(Value::Null),
        );
        self.set(unit, work);
        let per_s = work as f64 / secs;
        self.set(&format!("{unit}_per_s"), round1(per_s));
        self.set("client_cpu_s", round3(edges.client_cpu_s));
        if let Some(cpu) = edges.server_cpu_s {
            self.set(
                "server_pid",
                common.server_pid.map(Value::from).unwrap_or(Value::Null),
            );
            self.set("server_cpu_s", round3(cpu));
            let mut line = format!(
                "server CPU     {cpu:.2} s in {secs:.1} s ({:.0}% of a core)",
                100.0 * cpu / secs
            );
            // Held connections are a state, not work done per CPU-second.
            if unit != "held" {
                let per_cpu = if cpu > 0.0 { work as f64 / cpu } else { 0.0 };
                self.set(&format!("{unit}_per_server_cpu_s"), round1(per_cpu));
                line += &format!(": {} {unit} per server CPU-second", thousands(per_cpu));
            }
            self.line(line);
        } else if let Some(pid) = common.server_pid {
            self.error(format!(
                "cannot read /proc/{pid}/stat: is the server still running?"
            ));
        }
        if let Some(rss) = edges.server_rss {
            self.set("server_rss_bytes", rss);
        }
        self.line(format!(
            "client CPU     {:.2} s ({:.0}% of a core)",
            edges.client_cpu_s,
            100.0 * edges.client_cpu_s / secs
        ));
        if let (Some(s), Some(url)) = (scrapes, &common.scrape) {
            self.set(
                "scrapes",
                json!({"url": url, "ok": s.ok, "failed": s.failed, "bytes": s.bytes}),
            );
            self.line(format!(
                "scrapes        {} ok, {} failed ({url})",
                s.ok, s.failed
            ));
            if s.ok == 0 {
                self.error(format!("every scrape of {url} failed"));
            }
        }
    }

    /// Prints the report: one JSON object, or the human summary.
    pub fn print(&self, json: bool) {
        let mut out = std::io::stdout().lock();
        if json {
            let mut fields = self.fields.clone();
            fields.insert("ok".into(), self.ok().into());
            fields.insert("error_count".into(), self.error_count.into());
            fields.insert("errors".into(), self.errors.clone().into());
            let _ = writeln!(out, "{}", Value::Object(fields));
        } else {
            for l in &self.lines {
                let _ = writeln!(out, "{l}");
            }
            if !self.ok() {
                let _ = writeln!(out, "FAILED: {} error(s)", self.error_count);
            }
        }
        let _ = out.flush();
        if !self.ok() {
            for e in &self.errors {
                eprintln!("wsotel-bench: error: {e}");
            }
        }
    }
}

pub fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

pub fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// `1234567.8` as `1,234,568`.
pub fn thousands(x: f64) -> String {
    let n = x.round() as i64;
    let s = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 { format!("-{out}") } else { out }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        assert_eq!(thousands(1_234_567.8), "1,234,568");
        assert_eq!(thousands(999.0), "999");
        assert_eq!(thousands(-1000.0), "-1,000");
        let mut r = Report::new("echo");
        assert!(r.ok());
        r.error("x");
        assert!(!r.ok());
        assert_eq!(r.fields["mode"], "echo");
    }
}
