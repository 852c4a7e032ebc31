//! The CRI log format kubelet reads: one line per record,
//! `<RFC3339Nano timestamp> <stdout|stderr> <P|F> <content>`. A line longer than 16 KiB is
//! split into `P` (partial) records closed by an `F` (full) one. kubelet rotates the file by
//! renaming it and then asks for a reopen.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// The longest record content; longer lines become several records.
pub const MAX_RECORD: usize = 16 * 1024;

/// Which output a chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// stdout.
    Stdout,
    /// stderr.
    Stderr,
}

impl Stream {
    /// "stdout" or "stderr", as the log and the streaming protocols name it.
    pub fn name(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// A container's log file and the unfinished line of each stream.
pub struct LogWriter {
    dir: PathBuf,
    rel: PathBuf,
    file: File,
    partial: [Vec<u8>; 2],
}

/// Opens `rel` beneath `dir` (the pod's log directory, kubelet's own) for appending, making
/// it and its directories where missing. Nothing under `dir` is followed if it is a link: a
/// link placed at the log's path would otherwise have root append to any node file.
fn open(dir: &Path, rel: &Path) -> std::io::Result<File> {
    use rustix::fs::{Mode, OFlags, ResolveFlags};
    std::fs::create_dir_all(dir)?;
    let how = ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
    let names: Vec<&std::ffi::OsStr> = rel
        .components()
        .map(|c| match c {
            std::path::Component::Normal(n) => Ok(n),
            _ => Err(std::io::Error::other(format!(
                "log path {} leaves the log directory",
                rel.display()
            ))),
        })
        .collect::<Result<_, _>>()?;
    let (name, parents) = names
        .split_last()
        .ok_or_else(|| std::io::Error::other("empty log path"))?;
    let mut cur = rustix::fs::open(
        dir,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    for p in parents {
        match rustix::fs::mkdirat(&cur, *p, Mode::from_raw_mode(0o755)) {
            Ok(()) | Err(rustix::io::Errno::EXIST) => {}
            Err(e) => return Err(e.into()),
        }
        cur = rustix::fs::openat2(
            &cur,
            *p,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
            how,
        )?;
    }
    let fd = rustix::fs::openat2(
        &cur,
        *name,
        OFlags::WRONLY | OFlags::CREATE | OFlags::APPEND | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o640),
        how,
    )?;
    let file = File::from(fd);
    // A FIFO or a device placed there would block the monitor or reach a device.
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::other("the log path is not a regular file"));
    }
    Ok(file)
}

impl LogWriter {
    /// Opens (creating it and its directories) the log at `rel` beneath the directory `dir`.
    pub fn open(dir: &Path, rel: &Path) -> std::io::Result<LogWriter> {
        Ok(LogWriter {
            file: open(dir, rel)?,
            dir: dir.to_owned(),
            rel: rel.to_owned(),
            partial: [Vec::new(), Vec::new()],
        })
    }

    /// Opens the path again: after kubelet renamed the file, a new one starts there.
    pub fn reopen(&mut self) -> std::io::Result<()> {
        self.file = open(&self.dir, &self.rel)?;
        Ok(())
    }

    /// Records what a stream produced. Complete lines become `F` records at once; an
    /// unfinished line waits for its end, unless it reached 16 KiB, which makes a `P` record.
    pub fn write(&mut self, stream: Stream, data: &[u8]) -> std::io::Result<()> {
        let ts = timestamp(SystemTime::now());
        let mut out = Vec::with_capacity(data.len() + 64);
        let idx = stream as usize;
        let mut rest = data;
        while !rest.is_empty() {
            match rest.iter().position(|b| *b == b'\n') {
                Some(nl) => {
                    let mut line = std::mem::take(&mut self.partial[idx]);
                    line.extend_from_slice(&rest[..nl]);
                    emit(&mut out, &ts, stream, &line);
                    rest = &rest[nl + 1..];
                }
                None => {
                    self.partial[idx].extend_from_slice(rest);
                    rest = &[];
                }
            }
        }
        // Long unfinished lines go out in 16 KiB partial records.
        while self.partial[idx].len() >= MAX_RECORD {
            let chunk: Vec<u8> = self.partial[idx].drain(..MAX_RECORD).collect();
            record(&mut out, &ts, stream, "P", &chunk);
        }
        if out.is_empty() {
            Ok(())
        } else {
            self.file.write_all(&out)
        }
    }

    /// At the end of a stream: an unfinished line is written as a full record.
    pub fn finish(&mut self, stream: Stream) -> std::io::Result<()> {
        let idx = stream as usize;
        if self.partial[idx].is_empty() {
            return Ok(());
        }
        let line = std::mem::take(&mut self.partial[idx]);
        let mut out = Vec::new();
        emit(&mut out, &timestamp(SystemTime::now()), stream, &line);
        self.file.write_all(&out)
    }
}

/// A whole line: `P` records of 16 KiB, then the `F` record with the remainder.
fn emit(out: &mut Vec<u8>, ts: &str, stream: Stream, line: &[u8]) {
    let mut line = line;
    while line.len() > MAX_RECORD {
        record(out, ts, stream, "P", &line[..MAX_RECORD]);
        line = &line[MAX_RECORD..];
    }
    record(out, ts, stream, "F", line);
}

fn record(out: &mut Vec<u8>, ts: &str, stream: Stream, tag: &str, content: &[u8]) {
    out.extend_from_slice(ts.as_bytes());
    out.push(b' ');
    out.extend_from_slice(stream.name().as_bytes());
    out.push(b' ');
    out.extend_from_slice(tag.as_bytes());
    out.push(b' ');
    out.extend_from_slice(content);
    out.push(b'\n');
}

/// RFC 3339 with nanoseconds, UTC: `2006-01-02T15:04:05.999999999Z`.
pub fn timestamp(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, dd) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{dd:02}T{:02}:{:02}:{:02}.{:09}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_nanos()
    )
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn lines(p: &Path) -> Vec<(String, String, String)> {
        std::fs::read_to_string(p)
            .unwrap()
            .lines()
            .map(|l| {
                let mut f = l.splitn(4, ' ');
                let _ts = f.next().unwrap();
                (
                    f.next().unwrap().into(),
                    f.next().unwrap().into(),
                    f.next().unwrap_or("").into(),
                )
            })
            .collect()
    }

    #[test]
    fn timestamps_are_rfc3339_nano_utc() {
        let t = UNIX_EPOCH + Duration::new(1_795_819_021, 123_456_789);
        assert_eq!(timestamp(t), "2026-11-27T22:37:01.123456789Z");
        assert_eq!(timestamp(UNIX_EPOCH), "1970-01-01T00:00:00.000000000Z");
        assert_eq!(
            timestamp(UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00.000000000Z"
        );
    }

    #[test]
    fn lines_streams_and_partial_lines() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("sub/dir/0.log");
        let mut w = LogWriter::open(d.path(), Path::new("sub/dir/0.log")).unwrap();
        w.write(Stream::Stdout, b"hello\nwor").unwrap();
        w.write(Stream::Stderr, b"oops\n").unwrap();
        w.write(Stream::Stdout, b"ld\n\nlast").unwrap();
        w.finish(Stream::Stdout).unwrap();
        assert_eq!(
            lines(&p),
            vec![
                ("stdout".into(), "F".into(), "hello".into()),
                ("stderr".into(), "F".into(), "oops".into()),
                ("stdout".into(), "F".into(), "world".into()),
                ("stdout".into(), "F".into(), "".into()),
                ("stdout".into(), "F".into(), "last".into()),
            ]
        );
    }

    #[test]
    fn a_40k_line_becomes_two_partial_records_and_a_full_one() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("0.log");
        let mut w = LogWriter::open(d.path(), Path::new("0.log")).unwrap();
        let line = vec![b'x'; 40 * 1024];
        // Written in small pieces, as a pipe delivers it.
        for c in line.chunks(4000) {
            w.write(Stream::Stdout, c).unwrap();
        }
        w.write(Stream::Stdout, b"\n").unwrap();
        let l = lines(&p);
        assert_eq!(
            l.iter().map(|x| x.1.as_str()).collect::<Vec<_>>(),
            ["P", "P", "F"]
        );
        assert_eq!(l[0].2.len(), MAX_RECORD);
        assert_eq!(l[1].2.len(), MAX_RECORD);
        assert_eq!(l[2].2.len(), 40 * 1024 - 2 * MAX_RECORD);
    }

    #[test]
    fn reopen_follows_a_rename() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("0.log");
        let mut w = LogWriter::open(d.path(), Path::new("0.log")).unwrap();
        w.write(Stream::Stdout, b"before\n").unwrap();
        std::fs::rename(&p, d.path().join("0.log.1")).unwrap();
        w.reopen().unwrap();
        w.write(Stream::Stdout, b"after\n").unwrap();
        assert_eq!(
            lines(&p),
            vec![("stdout".into(), "F".into(), "after".into())]
        );
        assert_eq!(lines(&d.path().join("0.log.1"))[0].2, "before");
    }

    #[test]
    fn links_beneath_the_log_directory_are_never_followed() {
        let d = tempfile::tempdir().unwrap();
        let outside = d.path().join("node-file");
        std::fs::write(&outside, b"node\n").unwrap();
        let logs = d.path().join("logs");
        std::fs::create_dir_all(logs.join("c")).unwrap();
        std::os::unix::fs::symlink(&outside, logs.join("c/0.log")).unwrap();
        std::os::unix::fs::symlink(d.path(), logs.join("up")).unwrap();
        assert!(LogWriter::open(&logs, Path::new("c/0.log")).is_err());
        assert!(LogWriter::open(&logs, Path::new("up/node-file")).is_err());
        assert!(LogWriter::open(&logs, Path::new("../node-file")).is_err());
        assert_eq!(std::fs::read(&outside).unwrap(), b"node\n");
    }
}
