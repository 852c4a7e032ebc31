//! Fault injection for the tests: `BERTH_FAILPOINTS="step=action,..."` makes berthd die at a
//! named step as SIGKILL would (`kill`) or pause there (`sleep(ms)`, for a client deadline to
//! cancel the call at that step). Compiled in only with the `failpoints` feature; without it
//! `hit` is empty.

/// Reached step `step` (`create:rootfs`, `run:network`, ...): acts if a failpoint names it.
pub async fn hit(step: &'static str) {
    #[cfg(feature = "failpoints")]
    {
        match action(step) {
            Some(Action::Kill) => {
                tracing::warn!(step, "failpoint: killing berthd");
                // SAFETY: kill(2) on our own pid with SIGKILL; nothing in this process runs on.
                unsafe {
                    libc::kill(libc::getpid(), libc::SIGKILL);
                }
            }
            Some(Action::Sleep(ms)) => {
                tracing::warn!(step, ms, "failpoint: pausing");
                tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
            }
            None => {}
        }
    }
    #[cfg(not(feature = "failpoints"))]
    let _ = step;
}

#[cfg(feature = "failpoints")]
#[derive(Clone, Copy)]
enum Action {
    Kill,
    Sleep(u64),
}

#[cfg(feature = "failpoints")]
fn action(step: &str) -> Option<Action> {
    static POINTS: std::sync::OnceLock<Vec<(String, Action)>> = std::sync::OnceLock::new();
    POINTS
        .get_or_init(|| {
            let spec = std::env::var("BERTH_FAILPOINTS").unwrap_or_default();
            spec.split(',')
                .filter_map(|p| {
                    let (name, act) = p.trim().split_once('=')?;
                    let act = match act {
                        "kill" => Action::Kill,
                        a => Action::Sleep(
                            a.strip_prefix("sleep(")?.strip_suffix(')')?.parse().ok()?,
                        ),
                    };
                    Some((name.to_string(), act))
                })
                .collect()
        })
        .iter()
        .find(|(n, _)| n == step)
        .map(|(_, a)| *a)
}
