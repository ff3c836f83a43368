//! What a fetch tells the person watching, on stderr: a progress line (bytes, rate, ETA)
//! redrawn in place when stderr is a terminal, and notes (retries, the summary) unless quiet.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// Redraws at most this often: a terminal cannot show more, and each draw is a syscall.
const REDRAW: Duration = Duration::from_millis(100);
const BAR_WIDTH: usize = 24;

pub struct Progress {
    total: u64,
    done: u64,
    started: Instant,
    drawn: Option<Instant>,
    /// Draw the progress line (stderr is a terminal and not quiet).
    bar: bool,
    /// Print notes.
    notes: bool,
}

impl Progress {
    /// Reporting on stderr: the line only on a terminal, nothing at all when `quiet`.
    pub fn stderr(quiet: bool) -> Self {
        Self {
            total: 0,
            done: 0,
            started: Instant::now(),
            drawn: None,
            bar: !quiet && std::io::stderr().is_terminal(),
            notes: !quiet,
        }
    }

    /// Starts counting towards `total` bytes.
    pub fn start(&mut self, total: u64) {
        self.total = total;
        self.started = Instant::now();
    }

    /// `done` bytes of the total are on disk now.
    pub fn update(&mut self, done: u64) {
        self.done = done;
        if self.bar && self.drawn.is_none_or(|at| at.elapsed() >= REDRAW) {
            self.draw();
        }
    }

    /// Prints `message` on its own line, above the progress line.
    pub fn note(&mut self, message: &str) {
        if self.notes {
            self.clear();
            eprintln!("{message}");
            if self.bar {
                self.draw();
            }
        }
    }

    /// Removes the progress line for good.
    pub fn finish(&mut self) {
        self.clear();
        self.bar = false;
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    fn draw(&mut self) {
        let line = render(self.done, self.total, self.started.elapsed());
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "\r{line}\x1b[K");
        let _ = err.flush();
        self.drawn = Some(Instant::now());
    }

    fn clear(&mut self) {
        if self.drawn.take().is_some() {
            let _ = write!(std::io::stderr().lock(), "\r\x1b[K");
        }
    }
}

/// The progress line: `[#####...]  42.0%  420.0 MiB / 1.0 GiB  300.0 MiB/s  ETA 2s`.
pub fn render(done: u64, total: u64, elapsed: Duration) -> String {
    let fraction = if total == 0 {
        1.0
    } else {
        done as f64 / total as f64
    };
    let filled = ((fraction * BAR_WIDTH as f64) as usize).min(BAR_WIDTH);
    let rate = done as f64 / elapsed.as_secs_f64().max(1e-3);
    let eta = if rate > 0.0 {
        format_duration(total.saturating_sub(done) as f64 / rate)
    } else {
        "?".to_owned()
    };
    format!(
        "[{}{}] {:5.1}%  {} / {}  {}/s  ETA {eta}",
        "#".repeat(filled),
        ".".repeat(BAR_WIDTH - filled),
        fraction * 100.0,
        human_bytes(done),
        human_bytes(total),
        human_bytes(rate as u64),
    )
}

/// Bytes in binary units with one decimal: `795.0 KiB`; below 1 KiB exact: `40 B`.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// Seconds as `42s`, `3m05s` or `2h07m`.
fn format_duration(seconds: f64) -> String {
    let s = seconds.round() as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units() {
        assert_eq!(human_bytes(40), "40 B");
        assert_eq!(human_bytes(814_120), "795.0 KiB");
        assert_eq!(human_bytes(1 << 30), "1.0 GiB");
        assert_eq!(format_duration(4.4), "4s");
        assert_eq!(format_duration(185.0), "3m05s");
        assert_eq!(format_duration(7620.0), "2h07m");
    }

    #[test]
    fn progress_line() {
        let line = render(256 << 20, 1 << 30, Duration::from_secs(2));
        assert_eq!(
            line,
            "[######..................]  25.0%  256.0 MiB / 1.0 GiB  128.0 MiB/s  ETA 6s"
        );
        assert!(render(0, 0, Duration::ZERO).contains("100.0%"));
        assert!(render(0, 10, Duration::ZERO).ends_with("ETA ?"));
    }
}
