//! `caravan-relay`: wiring only; see the library.

use clap::Parser;

fn main() -> anyhow::Result<()> {
    let config = caravan_relay::Config::parse();
    config.log.init();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        // File reads run on blocking threads: a few keep the cores busy
        // (cached blobs are read from the page cache); hundreds would only
        // add stacks and allocator arenas when a thousand agents download.
        .max_blocking_threads(16)
        .build()?
        .block_on(caravan_relay::run(config))
}
