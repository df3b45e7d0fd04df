//! Parsers for the value syntaxes that `ltxfs.yml` shares with LiteFS.
//!
//! - Durations use Go's `time.ParseDuration` syntax, because LiteFS reads its
//!   durations that way: `10s`, `5m`, `1h30m`, `250ms`, `1.5h`, `0`.
//! - Byte sizes (`data.max-size`) are an ltxfs addition: `512MiB`, `1GB`, or a
//!   plain number of bytes.
//! - Command lines (`exec`) are split into an argument vector with POSIX shell
//!   quoting. No shell is ever run.
//!
//! Every parser returns a [`ValueError`] whose message quotes the rejected
//! text and says how to write it correctly; none of them panics on any input.

use std::time::Duration;

/// A value in the configuration could not be parsed.
///
/// The message quotes the offending value and says how to write it; the
/// caller adds the key and line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ValueError(pub(crate) String);

/// The largest duration Go can represent (`math.MaxInt64` nanoseconds, about
/// 292 years). LiteFS cannot read anything longer, so neither does ltxfs.
const MAX_DURATION_NANOS: u128 = i64::MAX as u128;

/// How many fraction digits are taken into account. Further digits cannot
/// change the result by a whole nanosecond for any supported unit.
const MAX_FRACTION_DIGITS: usize = 20;

/// Parses a duration written in Go's `time.ParseDuration` syntax.
///
/// The syntax is an optional sign followed by one or more `<number><unit>`
/// pairs, with no spaces: `10s`, `1h30m`, `1.5h`, `250ms`. Units are `ns`,
/// `us` (or `µs`/`μs`), `ms`, `s`, `m` and `h`. A bare `0` is also accepted.
///
/// Negative durations are rejected because no setting in `ltxfs.yml` can
/// use one; `-0s` is zero and is accepted.
pub fn parse_duration(text: &str) -> Result<Duration, ValueError> {
    let invalid = |why: &str| {
        ValueError(format!(
            "invalid duration `{text}`: {why}; write durations like `10s`, `5m`, `1h30m` or `250ms`"
        ))
    };

    let (negative, mut rest) = match text.as_bytes().first() {
        Some(b'-') => (true, &text[1..]),
        Some(b'+') => (false, &text[1..]),
        _ => (false, text),
    };
    if rest == "0" {
        return Ok(Duration::ZERO);
    }
    if rest.is_empty() {
        return Err(invalid("it has no number and unit"));
    }

    let mut total_nanos: u128 = 0;
    while !rest.is_empty() {
        let integer_len = rest.bytes().take_while(u8::is_ascii_digit).count();
        let integer_digits = &rest[..integer_len];
        rest = &rest[integer_len..];

        let mut fraction_digits = "";
        if let Some(after_dot) = rest.strip_prefix('.') {
            let fraction_len = after_dot.bytes().take_while(u8::is_ascii_digit).count();
            fraction_digits = &after_dot[..fraction_len];
            rest = &after_dot[fraction_len..];
        }
        if integer_digits.is_empty() && fraction_digits.is_empty() {
            return Err(invalid("expected a number"));
        }

        let unit_len = rest
            .find(|c: char| c == '.' || c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let nanos_per_unit: u128 = match unit {
            "ns" => 1,
            "us" | "\u{b5}s" | "\u{3bc}s" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60 * 1_000_000_000,
            "h" => 3_600 * 1_000_000_000,
            "" => {
                return Err(invalid(
                    "a number is missing its unit (ns, us, ms, s, m or h)",
                ));
            }
            other => {
                return Err(invalid(&format!(
                    "unknown unit `{other}` (use ns, us, ms, s, m or h)"
                )));
            }
        };

        // Anything with more than 20 integer digits overflows in any unit.
        if integer_digits.len() > 20 {
            return Err(invalid("it is too long (the maximum is about 292 years)"));
        }
        let integer: u128 = if integer_digits.is_empty() {
            0
        } else {
            integer_digits
                .parse()
                .map_err(|_| invalid("expected a number"))?
        };

        let kept_fraction = &fraction_digits[..fraction_digits.len().min(MAX_FRACTION_DIGITS)];
        let fraction_nanos: u128 = if kept_fraction.is_empty() {
            0
        } else {
            let numerator: u128 = kept_fraction
                .parse()
                .map_err(|_| invalid("expected a number"))?;
            numerator * nanos_per_unit / 10u128.pow(kept_fraction.len() as u32)
        };

        total_nanos = integer
            .checked_mul(nanos_per_unit)
            .and_then(|nanos| nanos.checked_add(fraction_nanos))
            .and_then(|nanos| nanos.checked_add(total_nanos))
            .filter(|nanos| *nanos <= MAX_DURATION_NANOS)
            .ok_or_else(|| invalid("it is too long (the maximum is about 292 years)"))?;
    }

    if negative && total_nanos > 0 {
        return Err(invalid(
            "it is negative, and durations must be zero or more",
        ));
    }
    // The bound above keeps the value inside u64.
    Ok(Duration::from_nanos(total_nanos as u64))
}

/// Parses a byte size such as `512MiB`, `1GB`, `1.5 GiB` or `1048576`.
///
/// Units are case-insensitive. `B`, `KB`, `MB`, `GB` and `TB` are decimal
/// (powers of 1000, as disk vendors and `ls --si` use them); `KiB`, `MiB`,
/// `GiB` and `TiB` are binary (powers of 1024). A plain number is a count of
/// bytes. The single letters `K`, `M`, `G` and `T` are rejected because
/// tools disagree on whether they mean 1000 or 1024. Fractions are allowed
/// and rounded down to whole bytes.
pub fn parse_byte_size(text: &str) -> Result<u64, ValueError> {
    let invalid = |why: &str| {
        ValueError(format!(
            "invalid byte size `{text}`: {why}; write sizes like `512MiB`, `1GB` or `1073741824`"
        ))
    };

    let trimmed = text.trim();
    let integer_len = trimmed.bytes().take_while(u8::is_ascii_digit).count();
    let integer_digits = &trimmed[..integer_len];
    let mut rest = &trimmed[integer_len..];
    let mut fraction_digits = "";
    if let Some(after_dot) = rest.strip_prefix('.') {
        let fraction_len = after_dot.bytes().take_while(u8::is_ascii_digit).count();
        fraction_digits = &after_dot[..fraction_len];
        rest = &after_dot[fraction_len..];
    }
    if integer_digits.is_empty() && fraction_digits.is_empty() {
        return Err(invalid("it does not start with a number"));
    }

    let unit = rest.trim_start().to_ascii_lowercase();
    let bytes_per_unit: u128 = match unit.as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        "k" | "m" | "g" | "t" => {
            let number = trimmed[..trimmed.len() - rest.len()].trim_end();
            let letter = unit.to_ascii_uppercase();
            return Err(invalid(&format!(
                "`{letter}` is ambiguous; write `{number}{letter}B` for powers of 1000 \
                 or `{number}{letter}iB` for powers of 1024"
            )));
        }
        _ => {
            return Err(invalid(&format!(
                "unknown unit `{}` (use B, KB, MB, GB, TB, KiB, MiB, GiB or TiB)",
                rest.trim_start()
            )));
        }
    };

    let too_large = || invalid("it is too large");
    if integer_digits.len() > 20 {
        return Err(too_large());
    }
    let integer: u128 = if integer_digits.is_empty() {
        0
    } else {
        integer_digits.parse().map_err(|_| too_large())?
    };
    let kept_fraction = &fraction_digits[..fraction_digits.len().min(MAX_FRACTION_DIGITS)];
    let fraction_bytes: u128 = if kept_fraction.is_empty() {
        0
    } else {
        let numerator: u128 = kept_fraction.parse().map_err(|_| too_large())?;
        numerator * bytes_per_unit / 10u128.pow(kept_fraction.len() as u32)
    };
    let total = integer
        .checked_mul(bytes_per_unit)
        .and_then(|bytes| bytes.checked_add(fraction_bytes))
        .ok_or_else(too_large)?;
    u64::try_from(total).map_err(|_| too_large())
}

/// Splits a command line into an argument vector, the way `exec: "..."` is
/// read.
///
/// The words are split with POSIX shell quoting rules (the `shell-words`
/// crate): whitespace separates arguments, `'...'` and `"..."` quote, a
/// backslash escapes, and an unquoted `#` at the start of a word begins a
/// comment. No shell runs and nothing is expanded (environment variables were
/// already expanded in the whole file, before YAML parsing).
///
/// An argument made only of `|`, `&`, `;`, `<` and `>` is rejected, quoted or
/// not, because it would be an operator in a shell but is passed as text here;
/// run `sh -c '...'` when a shell is really wanted.
///
/// An unterminated quote is an error; a trailing backslash stays as it is.
pub fn split_command_line(line: &str) -> Result<Vec<String>, ValueError> {
    let invalid = |why: &str| {
        ValueError(format!(
            "cannot split command `{line}` into arguments: {why}"
        ))
    };
    let arguments = shell_words::split(line).map_err(|_| invalid("a quote is never closed"))?;
    if let Some(operator) = arguments.iter().find(|argument| {
        !argument.is_empty()
            && argument
                .chars()
                .all(|c| matches!(c, '|' | '&' | ';' | '<' | '>'))
    }) {
        return Err(invalid(&format!(
            "`{operator}` is shell syntax, but exec runs the program directly without a shell; \
             list several commands under `exec`, or use `sh -c '...'`"
        )));
    }
    Ok(arguments)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(millis: u64) -> Duration {
        Duration::from_millis(millis)
    }

    #[test]
    fn durations_in_go_syntax_parse() {
        let table: &[(&str, Duration)] = &[
            ("0", Duration::ZERO),
            ("-0s", Duration::ZERO),
            ("+5s", ms(5_000)),
            ("10s", ms(10_000)),
            ("5m", ms(300_000)),
            ("1h30m", ms(5_400_000)),
            ("250ms", ms(250)),
            ("1m30s", ms(90_000)),
            ("1.5h", ms(5_400_000)),
            (".5s", ms(500)),
            ("1.s", ms(1_000)),
            ("1h1m1s1ms1us1ns", Duration::new(3_661, 1_001_001)),
            ("3\u{b5}s", Duration::from_micros(3)),
            ("3\u{3bc}s", Duration::from_micros(3)),
            ("2562047h", Duration::from_secs(2_562_047 * 3_600)),
        ];
        for (text, expected) in table {
            assert_eq!(parse_duration(text).as_ref(), Ok(expected), "{text}");
        }
    }

    #[test]
    fn bad_durations_are_rejected_with_the_value_quoted() {
        for text in [
            "",
            "10",
            "s",
            "10 s",
            "10sec",
            "1d",
            "-5s",
            "1h-5m",
            "abc",
            ".s",
            "9999999999999999999999h",
            "2562048h",
        ] {
            let error = parse_duration(text).expect_err(text);
            assert!(error.0.contains(&format!("`{text}`")), "{text}: {error}");
        }
    }

    #[test]
    fn byte_sizes_parse() {
        let table: &[(&str, u64)] = &[
            ("0", 0),
            ("1024", 1024),
            ("1B", 1),
            ("1KB", 1_000),
            ("1GB", 1_000_000_000),
            ("512MiB", 512 << 20),
            ("1 GiB", 1 << 30),
            ("1.5GiB", 3 << 29),
            ("2tib", 2 << 40),
            ("1mb", 1_000_000),
        ];
        for (text, expected) in table {
            assert_eq!(parse_byte_size(text).as_ref(), Ok(expected), "{text}");
        }
    }

    #[test]
    fn bad_byte_sizes_are_rejected() {
        for text in [
            "",
            "GB",
            "1G",
            "1 k",
            "1PB",
            "-1GB",
            "99999999999999999999TiB",
            "1e9",
        ] {
            let error = parse_byte_size(text).expect_err(text);
            assert!(error.0.contains(&format!("`{text}`")), "{text}: {error}");
        }
        let ambiguous = parse_byte_size("1G").unwrap_err().0;
        assert!(
            ambiguous.contains("`1GB`") && ambiguous.contains("`1GiB`"),
            "{ambiguous}"
        );
    }

    #[test]
    fn command_lines_split_with_simple_quoting() {
        let table: &[(&str, &[&str])] = &[
            ("myapp -addr :8081", &["myapp", "-addr", ":8081"]),
            ("  spaced   out\targs  ", &["spaced", "out", "args"]),
            (
                "sh -c 'echo $HOME && ls'",
                &["sh", "-c", "echo $HOME && ls"],
            ),
            (r#"app --name="a b" c"#, &["app", "--name=a b", "c"]),
            (r#"echo "say \"hi\" \n""#, &["echo", r#"say "hi" \n"#]),
            (r"echo a\ b \'q\'", &["echo", "a b", "'q'"]),
            ("echo 'a|b' \"x && y\"", &["echo", "a|b", "x && y"]),
            ("app #comment", &["app"]),
            ("echo '' x", &["echo", "", "x"]),
            ("echo 'a'\"b\"c", &["echo", "abc"]),
            ("echo \\\nnext", &["echo", "next"]),
            ("echo \\", &["echo", "\\"]),
            ("", &[]),
        ];
        for (line, expected) in table {
            let split = split_command_line(line).expect(line);
            assert_eq!(split, *expected, "{line}");
        }
    }

    #[test]
    fn bad_command_lines_are_rejected() {
        for line in [
            "echo 'open",
            "echo \"open",
            "migrate && serve",
            "a | b",
            "a > f",
            "a ; b",
            "echo '&&'",
        ] {
            assert!(split_command_line(line).is_err(), "{line}");
        }
        let operator = split_command_line("migrate && serve").unwrap_err().0;
        assert!(operator.contains("`&&` is shell syntax"), "{operator}");
    }
}
