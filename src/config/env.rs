//! Environment variable expansion in the configuration text, before YAML
//! parsing, compatible with LiteFS.
//!
//! Syntax, applied to the raw text of the file:
//!
//! - `$NAME` and `${NAME}` are replaced by the variable's value. An unset
//!   variable becomes the empty string, as with Go's `os.ExpandEnv`, which
//!   LiteFS uses. `NAME` is letters, digits and `_`.
//! - `${NAME == 'text'}`, `${NAME != "text"}` and `${NAME == OTHER}` become
//!   `true` or `false` by comparing the variable with a literal or with
//!   another variable. LiteFS has the same extension; Fly.io setups use it
//!   as `candidate: ${FLY_REGION == PRIMARY_REGION}`.
//! - `$$` is a literal `$`. (This is an ltxfs choice: Go would read `$$` as a
//!   variable named `$` and produce an empty string, which is never useful.)
//! - `$` followed by anything else that cannot start a name (a space, `/`,
//!   a quote, the end of the line) is kept as is. As in Go, `$` followed by
//!   a digit or one of `*#@!?-` names a one-character variable, which is
//!   almost always unset and so becomes empty.
//!
//! Differences from LiteFS, all of which turn silent surprises into errors:
//! a `${` without its `}` on the same line, an empty `${}`, and a `${...}`
//! that is neither a name nor a comparison (for example the shell's
//! `${PORT:-8080}`) are errors naming the line. LiteFS silently drops or
//! empties them.
//!
//! Lines whose first non-blank character is `#` are whole-line comments and
//! are left untouched, so a comment can mention `${` freely.
//!
//! Expansion keeps a map from lines of the expanded text back to lines of
//! the original file (a value may contain line breaks), so that every error
//! reports the line the user wrote.

/// The expanded text and what is needed to report errors against the
/// original.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Expanded {
    /// The text with every reference replaced.
    pub text: String,
    /// For each line of `text` (index 0 is line 1), the 1-based line of the
    /// original text it came from.
    pub original_line_of: Vec<usize>,
    /// Variables that were referenced but unset, with the 1-based original
    /// line of each reference.
    pub unset_variables: Vec<(usize, String)>,
}

impl Expanded {
    /// Wraps text that was not expanded: every line maps to itself.
    pub fn unchanged(text: &str) -> Self {
        let line_count = text.split('\n').count();
        Self {
            text: text.to_owned(),
            original_line_of: (1..=line_count).collect(),
            unset_variables: Vec::new(),
        }
    }

    /// Maps a 1-based line of the expanded text to the original text.
    pub fn original_line(&self, expanded_line: usize) -> usize {
        expanded_line
            .checked_sub(1)
            .and_then(|index| self.original_line_of.get(index))
            .copied()
            .unwrap_or(expanded_line)
    }

    /// Names the unset variables referenced on an original line, for a hint
    /// in error messages.
    pub fn unset_on_line(&self, original_line: usize) -> Vec<&str> {
        self.unset_variables
            .iter()
            .filter(|(line, _)| *line == original_line)
            .map(|(_, name)| name.as_str())
            .collect()
    }
}

/// An expansion problem: the 1-based line and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ExpansionError {
    pub line: usize,
    pub message: String,
}

/// Expands every reference in `text`, looking variables up with `lookup`.
pub(crate) fn expand(text: &str, lookup: &super::EnvLookup) -> Result<Expanded, ExpansionError> {
    let mut expanded = Expanded {
        text: String::with_capacity(text.len()),
        original_line_of: Vec::new(),
        unset_variables: Vec::new(),
    };
    for (index, line) in text.split_inclusive('\n').enumerate() {
        let line_number = index + 1;
        let expanded_line = if line.trim_start().starts_with('#') {
            line.to_owned()
        } else {
            expand_line(line, line_number, lookup, &mut expanded.unset_variables)?
        };
        let line_breaks = expanded_line.matches('\n').count();
        // A line without a trailing break still occupies one line.
        let lines_taken = if expanded_line.ends_with('\n') {
            line_breaks
        } else {
            line_breaks + 1
        };
        expanded
            .original_line_of
            .extend(std::iter::repeat_n(line_number, lines_taken));
        expanded.text.push_str(&expanded_line);
    }
    // The (empty) line after a final line break belongs to the next line.
    let last_line = text.split_inclusive('\n').count() + 1;
    expanded.original_line_of.push(last_line);
    Ok(expanded)
}

fn is_name_byte(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || byte == b'_'
}

fn is_special_variable(byte: u8) -> bool {
    matches!(byte, b'*' | b'#' | b'@' | b'!' | b'?' | b'-' | b'0'..=b'9')
}

fn expand_line(
    line: &str,
    line_number: usize,
    lookup: &super::EnvLookup,
    unset_variables: &mut Vec<(usize, String)>,
) -> Result<String, ExpansionError> {
    let mut get = |name: &str| match lookup(name) {
        Some(value) => value,
        None => {
            unset_variables.push((line_number, name.to_owned()));
            String::new()
        }
    };

    let bytes = line.as_bytes();
    let mut output = String::with_capacity(line.len());
    let mut copied_up_to = 0;
    let mut position = 0;
    while position < bytes.len() {
        if bytes[position] != b'$' {
            position += 1;
            continue;
        }
        output.push_str(&line[copied_up_to..position]);
        let next = bytes.get(position + 1).copied();
        match next {
            Some(b'$') => {
                output.push('$');
                position += 2;
            }
            Some(b'{') => {
                let inner_start = position + 2;
                let Some(length) = line[inner_start..].find('}') else {
                    return Err(ExpansionError {
                        line: line_number,
                        message: "`${` is not closed by `}` on the same line; \
                                  write `$${` for a literal `${`"
                            .to_owned(),
                    });
                };
                let inner = &line[inner_start..inner_start + length];
                output.push_str(&evaluate_braced(inner, line_number, &mut get)?);
                position = inner_start + length + 1;
            }
            Some(byte) if is_special_variable(byte) => {
                output.push_str(&get(&line[position + 1..position + 2]));
                position += 2;
            }
            Some(byte) if is_name_byte(byte) => {
                let name_length = bytes[position + 1..]
                    .iter()
                    .take_while(|byte| is_name_byte(**byte))
                    .count();
                output.push_str(&get(&line[position + 1..position + 1 + name_length]));
                position += 1 + name_length;
            }
            _ => {
                output.push('$');
                position += 1;
            }
        }
        copied_up_to = position;
    }
    output.push_str(&line[copied_up_to..]);
    Ok(output)
}

/// Evaluates the inside of `${...}`: a name or a comparison.
fn evaluate_braced(
    inner: &str,
    line_number: usize,
    get: &mut dyn FnMut(&str) -> String,
) -> Result<String, ExpansionError> {
    let trimmed = inner.trim();
    let unsupported = || ExpansionError {
        line: line_number,
        message: format!(
            "cannot expand `${{{inner}}}`: write `${{NAME}}`, `${{NAME == 'text'}}`, \
             `${{NAME != \"text\"}}` or `${{NAME == OTHER_NAME}}` (shell forms such as \
             `${{NAME:-default}}` are not supported)"
        ),
    };
    if trimmed.is_empty() {
        return Err(ExpansionError {
            line: line_number,
            message: "`${}` has no variable name in it".to_owned(),
        });
    }

    let name_length = trimmed
        .bytes()
        .take_while(|byte| is_name_byte(*byte))
        .count();
    if name_length == 0 {
        return Err(unsupported());
    }
    let (name, after_name) = trimmed.split_at(name_length);
    if after_name.is_empty() {
        return Ok(get(name));
    }

    let after_name = after_name.trim_start();
    let (wants_equal, right_side) = if let Some(rest) = after_name.strip_prefix("==") {
        (true, rest.trim_start())
    } else if let Some(rest) = after_name.strip_prefix("!=") {
        (false, rest.trim_start())
    } else {
        return Err(unsupported());
    };

    let quoted_literal = [b'\'', b'"'].into_iter().find_map(|quote| {
        let bytes = right_side.as_bytes();
        (bytes.len() >= 2 && bytes[0] == quote && bytes[bytes.len() - 1] == quote)
            .then(|| right_side[1..right_side.len() - 1].to_owned())
    });
    let right_value = match quoted_literal {
        Some(literal) => literal,
        None if !right_side.is_empty() && right_side.bytes().all(is_name_byte) => get(right_side),
        None => return Err(unsupported()),
    };
    let left_value = get(name);
    Ok(((left_value == right_value) == wants_equal).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_env(name: &str) -> Option<String> {
        match name {
            "HOME" => Some("/home/ltx".to_owned()),
            "FLY_REGION" => Some("ams".to_owned()),
            "PRIMARY_REGION" => Some("ams".to_owned()),
            "OTHER_REGION" => Some("ord".to_owned()),
            "MULTI" => Some("a\nb".to_owned()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    fn expand_text(text: &str) -> String {
        expand(text, &fake_env).expect(text).text
    }

    #[test]
    fn references_expand() {
        let table = [
            ("dir: $HOME/x", "dir: /home/ltx/x"),
            ("dir: ${HOME}x", "dir: /home/ltxx"),
            ("dir: ${ HOME }", "dir: /home/ltx"),
            ("v: $UNSET.", "v: ."),
            ("v: ${UNSET}", "v: "),
            ("v: [$EMPTY]", "v: []"),
            ("v: $$HOME", "v: $HOME"),
            ("v: $$$$", "v: $$"),
            ("v: a$", "v: a$"),
            ("v: $ $/ $\"", "v: $ $/ $\""),
            ("v: $1x", "v: x"),
            ("v: $@", "v: "),
            ("c: ${FLY_REGION == PRIMARY_REGION}", "c: true"),
            ("c: ${FLY_REGION != PRIMARY_REGION}", "c: false"),
            ("c: ${FLY_REGION == OTHER_REGION}", "c: false"),
            ("c: ${FLY_REGION == 'ams'}", "c: true"),
            ("c: ${FLY_REGION=='ord'}", "c: false"),
            ("c: ${FLY_REGION != \"ord\"}", "c: true"),
            ("c: ${UNSET == ''}", "c: true"),
            ("c: ${UNSET == OTHER_UNSET}", "c: true"),
            (
                "# comment ${ left alone $HOME",
                "# comment ${ left alone $HOME",
            ),
        ];
        for (input, output) in table {
            assert_eq!(expand_text(input), output, "{input}");
        }
    }

    #[test]
    fn malformed_references_are_errors_with_lines() {
        for (input, line) in [
            ("a: 1\nb: ${OPEN\n", 2),
            ("a: ${}", 1),
            ("a: 1\n\nb: ${PORT:-8080}", 3),
            ("a: ${A == }", 1),
            ("a: ${A <> B}", 1),
            ("a: ${'x' == A}", 1),
        ] {
            let error = expand(input, &fake_env).expect_err(input);
            assert_eq!(error.line, line, "{input}: {}", error.message);
        }
    }

    #[test]
    fn line_map_follows_values_with_line_breaks() {
        let expanded = expand("a: \"$MULTI\"\nb: $UNSET\nc: 1", &fake_env).unwrap();
        assert_eq!(expanded.text, "a: \"a\nb\"\nb: \nc: 1");
        assert_eq!(expanded.original_line(1), 1);
        assert_eq!(expanded.original_line(2), 1);
        assert_eq!(expanded.original_line(3), 2);
        assert_eq!(expanded.original_line(4), 3);
        assert_eq!(expanded.unset_on_line(2), vec!["UNSET"]);
        assert!(expanded.unset_on_line(1).is_empty());
    }

    #[test]
    fn unchanged_text_maps_lines_to_themselves() {
        let unchanged = Expanded::unchanged("a\nb\n");
        assert_eq!(unchanged.original_line(3), 3);
        assert_eq!(unchanged.original_line(99), 99);
    }
}
