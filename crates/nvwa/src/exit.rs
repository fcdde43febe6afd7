//! The exit codes of the `nvwa` command, one per outcome an automation must tell apart.
//! Documented in `nvwa --help` (the end of its `after_help`, which [`HELP_LINES`] must match), the man
//! page and the README.

use nvwa_core::journal::Phase;
use nvwa_core::protocol::ErrorKind;

pub const OTHER: u8 = 1;
// 2 is clap's, for a command line it cannot parse.
pub const UNREACHABLE: u8 = 3;
pub const REFUSED: u8 = 4;
pub const BUSY: u8 = 5;
pub const ROLLED_BACK: u8 = 6;
pub const RESTORE_FAILED: u8 = 7;

/// The exit codes as `--help` and the man page show them (a macro, so that `concat!` can put it
/// into the help text at compile time).
macro_rules! exit_status_help {
    () => {
        "\
Exit status:
  0  success (for `status`: no update has run, or the last one restored every target)
  1  any other error (an unreadable configuration, an internal error)
  2  the command line could not be parsed
  3  the nvwa server could not be reached
  4  refused before anything happened (bad input, a failed precondition, not root)
  5  busy: another request or an unfinished update owns the machine (for `status`: one is running)
  6  rolled back: the update failed before the kernel switch; every target runs on the old kernel
     (for `status`: also an update abandoned because the machine restarted before it committed)
  7  restore failed on the new kernel for some targets; their images are kept for a retry
     (not for a target `lost`: restored lazily, it ran again before its memory failed)"
    };
}

/// The same text, for the man page.
pub const HELP_LINES: &str = exit_status_help!();

pub fn for_failure(kind: ErrorKind) -> u8 {
    match kind {
        ErrorKind::Refused => REFUSED,
        ErrorKind::Busy => BUSY,
        ErrorKind::RolledBack => ROLLED_BACK,
        ErrorKind::RestoreFailed => RESTORE_FAILED,
        ErrorKind::Internal => OTHER,
    }
}

/// `nvwa status`: whether the last update ended well.
pub fn for_phase(phase: Phase) -> u8 {
    match phase {
        Phase::Restored => 0,
        Phase::RolledBack | Phase::Abandoned => ROLLED_BACK,
        Phase::RestoreFailed => RESTORE_FAILED,
        Phase::Planned
        | Phase::KernelLoaded
        | Phase::Frozen
        | Phase::Dumped
        | Phase::Committed
        | Phase::Booted => BUSY,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn every_outcome_has_its_own_code() {
        let codes = [
            for_failure(ErrorKind::Refused),
            for_failure(ErrorKind::Busy),
            for_failure(ErrorKind::RolledBack),
            for_failure(ErrorKind::RestoreFailed),
            OTHER,
            UNREACHABLE,
            2,
        ];
        let mut unique = codes.to_vec();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), codes.len(), "{codes:?}");
        for c in codes {
            assert!(
                HELP_LINES.contains(&format!("  {c}  ")),
                "code {c} is documented"
            );
        }
        let help = crate::cli::Cli::command().render_long_help().to_string();
        assert!(
            help.contains(HELP_LINES),
            "--help shows the exit codes:\n{help}"
        );
    }
}
