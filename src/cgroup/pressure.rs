//! Pressure stall information of a cgroup v2 directory (`cpu.pressure`, `memory.pressure`,
//! `io.pressure`): how long its tasks waited for the resource, as totals and recent averages.
//! cgroup v1 has no per-cgroup pressure files.

/// One line of a pressure file: tasks that waited (`some`) or all tasks at once (`full`).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Stall {
    /// Time waited since the cgroup was made, ns (the file counts µs).
    pub total_ns: u64,
    /// Share of the last 10 s spent waiting, percent.
    pub avg10: f64,
    /// Over the last 60 s, percent.
    pub avg60: f64,
    /// Over the last 300 s, percent.
    pub avg300: f64,
}

/// A whole pressure file.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Pressure {
    /// Some tasks stalled.
    pub some: Stall,
    /// All non-idle tasks stalled at once (absent for the cpu of a kernel before 5.13).
    pub full: Option<Stall>,
}

/// Parses a pressure file; none if its `some` line is missing or malformed.
pub fn parse(text: &str) -> Option<Pressure> {
    let mut some = None;
    let mut full = None;
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let slot = match words.next() {
            Some("some") => &mut some,
            Some("full") => &mut full,
            _ => continue,
        };
        let mut s = Stall::default();
        for w in words {
            let (k, v) = w.split_once('=')?;
            match k {
                "avg10" => s.avg10 = v.parse().ok()?,
                "avg60" => s.avg60 = v.parse().ok()?,
                "avg300" => s.avg300 = v.parse().ok()?,
                "total" => s.total_ns = v.parse::<u64>().ok()?.saturating_mul(1000),
                _ => {}
            }
        }
        *slot = Some(s);
    }
    Some(Pressure { some: some?, full })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn some_and_full_lines_with_totals_in_ns() {
        let p = parse(
            "some avg10=1.50 avg60=0.25 avg300=0.00 total=1234\n\
             full avg10=0.00 avg60=0.00 avg300=0.00 total=7\n",
        )
        .unwrap();
        assert_eq!(p.some.total_ns, 1_234_000);
        assert_eq!(p.some.avg10, 1.5);
        assert_eq!(p.some.avg60, 0.25);
        assert_eq!(p.full.unwrap().total_ns, 7000);
        let only_some = parse("some avg10=0.00 avg60=0.00 avg300=0.00 total=0\n").unwrap();
        assert_eq!(only_some.full, None);
        assert_eq!(
            parse("full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n"),
            None
        );
        assert_eq!(parse("some avg10=x\n"), None);
    }
}
