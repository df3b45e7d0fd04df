//! Finds the line of a key such as `lease.consul.url` or `exec[1]` in YAML
//! text, for error messages.
//!
//! serde reports lines for syntax and type errors, but validation runs on
//! the parsed [`Config`](super::Config), where lines are gone, and serde
//! reports a mapping value's first inner line rather than its key's line.
//! This module recovers the line from the text by following indentation.
//!
//! It understands block-style YAML (`key: value` lines, nested by
//! indentation, and `- ` list items), which is how configuration files are
//! written. Inside flow collections (`{a: 1}`) or multi-line block scalars it
//! may find nothing or a wrong line; the result is only ever used to point
//! the user at a line, never to decide anything.

/// One element of a dotted key path.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Step<'a> {
    Key(&'a str),
    Index(usize),
}

/// What a line (or the inline mapping after a `- `) contributes.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry<'a> {
    /// 1-based line number.
    line: usize,
    /// Column of the key or of the `-`.
    indent: usize,
    /// The key, for `key:` entries; `None` for list items.
    key: Option<&'a str>,
}

impl Entry<'_> {
    fn is_item(&self) -> bool {
        self.key.is_none()
    }
}

/// Splits `lease.consul.url` or `exec[1].cmd` into steps.
fn steps(path: &str) -> Vec<Step<'_>> {
    let mut steps = Vec::new();
    for part in path.split('.') {
        let (name, mut indexes) = match part.find('[') {
            Some(bracket) => (&part[..bracket], &part[bracket..]),
            None => (part, ""),
        };
        if !name.is_empty() {
            steps.push(Step::Key(name));
        }
        while let Some(rest) = indexes.strip_prefix('[') {
            let Some(close) = rest.find(']') else { break };
            if let Ok(index) = rest[..close].parse() {
                steps.push(Step::Index(index));
            }
            indexes = &rest[close + 1..];
        }
    }
    steps
}

/// Reads `key:` at the start of `text`, allowing a quoted key.
fn leading_key(text: &str) -> Option<&str> {
    let (key, after) = match text.as_bytes().first()? {
        quote @ (b'"' | b'\'') => {
            let close = text[1..].find(*quote as char)? + 1;
            (&text[1..close], &text[close + 1..])
        }
        _ => {
            let colon = text.find(':')?;
            (text[..colon].trim_end(), &text[colon..])
        }
    };
    let after_colon = after.strip_prefix(':')?;
    let separated = after_colon.is_empty() || after_colon.starts_with([' ', '\t', '\r', '\n']);
    (separated && !key.is_empty() && !key.starts_with(['#', '{', '['])).then_some(key)
}

fn entries(text: &str) -> Vec<Entry<'_>> {
    let mut entries = Vec::new();
    for (index, raw_line) in text.lines().enumerate() {
        let line = index + 1;
        let mut indent = raw_line.len() - raw_line.trim_start_matches(' ').len();
        let mut rest = &raw_line[indent..];
        if rest.is_empty() || rest.starts_with('#') || rest.starts_with("---") {
            continue;
        }
        // A list item; its inline mapping key (if any) sits after the dash.
        while let Some(after_dash) = rest.strip_prefix('-') {
            if !(after_dash.is_empty() || after_dash.starts_with(' ')) {
                break;
            }
            entries.push(Entry {
                line,
                indent,
                key: None,
            });
            let spaces = after_dash.len() - after_dash.trim_start_matches(' ').len();
            indent += 1 + spaces;
            rest = &after_dash[spaces..];
        }
        if let Some(key) = leading_key(rest) {
            entries.push(Entry {
                line,
                indent,
                key: Some(key),
            });
        }
    }
    entries
}

/// Returns the 1-based line of `path` in `text`, or of its deepest ancestor
/// that exists when the key itself is absent; `None` when not even the first
/// step is found.
pub(crate) fn locate_key(text: &str, path: &str) -> Option<usize> {
    locate_key_occurrence(text, path, 0)
}

/// Like [`locate_key`], but finds the `occurrence`-th (0-based) appearance of
/// the last key under its parent, which is how a duplicated key is found.
pub(crate) fn locate_key_occurrence(text: &str, path: &str, occurrence: usize) -> Option<usize> {
    let entries = entries(text);
    let mut range = 0..entries.len();
    let mut found_line = None;
    let steps = steps(path);
    let last_step = steps.len().saturating_sub(1);

    for (step_number, step) in steps.into_iter().enumerate() {
        let skip = if step_number == last_step {
            occurrence
        } else {
            0
        };
        let candidates = &entries[range.clone()];
        let Some(base_indent) = candidates.iter().map(|entry| entry.indent).min() else {
            break;
        };
        let position = match step {
            Step::Key(name) => candidates
                .iter()
                .enumerate()
                .filter(|(_, entry)| entry.indent == base_indent && entry.key == Some(name))
                .nth(skip)
                .map(|(position, _)| position),
            Step::Index(wanted) => candidates
                .iter()
                .enumerate()
                .filter(|(_, entry)| entry.indent == base_indent && entry.is_item())
                .nth(wanted)
                .map(|(position, _)| position),
        };
        let Some(position) = position else { break };
        let start = range.start + position;
        let owner = &entries[start];
        found_line = Some(owner.line);

        // The owner's children follow it until something at its level or
        // shallower; YAML lets a key's list items sit at the key's own
        // indentation, so those count as children of a key.
        let end = entries[start + 1..range.end]
            .iter()
            .position(|entry| {
                entry.indent < owner.indent
                    || (entry.indent == owner.indent && !(owner.key.is_some() && entry.is_item()))
            })
            .map_or(range.end, |offset| start + 1 + offset);
        range = start + 1..end;
    }
    found_line
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "\
# comment with key: value
fuse:
  dir: /litefs

lease:
  type: consul
  # consul: commented out
  \"hostname\": x
  consul:
    url: http://x
    key: k
exec:
  - cmd: migrate
    if-candidate: true
  - cmd: serve
proxy:
  passthrough:
  - '*.png'
  - '*.ico'
";

    #[test]
    fn finds_nested_keys() {
        assert_eq!(locate_key(TEXT, "fuse"), Some(2));
        assert_eq!(locate_key(TEXT, "fuse.dir"), Some(3));
        assert_eq!(locate_key(TEXT, "lease.type"), Some(6));
        assert_eq!(locate_key(TEXT, "lease.hostname"), Some(8));
        assert_eq!(locate_key(TEXT, "lease.consul"), Some(9));
        assert_eq!(locate_key(TEXT, "lease.consul.key"), Some(11));
    }

    #[test]
    fn finds_list_items() {
        assert_eq!(locate_key(TEXT, "exec[0]"), Some(13));
        assert_eq!(locate_key(TEXT, "exec[1].cmd"), Some(15));
        assert_eq!(locate_key(TEXT, "exec[0].if-candidate"), Some(14));
        assert_eq!(locate_key(TEXT, "proxy.passthrough[1]"), Some(19));
    }

    #[test]
    fn missing_keys_point_at_the_deepest_ancestor() {
        assert_eq!(locate_key(TEXT, "lease.consul.ttl"), Some(9));
        assert_eq!(locate_key(TEXT, "lease.etcd.key"), Some(5));
        assert_eq!(locate_key(TEXT, "exec[5]"), Some(12));
        assert_eq!(locate_key(TEXT, "http.addr"), None);
        assert_eq!(locate_key(TEXT, "fuse.dir.deeper"), Some(3));
    }

    #[test]
    fn finds_a_repeated_key() {
        let text = "lease:\n  type: static\n  candidate: true\n  type: consul\n";
        assert_eq!(locate_key_occurrence(text, "lease.type", 1), Some(4));
    }

    #[test]
    fn key_under_a_different_parent_is_not_found() {
        assert_eq!(locate_key("a:\n  x: 1\nb:\n  y: 2\n", "b.x"), Some(3));
        assert_eq!(locate_key("a:\n  x: 1\nb:\n  y: 2\n", "x"), None);
    }
}
