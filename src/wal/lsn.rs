//! `Lsn`: a position in the WAL (`XLogRecPtr` in PostgreSQL's `xlogdefs.h`).

use std::fmt;
use std::str::FromStr;

/// A WAL position. Displays and parses in PostgreSQL's `X/X` hexadecimal form.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

/// An LSN string that is not of PostgreSQL's `X/X` form.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid LSN {0:?}: expected PostgreSQL's X/X hexadecimal form, such as 0/16B3748")]
pub struct LsnParseError(pub String);

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xffff_ffff)
    }
}

impl FromStr for Lsn {
    type Err = LsnParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || LsnParseError(s.to_string());
        let (hi, lo) = s.split_once('/').ok_or_else(err)?;
        if hi.is_empty() || lo.is_empty() || hi.len() > 8 || lo.len() > 8 {
            return Err(err());
        }
        let hi = u32::from_str_radix(hi, 16).map_err(|_| err())?;
        let lo = u32::from_str_radix(lo, 16).map_err(|_| err())?;
        Ok(Lsn(((hi as u64) << 32) | lo as u64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_round_trips_through_text() {
        for text in ["0/0", "0/16B3748", "1/0", "FFFFFFFF/FFFFFFFF"] {
            let lsn: Lsn = text.parse().unwrap();
            assert_eq!(lsn.to_string(), text);
        }
        assert_eq!("0/2000028".parse::<Lsn>().unwrap(), Lsn(33554472));
    }

    #[test]
    fn lsn_rejects_malformed_text() {
        for text in ["", "0", "/1", "1/", "g/0", "123456789/0", "0/1/2"] {
            assert!(text.parse::<Lsn>().is_err(), "{text}");
        }
    }
}
