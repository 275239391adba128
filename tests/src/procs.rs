//! Child processes that are killed when dropped, with their output in a log file.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
};

use anyhow::Context as _;

pub struct Proc {
    pub name: String,
    pub log: PathBuf,
    child: Child,
}

impl Proc {
    pub fn spawn(
        name: &str,
        program: &Path,
        args: &[&str],
        env: &[(String, String)],
        dir: &Path,
    ) -> anyhow::Result<Self> {
        let logs = dir.join("logs");
        std::fs::create_dir_all(&logs)?;
        let log = logs.join(format!("{name}.log"));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let mut cmd = Command::new(program);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", program.display()))?;
        Ok(Self {
            name: name.into(),
            log,
            child,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// How the process ended, once it has.
    pub fn exit_status(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Kills the process (SIGKILL) and waits for it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The last `n` lines of the log, headed by the process name.
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(n)..].join("\n");
        format!("\n--- {} ({}) ---\n{tail}\n", self.name, self.log.display())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A memory figure of a running process from `/proc/<pid>/status`
/// (`VmRSS`, `VmHWM`, ...), in MiB; 0 if it cannot be read.
pub fn memory_mib(pid: u32, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix(field)?
                    .strip_prefix(':')?
                    .trim()
                    .trim_end_matches(" kB")
                    .parse::<f64>()
                    .ok()
            })
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Peak resident memory of a running process (`VmHWM`), in MiB.
pub fn peak_mib(pid: u32) -> f64 {
    memory_mib(pid, "VmHWM")
}

/// CPU seconds (user + system) used so far by `pid` and its live children.
pub fn cpu_seconds(pid: u32) -> f64 {
    let ticks = |p: &str| -> Option<(u32, u64)> {
        let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
        let rest = &stat[stat.rfind(')')? + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        Some((
            f[1].parse().ok()?,
            f[11].parse::<u64>().ok()? + f[12].parse::<u64>().ok()?,
        ))
    };
    let mut total = ticks(&pid.to_string()).map_or(0, |t| t.1);
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some((ppid, t)) = name.parse::<u32>().ok().and_then(|_| ticks(&name)) {
            if ppid == pid {
                total += t;
            }
        }
    }
    total as f64 / 100.0 // USER_HZ
}

/// CPU nanoseconds used so far by each live thread of `pid`
/// (`/proc/<pid>/task/*/schedstat`), for figures too small for clock ticks.
pub fn thread_cpu_ns(pid: u32) -> std::collections::HashMap<String, u64> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|task| {
            let stat = std::fs::read_to_string(task.path().join("schedstat")).ok()?;
            let ns = stat.split_whitespace().next()?.parse().ok()?;
            Some((task.file_name().to_string_lossy().into_owned(), ns))
        })
        .collect()
}

/// CPU seconds the live threads of `pid` used since `before` (from
/// [`thread_cpu_ns`]); threads that ended meanwhile are not counted.
pub fn thread_cpu_seconds_since(pid: u32, before: &std::collections::HashMap<String, u64>) -> f64 {
    thread_cpu_ns(pid)
        .iter()
        .map(|(tid, ns)| ns - before.get(tid).copied().unwrap_or(0).min(*ns))
        .sum::<u64>() as f64
        / 1e9
}

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}
