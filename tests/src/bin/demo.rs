//! `caravan-demo`: Caravan's main job end to end on this machine. Starts a
//! local kube-apiserver and etcd, the controller, a Git repository seeded from
//! `examples/`, the hq relay and three agents; waits until the job converges;
//! prints the `kubectl get` tables. Exits 0 on success, non-zero with the
//! reason on failure or time-out.

use std::time::{Duration, Instant};

use caravan_api::conditions;
use caravan_tests::{wait_for, Caravan};

const TIMEOUT: Duration = Duration::from_secs(180);

fn step(start: Instant, msg: &str) {
    println!("[{:>5.1}s] {msg}", start.elapsed().as_secs_f64());
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match demo().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("\ndemo failed: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn demo() -> anyhow::Result<()> {
    let start = Instant::now();
    step(
        start,
        "starting etcd, kube-apiserver and caravan-controller",
    );
    let mut c = Caravan::start("caravan").await?;
    step(
        start,
        &format!(
            "cluster up; controller serving the distribution API at {}",
            c.api_url
        ),
    );
    let repo = c.seed_example_fleet().await?;
    step(start, &format!("git repository {} seeded from examples/ (cabinet, site hq, hello 1.0.0, job); GitSource created", repo.url()));
    let relay = c.start_relay("hq").await?;
    step(
        start,
        &format!(
            "relay for site hq started from its Deployment, serving {}",
            relay.url
        ),
    );
    wait_for("site hq to report its relay ready", TIMEOUT, || async {
        Ok(c.site("hq")
            .await?
            .status
            .filter(|s| conditions::is_true(&s.conditions, conditions::READY)))
    })
    .await?;
    for i in 1..=3 {
        c.start_agent(&format!("laptop-{i}"), &relay)?;
    }
    step(
        start,
        "three agents started; waiting for the job to converge",
    );
    c.wait_job("hello-everywhere", "Succeeded", "3/3", TIMEOUT)
        .await?;
    for a in &c.agents {
        let v = std::fs::read_to_string(a.install_root.join("hello/VERSION"))?;
        anyhow::ensure!(v.trim() == "1.0.0", "{} has hello {v}", a.name);
    }
    step(start, "job hello-everywhere Succeeded 3/3; hello 1.0.0 is installed in every agent's install root\n");
    for kind in [
        "gitsources",
        "cabinets",
        "packages",
        "sites",
        "agents",
        "distributionjobs",
    ] {
        println!("$ kubectl get {kind} -n caravan");
        println!("{}", c.cluster.kubectl(&["get", kind, "-n", "caravan"])?);
    }
    println!("$ caravan job status hello-everywhere -n caravan");
    println!(
        "{}",
        c.cli(&["job", "status", "hello-everywhere", "-n", "caravan"])?
    );
    println!("demo converged in {:.1}s", start.elapsed().as_secs_f64());
    Ok(())
}
