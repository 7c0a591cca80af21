//! The live progress line of a long statement: after about a second, one line on stderr (only on
//! a terminal) with the elapsed time, the rows produced so far, and — when the input's size is
//! known — how much of it the scans have read, as a percentage and a bar. The scans' live
//! `output_rows` metrics are read against their row-count statistics (exact for in-memory tables
//! and Parquet metadata). The line is cleared when the statement ends or is cancelled.

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use datafusion::common::stats::Precision;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::statistics::{StatisticsArgs, StatisticsContext};

/// When the line first appears.
const DELAY: Duration = Duration::from_millis(1000);
/// How often it is redrawn.
const EVERY: Duration = Duration::from_millis(200);
/// Characters of the bar.
const BAR: usize = 20;

/// The leaves of `plan` (its scans).
fn leaves(plan: &Arc<dyn ExecutionPlan>, out: &mut Vec<Arc<dyn ExecutionPlan>>) {
    if plan.children().is_empty() {
        out.push(Arc::clone(plan));
    }
    for child in plan.children() {
        leaves(child, out);
    }
}

/// The rows the scans will read, if every scan knows its size.
fn total_rows(scans: &[Arc<dyn ExecutionPlan>]) -> Option<usize> {
    let statistics = StatisticsContext::new();
    let args = StatisticsArgs::new();
    scans
        .iter()
        .map(
            |scan| match statistics.compute(scan.as_ref(), &args).ok()?.num_rows {
                Precision::Exact(n) | Precision::Inexact(n) => Some(n),
                Precision::Absent => None,
            },
        )
        .sum()
}

/// The rows the scans have read so far (their live `output_rows` metrics).
fn scanned_rows(scans: &[Arc<dyn ExecutionPlan>]) -> usize {
    scans
        .iter()
        .filter_map(|scan| scan.metrics()?.output_rows())
        .sum()
}

/// The text of the line.
pub fn line(elapsed: Duration, rows: usize, done: Option<(usize, usize)>) -> String {
    let mut text = format!("{:.1} s, {rows} rows", elapsed.as_secs_f64());
    if let Some((scanned, total)) = done.filter(|&(_, total)| total > 0) {
        let fraction = (scanned as f64 / total as f64).clamp(0.0, 1.0);
        let filled = (fraction * BAR as f64).round() as usize;
        text.push_str(&format!(
            "  [{}{}] {:>3.0}%",
            "#".repeat(filled),
            "-".repeat(BAR - filled),
            fraction * 100.0
        ));
    }
    text
}

/// A statement's progress line, drawn by a task of its own until dropped (which clears it).
pub struct Progress {
    task: tokio::task::JoinHandle<()>,
    drawn: Arc<AtomicUsize>,
}

impl Progress {
    /// Starts the line for the statement running `plan`; `rows` is the count of result rows the
    /// caller keeps up to date.
    pub fn start(plan: &Arc<dyn ExecutionPlan>, rows: Arc<AtomicUsize>) -> Progress {
        let mut scans = Vec::new();
        leaves(plan, &mut scans);
        let total = total_rows(&scans);
        Progress::drawing(move |elapsed| {
            let done = total.map(|total| (scanned_rows(&scans), total));
            Some(line(elapsed, rows.load(Ordering::Relaxed), done))
        })
    }

    /// The line of a `CREATE FUNCTION ... LANGUAGE rust` being compiled: the elapsed time and
    /// what the build is doing (crates built so far), drawn while the build reports something.
    pub fn compiling(status: udf_engine::compile::CompileStatus) -> Progress {
        Progress::drawing(move |elapsed| {
            let now = status.now();
            (!now.is_empty()).then(|| format!("{:.1} s, {now}", elapsed.as_secs_f64()))
        })
    }

    /// A line drawn by a task of its own: after [`DELAY`], every [`EVERY`], the text `text`
    /// gives for the elapsed time (nothing drawn when it gives none).
    fn drawing(mut text: impl FnMut(Duration) -> Option<String> + Send + 'static) -> Progress {
        let drawn = Arc::new(AtomicUsize::new(0));
        let drawn_by_task = Arc::clone(&drawn);
        let started = Instant::now();
        let task = tokio::spawn(async move {
            tokio::time::sleep(DELAY).await;
            let mut tick = tokio::time::interval(EVERY);
            loop {
                tick.tick().await;
                let Some(text) = text(started.elapsed()) else {
                    continue;
                };
                let mut err = std::io::stderr().lock();
                // Carriage return and "erase line": the line is redrawn in place.
                let _ = write!(err, "\r\x1b[2K{text}");
                let _ = err.flush();
                drawn_by_task.store(1, Ordering::Relaxed);
            }
        });
        Progress { task, drawn }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.task.abort();
        if self.drawn.load(Ordering::Relaxed) > 0 {
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[2K");
            let _ = err.flush();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_shows_time_rows_and_a_bar_when_the_size_is_known() {
        let d = Duration::from_millis(2500);
        assert_eq!(line(d, 12, None), "2.5 s, 12 rows");
        assert_eq!(
            line(d, 0, Some((25, 100))),
            "2.5 s, 0 rows  [#####---------------]  25%"
        );
        assert_eq!(
            line(d, 0, Some((300, 100))),
            "2.5 s, 0 rows  [####################] 100%"
        );
        assert_eq!(line(d, 0, Some((0, 0))), "2.5 s, 0 rows");
    }
}
