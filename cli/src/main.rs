//! `caravan`: the operator's command line.

mod pack;

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use caravan_api::v1alpha1::{Artifact, InstallSpec, Package, PackageSpec};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "caravan",
    version,
    about = "Caravan: GitOps software distribution"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build and publish packages.
    #[command(subcommand)]
    Package(PackageCommand),
}

#[derive(clap::Args, Clone)]
struct BuildArgs {
    /// Directory whose contents become the package.
    dir: PathBuf,
    /// Package name.
    #[arg(long)]
    name: String,
    /// Package version.
    #[arg(long)]
    version: String,
    /// Cabinet the package belongs to.
    #[arg(long, default_value = "main")]
    cabinet: String,
    /// Directory (in your Git working tree) to write the Package manifest into.
    #[arg(long, default_value = ".")]
    manifest_dir: PathBuf,
}

#[derive(Subcommand)]
enum PackageCommand {
    /// Pack DIR into `<name>-<version>.tar.zst` and write its Package manifest.
    Build {
        #[command(flatten)]
        args: BuildArgs,
        /// Where to write the archive (default: `<name>-<version>.tar.zst` here).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Build DIR, upload it to the cabinet store and write its Package manifest.
    Push {
        #[command(flatten)]
        args: BuildArgs,
        /// The controller's distribution API.
        #[arg(long, env = "CARAVAN_SERVER")]
        server: String,
        /// Upload token of the controller.
        #[arg(long, env = "CARAVAN_UPLOAD_TOKEN", hide_env_values = true)]
        token: String,
        /// CA certificate (PEM) to verify the controller's HTTPS certificate with.
        #[arg(long, env = "CARAVAN_CA_FILE")]
        ca_file: Option<PathBuf>,
    },
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run(Cli::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("caravan: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Package(PackageCommand::Build { args, out }) => {
            let out = out.unwrap_or_else(|| {
                PathBuf::from(format!("{}-{}.tar.zst", args.name, args.version))
            });
            let artifact = build(&args, &out)?;
            println!(
                "built {} ({}, {} bytes)",
                out.display(),
                artifact.digest,
                artifact.size
            );
            Ok(())
        }
        Command::Package(PackageCommand::Push {
            args,
            server,
            token,
            ca_file,
        }) => {
            let tmp = tempfile::NamedTempFile::new()?;
            // The manifest is written only once its blob is in the cabinet.
            let artifact = pack::pack(&args.dir, tmp.path())
                .with_context(|| format!("packing {}", args.dir.display()))?;
            upload(&server, &token, ca_file.as_deref(), &artifact, tmp.path()).await?;
            write_manifest(&args, &artifact)?;
            println!(
                "pushed {} {} to cabinet {} ({}, {} bytes)",
                args.name, args.version, args.cabinet, artifact.digest, artifact.size
            );
            Ok(())
        }
    }
}

/// Packs the directory and writes the manifest next to the other manifests.
fn build(args: &BuildArgs, out: &Path) -> anyhow::Result<Artifact> {
    let artifact =
        pack::pack(&args.dir, out).with_context(|| format!("packing {}", args.dir.display()))?;
    write_manifest(args, &artifact)?;
    Ok(artifact)
}

/// Writes the Package manifest into the manifest directory.
fn write_manifest(args: &BuildArgs, artifact: &Artifact) -> anyhow::Result<()> {
    let manifest = manifest(args, artifact);
    std::fs::create_dir_all(&args.manifest_dir)?;
    let path = args
        .manifest_dir
        .join(format!("{}-{}.yaml", args.name, args.version));
    std::fs::write(&path, manifest).with_context(|| format!("writing {}", path.display()))?;
    println!("wrote {}", path.display());
    Ok(())
}

fn manifest(args: &BuildArgs, artifact: &Artifact) -> String {
    let pkg = Package::new(
        &format!("{}-{}", args.name, args.version).to_ascii_lowercase(),
        PackageSpec {
            cabinet: args.cabinet.clone(),
            name: args.name.clone(),
            version: args.version.clone(),
            artifact: artifact.clone(),
            install: InstallSpec::default(),
            description: None,
        },
    );
    serde_yaml_ng::to_string(&pkg).expect("a Package serializes")
}

/// Streams the archive to the controller's store.
async fn upload(
    server: &str,
    token: &str,
    ca_file: Option<&Path>,
    artifact: &Artifact,
    file: &Path,
) -> anyhow::Result<()> {
    let client = caravan_net::client(ca_file, std::time::Duration::from_secs(120))?;
    let url = format!(
        "{}/v1/blobs/{}",
        server.trim_end_matches('/'),
        artifact.digest
    );
    let f = tokio::fs::File::open(file).await?;
    let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::new(f));
    let res = client
        .put(&url)
        .bearer_auth(token)
        .header(reqwest::header::CONTENT_LENGTH, artifact.size)
        .body(body)
        .send()
        .await
        .with_context(|| format!("uploading to {url}"))?;
    if !res.status().is_success() {
        let status = res.status();
        let msg = caravan_net::error_message(res).await;
        anyhow::bail!("upload to {url} failed: {status}: {msg}");
    }
    Ok(())
}
