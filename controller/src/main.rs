//! `caravan-controller`: wiring only; see the library for the parts.

use clap::Parser;

/// jemalloc, not glibc's malloc: each computation of the index allocates
/// and frees a few KiB per agent on whichever thread runs it, and glibc's
/// per-thread arenas held on to what was freed. 50,000 agents through a job
/// (`caravan-bench-fleet 50000 4 60 --sites 5`): 1,707 MiB with glibc,
/// 940 MiB with jemalloc.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = caravan_controller::Config::parse();
    config.log.init();
    match &config.command {
        Some(command) => caravan_controller::run_command(&config, command),
        None => match caravan_controller::run(config).await? {
            caravan_controller::Stopped::Shutdown => Ok(()),
            // The same process, as it was started: the kubelet (or systemd)
            // sees no exit.
            caravan_controller::Stopped::Restart => {
                use std::os::unix::process::CommandExt as _;
                let exe = std::env::current_exe()?;
                Err(std::process::Command::new(exe)
                    .args(std::env::args_os().skip(1))
                    .exec()
                    .into())
            }
        },
    }
}
