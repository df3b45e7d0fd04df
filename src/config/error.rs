//! The configuration error type, and the translation of serde_norway's
//! errors into messages that name the file, the line as the user wrote it,
//! and the full dotted key.
//!
//! serde_norway reports `path.to.key: message at line N column M`, with the
//! line (also given by `Error::location`) counted in the text after `${...}`
//! expansion and, for a mapping value, pointing at the value's first inner
//! line. This module removes that position from the text, maps the line back
//! to the original text, moves the line to the key itself where serde points
//! elsewhere, and rewrites the messages that users meet most (unknown keys,
//! duplicate keys, LiteFS-only keys) into ones that say what to do.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use super::CONFIG_FILE_NAME;
use super::env::Expanded;
use super::locate;
use super::raw::{LITEFS_ONLY_KEYS, LITEFS_ONLY_MARKER};

/// Why the configuration could not be used. Every message names the file
/// (when there is one), the line (when known) and the key.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file named with `--config` does not exist.
    #[error(
        "config file {} does not exist; check the --config path, or leave --config out to \
         search ./{CONFIG_FILE_NAME} and /etc/{CONFIG_FILE_NAME}",
        path.display()
    )]
    NotFound {
        /// The path as given.
        path: PathBuf,
    },

    /// The file exists but could not be read.
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// The text is not valid: YAML syntax, an unknown key, a wrong type, a
    /// malformed value, or a malformed `${...}` reference.
    #[error("{}{}{message}", Location(file.as_deref(), *line), KeyPrefix(key.as_deref()))]
    Parse {
        /// The file, when the text came from one.
        file: Option<PathBuf>,
        /// The 1-based line in the file as written (before `${...}`
        /// expansion), when known.
        line: Option<usize>,
        /// The dotted key, such as `lease.consul.ttl`, when known.
        key: Option<String>,
        /// What is wrong and how to fix it.
        message: String,
    },

    /// A key that LiteFS accepts but ltxfs does not support yet.
    #[error(
        "{}`{key}` is a LiteFS setting that ltxfs does not support yet; remove it from the \
         config file.{}{hint}",
        Location(file.as_deref(), *line),
        if hint.is_empty() { "" } else { " " }
    )]
    UnsupportedLiteFsKey {
        /// The file, when the text came from one.
        file: Option<PathBuf>,
        /// The 1-based line of the key, when known.
        line: Option<usize>,
        /// The dotted key, such as `backup` or `proxy.read-timeout`.
        key: String,
        /// What to do instead, or empty.
        hint: &'static str,
    },

    /// The settings parse but do not work together (see
    /// [`Config::validate`](super::Config::validate)).
    #[error("{}{key}: {message}", Location(file.as_deref(), *line))]
    Invalid {
        /// The file, when the text came from one.
        file: Option<PathBuf>,
        /// The 1-based line of the key (or of its section when the key is
        /// missing), when known.
        line: Option<usize>,
        /// The dotted key, such as `lease.consul.url` or `exec[1]`.
        key: String,
        /// What is wrong and how to fix it.
        message: String,
    },
}

impl ConfigError {
    /// The 1-based line the error is about, when known.
    pub fn line(&self) -> Option<usize> {
        match self {
            Self::NotFound { .. } | Self::Read { .. } => None,
            Self::Parse { line, .. }
            | Self::UnsupportedLiteFsKey { line, .. }
            | Self::Invalid { line, .. } => *line,
        }
    }

    /// The dotted key the error is about, when known.
    pub fn key(&self) -> Option<&str> {
        match self {
            Self::NotFound { .. } | Self::Read { .. } => None,
            Self::Parse { key, .. } => key.as_deref(),
            Self::UnsupportedLiteFsKey { key, .. } | Self::Invalid { key, .. } => Some(key),
        }
    }

    /// The file the error is about, when there is one.
    pub fn file(&self) -> Option<&Path> {
        match self {
            Self::NotFound { path } | Self::Read { path, .. } => Some(path),
            Self::Parse { file, .. }
            | Self::UnsupportedLiteFsKey { file, .. }
            | Self::Invalid { file, .. } => file.as_deref(),
        }
    }

    /// Records the file the text came from.
    pub(crate) fn in_file(mut self, path: &Path) -> Self {
        match &mut self {
            Self::NotFound { .. } | Self::Read { .. } => {}
            Self::Parse { file, .. }
            | Self::UnsupportedLiteFsKey { file, .. }
            | Self::Invalid { file, .. } => *file = Some(path.to_owned()),
        }
        self
    }
}

/// Formats the "where" part of an error: `FILE: line N: `.
struct Location<'a>(Option<&'a Path>, Option<usize>);

impl fmt::Display for Location<'_> {
    fn fmt(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        if let Some(file) = self.0 {
            write!(formatter, "{}: ", file.display())?;
        }
        if let Some(line) = self.1 {
            write!(formatter, "line {line}: ")?;
        }
        Ok(())
    }
}

/// Formats an optional key as `KEY: `.
struct KeyPrefix<'a>(Option<&'a str>);

impl fmt::Display for KeyPrefix<'_> {
    fn fmt(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        match self.0 {
            Some(key) => write!(formatter, "{key}: "),
            None => Ok(()),
        }
    }
}

/// Adds a note when the line refers to environment variables that are not
/// set, since an empty expansion is the usual cause of a missing value.
pub(crate) fn with_unset_variable_note(
    message: String,
    line: Option<usize>,
    expanded: &Expanded,
) -> String {
    let Some(line) = line else { return message };
    let unset = expanded.unset_on_line(line);
    if unset.is_empty() {
        return message;
    }
    let names = unset
        .iter()
        .map(|name| format!("`{name}`"))
        .collect::<Vec<_>>()
        .join(", ");
    let verb = if unset.len() == 1 { "is" } else { "are" };
    format!(
        "{message} (note: environment variable {names} on line {line} {verb} not set, \
         so it expanded to an empty string)"
    )
}

/// serde_norway's message without the ` at line N column M` it appends for
/// the error's own location ([`serde_norway::Error::location`]); the line is
/// reported separately, mapped to the original text.
fn message_without_location(error: &serde_norway::Error) -> String {
    let message = error.to_string();
    let Some(location) = error.location() else {
        return message;
    };
    let position = format!(" at line {} column {}", location.line(), location.column());
    match message.split_once(&position) {
        Some((before, after)) => format!("{before}{after}"),
        None => message,
    }
}

/// Replaces serde's "struct RawLease" (an internal type name) with words.
fn without_internal_type_names(message: &str) -> String {
    let mut output = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(start) = rest.find("struct Raw") {
        output.push_str(&rest[..start]);
        output.push_str("a mapping of keys");
        let after = &rest[start + "struct Raw".len()..];
        let name_length = after
            .bytes()
            .take_while(|byte| byte.is_ascii_alphanumeric())
            .count();
        rest = &after[name_length..];
    }
    output.push_str(rest);
    output
}

/// Splits serde_norway's `path.to.key: message` into its two parts.
fn split_key_prefix(message: &str) -> (Option<&str>, &str) {
    if let Some((prefix, rest)) = message.split_once(": ") {
        let looks_like_path = !prefix.is_empty()
            && prefix.bytes().all(|byte| {
                byte.is_ascii_alphanumeric()
                    || matches!(byte, b'-' | b'_' | b'.' | b'[' | b']' | b'?')
            });
        if looks_like_path {
            return (Some(prefix), rest);
        }
    }
    (None, message)
}

/// Returns the text between the first pair of backquotes.
fn first_quoted(text: &str) -> Option<&str> {
    let start = text.find('`')? + 1;
    let length = text[start..].find('`')?;
    Some(&text[start..start + length])
}

fn join_key(section: Option<&str>, key: &str) -> String {
    match section {
        Some(section) => format!("{section}.{key}"),
        None => key.to_owned(),
    }
}

/// Levenshtein distance, for "did you mean" suggestions on short keys.
fn edit_distance(left: &str, right: &str) -> usize {
    let right: Vec<char> = right.chars().collect();
    let mut previous: Vec<usize> = (0..=right.len()).collect();
    for (i, left_char) in left.chars().enumerate() {
        let mut current = vec![i + 1];
        for (j, right_char) in right.iter().enumerate() {
            let substitution = previous[j] + usize::from(left_char != *right_char);
            current.push(substitution.min(previous[j + 1] + 1).min(current[j] + 1));
        }
        previous = current;
    }
    previous[right.len()]
}

/// Rewrites serde's "unknown field `x`, expected one of `a`, `b`" for a key
/// under `section` into a message that names the full key, suggests a close
/// match, and leaves out the LiteFS-only keys that serde lists.
fn unknown_key_message(section: Option<&str>, rest: &str) -> Option<(String, String)> {
    let after = rest.strip_prefix("unknown field ")?;
    let unknown = first_quoted(after)?;
    let expected_part = after.split_once("expected").map_or("", |(_, list)| list);
    let allowed: Vec<&str> = expected_part
        .split('`')
        .skip(1)
        .step_by(2)
        .filter(|candidate| {
            let full = join_key(section, candidate);
            !LITEFS_ONLY_KEYS.iter().any(|(key, _)| *key == full)
        })
        .collect();

    let normalized = unknown.to_ascii_lowercase().replace('_', "-");
    let suggestion = allowed
        .iter()
        .map(|candidate| (edit_distance(&normalized, candidate), *candidate))
        .filter(|(distance, candidate)| *distance <= 2 && *distance < candidate.len())
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, candidate)| candidate);

    let mut message = "unknown key".to_owned();
    if let Some(suggestion) = suggestion {
        message.push_str(&format!(" (did you mean `{suggestion}`?)"));
    }
    let place = match section {
        Some(section) => format!("under `{section}`"),
        None => "at the top level".to_owned(),
    };
    if allowed.is_empty() {
        message.push_str(&format!("; no keys are allowed {place}"));
    } else {
        let list = allowed
            .iter()
            .map(|key| format!("`{key}`"))
            .collect::<Vec<_>>()
            .join(", ");
        message.push_str(&format!("; the keys allowed {place} are {list}"));
    }
    Some((join_key(section, unknown), message))
}

/// Converts a serde_norway error into a [`ConfigError`], with the line
/// mapped back to the original text and the key split out.
pub(crate) fn parse_error_from_serde(
    error: &serde_norway::Error,
    expanded: &Expanded,
) -> ConfigError {
    let serde_line = error.location().map(|location| location.line());
    let mut line = serde_line.map(|line| expanded.original_line(line));
    let full_message = without_internal_type_names(&message_without_location(error));
    let (section, rest) = split_key_prefix(&full_message);

    if rest == LITEFS_ONLY_MARKER {
        let key = section.unwrap_or_default().to_owned();
        let hint = LITEFS_ONLY_KEYS
            .iter()
            .find(|(known, _)| *known == key)
            .map_or("", |(_, hint)| *hint);
        // serde points at a mapping's first inner line; find the key's own.
        if let Some(key_line) = locate::locate_key(&expanded.text, &key) {
            line = Some(expanded.original_line(key_line));
        }
        return ConfigError::UnsupportedLiteFsKey {
            file: None,
            line,
            key,
            hint,
        };
    }

    let (key, mut message) = if let Some((key, message)) = unknown_key_message(section, rest) {
        (Some(key), message)
    } else if let Some(duplicate) = rest.strip_prefix("duplicate field ").and_then(first_quoted) {
        let key = join_key(section, duplicate);
        // serde points at the enclosing mapping; find the second occurrence.
        if let Some(key_line) = locate::locate_key_occurrence(&expanded.text, &key, 1) {
            line = Some(expanded.original_line(key_line));
        }
        (
            Some(key),
            "the key appears more than once in the same section; keep only one".to_owned(),
        )
    } else {
        (section.map(str::to_owned), rest.to_owned())
    };

    if message.contains("cannot start any token") {
        let has_tab = serde_line
            .and_then(|line| expanded.text.lines().nth(line.saturating_sub(1)))
            .is_some_and(|text| text.contains('\t'));
        if has_tab {
            message.push_str(" (YAML does not allow tabs for indentation; use spaces)");
        }
    }
    let message = with_unset_variable_note(message, line, expanded);
    ConfigError::Parse {
        file: None,
        line,
        key,
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::super::parse_with_env;
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn parse_error(text: &str) -> ConfigError {
        parse_with_env(text, Some(&no_env)).expect_err(text)
    }

    #[test]
    fn locations_are_removed_from_serde_messages() {
        for text in ["lease:\n  type: [\n", "lease: 3\n", "lease:\n  bogus: 1\n"] {
            let error =
                serde_norway::from_str::<super::super::raw::RawConfig>(text).expect_err(text);
            assert!(error.location().is_some(), "{text}: {error}");
            let message = message_without_location(&error);
            assert!(!message.contains(" column "), "{text}: {message}");
        }
    }

    #[test]
    fn key_prefixes_are_split_off() {
        assert_eq!(
            split_key_prefix("lease.consul: unknown field `x`"),
            (Some("lease.consul"), "unknown field `x`")
        );
        assert_eq!(
            split_key_prefix("invalid type: string"),
            (None, "invalid type: string")
        );
        assert_eq!(split_key_prefix("exec[1]: bad"), (Some("exec[1]"), "bad"));
    }

    #[test]
    fn edit_distances() {
        assert_eq!(edit_distance("advertise-url", "advertise-url"), 0);
        assert_eq!(edit_distance("canidate", "candidate"), 1);
        assert_eq!(edit_distance("", "abc"), 3);
    }

    #[test]
    fn unknown_keys_get_suggestions_and_hide_litefs_only_keys() {
        let error = parse_error("lease:\n  advertise_url: http://x:1\n");
        let text = error.to_string();
        assert_eq!(error.key(), Some("lease.advertise_url"));
        assert_eq!(error.line(), Some(2));
        assert!(text.contains("(did you mean `advertise-url`?)"), "{text}");
        assert!(!text.contains("`databases`"), "{text}");

        let top = parse_error("tracing_enabled: true\n").to_string();
        assert!(!top.contains("`tracing`,"), "{top}");
        assert!(top.contains("`backup`"), "{top}");
        let backup = parse_error("backup:\n  sync_interval: 1s\n").to_string();
        assert!(
            backup.contains("(did you mean `sync-interval`?)"),
            "{backup}"
        );
        assert!(
            !backup.contains("`auth-token`") && !backup.contains("`full-sync-interval`"),
            "{backup}"
        );
    }

    #[test]
    fn duplicate_keys_point_at_the_repeat() {
        let error = parse_error("lease:\n  type: static\n  candidate: true\n  type: consul\n");
        assert_eq!(error.key(), Some("lease.type"));
        assert_eq!(error.line(), Some(4));
    }

    #[test]
    fn tabs_get_a_hint() {
        let error = parse_error("fuse:\n\tdir: /x\n");
        assert!(error.to_string().contains("tabs"), "{error}");
    }

    #[test]
    fn internal_type_names_are_not_shown() {
        let error = parse_error("lease: 3\n");
        assert_eq!(error.key(), Some("lease"));
        assert!(
            error.to_string().contains("expected a mapping of keys"),
            "{error}"
        );
        let top = parse_error("just text\n");
        assert!(!top.to_string().contains("Raw"), "{top}");
    }
}
