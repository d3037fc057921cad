//! Version rules: which tags of a repository are versions of a component, the semantic version
//! each one carries and the channel it belongs to.

use std::fmt;
use std::str::FromStr;

use regex::{Regex, RegexBuilder};
use semver::Version;
use serde::{Deserialize, Serialize};

use crate::RegistryError;

/// `1.2.3`, `v1.2.3`, `1.2.3-rc.1`, `1.2.3+build.5`: a full semantic version, optionally after
/// a `v`. Moving aliases (`1`, `1.2`, `latest`) are deliberately not versions.
pub const DEFAULT_TAG_PATTERN: &str = r"v?(?P<version>(?:0|[1-9]\d*)\.(?:0|[1-9]\d*)\.(?:0|[1-9]\d*)(?:-[0-9A-Za-z.-]+)?(?:\+[0-9A-Za-z.-]+)?)";
pub const DEFAULT_CHANNEL: &str = "stable";

const MAX_PATTERN_LEN: usize = 1024;
/// User patterns compile to at most this much memory; the default of the regex crate (10 MiB)
/// is generous for a tag filter.
const MAX_COMPILED_PATTERN: usize = 1 << 20;
const MAX_CHANNEL_LEN: usize = 64;

fn invalid(message: String) -> RegistryError {
    RegistryError::InvalidInput(message)
}

/// Compiles `pattern` anchored to the whole tag, with a clear error for bad input.
fn compile(pattern: &str, what: &str) -> Result<Regex, RegistryError> {
    if pattern.trim().is_empty() {
        return Err(invalid(format!("{what} is empty")));
    }
    if pattern.len() > MAX_PATTERN_LEN {
        return Err(invalid(format!(
            "{what} is longer than {MAX_PATTERN_LEN} characters"
        )));
    }
    RegexBuilder::new(&format!("^(?:{pattern})$"))
        .size_limit(MAX_COMPILED_PATTERN)
        .build()
        .map_err(|e| invalid(format!("{what} {pattern:?} is not a valid regex: {e}")))
}

/// Which channel a version belongs to.
#[derive(Clone, Debug)]
pub enum ChannelMatch {
    /// The semantic version has a pre-release part (`1.2.3-beta.1`).
    Prerelease,
    /// The whole tag matches this regex.
    Tag(Regex),
}

/// `channel` for versions that match `when`; rules are tried in order, the first match wins.
///
/// Text form (for CLIs and storage): `beta=prerelease` or `rc=~-rc\.\d+$` (`~` then a regex
/// over the whole tag).
#[derive(Clone, Debug)]
pub struct ChannelRule {
    channel: String,
    when: ChannelMatch,
}

fn check_channel(channel: &str) -> Result<(), RegistryError> {
    let ok = !channel.is_empty()
        && channel.len() <= MAX_CHANNEL_LEN
        && channel.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.')
        });
    if ok {
        Ok(())
    } else {
        Err(invalid(format!(
            "channel name {channel:?} is invalid: 1 to {MAX_CHANNEL_LEN} lowercase letters, \
             digits, '-', '_' or '.'"
        )))
    }
}

impl ChannelRule {
    /// Versions with a pre-release part go to `channel`.
    pub fn prerelease(channel: &str) -> Result<Self, RegistryError> {
        check_channel(channel)?;
        Ok(Self {
            channel: channel.to_string(),
            when: ChannelMatch::Prerelease,
        })
    }

    /// Tags that match `pattern` (as a whole) go to `channel`.
    pub fn tag_regex(channel: &str, pattern: &str) -> Result<Self, RegistryError> {
        check_channel(channel)?;
        let regex = compile(pattern, &format!("tag regex of channel {channel:?}"))?;
        Ok(Self {
            channel: channel.to_string(),
            when: ChannelMatch::Tag(regex),
        })
    }

    pub fn channel(&self) -> &str {
        &self.channel
    }

    pub fn when(&self) -> &ChannelMatch {
        &self.when
    }

    fn matches(&self, tag: &str, version: &Version) -> bool {
        match &self.when {
            ChannelMatch::Prerelease => !version.pre.is_empty(),
            ChannelMatch::Tag(regex) => regex.is_match(tag),
        }
    }
}

impl FromStr for ChannelRule {
    type Err = RegistryError;

    fn from_str(text: &str) -> Result<Self, RegistryError> {
        let (channel, rule) = text.split_once('=').ok_or_else(|| {
            invalid(format!(
                "channel rule {text:?} must be NAME=prerelease or NAME=~REGEX"
            ))
        })?;
        let channel = channel.trim();
        if rule.trim() == "prerelease" {
            Self::prerelease(channel)
        } else if let Some(pattern) = rule.strip_prefix('~') {
            Self::tag_regex(channel, pattern)
        } else {
            Err(invalid(format!(
                "channel rule {text:?}: after '=' comes `prerelease` or `~` and a regex"
            )))
        }
    }
}

impl fmt::Display for ChannelRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.when {
            ChannelMatch::Prerelease => write!(f, "{}=prerelease", self.channel),
            ChannelMatch::Tag(regex) => {
                // Undo the anchoring `compile` added, so that the text round-trips.
                let shown = regex.as_str();
                let inner = shown
                    .strip_prefix("^(?:")
                    .and_then(|s| s.strip_suffix(")$"))
                    .unwrap_or(shown);
                write!(f, "{}=~{inner}", self.channel)
            }
        }
    }
}

/// How a repository's tags map to versions of a component.
///
/// A tag is a version when `tag_pattern` matches the *whole* tag; the named group `version`
/// (or else the first group) must then hold a semantic version. Its channel is that of the
/// first matching channel rule, else `default_channel`. Serialized as
/// `{"tag_pattern": …, "channels": ["beta=prerelease"], "default_channel": "stable"}`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(try_from = "VersionRulesText", into = "VersionRulesText")]
pub struct VersionRules {
    pattern: String,
    regex: Regex,
    /// Which capture group holds the version.
    group: VersionGroup,
    channels: Vec<ChannelRule>,
    default_channel: String,
}

#[derive(Clone, Copy, Debug)]
enum VersionGroup {
    Named,
    First,
}

impl VersionRules {
    /// Rules with `tag_pattern` (see the type's docs), no channel rules and channel `stable`.
    pub fn new(tag_pattern: &str) -> Result<Self, RegistryError> {
        let regex = compile(tag_pattern, "tag pattern")?;
        let group = if regex.capture_names().any(|n| n == Some("version")) {
            VersionGroup::Named
        } else if regex.captures_len() > 1 {
            VersionGroup::First
        } else {
            return Err(invalid(format!(
                "tag pattern {tag_pattern:?} has no capture group: name the part holding the \
                 version `(?P<version>…)`"
            )));
        };
        Ok(Self {
            pattern: tag_pattern.to_string(),
            regex,
            group,
            channels: Vec::new(),
            default_channel: DEFAULT_CHANNEL.to_string(),
        })
    }

    /// [`DEFAULT_TAG_PATTERN`] with pre-releases on channel `beta` and the rest `stable`.
    pub fn semver() -> Self {
        let compiled = Self::new(DEFAULT_TAG_PATTERN).and_then(|rules| {
            let beta = ChannelRule::prerelease("beta")?;
            Ok(rules.with_channel(beta))
        });
        match compiled {
            Ok(rules) => rules,
            // The pattern and the channel name are constants checked by the tests.
            Err(e) => unreachable!("default version rules do not compile: {e}"),
        }
    }

    /// Adds a channel rule after the existing ones.
    pub fn with_channel(mut self, rule: ChannelRule) -> Self {
        self.channels.push(rule);
        self
    }

    /// The channel of versions no rule matches.
    pub fn with_default_channel(mut self, channel: &str) -> Result<Self, RegistryError> {
        check_channel(channel)?;
        self.default_channel = channel.to_string();
        Ok(self)
    }

    pub fn tag_pattern(&self) -> &str {
        &self.pattern
    }

    pub fn channels(&self) -> &[ChannelRule] {
        &self.channels
    }

    pub fn default_channel(&self) -> &str {
        &self.default_channel
    }

    /// The version and channel of `tag`, or why it is not a version.
    pub fn classify(&self, tag: &str) -> Result<(Version, String), String> {
        let captures = self
            .regex
            .captures(tag)
            .ok_or_else(|| "does not match the tag pattern".to_string())?;
        let text = match self.group {
            VersionGroup::Named => captures.name("version"),
            VersionGroup::First => captures.get(1),
        }
        .map(|m| m.as_str())
        .ok_or_else(|| "the version group matched nothing".to_string())?;
        let version =
            Version::parse(text).map_err(|e| format!("{text:?} is not a semantic version: {e}"))?;
        let channel = self
            .channels
            .iter()
            .find(|rule| rule.matches(tag, &version))
            .map_or(&self.default_channel, |rule| &rule.channel)
            .clone();
        Ok((version, channel))
    }
}

impl Default for VersionRules {
    fn default() -> Self {
        Self::semver()
    }
}

/// The stored form of [`VersionRules`].
#[derive(Serialize, Deserialize)]
struct VersionRulesText {
    tag_pattern: String,
    #[serde(default)]
    channels: Vec<String>,
    #[serde(default = "default_channel")]
    default_channel: String,
}

fn default_channel() -> String {
    DEFAULT_CHANNEL.to_string()
}

impl TryFrom<VersionRulesText> for VersionRules {
    type Error = RegistryError;

    fn try_from(text: VersionRulesText) -> Result<Self, RegistryError> {
        let mut rules =
            Self::new(&text.tag_pattern)?.with_default_channel(&text.default_channel)?;
        for rule in &text.channels {
            rules = rules.with_channel(rule.parse()?);
        }
        Ok(rules)
    }
}

impl From<VersionRules> for VersionRulesText {
    fn from(rules: VersionRules) -> Self {
        Self {
            channels: rules.channels.iter().map(ToString::to_string).collect(),
            tag_pattern: rules.pattern,
            default_channel: rules.default_channel,
        }
    }
}

/// A tag that is a version of the component, pinned to the manifest digest it resolved to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ComponentVersion {
    pub tag: String,
    /// `sha256:<hex>` of the manifest (or index) the tag pointed to when synced.
    pub digest: String,
    pub media_type: String,
    pub semver: Option<Version>,
    pub channel: String,
}

/// A tag `sync` did not turn into a version, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkippedTag {
    pub tag: String,
    pub reason: String,
}

/// The outcome of a sync: versions (highest semantic version first) and skipped tags (in the
/// registry's order).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncReport {
    pub versions: Vec<ComponentVersion>,
    pub skipped: Vec<SkippedTag>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn classify(rules: &VersionRules, tag: &str) -> Option<(String, String)> {
        rules.classify(tag).ok().map(|(v, c)| (v.to_string(), c))
    }

    fn pair(v: &str, c: &str) -> Option<(String, String)> {
        Some((v.to_string(), c.to_string()))
    }

    #[test]
    fn default_rules_take_full_semvers_and_put_prereleases_on_beta() {
        let rules = VersionRules::default();
        assert_eq!(classify(&rules, "1.2.3"), pair("1.2.3", "stable"));
        assert_eq!(classify(&rules, "v1.2.3"), pair("1.2.3", "stable"));
        assert_eq!(
            classify(&rules, "2.0.0-beta.1"),
            pair("2.0.0-beta.1", "beta")
        );
        assert_eq!(
            classify(&rules, "1.0.0+build.7"),
            pair("1.0.0+build.7", "stable")
        );
        for not_a_version in [
            "latest", "1", "1.2", "01.2.3", "1.2.3-", "x1.2.3", "1.2.3.4",
        ] {
            assert_eq!(classify(&rules, not_a_version), None, "{not_a_version}");
        }
        assert_eq!(
            rules.classify("latest").unwrap_err(),
            "does not match the tag pattern"
        );
    }

    #[test]
    fn custom_patterns_groups_and_channels() {
        let rules = VersionRules::new(r"app-(\d+\.\d+\.\d+)(-rc\d+)?")
            .unwrap()
            .with_channel("rc=~.*-rc\\d+".parse().unwrap())
            .with_default_channel("ga")
            .unwrap();
        assert_eq!(classify(&rules, "app-1.2.3"), pair("1.2.3", "ga"));
        assert_eq!(classify(&rules, "app-1.2.3-rc1"), pair("1.2.3", "rc"));
        assert_eq!(classify(&rules, "1.2.3"), None);

        // The named group wins over the first group.
        let rules = VersionRules::new(r"(release|hotfix)-(?P<version>.+)").unwrap();
        assert_eq!(classify(&rules, "hotfix-1.0.1"), pair("1.0.1", "stable"));
        assert_eq!(
            rules.classify("hotfix-1.0").unwrap_err(),
            "\"1.0\" is not a semantic version: unexpected end of input while parsing minor version number"
        );
    }

    #[test]
    fn bad_rules_are_refused_clearly() {
        let msg = |r: Result<VersionRules, RegistryError>| match r {
            Err(RegistryError::InvalidInput(m)) => m,
            other => panic!("expected InvalidInput, got {other:?}"),
        };
        assert!(msg(VersionRules::new("(")).contains("not a valid regex"));
        assert!(msg(VersionRules::new(r"\d+\.\d+\.\d+")).contains("no capture group"));
        assert!(msg(VersionRules::new("  ")).contains("empty"));
        assert!(msg(VersionRules::new(&"(a)".repeat(400))).contains("longer than"));
        assert!(msg(VersionRules::new(r"(\w{1000}){1000}")).contains("not a valid regex"));
        assert!(msg(VersionRules::semver().with_default_channel("Stable")).contains("channel"));
        for bad in ["beta", "beta=pre", "=prerelease", "x=~(", "Beta=prerelease"] {
            assert!(bad.parse::<ChannelRule>().is_err(), "{bad}");
        }
    }

    #[test]
    fn rules_round_trip_through_their_stored_form() {
        let rules = VersionRules::new(r"v(?P<version>.+)")
            .unwrap()
            .with_channel("rc=~.*-rc.*".parse().unwrap())
            .with_channel(ChannelRule::prerelease("beta").unwrap());
        let json = serde_json::to_value(&rules).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "tag_pattern": "v(?P<version>.+)",
                "channels": ["rc=~.*-rc.*", "beta=prerelease"],
                "default_channel": "stable",
            })
        );
        let back: VersionRules = serde_json::from_value(json).unwrap();
        assert_eq!(classify(&back, "v1.0.0-rc.1"), pair("1.0.0-rc.1", "rc"));
        assert_eq!(classify(&back, "v1.0.0-alpha"), pair("1.0.0-alpha", "beta"));
        let err = serde_json::from_value::<VersionRules>(serde_json::json!({
            "tag_pattern": "v(?P<version>.+)",
            "channels": ["nonsense"],
        }))
        .unwrap_err();
        assert!(err.to_string().contains("NAME=prerelease"), "{err}");
    }
}
