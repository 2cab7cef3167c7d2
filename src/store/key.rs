//! `ObjectKey`: a validated key relative to the store's root (bucket prefix or directory).

use std::fmt;

/// A key such as `wal_005/000000010000000000000003.lz4`: '/'-separated, relative, with no
/// empty, `.` or `..` parts, so it can never escape the store's root on a filesystem.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey(String);

/// A string that cannot be an object key.
#[derive(Debug, thiserror::Error)]
#[error("invalid object key {0:?}")]
pub struct InvalidKey(pub String);

impl ObjectKey {
    /// Validates `key`.
    pub fn new(key: &str) -> Result<ObjectKey, InvalidKey> {
        let ok = !key.is_empty()
            && !key.contains('\0')
            && key.split('/').all(|part| !part.is_empty() && part != "." && part != "..");
        if ok {
            Ok(ObjectKey(key.to_string()))
        } else {
            Err(InvalidKey(key.to_string()))
        }
    }

    /// The key as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The last '/'-separated part.
    pub fn file_name(&self) -> &str {
        self.0.rsplit('/').next().unwrap_or(&self.0)
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_cannot_escape_the_root() {
        assert!(ObjectKey::new("wal_005/x.lz4").is_ok());
        for bad in ["", "/abs", "a//b", "../x", "a/./b", "a/..", "a/", "a\0b"] {
            assert!(ObjectKey::new(bad).is_err(), "{bad:?}");
        }
        assert_eq!(ObjectKey::new("a/b/c.lz4").unwrap().file_name(), "c.lz4");
    }
}
