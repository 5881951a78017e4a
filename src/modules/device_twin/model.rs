//! The DeviceTwin data model of KubeEdge (edge-node §2.2): devices, attributes, twins, values and
//! versions, with Go's JSON keys and `omitempty` rules, plus the validation of keys, values and
//! value types that mappers' payloads go through. Pure data: no I/O.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// `metadata.type` of a twin that was deleted; its row stays (edge-node §2.4).
pub const TYPE_DELETED: &str = "deleted";
/// The default value type.
pub const TYPE_STRING: &str = "string";
/// Longest twin key and twin value (`dtcommon.ValidateTwinKey`, `ValidateTwinValue`).
pub const MAX_KEY_BYTES: usize = 128;
pub const MAX_VALUE_BYTES: usize = 512;

fn is_zero(n: &i64) -> bool {
    *n == 0
}

/// `{"timestamp":ms}` of a value; the timestamp is omitted when 0.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ValueMetadata {
    #[serde(default, skip_serializing_if = "is_zero")]
    pub timestamp: i64,
}

/// `{"value","metadata"}` of a twin's expected or actual side. Values are strings.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TwinValue {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<ValueMetadata>,
}

impl TwinValue {
    /// A value stamped with the edge's clock.
    pub fn stamped(value: Option<String>, now_ms: i64) -> TwinValue {
        TwinValue { value, metadata: Some(ValueMetadata { timestamp: now_ms }) }
    }
}

/// `{"cloud","edge"}`: both always emitted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TwinVersion {
    #[serde(default)]
    pub cloud: i64,
    #[serde(default)]
    pub edge: i64,
}

/// `{"type"}`; the type is omitted when empty.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TypeMetadata {
    #[serde(rename = "type", default, skip_serializing_if = "String::is_empty")]
    pub kind: String,
}

/// One twin, as stored and as carried in messages (Go's `MsgTwin`, keys in struct order).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsgTwin {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected: Option<TwinValue>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actual: Option<TwinValue>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub optional: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<TypeMetadata>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_version: Option<TwinVersion>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actual_version: Option<TwinVersion>,
}

impl MsgTwin {
    /// The value type, `""` when there is no metadata.
    pub fn kind(&self) -> &str {
        self.metadata.as_ref().map_or("", |m| m.kind.as_str())
    }

    pub fn is_deleted(&self) -> bool {
        self.kind() == TYPE_DELETED
    }

    /// Go's `CopyMsgTwin(twin, true)`: the twin without its versions, as mappers see it.
    pub fn without_versions(&self) -> MsgTwin {
        MsgTwin { expected_version: None, actual_version: None, ..self.clone() }
    }
}

/// A device attribute (Go's `MsgAttr`): the value is always emitted.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsgAttr {
    #[serde(default)]
    pub value: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub optional: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<TypeMetadata>,
}

/// A device as stored: every field but the maps is a string omitted when empty.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Device {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub id: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub state: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub last_online: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub attributes: BTreeMap<String, MsgAttr>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub twin: BTreeMap<String, MsgTwin>,
}

/// A device as carried in membership messages: map entries may be `null`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceMsg {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub id: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub state: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub last_online: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attributes: Option<BTreeMap<String, Option<MsgAttr>>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub twin: Option<BTreeMap<String, Option<MsgTwin>>>,
}

/// `{event_id, timestamp}`, always emitted, at the head of every device payload.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseMessage {
    #[serde(default)]
    pub event_id: String,
    #[serde(default)]
    pub timestamp: i64,
}

/// A mapper's `twin/update` (and a cloud `cloud_updated`).
#[derive(Clone, Debug, Default, Deserialize)]
pub struct TwinUpdate {
    #[serde(default)]
    pub event_id: String,
    #[serde(default)]
    pub twin: Option<BTreeMap<String, Option<MsgTwin>>>,
}

/// Parses a `twin/update` payload the way `UnmarshalDeviceTwinUpdate` does: the JSON must
/// parse, `twin` must be there, every key and every non-empty value must be valid.
///
/// # Errors
/// The reason text KubeEdge answers with (code 400).
pub fn parse_twin_update(payload: &[u8]) -> Result<TwinUpdate, String> {
    let update: TwinUpdate = serde_json::from_slice(payload)
        .map_err(|_| "Unmarshal update request body failed, please check the request".to_owned())?;
    let Some(twins) = &update.twin else {
        return Err("Update twin error, key:twin does not exist".to_owned());
    };
    for (key, twin) in twins {
        if !valid_key(key) {
            return Err("The key of twin must only include upper or lowercase letters, number, \
                        english, and special letter - _ . , : / @ # and the length of key should \
                        be less than 128 bytes"
                .to_owned());
        }
        let Some(twin) = twin else { continue };
        for side in [&twin.expected, &twin.actual].into_iter().flatten() {
            if let Some(value) = &side.value {
                if !value.is_empty() && !valid_value(value) {
                    return Err("The value of twin must only include upper or lowercase letters, \
                                number, english, and special letter - _ . , : / @ # and the \
                                length of value should be less than 512 bytes"
                        .to_owned());
                }
            }
        }
    }
    Ok(update)
}

fn valid_chars(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.,:/@#".contains(&b))
}

/// `^[a-zA-Z0-9-_.,:/@#]{1,128}$`
pub fn valid_key(key: &str) -> bool {
    (1..=MAX_KEY_BYTES).contains(&key.len()) && valid_chars(key)
}

/// `^[a-zA-Z0-9-_.,:/@#]{1,512}$`
pub fn valid_value(value: &str) -> bool {
    (1..=MAX_VALUE_BYTES).contains(&value.len()) && valid_chars(value)
}

/// `dtcommon.ValidateValue`: the value parses as its declared type.
///
/// # Errors
/// The type is unknown, or the value does not parse as it.
pub fn validate_value(kind: &str, value: &str) -> Result<(), String> {
    let ok = match kind {
        "" | TYPE_STRING | TYPE_DELETED => true,
        "int" | "integer" => value.parse::<i64>().is_ok(),
        "float" => value.parse::<f64>().is_ok(),
        "boolean" => {
            matches!(value, "1" | "t" | "T" | "TRUE" | "true" | "True")
                || matches!(value, "0" | "f" | "F" | "FALSE" | "false" | "False")
        }
        _ => return Err(format!("the value type {kind:?} is not allowed")),
    };
    if ok {
        Ok(())
    } else {
        Err(format!("the value {value:?} is not of type {kind}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_values_follow_kubeedge_character_class_and_limits() {
        assert!(valid_key("temperature") && valid_key("a-b_c.d,e:f/g@h#i"));
        assert!(!valid_key("") && !valid_key("has space") && !valid_key("a+b"));
        assert!(valid_key(&"k".repeat(128)) && !valid_key(&"k".repeat(129)));
        assert!(valid_value(&"v".repeat(512)) && !valid_value(&"v".repeat(513)));
        assert!(valid_value("-12.5") && !valid_value("1e+5"));
    }

    #[test]
    fn types_are_checked_like_go_strconv() {
        assert!(validate_value("float", "23.5").is_ok());
        assert!(validate_value("float", "").is_err());
        assert!(validate_value("int", "-4").is_ok() && validate_value("integer", "4.5").is_err());
        assert!(
            validate_value("boolean", "True").is_ok() && validate_value("boolean", "yes").is_err()
        );
        assert!(validate_value("string", "x").is_ok() && validate_value("", "").is_ok());
        assert!(validate_value("bytes", "x").is_err());
    }

    #[test]
    fn twin_update_needs_twin_and_valid_keys_and_values() {
        assert!(parse_twin_update(b"not json").is_err());
        assert!(parse_twin_update(br#"{"event_id":"e"}"#).unwrap_err().contains("key:twin"));
        assert!(parse_twin_update(br#"{"twin":{"bad key":null}}"#).unwrap_err().contains("key"));
        let bad_value = br#"{"twin":{"k":{"actual":{"value":"a b"}}}}"#;
        assert!(parse_twin_update(bad_value).unwrap_err().contains("value"));
        let ok =
            parse_twin_update(br#"{"event_id":"e","twin":{"k":null,"j":{"actual":{"value":""}}}}"#)
                .unwrap();
        assert_eq!(ok.event_id, "e");
        assert_eq!(ok.twin.unwrap().len(), 2);
    }

    #[test]
    fn serialisation_follows_go_omitempty() {
        let twin = MsgTwin {
            actual: Some(TwinValue::stamped(Some("23.5".into()), 7)),
            optional: Some(false),
            metadata: Some(TypeMetadata { kind: "float".into() }),
            actual_version: Some(TwinVersion { cloud: 0, edge: 1 }),
            ..MsgTwin::default()
        };
        assert_eq!(
            serde_json::to_string(&twin).unwrap(),
            r#"{"actual":{"value":"23.5","metadata":{"timestamp":7}},"optional":false,"metadata":{"type":"float"},"actual_version":{"cloud":0,"edge":1}}"#
        );
        assert_eq!(serde_json::to_string(&Device::default()).unwrap(), "{}");
    }
}
