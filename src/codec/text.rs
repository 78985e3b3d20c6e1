//! [`Text`]: a short string kept inline, for the ids and names every job carries.

use std::borrow::Borrow;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

/// Bytes a [`Text`] holds without an allocation.
const INLINE: usize = 22;

/// A UTF-8 string for job ids, handler names and batch ids: up to 22 bytes inline (no allocation,
/// and a clone is a copy), longer ones shared behind an `Arc`.
///
/// Why not `String` or a slice of the received frame: decoding a job's id and handler name into
/// `String`s costs two allocations, and the id's map key and the batch id of each result two more;
/// `Bytes` slices of the frame avoid those but each clone and drop is an atomic operation on the
/// frame's shared count, which the session and the connection task touch from two threads (measured
/// 4 % slower than `String`, see BENCHMARKS.md). Short ids, the common case, need neither.
///
/// Invariant: the bytes are valid UTF-8 (checked once, when the text is made).
#[derive(Clone)]
pub struct Text(Repr);

#[derive(Clone)]
enum Repr {
    Inline { len: u8, bytes: [u8; INLINE] },
    Shared(Arc<str>),
}

/// The bytes given for a [`Text`] are not UTF-8.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("not UTF-8")]
pub struct NotUtf8;

impl Text {
    /// `bytes` as a text, if they are UTF-8.
    pub fn from_utf8(bytes: &[u8]) -> Result<Self, NotUtf8> {
        // ASCII, the common case, is checked a word at a time.
        if bytes.len() <= INLINE && bytes.is_ascii() {
            return Ok(Self::inline(bytes));
        }
        let s = std::str::from_utf8(bytes).map_err(|_| NotUtf8)?;
        Ok(Self::from(s))
    }

    /// Call only with UTF-8 of at most [`INLINE`] bytes.
    fn inline(utf8: &[u8]) -> Self {
        let mut bytes = [0; INLINE];
        bytes[..utf8.len()].copy_from_slice(utf8);
        // At most INLINE (22): fits in a u8.
        let len = utf8.len() as u8;
        Self(Repr::Inline { len, bytes })
    }

    /// The text as a `str`.
    ///
    /// The crate does not use `unsafe`, so an inline text's UTF-8 is checked again here (a few
    /// nanoseconds for the short ids it holds); hot paths compare and hash [`Text::as_bytes`].
    pub fn as_str(&self) -> &str {
        match &self.0 {
            // Valid by the invariant; the empty string is never reached.
            Repr::Inline { .. } => std::str::from_utf8(self.as_bytes()).unwrap_or_default(),
            Repr::Shared(s) => s,
        }
    }

    /// The text's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        match &self.0 {
            Repr::Inline { len, bytes } => &bytes[..usize::from(*len)],
            Repr::Shared(s) => s.as_bytes(),
        }
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        match &self.0 {
            Repr::Inline { len, .. } => usize::from(*len),
            Repr::Shared(s) => s.len(),
        }
    }

    /// Whether the text is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Default for Text {
    fn default() -> Self {
        Self(Repr::Inline {
            len: 0,
            bytes: [0; INLINE],
        })
    }
}

impl From<&str> for Text {
    fn from(s: &str) -> Self {
        if s.len() <= INLINE {
            Self::inline(s.as_bytes())
        } else {
            Self(Repr::Shared(Arc::from(s)))
        }
    }
}

impl From<String> for Text {
    fn from(s: String) -> Self {
        Self::from(s.as_str())
    }
}

impl From<Text> for String {
    fn from(t: Text) -> Self {
        t.as_str().to_owned()
    }
}

impl PartialEq for Text {
    fn eq(&self, other: &Self) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl Eq for Text {}

impl PartialOrd for Text {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Text {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.as_bytes().cmp(other.as_bytes())
    }
}

// Hashes as its bytes, so that maps keyed by `Text` can be searched with a `&[u8]`.
impl Hash for Text {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.as_bytes().hash(state);
    }
}

impl Borrow<[u8]> for Text {
    fn borrow(&self) -> &[u8] {
        self.as_bytes()
    }
}

impl PartialEq<str> for Text {
    fn eq(&self, other: &str) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl PartialEq<&str> for Text {
    fn eq(&self, other: &&str) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl fmt::Debug for Text {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for Text {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_utf8_makes_a_text() {
        let t = Text::from_utf8("jöb-1".as_bytes()).unwrap();
        assert_eq!(t.as_str(), "jöb-1");
        assert_eq!(t, "jöb-1");
        assert_eq!(Text::from_utf8(b"\xff\xfe").err(), Some(NotUtf8));
        assert_eq!(format!("{t:?} {t}"), "\"jöb-1\" jöb-1");
    }

    #[test]
    fn short_and_long_texts_compare_by_content() {
        for s in [
            "",
            "a",
            "exactly-twenty-two-b22",
            "twenty-three-bytes-b-23",
            &"x".repeat(300),
        ] {
            let t = Text::from(s);
            assert_eq!(t.as_str(), s);
            assert_eq!(t.len(), s.len());
            assert_eq!(t.clone(), t);
            assert_eq!(String::from(t), s);
        }
        assert!(matches!(
            Text::from("exactly-twenty-two-b22").0,
            Repr::Inline { .. }
        ));
        assert!(matches!(
            Text::from("twenty-three-bytes-b-23").0,
            Repr::Shared(_)
        ));
        assert_eq!(std::mem::size_of::<Text>(), 24, "as small as a String");
    }

    #[test]
    fn maps_keyed_by_text_are_searched_by_bytes() {
        let mut m = std::collections::HashMap::new();
        m.insert(Text::from("a"), 1);
        m.insert(Text::from("y".repeat(40)), 2);
        assert_eq!(m.get(b"a".as_slice()), Some(&1));
        assert_eq!(m.get("y".repeat(40).as_bytes()), Some(&2));
        assert_eq!(m.get(b"b".as_slice()), None);
    }
}
