//! The process's open-file limit. Every run in flight holds a socket, so the agent raises its
//! soft limit to the hard one at start (and logs both), and keeps the runs in flight within
//! what the limit leaves once its other files are counted.

use nix::sys::resource::{RLIM_INFINITY, Resource, getrlimit, setrlimit};

/// Open files kept for everything but runs: the database pools, the gRPC listener and its
/// clients' connections, the metrics endpoint, logs.
pub const RESERVED_FILES: u64 = 512;

/// The highest soft limit asked for when the hard limit is unlimited (Linux refuses more than
/// `fs.nr_open`, 1,048,576 by default).
const UNLIMITED: u64 = 1 << 20;

/// The open-file limit before and after [`raise_open_files`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenFiles {
    /// The soft limit the process started with.
    pub before: u64,
    /// The soft limit now.
    pub now: u64,
}

impl OpenFiles {
    /// The most runs in flight the limit allows.
    pub fn runs_allowed(&self) -> usize {
        usize::try_from(self.now.saturating_sub(RESERVED_FILES).max(1)).unwrap_or(usize::MAX)
    }
}

/// Raises the soft open-file limit to the hard limit (a no-op when they are equal).
pub fn raise_open_files() -> std::io::Result<OpenFiles> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(std::io::Error::from)?;
    let target = if hard == RLIM_INFINITY {
        UNLIMITED.max(soft)
    } else {
        hard
    };
    if soft >= target {
        return Ok(OpenFiles {
            before: soft,
            now: soft,
        });
    }
    setrlimit(Resource::RLIMIT_NOFILE, target, hard).map_err(std::io::Error::from)?;
    let (now, _) = getrlimit(Resource::RLIMIT_NOFILE).map_err(std::io::Error::from)?;
    Ok(OpenFiles { before: soft, now })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_soft_limit_reaches_the_hard_one_and_leaves_room_for_other_files() {
        let raised = raise_open_files().expect("raise");
        let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("read");
        assert_eq!(raised.now, soft);
        assert!(soft == hard || hard == RLIM_INFINITY, "{soft} of {hard}");
        assert_eq!(
            raise_open_files().expect("again").before,
            soft,
            "idempotent"
        );
        let small = OpenFiles {
            before: 1024,
            now: 1024,
        };
        assert_eq!(small.runs_allowed(), 512);
    }
}
