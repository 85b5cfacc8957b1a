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
pub fn now_micros() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}
