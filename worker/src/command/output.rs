//! A run's output, bounded whatever the program writes: stdout and stderr read in chunks and cut
//! into lines (`\n` or `\r` ends one, as a terminal's progress bar does), a line past
//! [`MAX_OUTPUT_LINE`] cut and marked, the log file at most [`LOG_BYTES`] on disk, and reading
//! stopped on request even while a process the run left behind holds the pipe open.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// The most a run's log takes on disk: the file and its one older generation (`NAME.1`), each
/// cut at half of it.
pub const LOG_BYTES: u64 = 32 << 20;
/// The longest line of output kept whole; the rest of a longer one is dropped, and the line
/// marked.
pub const MAX_OUTPUT_LINE: usize = 64 << 10;
/// Lines of stderr quoted in a failed attempt's cause, each at most [`TAIL_CHARS`].
const STDERR_TAIL: usize = 20;
const TAIL_CHARS: usize = 500;
/// What ends a line of output: a terminal's progress bar ends its lines with `\r`.
const OUTPUT_ENDS: &[u8] = b"\n\r";
/// What one read takes from a pipe.
const CHUNK: usize = 64 << 10;

/// Cuts a byte stream into lines of at most `max` bytes: each call of `emit` gets one line with
/// its terminator (one of `ends`) and whether it was cut. Memory: at most `max` bytes.
pub struct Lines {
    max: usize,
    ends: &'static [u8],
    line: Vec<u8>,
    /// The current line was cut: its rest is being skipped.
    cutting: bool,
}

impl Lines {
    pub fn new(max: usize, ends: &'static [u8]) -> Lines {
        Lines {
            max,
            ends,
            line: Vec::new(),
            cutting: false,
        }
    }

    pub fn push(&mut self, mut bytes: &[u8], emit: &mut impl FnMut(&[u8], bool)) {
        while !bytes.is_empty() {
            let end = bytes.iter().position(|b| self.ends.contains(b));
            let (part, rest) = match end {
                Some(i) => (&bytes[..=i], &bytes[i + 1..]),
                None => (bytes, &[][..]),
            };
            bytes = rest;
            if !self.cutting {
                let room = self.max - self.line.len();
                if part.len() <= room {
                    self.line.extend_from_slice(part);
                } else {
                    self.line.extend_from_slice(&part[..room]);
                    emit(&self.line, true);
                    self.line.clear();
                    self.cutting = true;
                }
            }
            if end.is_some() {
                if !self.cutting {
                    emit(&self.line, false);
                }
                self.line.clear();
                self.cutting = false;
            }
        }
    }

    /// What is left at the end of the stream (a last line with no terminator).
    pub fn finish(&mut self, emit: &mut impl FnMut(&[u8], bool)) {
        if !self.line.is_empty() && !self.cutting {
            emit(&self.line, false);
        }
        self.line.clear();
    }
}

/// A run's log file: at half of [`LOG_BYTES`] the file becomes `NAME.1` (replacing the older
/// one) and writing goes on in a new one.
pub struct Log {
    path: PathBuf,
    file: std::io::BufWriter<std::fs::File>,
    written: u64,
}

impl Log {
    pub fn open(path: &Path) -> std::io::Result<Log> {
        Ok(Log {
            path: path.to_path_buf(),
            file: std::io::BufWriter::new(create_new(path)?),
            written: 0,
        })
    }

    pub fn write(&mut self, bytes: &[u8]) {
        if self.written + bytes.len() as u64 > LOG_BYTES / 2 {
            let mut older = self.path.clone().into_os_string();
            older.push(".1");
            let _ = self.file.flush();
            let reopened =
                std::fs::rename(&self.path, &older).and_then(|()| create_new(&self.path));
            match reopened {
                Ok(f) => {
                    self.file = std::io::BufWriter::new(f);
                    self.written = 0;
                }
                Err(e) => {
                    tracing::warn!(path = %self.path.display(), error = %e, "cannot rotate a run's log");
                    return;
                }
            }
        }
        if self.file.write_all(bytes).is_ok() {
            self.written += bytes.len() as u64;
        }
    }

    /// Writes out what is buffered (after each chunk read: the log is current within one).
    pub fn flush(&mut self) {
        let _ = self.file.flush();
    }
}

/// Creates `path` afresh for writing without following a symbolic link at it: whatever was
/// there (a program may have planted a link where its next run's file goes) is removed first,
/// and the file is made new.
pub fn create_new(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

/// The last lines of stderr, for a failed attempt's cause.
#[derive(Clone, Default)]
pub struct Tail(Arc<Mutex<VecDeque<String>>>);

impl Tail {
    fn push(&self, line: &[u8]) {
        let text = String::from_utf8_lossy(line);
        let text = text.trim_end();
        if text.is_empty() {
            return;
        }
        let mut tail = self.0.lock().unwrap_or_else(|p| p.into_inner());
        tail.push_back(text.chars().take(TAIL_CHARS).collect());
        if tail.len() > STDERR_TAIL {
            tail.pop_front();
        }
    }

    /// The lines as a cause quotes them.
    pub fn quoted(&self) -> String {
        let lines = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if lines.is_empty() {
            String::from("(nothing on stderr)")
        } else {
            format!(
                "last lines of stderr:\n{}",
                lines.iter().cloned().collect::<Vec<_>>().join("\n")
            )
        }
    }
}

/// One of the program's outputs.
pub type Pipe = Box<dyn ReadFd>;

/// What a pipe is to [`copy`]: readable, and pollable by its descriptor.
pub trait ReadFd: Read + AsRawFd + Send + 'static {}
impl<T: Read + AsRawFd + Send + 'static> ReadFd for T {}

/// Copies one of the program's outputs into the log, a line at a time, keeping the last lines
/// in `tail` when given. Ends at the end of the stream, or soon after `stop` is set, and says
/// so on `done`.
pub fn copy(
    out: Pipe,
    log: Arc<Mutex<Log>>,
    tail: Option<Tail>,
    stop: Arc<AtomicBool>,
    done: std::sync::mpsc::Sender<()>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut out = out;
        let mut lines = Lines::new(MAX_OUTPUT_LINE, OUTPUT_ENDS);
        let writer = log.clone();
        let mut emit = |line: &[u8], cut: bool| {
            let mut log = writer.lock().unwrap_or_else(|p| p.into_inner());
            log.write(line);
            if cut {
                log.write(format!(" [line cut: longer than {MAX_OUTPUT_LINE} bytes]\n").as_bytes());
            }
            if let Some(tail) = &tail {
                tail.push(line);
            }
        };
        let mut buf = vec![0u8; CHUNK];
        while readable(&*out, &stop) {
            match out.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    lines.push(&buf[..n], &mut emit);
                    log.lock().unwrap_or_else(|p| p.into_inner()).flush();
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        lines.finish(&mut emit);
        log.lock().unwrap_or_else(|p| p.into_inner()).flush();
        let _ = done.send(());
    })
}

/// Waits until `fd` has something to read (or has closed); false once `stop` is set.
fn readable(fd: &(impl AsRawFd + ?Sized), stop: &AtomicBool) -> bool {
    loop {
        if stop.load(Ordering::Relaxed) {
            return false;
        }
        let mut poll = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd, owned here, for 100 ms.
        let ready = unsafe { libc::poll(&mut poll, 1, 100) };
        if ready > 0 {
            return true;
        }
        if ready < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            return false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines_of(chunks: &[&[u8]], max: usize) -> Vec<(String, bool)> {
        let mut got = Vec::new();
        let mut lines = Lines::new(max, OUTPUT_ENDS);
        let mut emit = |l: &[u8], cut| got.push((String::from_utf8_lossy(l).into_owned(), cut));
        for c in chunks {
            lines.push(c, &mut emit);
        }
        lines.finish(&mut emit);
        got
    }

    #[test]
    fn carriage_returns_end_lines_and_long_lines_are_cut_once() {
        assert_eq!(
            lines_of(&[b"10%\r20", b"%\r", b"done\nlast"], 100),
            [
                ("10%\r".to_string(), false),
                ("20%\r".into(), false),
                ("done\n".into(), false),
                ("last".into(), false)
            ]
        );
        // A line of 25 bytes in chunks, against a cap of 8: its first 8 bytes, marked; the
        // next line whole.
        assert_eq!(
            lines_of(&[b"abcdefghij", b"klmnopqrst", b"uvwxy\nok\n"], 8),
            [("abcdefgh".to_string(), true), ("ok\n".into(), false)]
        );
    }

    #[test]
    fn the_log_holds_its_bound_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run.log");
        let mut log = Log::open(&path).unwrap();
        let line = vec![b'x'; 1 << 20];
        for _ in 0..100 {
            log.write(&line);
        }
        let size = |p: &Path| std::fs::metadata(p).map_or(0, |m| m.len());
        let older = dir.path().join("run.log.1");
        assert!(
            size(&path) + size(&older) <= LOG_BYTES,
            "{} {}",
            size(&path),
            size(&older)
        );
        assert!(size(&older) > 0);
    }

    #[test]
    fn a_link_where_the_log_goes_is_replaced_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "keep me").unwrap();
        let path = dir.path().join("run.log");
        std::os::unix::fs::symlink(&victim, &path).unwrap();
        let mut log = Log::open(&path).unwrap();
        log.write(b"output\n");
        log.flush();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep me");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "output\n");
    }
}
