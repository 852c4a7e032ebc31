//! Process titles: what `ps` shows for berth's helper processes. The zygote, the monitors and
//! the pod inits are forks of one process, so without this they would all show the zygote's
//! command line. The argument area the kernel set up at exec is rewritten in place, as
//! setproctitle(3) does, so each says what it is (`berth-monitor <pod id>`).

use std::ffi::CStr;

/// Room the zygote is started with for its children's titles: enough for a prefix and a full
/// 64-digit pod id.
pub const ROOM: usize = 96;

/// Sets the process name (`comm`, 15 bytes at most) and the command line to `title`, cut to the
/// room the argument area has.
pub fn set(comm: &CStr, title: &str) {
    let _ = rustix::thread::set_name(comm);
    let Some((start, end)) = arg_area() else {
        return;
    };
    let len = end - start;
    if len < 2 {
        return;
    }
    let bytes = title.as_bytes();
    let n = bytes.len().min(len - 2);
    // SAFETY: [start, end) is this process's own argument area, which the kernel mapped
    // writable on its stack at exec and which no Rust value owns (std only keeps raw pointers
    // into it). It is overwritten within its bounds: the title, a NUL, NULs up to the last byte,
    // and a space there. A non-NUL last byte is the kernel's sign that the area holds a title:
    // /proc/PID/cmdline then reads up to the title's NUL.
    unsafe {
        let p = start as *mut u8;
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), p, n);
        std::ptr::write_bytes(p.add(n), 0, len - n);
        *p.add(len - 1) = b' ';
    }
}

/// `arg_start` and `arg_end` of this process, fields 48 and 49 of /proc/self/stat.
fn arg_area() -> Option<(usize, usize)> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The name may hold spaces and parentheses: fields start after the last ')', with field 3.
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut fields = rest.split(' ').skip(48 - 3);
    let start: usize = fields.next()?.parse().ok()?;
    let end: usize = fields.next()?.parse().ok()?;
    (start != 0 && end > start).then_some((start, end))
}
