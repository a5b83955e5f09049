//! The API version ranges a broker advertised (ApiVersions) and picking a version per request.

use anyhow::{anyhow, bail, Result};
use kafka_protocol::messages::ApiKey;
use kafka_protocol::protocol::{Message, Request};
use std::collections::HashMap;

/// API version ranges the broker advertised: API key → (min, max).
#[derive(Debug, Clone, Default)]
pub struct Versions {
    ranges: HashMap<i16, (i16, i16)>,
}

fn api_name(key: i16) -> String {
    ApiKey::try_from(key)
        .map(|k| format!("{k:?}"))
        .unwrap_or_else(|_| format!("API key {key}"))
}

impl Versions {
    pub fn from_ranges(ranges: impl IntoIterator<Item = (i16, i16, i16)>) -> Versions {
        Versions {
            ranges: ranges
                .into_iter()
                .map(|(k, lo, hi)| (k, (lo, hi)))
                .collect(),
        }
    }

    /// The highest version of request `R` the broker, the codecs and the caller (`cap`) share.
    pub fn pick<R: Request>(&self, cap: Option<i16>) -> Result<i16> {
        let ours = <R as Message>::VERSIONS;
        self.pick_in::<R>(ours.min, cap.unwrap_or(ours.max))
    }

    /// The highest version of `R` within `min..=max` (and the codecs' range) the broker speaks.
    pub fn pick_in<R: Request>(&self, min: i16, max: i16) -> Result<i16> {
        let name = api_name(R::KEY);
        let (lo, hi) = *self
            .ranges
            .get(&R::KEY)
            .ok_or_else(|| anyhow!("broker does not support the {name} API"))?;
        let ours = <R as Message>::VERSIONS;
        let (min, max) = (min.max(ours.min), max.min(ours.max));
        let top = hi.min(max);
        if top < lo.max(min) {
            bail!("no common {name} version: broker {lo}..={hi}, client {min}..={max}");
        }
        Ok(top)
    }

    pub fn supports(&self, key: ApiKey) -> bool {
        self.ranges.contains_key(&(key as i16))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kafka_protocol::messages::ProduceRequest;

    #[test]
    fn picks_highest_common_version_or_explains() {
        let v = Versions::from_ranges([(0, 3, 9), (18, 0, 3)]);
        assert_eq!(v.pick::<ProduceRequest>(None).unwrap(), 9);
        assert_eq!(v.pick::<ProduceRequest>(Some(7)).unwrap(), 7);
        assert_eq!(v.pick_in::<ProduceRequest>(3, 11).unwrap(), 9);
        let e = v.pick_in::<ProduceRequest>(10, 11).unwrap_err().to_string();
        assert!(e.contains("no common Produce version"), "{e}");
        let none = Versions::from_ranges([(18, 0, 3)]);
        let e = none.pick::<ProduceRequest>(None).unwrap_err().to_string();
        assert!(e.contains("Produce"), "{e}");
        let old = Versions::from_ranges([(0, 0, 2)]);
        assert!(old.pick::<ProduceRequest>(None).is_err());
    }
}
