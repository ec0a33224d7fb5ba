//! Addresses in JSON as `0x`-prefixed hex strings: JSON numbers lose precision past 2^53, and
//! people read kernel addresses in hex. For `#[serde(with = "...")]`.
use serde::{Deserialize as _, Deserializer, Serializer, de::Error as _};

fn parse<'de, D: Deserializer<'de>>(text: &str) -> Result<u64, D::Error> {
    let digits = text
        .strip_prefix("0x")
        .ok_or_else(|| D::Error::custom(format!("`{text}` is not a 0x-prefixed address")))?;
    u64::from_str_radix(digits, 16).map_err(D::Error::custom)
}

pub fn serialize<S: Serializer>(value: &u64, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&format!("{value:#x}"))
}

pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
    parse::<D>(&String::deserialize(deserializer)?)
}

/// The same for an address that may be missing (`null`).
pub mod option {
    use serde::{Deserialize as _, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(value: &Option<u64>, serializer: S) -> Result<S::Ok, S::Error> {
        match value {
            Some(value) => super::serialize(value, serializer),
            None => serializer.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<u64>, D::Error> {
        Option::<String>::deserialize(deserializer)?
            .map(|text| super::parse::<D>(&text))
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use serde::{Deserialize, Serialize};

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Addresses {
        #[serde(with = "super")]
        base: u64,
        #[serde(with = "super::option")]
        frame: Option<u64>,
    }

    #[test]
    fn round_trips_addresses_as_hex_strings() {
        let addresses = Addresses {
            base: 0xffff_8880_0000_0000,
            frame: None,
        };
        let json = serde_json::to_string(&addresses).unwrap();
        assert_eq!(json, r#"{"base":"0xffff888000000000","frame":null}"#);
        assert_eq!(serde_json::from_str::<Addresses>(&json).unwrap(), addresses);
        let frame: Addresses =
            serde_json::from_str(r#"{"base":"0x10","frame":"0xffffffff81000000"}"#).unwrap();
        assert_eq!(frame.frame, Some(0xffff_ffff_8100_0000));
        assert!(serde_json::from_str::<Addresses>(r#"{"base":"16","frame":null}"#).is_err());
        assert!(serde_json::from_str::<Addresses>(r#"{"base":"0xzz","frame":null}"#).is_err());
    }
}
