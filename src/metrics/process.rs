//! The process metrics every Prometheus exporter gives (`process_cpu_seconds_total`,
//! `process_resident_memory_bytes`, `process_open_fds`, `process_start_time_seconds`), read from
//! /proc at each scrape.

use std::sync::LazyLock;
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;

/// When the process started, as the metrics first read the clock (at start).
static STARTED: LazyLock<SystemTime> = LazyLock::new(SystemTime::now);

/// Takes the start time now: called once at start, so that it is the process's.
pub fn note_start() {
    LazyLock::force(&STARTED);
}

#[derive(Debug)]
pub struct ProcessCollector;

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        if let Some(seconds) = cpu_seconds() {
            let metric = encoder.encode_descriptor(
                "process_cpu_seconds",
                "User and system CPU time spent, in seconds",
                None,
                MetricType::Counter,
            )?;
            ConstCounter::new(seconds).encode(metric)?;
        }
        if let Some(bytes) = resident_bytes() {
            let metric = encoder.encode_descriptor(
                "process_resident_memory_bytes",
                "Resident memory size, in bytes",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(bytes).encode(metric)?;
        }
        if let Ok(entries) = std::fs::read_dir("/proc/self/fd") {
            let metric = encoder.encode_descriptor(
                "process_open_fds",
                "Open file descriptors",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(entries.count() as i64).encode(metric)?;
        }
        let started = STARTED
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |since| since.as_secs_f64());
        let metric = encoder.encode_descriptor(
            "process_start_time_seconds",
            "When the process started, in seconds since the Unix epoch",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(started).encode(metric)?;
        Ok(())
    }
}

/// utime + stime of /proc/self/stat (fields 14 and 15, after the command's parenthesis).
fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let after_command = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = after_command.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    let per_second = rustix::param::clock_ticks_per_second();
    Some(ticks as f64 / per_second as f64)
}

/// The resident pages of /proc/self/statm, in bytes.
fn resident_bytes() -> Option<i64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: i64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * rustix::param::page_size() as i64)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_process_figures_are_read() {
        assert!(super::cpu_seconds().is_some_and(|s| s >= 0.0));
        assert!(super::resident_bytes().is_some_and(|b| b > 0));
    }
}
