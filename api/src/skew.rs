//! Which releases of relays and agents a controller works with: its own
//! release and the one before for relays, the two before for agents
//! (narrower for relays, which serve agents of every release in the
//! window). A release is the minor version while the major is 0
//! (`0.3.x`), the major after that (`2.x`). Every request between
//! components names its sender's release in [`VERSION_HEADER`].

use std::fmt;

use semver::Version;

/// Request and response header: the sender's release ([`crate::RELEASE`]).
pub const VERSION_HEADER: &str = "caravan-version";

/// Longest release a component may say it is of (a longer one is not read).
pub const MAX_VERSION_LEN: usize = 64;

/// A component the controller works with, and how far behind it may be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Component {
    Relay,
    Agent,
}

impl Component {
    /// How many releases behind the controller it may be.
    pub fn behind(self) -> u64 {
        match self {
            Component::Relay => 1,
            Component::Agent => 2,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Component::Relay => "relay",
            Component::Agent => "agent",
        }
    }
}

/// How many releases `theirs` is behind `ours` (negative: ahead). A 0.x
/// release is counted as far behind any 1.0 or later: 1.0 is a break.
fn releases_behind(ours: &Version, theirs: &Version) -> i128 {
    match (ours.major, theirs.major) {
        (0, 0) => i128::from(ours.minor) - i128::from(theirs.minor),
        (0, _) => -1,
        (_, 0) => i128::MAX,
        (a, b) => i128::from(a) - i128::from(b),
    }
}

/// Whether `theirs` is of a later release than `ours` (one that does not
/// parse counts as later: nothing is taken from it).
pub fn later_release(theirs: &str, ours: &str) -> bool {
    match (Version::parse(theirs), Version::parse(ours)) {
        (Ok(t), Ok(o)) => releases_behind(&o, &t) < 0,
        _ => true,
    }
}

/// Why a component is outside the window.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skew {
    pub component: Component,
    /// Its release as it said it (none: it said nothing, so it is older than
    /// the release that began to say it).
    pub version: Option<String>,
    pub controller: String,
    /// What to do.
    pub upgrade: Upgrade,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Upgrade {
    /// The component is too old: bring it to the controller's release.
    Component,
    /// The component is newer than the controller: upgrade the controller
    /// first (components follow it, never lead it).
    Controller,
}

impl fmt::Display for Skew {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = self.component.name();
        let theirs = self
            .version
            .as_deref()
            .unwrap_or("of a release that does not say its version");
        write!(
            f,
            "{name} {theirs} is outside what controller {} works with ({name}s up to {} releases behind it): ",
            self.controller,
            self.component.behind()
        )?;
        match self.upgrade {
            Upgrade::Component => write!(f, "upgrade the {name} to {}", self.controller),
            Upgrade::Controller => write!(f, "upgrade the controller to {theirs} first"),
        }
    }
}

impl std::error::Error for Skew {}

/// Whether controller `controller` works with `component` of release
/// `theirs` (the value of its [`VERSION_HEADER`], if it sent one).
pub fn check(controller: &str, component: Component, theirs: Option<&str>) -> Result<(), Skew> {
    let skew = |upgrade| Skew {
        component,
        version: theirs.map(str::to_owned),
        controller: controller.to_owned(),
        upgrade,
    };
    let ours = Version::parse(controller).map_err(|_| skew(Upgrade::Component))?;
    let Some(Ok(v)) = theirs.map(Version::parse) else {
        return Err(skew(Upgrade::Component));
    };
    let behind = releases_behind(&ours, &v);
    if behind < 0 {
        Err(skew(Upgrade::Controller))
    } else if behind > i128::from(component.behind()) {
        Err(skew(Upgrade::Component))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::{check, Component, Upgrade};

    fn upgrade(controller: &str, c: Component, theirs: Option<&str>) -> Option<Upgrade> {
        check(controller, c, theirs).err().map(|s| s.upgrade)
    }

    #[test]
    fn a_later_release_is_a_later_minor_while_the_major_is_0() {
        use super::later_release;
        assert!(later_release("0.3.0", "0.2.5"));
        assert!(
            !later_release("0.2.5", "0.2.0"),
            "a patch is the same release"
        );
        assert!(!later_release("0.1.0", "0.2.0"));
        assert!(later_release("1.0.0", "0.9.0"));
        assert!(later_release("garbage", "0.2.0"));
    }

    #[test]
    fn relays_may_be_one_release_behind_and_agents_two() {
        use Component::*;
        // Within the window, patch releases and all.
        for theirs in ["0.4.0", "0.4.7", "0.3.2"] {
            assert_eq!(upgrade("0.4.1", Relay, Some(theirs)), None, "{theirs}");
        }
        for theirs in ["0.4.0", "0.3.9", "0.2.0"] {
            assert_eq!(upgrade("0.4.1", Agent, Some(theirs)), None, "{theirs}");
        }
        // Too old.
        assert_eq!(
            upgrade("0.4.1", Relay, Some("0.2.9")),
            Some(Upgrade::Component)
        );
        assert_eq!(
            upgrade("0.4.1", Agent, Some("0.1.0")),
            Some(Upgrade::Component)
        );
        // Newer than the controller: the controller goes first.
        assert_eq!(
            upgrade("0.4.1", Relay, Some("0.5.0")),
            Some(Upgrade::Controller)
        );
        assert_eq!(
            upgrade("0.4.1", Agent, Some("1.0.0")),
            Some(Upgrade::Controller)
        );
        // After 1.0 a release is a major version.
        assert_eq!(upgrade("3.2.0", Agent, Some("1.9.0")), None);
        assert_eq!(
            upgrade("3.2.0", Relay, Some("1.9.0")),
            Some(Upgrade::Component)
        );
        assert_eq!(
            upgrade("3.2.0", Agent, Some("0.9.0")),
            Some(Upgrade::Component)
        );
    }

    #[test]
    fn a_component_that_does_not_say_its_version_is_refused_by_name() {
        let skew = check("0.4.1", Component::Agent, None).unwrap_err();
        assert_eq!(skew.upgrade, Upgrade::Component);
        let message = skew.to_string();
        assert!(
            message.contains("agent of a release that does not say its version"),
            "{message}"
        );
        assert!(message.contains("controller 0.4.1"), "{message}");
        assert!(message.contains("upgrade the agent to 0.4.1"), "{message}");
        let garbage = check("0.4.1", Component::Relay, Some("latest")).unwrap_err();
        assert!(
            garbage.to_string().starts_with("relay latest is outside"),
            "{garbage}"
        );
        let ahead = check("0.4.1", Component::Relay, Some("0.5.0")).unwrap_err();
        assert!(
            ahead
                .to_string()
                .ends_with("upgrade the controller to 0.5.0 first"),
            "{ahead}"
        );
    }
}
