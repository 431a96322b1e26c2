//! Logging stage: one JSON object per flow, written when it ends, through a
//! bounded queue drained by a dedicated thread. A blocked stdout or file never
//! stalls relaying: when the queue is full the line is dropped and counted.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::time::SystemTime;

use prometheus_client::metrics::counter::Counter;
use serde::Serialize;

use crate::config::AccessLog;

/// The access log record of DESIGN §4.
#[derive(Debug, Clone, Serialize)]
pub struct FlowRecord {
    pub ts: String,
    pub client: SocketAddr,
    pub dst: Option<SocketAddr>,
    pub upstream: Option<SocketAddr>,
    pub protocol: &'static str,
    pub name: Option<String>,
    pub decision: &'static str,
    pub entry: Option<String>,
    pub reason: Option<&'static str>,
    pub ech: bool,
    pub bytes_up: u64,
    pub bytes_down: u64,
    pub duration_ms: u64,
    pub error: Option<String>,
}

/// Queue capacity: enough for bursts of short flows while the reader is slow.
const QUEUE: usize = 8192;

#[derive(Clone)]
pub struct AccessLogger {
    tx: Option<SyncSender<String>>,
    dropped: Counter,
}

impl AccessLogger {
    pub fn new(target: &AccessLog, dropped: Counter) -> std::io::Result<AccessLogger> {
        let mut out: Box<dyn Write + Send> = match target {
            AccessLog::Off => return Ok(AccessLogger { tx: None, dropped }),
            AccessLog::Stdout => Box::new(std::io::stdout()),
            AccessLog::File(p) => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)?,
            ),
        };
        let (tx, rx) = sync_channel::<String>(QUEUE);
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || {
                let mut buf = Vec::with_capacity(64 * 1024);
                while let Ok(line) = rx.recv() {
                    buf.extend_from_slice(line.as_bytes());
                    // Batch whatever else is queued into one write.
                    while let Ok(more) = rx.try_recv() {
                        buf.extend_from_slice(more.as_bytes());
                        if buf.len() > 60 * 1024 {
                            break;
                        }
                    }
                    if out.write_all(&buf).and_then(|_| out.flush()).is_err() {
                        // Nothing sensible to do: the diagnostics stream
                        // says so once per failing batch.
                        eprintln!("portcullis: access log write failed");
                    }
                    buf.clear();
                }
            })?;
        Ok(AccessLogger {
            tx: Some(tx),
            dropped,
        })
    }

    pub fn log(&self, rec: &FlowRecord) {
        let Some(tx) = &self.tx else { return };
        let mut line = match serde_json::to_string(rec) {
            Ok(l) => l,
            Err(_) => return,
        };
        line.push('\n');
        match tx.try_send(line) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.dropped.inc();
            }
        }
    }
}

/// RFC 3339 UTC timestamp with milliseconds, without a date crate.
pub fn timestamp(t: SystemTime) -> String {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let ms = d.subsec_millis();
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (h, m, s) = (rem / 3600, (rem % 3600) / 60, rem % 60);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = if month <= 2 { y + 1 } else { y };
    format!("{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}.{ms:03}Z")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn timestamps() {
        assert_eq!(
            timestamp(SystemTime::UNIX_EPOCH),
            "1970-01-01T00:00:00.000Z"
        );
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_796_001_784_123);
        assert_eq!(timestamp(t), "2026-11-30T01:23:04.123Z");
        let leap = SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(timestamp(leap), "2000-02-29T00:00:00.000Z");
    }
}
