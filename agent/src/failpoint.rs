//! Crash testing. With `CARAVAN_AGENT_FAILPOINT=<name>` in its environment
//! the agent kills itself with SIGKILL, as a power cut or the OOM killer
//! would, when it reaches the point of that name; tests then check what a
//! crash there leaves behind and that the next start sets it right. Without
//! the variable a failpoint is one environment lookup.

/// The variable naming the failpoint to die at.
pub const ENV: &str = "CARAVAN_AGENT_FAILPOINT";

/// Whether the agent is to die at `name`.
pub fn armed(name: &str) -> bool {
    std::env::var_os(ENV).is_some_and(|v| v == name)
}

/// Dies here if this is the armed failpoint.
pub fn hit(name: &str) {
    if armed(name) {
        tracing::error!(failpoint = name, "killed at failpoint");
        let _ =
            rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::KILL);
    }
}
