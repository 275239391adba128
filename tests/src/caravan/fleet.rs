//! The example fleet of `examples/` in a Git repository, as the demo and
//! many tests start from it.

use crate::{git, repo_root};

use super::Caravan;

impl Caravan {
    /// Seeds a Git repository from `examples/`: the fleet manifests under
    /// `fleet/` and the `hello` example package pushed as version 1.0.0.
    pub async fn example_fleet(&self) -> anyhow::Result<git::GitRepo> {
        let repo = git::GitRepo::create(&self.dir.join("git"))?;
        let examples = repo_root().join("examples");
        for entry in std::fs::read_dir(examples.join("fleet"))? {
            let entry = entry?;
            let mut text = std::fs::read_to_string(entry.path())?;
            if let (Some(tls), "site.yaml") =
                (&self.tls, entry.file_name().to_string_lossy().as_ref())
            {
                // The relay serves HTTPS with the test certificate.
                self.create_tls_secret("hq-tls", tls).await?;
                text = text.replace(
                    "    replicas: 1\n",
                    "    replicas: 1\n    tlsSecret: hq-tls\n",
                );
            }
            repo.write(
                &format!("fleet/{}", entry.file_name().to_string_lossy()),
                &text,
            )?;
        }
        self.push_package(
            &examples.join("packages/hello"),
            "hello",
            "1.0.0",
            &repo.work.join("fleet/packages"),
        )?;
        repo.commit("Declare the fleet: cabinet, hq site, hello 1.0.0 for everyone")?;
        Ok(repo)
    }

    /// [`Self::example_fleet`], synced by a GitSource `fleet` every 2 s.
    pub async fn seed_example_fleet(&self) -> anyhow::Result<git::GitRepo> {
        let repo = self.example_fleet().await?;
        self.add_git_source("fleet", &repo.url(), "fleet", 2)
            .await?;
        Ok(repo)
    }
}
