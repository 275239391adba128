//! `caravan-agent`: wiring only; see the library.

use clap::Parser;

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    let cli = caravan_agent::Cli::parse();
    cli.log.init();
    match caravan_agent::main(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("caravan-agent: {e:#}");
            match e.downcast_ref::<caravan_agent::Stop>() {
                Some(_) => std::process::ExitCode::from(caravan_agent::Stop::EXIT_CODE),
                None => std::process::ExitCode::FAILURE,
            }
        }
    }
}
