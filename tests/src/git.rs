//! A Git repository for tests: a bare "remote" and a working tree that commits
//! and pushes to it, all with git2.

use std::path::{Path, PathBuf};

use anyhow::Context as _;

pub struct GitRepo {
    pub bare: PathBuf,
    pub work: PathBuf,
    repo: git2::Repository,
}

impl GitRepo {
    /// Creates `<dir>/fleet.git` (bare) and `<dir>/fleet` (working tree).
    pub fn create(dir: &Path) -> anyhow::Result<Self> {
        let bare = dir.join("fleet.git");
        let work = dir.join("fleet");
        git2::Repository::init_opts(
            &bare,
            git2::RepositoryInitOptions::new()
                .bare(true)
                .initial_head("main"),
        )?;
        let repo = git2::Repository::init_opts(
            &work,
            git2::RepositoryInitOptions::new().initial_head("main"),
        )?;
        repo.remote("origin", bare.to_str().context("path is UTF-8")?)?;
        Ok(Self { bare, work, repo })
    }

    /// URL the controller fetches from.
    pub fn url(&self) -> String {
        format!("file://{}", self.bare.display())
    }

    pub fn write(&self, path: &str, contents: &str) -> anyhow::Result<()> {
        let p = self.work.join(path);
        std::fs::create_dir_all(p.parent().context("file has a directory")?)?;
        std::fs::write(p, contents)?;
        Ok(())
    }

    pub fn remove(&self, path: &str) -> anyhow::Result<()> {
        std::fs::remove_file(self.work.join(path))?;
        Ok(())
    }

    /// Commits every change in the working tree and pushes `main`. Returns the commit id.
    pub fn commit(&self, message: &str) -> anyhow::Result<String> {
        let id = self.commit_unpushed(message)?;
        self.repo
            .find_remote("origin")?
            .push(&["+refs/heads/main:refs/heads/main"], None)?;
        Ok(id)
    }

    /// Commits every change in the working tree without pushing it (the
    /// next [`Self::commit`] pushes both). Returns the commit id.
    pub fn commit_unpushed(&self, message: &str) -> anyhow::Result<String> {
        let mut index = self.repo.index()?;
        index.add_all(["*"], git2::IndexAddOption::DEFAULT, None)?;
        index.update_all(["*"], None)?;
        index.write()?;
        let tree = self.repo.find_tree(index.write_tree()?)?;
        let sig = git2::Signature::now("Caravan Tests", "tests@caravan.invalid")?;
        let parent = self.repo.head().ok().and_then(|h| h.peel_to_commit().ok());
        let parents: Vec<&git2::Commit> = parent.iter().collect();
        let id = self
            .repo
            .commit(Some("HEAD"), &sig, &sig, message, &tree, &parents)?;
        Ok(id.to_string())
    }
}
