//! Process identity that survives pid reuse: a pid plus the kernel's start time of that process.
//!
//! A port records its owner this way so that a recycled pid never looks like the old owner.

/// Identity of a live process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessId {
    pub pid: u32,
    /// Start time in clock ticks since boot (field 22 of /proc/PID/stat).
    pub start: u64,
}

impl ProcessId {
    /// The calling process.
    pub fn current() -> ProcessId {
        let pid = std::process::id();
        let start = start_time(pid).unwrap_or(0);
        ProcessId { pid, start }
    }

    /// True while the process exists, has the same start time and is not a zombie.
    pub fn is_alive(&self) -> bool {
        if self.pid == 0 {
            return false;
        }
        match stat(self.pid) {
            Some((state, start)) => state != 'Z' && state != 'X' && start == self.start,
            None => false,
        }
    }
}

/// True when a process with this pid exists and is not a zombie (used before the start time is known).
pub fn pid_alive(pid: u32) -> bool {
    pid != 0 && matches!(stat(pid), Some((s, _)) if s != 'Z' && s != 'X')
}

/// Start time of `pid` in clock ticks since boot (field 22 of /proc/PID/stat), or None when
/// no such process exists. A zombie still has one: ask [`ProcessId::is_alive`] whether the
/// process still runs.
pub fn start_time(pid: u32) -> Option<u64> {
    stat(pid).map(|(_, s)| s)
}

/// The effective uid of this process: the user whose files it trusts.
pub fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Whether a file owned by `uid` may be trusted by this process: it is ours, or root's.
///
/// Anyone else's file in a shared place (`/dev/shm`, a misconfigured registry directory) may
/// have been planted before we got there to read what we write into it or to feed us data, so
/// it is never used. Root's files are accepted: root can read and write ours anyway.
pub fn trusted_owner(uid: u32) -> bool {
    uid == 0 || uid == euid()
}

/// A name for `uid` in error messages: the user name from /etc/passwd when there is one.
pub fn user_name(uid: u32) -> String {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    passwd
        .lines()
        .filter_map(|l| {
            let mut f = l.split(':');
            let name = f.next()?;
            let id = f.nth(1)?.parse::<u32>().ok()?;
            Some((name, id))
        })
        .find(|&(_, id)| id == uid)
        .map_or_else(
            || format!("uid {uid}"),
            |(name, _)| format!("{name} (uid {uid})"),
        )
}

/// Parses state and start time from /proc/PID/stat; the comm field may hold spaces and parens,
/// so fields are counted from the last ')'.
fn stat(pid: u32) -> Option<(char, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    // After the state (field 3) the start time is field 22: 18 more fields on.
    let start = fields.nth(18)?.parse().ok()?;
    Some((state, start))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn current_process_is_alive_and_recycled_identity_is_not() {
        let me = ProcessId::current();
        assert!(me.start > 0);
        assert!(me.is_alive());
        let older = ProcessId {
            start: me.start.wrapping_sub(1),
            ..me
        };
        assert!(!older.is_alive());
        assert!(!ProcessId { pid: 0, start: 0 }.is_alive());
    }

    #[test]
    fn exited_child_is_dead() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let id = ProcessId {
            pid: child.id(),
            start: start_time(child.id()).unwrap_or(0),
        };
        child.wait().unwrap();
        assert!(!id.is_alive());
    }

    #[test]
    fn a_zombie_has_a_start_time_but_is_not_alive() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        // Wait for the exit without reaping, so the child stays a zombie.
        // SAFETY: `info` is a live, writable siginfo_t; WNOWAIT leaves the child unreaped.
        let rc = unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            libc::waitid(libc::P_PID, pid, &mut info, libc::WEXITED | libc::WNOWAIT)
        };
        assert_eq!(rc, 0);
        let start = start_time(pid).expect("a zombie is still listed in /proc");
        assert!(!ProcessId { pid, start }.is_alive());
        assert!(!pid_alive(pid));
        child.wait().unwrap();
        assert_eq!(start_time(pid), None);
    }
}
