//! stderr behind a bounded queue and a thread of its own, so that logging never holds the daemon
//! up or takes it down. A line that cannot be queued (nobody reads a full pipe) or written (the
//! pipe closed: `projector run 2>&1 | head`, a log shipper restarting) is dropped and counted,
//! and the next line written is preceded by a notice saying how many were lost.

use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::Arc;
use std::time::Duration;

use tracing_subscriber::fmt::MakeWriter;

/// Lines waiting to be written; past this many, new lines are dropped.
const QUEUED_LINES: usize = 4096;

enum Message {
    Line(Vec<u8>),
    /// Answered once every line queued before it has been written (or dropped).
    Flush(mpsc::Sender<()>),
}

/// The writer the log formatter writes each line to; cheap to clone.
#[derive(Clone)]
pub struct StderrQueue {
    sender: SyncSender<Message>,
    dropped: Arc<AtomicU64>,
}

impl StderrQueue {
    /// Starts the thread that writes the queued lines to `output`. `notice` is the line that
    /// says how many lines were dropped, in the log's own format.
    pub fn start(
        output: impl Write + Send + 'static,
        notice: fn(u64) -> String,
    ) -> io::Result<StderrQueue> {
        let (sender, receiver) = mpsc::sync_channel(QUEUED_LINES);
        let dropped = Arc::new(AtomicU64::new(0));
        let counted = dropped.clone();
        std::thread::Builder::new()
            .name("projector-log".into())
            .spawn(move || write_lines(receiver, output, &counted, notice))?;
        Ok(StderrQueue { sender, dropped })
    }

    /// Lines dropped since the start.
    pub fn lines_dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Waits until the lines queued so far are written, for at most `timeout`: a full pipe
    /// that nobody reads must not hold up an exit.
    pub fn flush(&self, timeout: Duration) {
        let (done, written) = mpsc::channel();
        if self.sender.try_send(Message::Flush(done)).is_ok() {
            let _ = written.recv_timeout(timeout);
        }
    }
}

impl Write for &StderrQueue {
    /// Never fails and never waits: the formatter calls this once per line, from any thread.
    fn write(&mut self, line: &[u8]) -> io::Result<usize> {
        if self.sender.try_send(Message::Line(line.to_vec())).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for StderrQueue {
    type Writer = &'a StderrQueue;

    fn make_writer(&'a self) -> Self::Writer {
        self
    }
}

fn write_lines(
    receiver: Receiver<Message>,
    mut output: impl Write,
    dropped: &AtomicU64,
    notice: fn(u64) -> String,
) {
    let mut reported = 0;
    while let Ok(message) = receiver.recv() {
        match message {
            Message::Line(line) => {
                let lost = dropped.load(Ordering::Relaxed);
                if lost > reported && output.write_all(notice(lost - reported).as_bytes()).is_ok() {
                    reported = lost;
                }
                if output.write_all(&line).is_err() {
                    dropped.fetch_add(1, Ordering::Relaxed);
                }
            }
            Message::Flush(done) => {
                let _ = output.flush();
                let _ = done.send(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// An output that fails while `closed` is set and keeps what it was given otherwise.
    #[derive(Clone, Default)]
    struct Pipe {
        written: Arc<Mutex<Vec<u8>>>,
        closed: Arc<std::sync::atomic::AtomicBool>,
    }

    impl Write for Pipe {
        fn write(&mut self, data: &[u8]) -> io::Result<usize> {
            if self.closed.load(Ordering::Relaxed) {
                return Err(io::Error::from(io::ErrorKind::BrokenPipe));
            }
            let mut written = self.written.lock().unwrap_or_else(|e| e.into_inner());
            written.extend_from_slice(data);
            Ok(data.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn notice(lost: u64) -> String {
        format!("[{lost} dropped]\n")
    }

    #[test]
    fn lines_that_cannot_be_written_are_counted_and_said_once_when_writing_works_again() {
        let pipe = Pipe::default();
        let queue = StderrQueue::start(pipe.clone(), notice).unwrap_or_else(|e| panic!("{e}"));
        let mut writer = queue.make_writer();
        let write = |writer: &mut &StderrQueue, line: &str| {
            assert!(writer.write_all(line.as_bytes()).is_ok(), "never an error");
        };
        write(&mut writer, "one\n");
        queue.flush(Duration::from_secs(10));
        pipe.closed.store(true, Ordering::Relaxed);
        write(&mut writer, "two\n");
        write(&mut writer, "three\n");
        queue.flush(Duration::from_secs(10));
        assert_eq!(queue.lines_dropped(), 2);
        pipe.closed.store(false, Ordering::Relaxed);
        write(&mut writer, "four\n");
        write(&mut writer, "five\n");
        queue.flush(Duration::from_secs(10));
        let written = pipe.written.lock().map(|w| w.clone()).unwrap_or_default();
        assert_eq!(
            String::from_utf8_lossy(&written),
            "one\n[2 dropped]\nfour\nfive\n"
        );
    }

    /// An output that never takes anything: a pipe nobody reads.
    struct Stuck(Receiver<()>);

    impl Write for Stuck {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            let _ = self.0.recv();
            Err(io::Error::from(io::ErrorKind::BrokenPipe))
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stuck_output_drops_lines_past_the_queue_without_waiting() {
        let (release, stuck) = mpsc::channel();
        let queue = StderrQueue::start(Stuck(stuck), notice).unwrap_or_else(|e| panic!("{e}"));
        let mut writer = queue.make_writer();
        for _ in 0..QUEUED_LINES + 100 {
            assert!(writer.write_all(b"line\n").is_ok());
        }
        // One line is with the stuck writer, QUEUED_LINES wait; the rest were dropped.
        assert!(queue.lines_dropped() >= 99, "{}", queue.lines_dropped());
        let started = std::time::Instant::now();
        queue.flush(Duration::from_millis(50));
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "a flush gives up"
        );
        drop(release);
    }
}
