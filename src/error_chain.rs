//! One line for an error and its causes.

use std::error::Error;

/// `error` and its sources joined by `: `, so "connection refused" is not hidden
/// behind "client error (Connect)". A cause whose text the line already holds
/// (a message that quotes its source) is not repeated.
pub fn error_chain(error: &dyn Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    enum Outer {
        #[error("outer")]
        Plain(#[source] std::io::Error),
        #[error("outer: {0}")]
        Quoting(#[source] std::io::Error),
    }

    #[test]
    fn causes_are_joined_once() {
        let refused = || std::io::Error::other("refused");
        assert_eq!(error_chain(&Outer::Plain(refused())), "outer: refused");
        assert_eq!(error_chain(&Outer::Quoting(refused())), "outer: refused");
        assert_eq!(error_chain(&refused()), "refused");
    }
}
