//! Newtypes for the numbers that flow through the pipeline, so that a disk id can never be passed where
//! a sequence number is expected.

use serde::{Deserialize, Serialize};
use std::fmt;

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(
            Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
            rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
        )]
        #[serde(transparent)]
        #[rkyv(derive(Debug, PartialEq, Eq))]
        pub struct $name(pub u64);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}", self.0)
            }
        }

        impl From<&rkyv::Archived<$name>> for $name {
            fn from(a: &rkyv::Archived<$name>) -> Self {
                $name(a.0.to_native())
            }
        }
    };
}

id_type!(
    /// A protected item (one machine's set of protected disks).
    ItemId
);
id_type!(
    /// One protected disk of an item.
    DiskId
);
id_type!(
    /// Per-disk sequence number of a journaled change. The first change is 1; 0 means "nothing".
    Seq
);

impl Seq {
    pub const ZERO: Seq = Seq(0);
    pub fn next(self) -> Seq {
        Seq(self.0 + 1)
    }
}

/// A (item, disk) pair: the unit that is replicated, cached and applied in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct StreamKey {
    pub item: ItemId,
    pub disk: DiskId,
}

impl fmt::Display for StreamKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "item {} disk {}", self.item, self.disk)
    }
}

/// Microseconds since the Unix epoch, the clock recovery points are named by.
/// The tag of a planned failover's final bookmark on every disk of the machine.
pub fn stop_tag(generation: u64) -> String {
    format!("{STOP_TAG_PREFIX}{generation}")
}

const STOP_TAG_PREFIX: &str = "failover-";

/// Whether `tag` is a planned failover's final bookmark ([`stop_tag`]): a master target that applied
/// it reports at once, for the failover waits on it.
pub fn is_stop_tag(tag: &str) -> bool {
    tag.strip_prefix(STOP_TAG_PREFIX).is_some_and(|g| !g.is_empty() && g.bytes().all(|b| b.is_ascii_digit()))
}

pub fn now_micros() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

/// Parses a daily window "HH:MM-HH:MM" (UTC; it may wrap past midnight) into minutes of the day.
pub fn parse_daily_window(w: &str) -> Result<(u32, u32), String> {
    let bad = || format!("{w:?}: write HH:MM-HH:MM (UTC), like 22:00-06:00");
    let (a, b) = w.split_once('-').ok_or_else(bad)?;
    let minutes = |t: &str| -> Result<u32, String> {
        let (h, m) = t.trim().split_once(':').ok_or_else(bad)?;
        let (h, m): (u32, u32) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
        if h > 23 || m > 59 {
            return Err(bad());
        }
        Ok(h * 60 + m)
    };
    let (s, e) = (minutes(a)?, minutes(b)?);
    if s == e {
        return Err(bad());
    }
    Ok((s, e))
}

/// Whether `minute` of the day lies in the window `(start, end)` (which may wrap past midnight).
pub fn in_daily_window(window: (u32, u32), minute: u32) -> bool {
    let (start, end) = window;
    if start < end {
        (start..end).contains(&minute)
    } else {
        minute >= start || minute < end
    }
}

#[cfg(test)]
mod window_tests {
    use super::*;

    #[test]
    fn windows_parse_and_wrap() {
        assert_eq!(parse_daily_window("22:00-06:30"), Ok((1320, 390)));
        assert!(parse_daily_window("25:00-01:00").is_err() && parse_daily_window("1-2").is_err());
        assert!(in_daily_window((1320, 390), 1400) && in_daily_window((1320, 390), 10));
        assert!(!in_daily_window((1320, 390), 600) && in_daily_window((60, 120), 90));
    }
}

#[cfg(test)]
mod stop_tag_tests {
    #[test]
    fn stop_tags_are_recognised_and_nothing_else() {
        assert!(super::is_stop_tag(&super::stop_tag(1_700_000_000_000_000)));
        for other in ["failover-", "failover-12a", "crash-12", "xfailover-1", "failover-1 "] {
            assert!(!super::is_stop_tag(other), "{other}");
        }
    }
}
