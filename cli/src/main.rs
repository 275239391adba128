//! `caravan`: the operator's command line.

mod backup;
mod cabinet;
mod cluster;
mod job;

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use caravan_api::{
    signing,
    v1alpha1::{
        Artifact, Dependency, DetectionRule, InstallMethod, InstallSpec, Package, PackageSpec,
        Requirements, ScriptSpec, AGENT_BINARY,
    },
};
use caravan_archive::pack;
use caravan_net::fs::{write_private, Existing};
use clap::{Parser, Subcommand};
use ed25519_dalek::SigningKey;

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

// Parsed once per run: the size of its variants does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Build, sign and publish packages.
    #[command(subcommand)]
    Package(PackageCommand),
    /// Signing keys.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Bootstrap tokens agents enroll with.
    #[command(subcommand)]
    Token(cluster::TokenCommand),
    /// Approve or revoke enrolled agents.
    #[command(subcommand)]
    Agent(cluster::AgentCommand),
    /// Distribution jobs: status as a tree, re-run failures, pause, resume.
    #[command(subcommand)]
    Job(job::JobCommand),
    /// Sites: rotate a relay's credential.
    #[command(subcommand)]
    Site(cluster::SiteCommand),
    /// Cabinets: copy one's packages into an OCI registry.
    #[command(subcommand)]
    Cabinet(CabinetCommand),
    /// Write one archive with everything needed to rebuild the control
    /// plane: every Caravan object (status included) and the Secrets they
    /// use, from the cluster (kubeconfig); the controller's keys, roots,
    /// ledger and blobs, from the controller (backup token). Taken while
    /// everything runs. Keep it as safe as the controller's keys.
    Backup {
        /// The archive to write.
        #[arg(long, short = 'o')]
        out: PathBuf,
        #[command(flatten)]
        controller: backup::ControllerArgs,
    },
    /// Bring a backup back into a fresh cluster, through a controller
    /// started with --await-restore on an empty data directory: its data
    /// first (it starts again with the backup's keys), then the objects.
    /// Relays reconnect and agents carry on: same Agents, same credentials,
    /// nothing enrolled or installed again.
    Restore {
        /// The archive `caravan backup` wrote.
        archive: PathBuf,
        /// Finish a restore of this archive that stopped halfway (the
        /// controller runs with its keys already): create only what is
        /// missing of its objects.
        #[arg(long)]
        resume: bool,
        #[command(flatten)]
        controller: backup::ControllerArgs,
    },
}

#[derive(Subcommand)]
enum CabinetCommand {
    /// Copy the packages of CABINET (their manifests in --manifest-dir) from
    /// the controller's store into an OCI registry, the same digests, and
    /// pin each artifact's manifest in its Package manifest; then make the
    /// Cabinet an `oci` one with that repository.
    Copy {
        /// The cabinet whose packages to copy.
        cabinet: String,
        /// The directory of Package manifests (your Git working tree).
        #[arg(long, default_value = ".")]
        manifest_dir: PathBuf,
        /// The controller's distribution API.
        #[arg(long, env = "CARAVAN_SERVER")]
        server: String,
        /// Upload token of the controller (it reads the blobs too).
        #[arg(long, env = "CARAVAN_UPLOAD_TOKEN", hide_env_values = true)]
        token: String,
        /// CA certificate (PEM) to verify the controller's HTTPS certificate with.
        #[arg(long, env = "CARAVAN_CA_FILE")]
        ca_file: Option<PathBuf>,
        #[command(flatten)]
        registry: cabinet::RegistryArgs,
    },
}

#[derive(Subcommand)]
enum KeyCommand {
    /// Make an ed25519 key pair: `<out>.key` (private, mode 0600) and `<out>.pub`.
    Generate {
        /// Path prefix of the two files.
        #[arg(long)]
        out: PathBuf,
    },
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
    /// Sign the package with this private key (`caravan key generate`).
    #[arg(long)]
    sign_key: Option<PathBuf>,
    /// `archive` (extract), `script` (extract, then run --install-script) or
    /// `agent` (a new caravan-agent binary, file `caravan-agent`).
    #[arg(long, value_enum, default_value = "archive")]
    install: Method,
    /// Install script inside the package (with `--install script`).
    #[arg(long, default_value = "install.sh")]
    install_script: String,
    /// Uninstall script inside the package, if any.
    #[arg(long)]
    uninstall_script: Option<String>,
    /// Seconds before a script is killed and the step fails.
    #[arg(long, default_value_t = 600)]
    script_timeout: u32,
    /// Check inside the package run after the install; if it fails, the
    /// endpoint goes back to the previous version.
    #[arg(long)]
    health_check: Option<String>,
    /// Operating systems the package needs (repeatable: linux, windows, macos).
    #[arg(long = "os")]
    os: Vec<String>,
    /// Architectures the package needs (repeatable: x86_64, aarch64).
    #[arg(long = "arch")]
    arch: Vec<String>,
    /// Free bytes the package needs in the install root besides itself.
    #[arg(long)]
    min_free_disk: Option<u64>,
    /// A package this one needs installed first, as `NAME` or
    /// `NAME@RANGE` (`libfoo@>=1.2, <2`); repeatable.
    #[arg(long = "requires", value_name = "NAME[@RANGE]")]
    requires: Vec<String>,
    /// Detection: this file (absolute path) is present, with this digest if
    /// given as `PATH=sha256:HEX`; repeatable, every rule must hold.
    #[arg(long = "detect-file", value_name = "PATH[=DIGEST]")]
    detect_file: Vec<String>,
    /// Detection: this file's first line is the package version.
    #[arg(long = "detect-version-file", value_name = "PATH")]
    detect_version_file: Vec<String>,
    /// Detection: this shell command exits 0 (run with `/bin/sh -c`).
    #[arg(long = "detect-command", value_name = "COMMAND")]
    detect_command: Vec<String>,
    /// On upgrade, run this version's uninstall script before the new
    /// version installs (with `--install script`).
    #[arg(long)]
    uninstall_on_upgrade: bool,
}

#[derive(clap::ValueEnum, Clone, Copy, PartialEq, Eq)]
enum Method {
    Archive,
    Script,
    /// A new caravan-agent binary (file `caravan-agent` in the directory).
    Agent,
}

impl BuildArgs {
    /// Catches a package that could not install before it is built.
    fn check(&self) -> anyhow::Result<()> {
        self.install_spec()?.check().map_err(anyhow::Error::msg)?;
        anyhow::ensure!(
            !self.uninstall_on_upgrade
                || (self.install == Method::Script && self.uninstall_script.is_some()),
            "--uninstall-on-upgrade needs --install script and an --uninstall-script to run"
        );
        if let Some(check) = &self.health_check {
            anyhow::ensure!(
                self.dir.join(check).is_file(),
                "{check} is not a file in {}: the health check runs from there",
                self.dir.display()
            );
        }
        if self.install == Method::Agent {
            anyhow::ensure!(
                self.dir.join(AGENT_BINARY).is_file(),
                "{AGENT_BINARY} is not a file in {}: an agent package carries the new binary there",
                self.dir.display()
            );
        }
        if self.install == Method::Script {
            for script in std::iter::once(&self.install_script).chain(&self.uninstall_script) {
                anyhow::ensure!(
                    self.dir.join(script).is_file(),
                    "{script} is not a file in {}: a script package runs it from there",
                    self.dir.display()
                );
            }
        }
        Ok(())
    }

    fn install_spec(&self) -> anyhow::Result<InstallSpec> {
        let requirements = Requirements {
            os: self.os.clone(),
            arch: self.arch.clone(),
            min_free_disk_bytes: self.min_free_disk,
        };
        let requires = self
            .requires
            .iter()
            .map(|r| match r.split_once('@') {
                Some((name, range)) => Dependency {
                    name: name.trim().into(),
                    version: Some(range.trim().into()),
                },
                None => Dependency {
                    name: r.trim().into(),
                    version: None,
                },
            })
            .collect();
        let mut detect = Vec::new();
        for f in &self.detect_file {
            let (path, digest) = match f.rsplit_once('=') {
                Some((path, digest)) => (
                    path,
                    Some(
                        digest
                            .parse()
                            .map_err(|e| anyhow::anyhow!("--detect-file {f}: {e}"))?,
                    ),
                ),
                None => (f.as_str(), None),
            };
            detect.push(DetectionRule {
                file: Some(path.into()),
                digest,
                ..Default::default()
            });
        }
        detect.extend(self.detect_version_file.iter().map(|p| DetectionRule {
            version_file: Some(p.clone()),
            ..Default::default()
        }));
        detect.extend(self.detect_command.iter().map(|c| DetectionRule {
            command: vec!["/bin/sh".into(), "-c".into(), c.clone()],
            ..Default::default()
        }));
        Ok(InstallSpec {
            method: match self.install {
                Method::Archive => InstallMethod::Archive,
                Method::Script => InstallMethod::Script,
                Method::Agent => InstallMethod::Agent,
            },
            script: (self.install == Method::Script).then(|| ScriptSpec {
                install: self.install_script.clone(),
                uninstall: self.uninstall_script.clone(),
                timeout_seconds: self.script_timeout,
                uninstall_on_upgrade: self.uninstall_on_upgrade,
            }),
            requirements: (requirements != Requirements::default()).then_some(requirements),
            health_check: self.health_check.clone(),
            requires,
            detect,
        })
    }
}

#[derive(Subcommand)]
enum PackageCommand {
    /// Add a signature (by KEY) to a Package manifest, replacing that key's old one.
    Sign {
        /// The Package manifest (YAML) to sign.
        manifest: PathBuf,
        /// Private key file (`caravan key generate`).
        #[arg(long)]
        key: PathBuf,
    },
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
        /// The controller's distribution API (for a built-in cabinet).
        #[arg(long, env = "CARAVAN_SERVER")]
        server: Option<String>,
        /// Upload token of the controller.
        #[arg(long, env = "CARAVAN_UPLOAD_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// CA certificate (PEM) to verify the controller's HTTPS certificate with.
        #[arg(long, env = "CARAVAN_CA_FILE")]
        ca_file: Option<PathBuf>,
        #[command(flatten)]
        registry: cabinet::RegistryArgs,
        /// Namespace of the Cabinet, asked what it is unless --registry is
        /// given (default: the kubeconfig's).
        #[arg(long, short = 'n')]
        namespace: Option<String>,
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
        Command::Token(command) => cluster::token(command).await,
        Command::Agent(command) => cluster::agent(command).await,
        Command::Site(command) => cluster::site(command).await,
        Command::Job(command) => job::run(command).await,
        Command::Backup { out, controller } => backup::backup(&out, controller).await,
        Command::Restore {
            archive,
            resume,
            controller,
        } => backup::restore(&archive, controller, resume).await,
        Command::Cabinet(CabinetCommand::Copy {
            cabinet,
            manifest_dir,
            server,
            token,
            ca_file,
            registry,
        }) => {
            cabinet::copy_cabinet(
                &cabinet,
                &manifest_dir,
                &server,
                &token,
                ca_file.as_deref(),
                &registry,
            )
            .await
        }
        Command::Key(KeyCommand::Generate { out }) => {
            let key = SigningKey::from_bytes(&rand::random());
            let private = out.with_extension("key");
            let public = out.with_extension("pub");
            let text = format!("{}\n", signing::encode_private(&key));
            write_private(&private, text.as_bytes(), Existing::Keep).with_context(|| {
                format!("creating {} (it must not exist yet)", private.display())
            })?;
            std::fs::write(
                &public,
                format!("{}\n", signing::encode_public(&key.verifying_key())),
            )?;
            println!(
                "wrote {} and {} (key ID {})",
                private.display(),
                public.display(),
                signing::key_id(&key.verifying_key())
            );
            Ok(())
        }
        Command::Package(PackageCommand::Sign { manifest, key }) => {
            let text = std::fs::read_to_string(&manifest)
                .with_context(|| format!("reading {}", manifest.display()))?;
            let mut pkg: Package = serde_yaml_ng::from_str(&text)
                .with_context(|| format!("{} is not a Package manifest", manifest.display()))?;
            let sig = sign_spec(&pkg.spec, &key)?;
            println!(
                "signed {} {} with key {}",
                pkg.spec.name, pkg.spec.version, sig.key_id
            );
            pkg.spec.signatures.retain(|s| s.key_id != sig.key_id);
            pkg.spec.signatures.push(sig);
            std::fs::write(&manifest, serde_yaml_ng::to_string(&pkg)?)?;
            Ok(())
        }
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
            registry,
            namespace,
        }) => {
            let tmp = tempfile::NamedTempFile::new()?;
            args.check()?;
            let store = cabinet::StoreArgs {
                server,
                token,
                ca_file,
            };
            let to =
                cabinet::Destination::of(&args.cabinet, namespace, &args.name, store, &registry)
                    .await?;
            // The manifest is written only once its blob is in the cabinet.
            let mut artifact = pack(&args.dir, tmp.path())
                .with_context(|| format!("packing {}", args.dir.display()))?;
            match to {
                cabinet::Destination::Registry(registry) => {
                    let spec = PackageSpec {
                        artifact: artifact.clone(),
                        install: args.install_spec()?,
                        ..spec_of(&args)
                    };
                    artifact.manifest =
                        Some(cabinet::push_to_registry(&registry, &spec, tmp.path()).await?);
                }
                cabinet::Destination::Store {
                    server,
                    token,
                    ca_file,
                } => {
                    cabinet::upload(&server, &token, ca_file.as_deref(), &artifact, tmp.path())
                        .await?
                }
            }
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
    args.check()?;
    let artifact =
        pack(&args.dir, out).with_context(|| format!("packing {}", args.dir.display()))?;
    write_manifest(args, &artifact)?;
    Ok(artifact)
}

/// Writes the Package manifest into the manifest directory.
fn write_manifest(args: &BuildArgs, artifact: &Artifact) -> anyhow::Result<()> {
    let manifest = package_manifest(args, artifact)?;
    std::fs::create_dir_all(&args.manifest_dir)?;
    let path = args
        .manifest_dir
        .join(format!("{}-{}.yaml", args.name, args.version));
    std::fs::write(&path, manifest).with_context(|| format!("writing {}", path.display()))?;
    println!("wrote {}", path.display());
    Ok(())
}

/// The Package manifest (YAML) of a built package.
fn package_manifest(args: &BuildArgs, artifact: &Artifact) -> anyhow::Result<String> {
    let mut pkg = Package::new(
        &format!("{}-{}", args.name, args.version).to_ascii_lowercase(),
        PackageSpec {
            artifact: artifact.clone(),
            install: args.install_spec()?,
            ..spec_of(args)
        },
    );
    if let Some(key) = &args.sign_key {
        pkg.spec.signatures.push(sign_spec(&pkg.spec, key)?);
    }
    Ok(serde_yaml_ng::to_string(&pkg)?)
}

/// The spec of the package `args` build (with an empty artifact and the
/// default install spec: the caller fills them in).
fn spec_of(args: &BuildArgs) -> PackageSpec {
    PackageSpec {
        cabinet: args.cabinet.clone(),
        name: args.name.clone(),
        version: args.version.clone(),
        artifact: Artifact {
            digest: caravan_api::Digest::of(b""),
            size: 0,
            manifest: None,
        },
        install: Default::default(),
        description: None,
        signatures: vec![],
    }
}

/// Signs a package's metadata (name, version, artifact, install spec) with
/// the private key in `key`.
fn sign_spec(spec: &PackageSpec, key: &Path) -> anyhow::Result<signing::PackageSignature> {
    let text =
        std::fs::read_to_string(key).with_context(|| format!("reading {}", key.display()))?;
    let key = signing::parse_private(&text)
        .with_context(|| format!("{} is not a private key", key.display()))?;
    Ok(signing::sign(&key, &signing::Signed::of_spec(spec)))
}
