//! `caravan-relay`: wiring only; see the library.

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = caravan_relay::Config::parse();
    caravan_net::init_logging(config.log_json);
    caravan_relay::run(config).await
}
