//! `caravan-controller`: wiring only; see the library for the parts.

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = caravan_controller::Config::parse();
    config.log.init();
    caravan_controller::run(config).await
}
