//! The bearer token a client sends when the daemon has principals: `authorization: Bearer <token>`.

use std::path::Path;
use std::sync::Arc;

use tonic::metadata::{AsciiMetadataValue, MetadataMap};

/// A call's credentials: the `authorization` metadata value (shared: one pointer to pass around).
#[derive(Clone)]
pub struct Token(Arc<AsciiMetadataValue>);

/// Why a token cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The token file could not be read.
    #[error("cannot read the token file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The token is empty or holds characters a header cannot carry.
    #[error("the token from {0} is empty or not printable ASCII")]
    Invalid(String),
}

impl Token {
    /// The token in `text` (surrounding whitespace, such as a file's last newline, left out);
    /// `from` names where it came from for the error.
    pub fn new(text: &str, from: &str) -> Result<Self, TokenError> {
        let token = text.trim();
        let valid = !token.is_empty() && token.bytes().all(|b| b.is_ascii_graphic());
        let value = format!("Bearer {token}");
        match value.parse::<AsciiMetadataValue>() {
            Ok(mut v) if valid => {
                v.set_sensitive(true);
                Ok(Self(Arc::new(v)))
            }
            _ => Err(TokenError::Invalid(from.to_owned())),
        }
    }

    /// The token of `--token-file` if given, else of `BATCHD_TOKEN` (`env`), else none.
    pub fn from_file_or_env(
        file: Option<&Path>,
        env: Option<String>,
    ) -> Result<Option<Self>, TokenError> {
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|source| TokenError::Read {
                path: path.display().to_string(),
                source,
            })?;
            return Self::new(&text, &path.display().to_string()).map(Some);
        }
        env.map(|t| Self::new(&t, "BATCHD_TOKEN")).transpose()
    }

    /// Adds the token to a request's metadata.
    pub fn insert_into(&self, metadata: &mut MetadataMap) {
        metadata.insert("authorization", (*self.0).clone());
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(…)")
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn tokens_are_trimmed_and_checked() {
        let t = Token::new(" s3cr3t/+= \n", "test").unwrap();
        let mut m = MetadataMap::new();
        t.insert_into(&mut m);
        assert_eq!(m.get("authorization").unwrap(), "Bearer s3cr3t/+=");
        assert_eq!(format!("{t:?}"), "Token(…)", "never printed");
        for bad in ["", " \n", "two words", "caf\u{e9}", "a\u{7}b"] {
            assert!(Token::new(bad, "test").is_err(), "{bad:?}");
        }
        assert!(Token::from_file_or_env(None, None).unwrap().is_none());
        let env = Token::from_file_or_env(None, Some("x".into())).unwrap();
        assert!(env.is_some());
        let e = Token::from_file_or_env(Some(Path::new("/nonexistent/token")), None);
        assert!(e.unwrap_err().to_string().contains("/nonexistent/token"));
    }
}
