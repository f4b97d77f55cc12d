//! Log lines to stdout, many to a `write`.
//!
//! A busy worker logs two lines per task. Written one `write` each, every line wakes whatever
//! reads the other end of stdout (a container engine's pipe, journald's socket), and on this
//! project's machine that wake-up was a tenth of a worker's CPU per HTTP-target task
//! (docs/PERFORMANCE.md). Here a line is appended to a buffer; the first line into an empty
//! buffer wakes a thread of ours, which lets more gather for [`LINGER`] and writes them all
//! at once. A line thus reaches stdout at most [`LINGER`] late, and an idle process wakes
//! nobody. tracing-appender's non-blocking writer was measured first: it wakes its thread for
//! every line, which cost more than the `write` it saved.
//!
//! Order is kept: whoever writes to stdout holds its lock from taking lines out of the buffer
//! to having written them. A line that would take the buffer past [`LIMIT`] is written, with
//! the buffer, by the thread that logs it, so memory stays bounded when stdout is slower than
//! the logs (that thread waits on the pipe, as every logging thread did when each line was a
//! `write`). The lines still buffered are written when the [`Stdout`] from [`Stdout::start`]
//! is dropped: on the way out of `main`, and when a panic unwinds through it; a panic's own
//! line is written at once. A process killed outright (SIGKILL, an OOM kill) loses the lines
//! of its last [`LINGER`], which a `write` each would have left in the pipe: a task's record
//! is its events, confirmed before its ack, not its log lines.

use std::{
    io::{self, Write},
    sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError},
    thread::JoinHandle,
    time::Duration,
};

use tracing_subscriber::fmt::MakeWriter;

/// How long the writing thread lets lines gather after the first.
pub const LINGER: Duration = Duration::from_millis(5);

/// Bytes buffered past which a line's own thread writes them.
const LIMIT: usize = 256 * 1024;

/// The buffer and the state the writing thread waits on.
#[derive(Default)]
struct Lines {
    bytes: Vec<u8>,
    /// Set when the writing thread is to write what is left and stop.
    closing: bool,
}

struct Shared {
    /// Where lines go; held from taking lines out of the buffer to having written them.
    out: Mutex<Box<dyn Write + Send>>,
    lines: Mutex<Lines>,
    /// Signalled when the first line goes into an empty buffer, and on closing.
    ready: Condvar,
}

impl Shared {
    fn lines(&self) -> MutexGuard<'_, Lines> {
        // A thread that panicked while holding the lock left whole lines or none: the buffer
        // is only ever extended by a whole line, or emptied.
        self.lines.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Takes what is buffered and writes it, and `extra` after it, holding the output's lock
    /// throughout so that no other writer's lines come between.
    fn write_out(&self, spare: &mut Vec<u8>, extra: &[u8]) {
        let mut out = self.out.lock().unwrap_or_else(PoisonError::into_inner);
        {
            let mut lines = self.lines();
            std::mem::swap(&mut lines.bytes, spare);
        }
        spare.extend_from_slice(extra);
        // As tracing's own writer does, a log that cannot be written is not an error of the
        // program's: nothing is left to report it to.
        let _ = out.write_all(spare).and_then(|()| out.flush());
        spare.clear();
    }
}

/// The writer for the log layer, and, dropped, the last of its lines written.
pub struct Stdout {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl Stdout {
    /// Starts the writing thread for the process's stdout.
    pub fn start() -> Self {
        Self::to(Box::new(io::stdout()))
    }

    /// Starts the writing thread for `out`. Without a thread (the system refused one), every
    /// line is written at once by its own thread.
    fn to(out: Box<dyn Write + Send>) -> Self {
        let shared = Arc::new(Shared {
            out: Mutex::new(out),
            lines: Mutex::new(Lines::default()),
            ready: Condvar::new(),
        });
        let writer = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("offload-log".into())
            .spawn(move || write_lines(&writer))
            .ok();
        if thread.is_none() {
            shared.lines().closing = true;
        }
        Self { shared, thread }
    }

    /// What the log layer writes through.
    pub fn writer(&self) -> LineWriter {
        LineWriter {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl Drop for Stdout {
    fn drop(&mut self) {
        self.shared.lines().closing = true;
        self.shared.ready.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The writing thread: waits for a first line, lets others gather, writes them together.
fn write_lines(shared: &Shared) {
    let mut spare = Vec::new();
    loop {
        let closing = {
            let mut lines = shared.lines();
            while lines.bytes.is_empty() && !lines.closing {
                lines = shared
                    .ready
                    .wait(lines)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            lines.closing
        };
        if !closing {
            std::thread::sleep(LINGER);
        }
        shared.write_out(&mut spare, &[]);
        if closing {
            return;
        }
    }
}

/// Appends each line to the buffer.
pub struct LineWriter {
    shared: Arc<Shared>,
}

impl LineWriter {
    /// Writes what is buffered now, on this thread.
    pub fn write_now(&self) {
        self.shared.write_out(&mut Vec::new(), &[]);
    }
}

/// tracing's log layer formats a whole line, then writes it with one `write_all`.
impl Write for &LineWriter {
    fn write(&mut self, line: &[u8]) -> io::Result<usize> {
        let mut lines = self.shared.lines();
        if lines.closing || lines.bytes.len() + line.len() > LIMIT {
            // No thread to write it (gone, or never started), or stdout is behind: written
            // here, after what is buffered.
            drop(lines);
            self.shared.write_out(&mut Vec::new(), line);
            return Ok(line.len());
        }
        let first = lines.bytes.is_empty();
        lines.bytes.extend_from_slice(line);
        drop(lines);
        if first {
            self.shared.ready.notify_one();
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for LineWriter {
    type Writer = &'a Self;

    fn make_writer(&'a self) -> &'a Self {
        self
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    /// An output the test can read while the writer holds it.
    #[derive(Clone, Default)]
    struct Seen(Arc<Mutex<Vec<u8>>>);

    impl Write for Seen {
        fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
            self.0
                .lock()
                .expect("not poisoned")
                .extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Seen {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().expect("not poisoned").clone()).expect("lines are text")
        }
    }

    #[test]
    fn every_line_arrives_whole_and_in_each_threads_order() {
        let seen = Seen::default();
        let stdout = Stdout::to(Box::new(seen.clone()));
        let writer = stdout.writer();
        std::thread::scope(|scope| {
            for thread in 0..4 {
                let writer = &writer;
                scope.spawn(move || {
                    for line in 0..5_000 {
                        // Long enough that the buffer passes LIMIT and some are written inline.
                        let text = format!("{thread} {line} {}\n", "x".repeat(100));
                        (&*writer).write_all(text.as_bytes()).expect("never fails");
                    }
                });
            }
        });
        drop(stdout);
        let text = seen.text();
        let mut next = [0; 4];
        for line in text.lines() {
            let mut fields = line.split(' ');
            let thread: usize = fields
                .next()
                .and_then(|t| t.parse().ok())
                .expect("a thread");
            let number: usize = fields
                .next()
                .and_then(|n| n.parse().ok())
                .expect("a number");
            assert_eq!(fields.next().map(str::len), Some(100), "{line}");
            assert_eq!(number, next[thread], "thread {thread} out of order");
            next[thread] += 1;
        }
        assert_eq!(next, [5_000; 4]);
    }

    #[test]
    fn a_line_goes_out_soon_without_a_drop_and_after_it_at_once() {
        let seen = Seen::default();
        let stdout = Stdout::to(Box::new(seen.clone()));
        let writer = stdout.writer();
        (&writer).write_all(b"first\n").expect("never fails");
        let deadline = Instant::now() + Duration::from_secs(10);
        while seen.text().is_empty() {
            assert!(Instant::now() < deadline, "the line was never written");
            std::thread::yield_now();
        }
        assert_eq!(seen.text(), "first\n");
        drop(stdout);
        // No thread now: written by the caller, before write_all returns.
        (&writer).write_all(b"after\n").expect("never fails");
        assert_eq!(seen.text(), "first\nafter\n");
    }
}
