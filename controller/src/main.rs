//! `caravan-controller`: wiring only; see the library for the parts.

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = caravan_controller::Config::parse();
    config.log.init();
    match &config.command {
        Some(command) => caravan_controller::run_command(&config, command),
        None => caravan_controller::run(config).await,
    }
}
