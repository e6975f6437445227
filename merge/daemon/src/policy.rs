//! Share groups are the daemon's to authorise, not the VM's.
//!
//! A VM names a share group in its `Hello`, but that name is only a label within the VM
//! process's user (its uid, from the socket's peer credentials): VMs of uid A asking for
//! `default` and VMs of uid B asking for `default` land in two different groups — two merge
//! domains, two pools — and never share a page. Users share a group only where the
//! daemon's own share policy says so (`tinyvmm merged --share-policy FILE`):
//!
//! ```json
//! {"groups": [{"name": "ci", "uids": [1000, 1001]}]}
//! ```
//!
//! Then VMs of uid 1000 and of uid 1001 that ask for `ci` share one group; a VM of any
//! other uid asking for `ci` gets its own, private `ci`. Root (uid 0) is just another
//! user: root's VMs share only with root's VMs unless a policy group lists 0.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Longest group name the policy (and a `Hello`) may carry.
pub const MAX_GROUP_NAME_BYTES: usize = 256;

/// Who shares a group: the identity of a merge domain.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum GroupKey {
    /// The group `name` of one user's VMs (no policy group of that name lists the user).
    Private {
        /// The VM processes' uid.
        uid: u32,
        /// The name the VMs asked for.
        name: String,
    },
    /// The policy group `name`: the VMs of every uid it lists that ask for it.
    Shared {
        /// The policy group's name.
        name: String,
    },
}

/// The daemon's share policy: which users' VMs may share which named group.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SharePolicy {
    groups: Vec<PolicyGroup>,
}

/// One group of the policy.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PolicyGroup {
    name: String,
    uids: BTreeSet<u32>,
}

/// The policy file's shape.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    groups: Vec<PolicyFileGroup>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFileGroup {
    name: String,
    uids: Vec<u32>,
}

/// Why a share policy was refused.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The file could not be read.
    #[error("cannot read the share policy {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Not JSON of the documented shape (unknown fields included).
    #[error(
        "invalid share policy: {0} (expected {{\"groups\": [{{\"name\": \"ci\", \"uids\": [1000, 1001]}}]}})"
    )]
    Shape(#[source] serde_json::Error),
    /// A group without a name, or with one longer than a hello may carry.
    #[error("invalid share policy: group name {name:?} must be 1 to {MAX_GROUP_NAME_BYTES} bytes")]
    BadName {
        /// The name.
        name: String,
    },
    /// Two groups of the same name.
    #[error("invalid share policy: group {0:?} is listed twice")]
    Duplicate(String),
    /// A group that lists no user.
    #[error("invalid share policy: group {0:?} lists no uids")]
    NoUids(String),
}

impl SharePolicy {
    /// No policy: every group is private to its user.
    pub fn none() -> Self {
        Self::default()
    }

    /// Reads and checks a policy file.
    pub fn load(path: &Path) -> Result<Self, PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text)
    }

    /// Parses and checks a policy: `{"groups": [{"name": ..., "uids": [...]}, ...]}`, each
    /// name 1 to [`MAX_GROUP_NAME_BYTES`] bytes and listed once, each group with a uid.
    pub fn parse(text: &str) -> Result<Self, PolicyError> {
        let file: PolicyFile = serde_json::from_str(text).map_err(PolicyError::Shape)?;
        let mut groups: Vec<PolicyGroup> = Vec::with_capacity(file.groups.len());
        for g in file.groups {
            if g.name.is_empty() || g.name.len() > MAX_GROUP_NAME_BYTES {
                return Err(PolicyError::BadName { name: g.name });
            }
            if groups.iter().any(|o| o.name == g.name) {
                return Err(PolicyError::Duplicate(g.name));
            }
            if g.uids.is_empty() {
                return Err(PolicyError::NoUids(g.name));
            }
            groups.push(PolicyGroup {
                name: g.name,
                uids: g.uids.into_iter().collect(),
            });
        }
        Ok(SharePolicy { groups })
    }

    /// The group a VM of `uid` asking for `name` joins.
    pub fn group_of(&self, uid: u32, name: &str) -> GroupKey {
        match self
            .groups
            .iter()
            .find(|g| g.name == name && g.uids.contains(&uid))
        {
            Some(g) => GroupKey::Shared {
                name: g.name.clone(),
            },
            None => GroupKey::Private {
                uid,
                name: name.to_string(),
            },
        }
    }

    /// The users whose VMs are in group `key` (and who may see it in the control API).
    pub fn members(&self, key: &GroupKey) -> Vec<u32> {
        match key {
            GroupKey::Private { uid, .. } => vec![*uid],
            GroupKey::Shared { name } => self
                .groups
                .iter()
                .find(|g| g.name == *name)
                .map(|g| g.uids.iter().copied().collect())
                .unwrap_or_default(),
        }
    }

    /// Groups in the policy.
    pub fn len(&self) -> usize {
        self.groups.len()
    }

    /// Whether the policy names no group.
    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }
}

impl GroupKey {
    /// The group's name (as VMs ask for it).
    pub fn name(&self) -> &str {
        match self {
            GroupKey::Private { name, .. } | GroupKey::Shared { name } => name,
        }
    }
}

impl std::fmt::Display for GroupKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = tinyvmm_merge_protocol::wire::clip(self.name());
        match self {
            GroupKey::Private { uid, .. } => write!(f, "{name} (uid {uid})"),
            GroupKey::Shared { .. } => write!(f, "{name} (shared by policy)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_are_private_to_their_uid_unless_the_policy_shares_them() {
        let p =
            SharePolicy::parse(r#"{"groups": [{"name": "ci", "uids": [1000, 1001]}]}"#).unwrap();
        assert_eq!(p.len(), 1);
        let ci = GroupKey::Shared { name: "ci".into() };
        assert_eq!(p.group_of(1000, "ci"), ci);
        assert_eq!(p.group_of(1001, "ci"), ci);
        assert_eq!(p.members(&ci), vec![1000, 1001]);
        // Another user asking for "ci" gets its own "ci"; root is just another user.
        for uid in [0, 1002] {
            let own = p.group_of(uid, "ci");
            assert_eq!(
                own,
                GroupKey::Private {
                    uid,
                    name: "ci".into()
                }
            );
            assert_eq!(p.members(&own), vec![uid]);
        }
        assert_ne!(p.group_of(1000, "default"), p.group_of(1001, "default"));
        let none = SharePolicy::none();
        assert!(none.is_empty());
        assert_ne!(none.group_of(0, "default"), none.group_of(1000, "default"));
        let root = SharePolicy::parse(r#"{"groups": [{"name": "all", "uids": [0, 7]}]}"#).unwrap();
        assert_eq!(root.group_of(0, "all"), root.group_of(7, "all"));
    }

    #[test]
    fn malformed_policies_are_refused_with_what_is_wrong() {
        let long = format!(
            r#"{{"groups": [{{"name": "{}", "uids": [1]}}]}}"#,
            "x".repeat(MAX_GROUP_NAME_BYTES + 1)
        );
        let cases: &[(&str, &str)] = &[
            ("", "invalid share policy"),
            ("not json", "invalid share policy"),
            ("[]", "expected"),
            (r#"{"groups": {}}"#, "invalid share policy"),
            (r#"{"groups": [{"name": "ci"}]}"#, "missing field `uids`"),
            (
                r#"{"groups": [{"name": "ci", "uids": [-1]}]}"#,
                "invalid value",
            ),
            (
                r#"{"groups": [{"name": "ci", "uids": [4294967296]}]}"#,
                "invalid value",
            ),
            (
                r#"{"groups": [{"name": "ci", "uids": ["1000"]}]}"#,
                "invalid type",
            ),
            (
                r#"{"groups": [{"name": "ci", "uids": [1], "x": 1}]}"#,
                "unknown field `x`",
            ),
            (r#"{"groups": [], "extra": true}"#, "unknown field `extra`"),
            (r#"{"groups": [{"name": "", "uids": [1]}]}"#, "group name"),
            (&long, "group name"),
            (
                r#"{"groups": [{"name": "a", "uids": [1]}, {"name": "a", "uids": [2]}]}"#,
                "listed twice",
            ),
            (
                r#"{"groups": [{"name": "a", "uids": []}]}"#,
                "lists no uids",
            ),
        ];
        for (text, want) in cases {
            let e = SharePolicy::parse(text).unwrap_err().to_string();
            assert!(e.contains(want), "{text:?}: {e}");
        }
        assert_eq!(
            SharePolicy::parse(r#"{"groups": []}"#).unwrap(),
            SharePolicy::none()
        );
        let missing = SharePolicy::load(Path::new("/nonexistent/policy.json")).unwrap_err();
        assert!(
            missing.to_string().contains("/nonexistent/policy.json"),
            "{missing}"
        );
    }
}
