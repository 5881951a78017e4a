//! The MQTT topics of DeviceTwin (edge-node §2.3, §2.9): what a mapper's publish asks for, and
//! the topics the answers go to. A device ID is one topic segment for v1.10-era mappers and two
//! (`<namespace>/<name>`) for today's; the agent is set to one or the other.

/// Every device topic starts with this.
pub const DEVICE_PREFIX: &str = "$hw/events/device/";
/// Every node topic starts with this.
pub const NODE_PREFIX: &str = "$hw/events/node/";

/// A mapper's request, read from the topic of its publish.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// `…/<id>/twin/update`: a REST twin update.
    TwinUpdate(String),
    /// `…/<id>/twin/get`
    TwinGet(String),
    /// `…/<id>/twin/cloud_updated`: KubeEdge also takes a Sync from MQTT.
    TwinCloudUpdated(String),
    /// `…/<id>/state/update`
    StateUpdate(String),
    /// `$hw/events/node/<node>/membership/get`
    MembershipGet,
}

/// The subscriptions the twin needs, for `id_segments` 1 or 2 (edge-node §2.3, §2.9).
pub fn subscriptions(id_segments: u8) -> Vec<String> {
    let id = if id_segments == 2 { "+/+" } else { "+" };
    vec![
        format!("{DEVICE_PREFIX}{id}/twin/+"),
        format!("{DEVICE_PREFIX}{id}/state/update"),
        format!("{NODE_PREFIX}+/membership/get"),
    ]
}

/// What `topic` asks for, or `None` when it is not a twin request (a result topic, a wrong
/// number of ID segments, an empty ID).
pub fn parse(topic: &str, id_segments: u8) -> Option<Request> {
    if let Some(rest) = topic.strip_prefix(NODE_PREFIX) {
        let (node, action) = rest.split_once('/')?;
        return (!node.is_empty() && action == "membership/get").then_some(Request::MembershipGet);
    }
    let rest = topic.strip_prefix(DEVICE_PREFIX)?;
    let mut parts = rest.splitn(usize::from(id_segments.max(1)) + 1, '/');
    let mut id_parts = Vec::new();
    for _ in 0..id_segments.max(1) {
        let part = parts.next()?;
        if part.is_empty() {
            return None;
        }
        id_parts.push(part);
    }
    let id = id_parts.join("/");
    match parts.next()? {
        "twin/update" => Some(Request::TwinUpdate(id)),
        "twin/get" => Some(Request::TwinGet(id)),
        "twin/cloud_updated" => Some(Request::TwinCloudUpdated(id)),
        "state/update" => Some(Request::StateUpdate(id)),
        _ => None,
    }
}

/// `$hw/events/device/<id>/<suffix>`; `id` may be empty (KubeEdge's 400 answers to payloads it
/// could not read go to `$hw/events/device//twin/update/result`).
pub fn device_topic(id: &str, suffix: &str) -> String {
    format!("{DEVICE_PREFIX}{id}/{suffix}")
}

/// `$hw/events/node/<node>/membership/<suffix>`
pub fn membership_topic(node: &str, suffix: &str) -> String {
    format!("{NODE_PREFIX}{node}/membership/{suffix}")
}

pub const UPDATE_RESULT: &str = "twin/update/result";
pub const UPDATE_DOCUMENT: &str = "twin/update/document";
pub const UPDATE_DELTA: &str = "twin/update/delta";
pub const GET_RESULT: &str = "twin/get/result";
pub const STATE_RESULT: &str = "state/update/result";
pub const ATTRIBUTES_UPDATED: &str = "updated";
pub const MEMBERSHIP_UPDATED: &str = "updated";
pub const MEMBERSHIP_GET_RESULT: &str = "get/result";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_segment_ids() {
        let t = |s| parse(s, 1);
        assert_eq!(
            t("$hw/events/device/thermo-1/twin/update"),
            Some(Request::TwinUpdate("thermo-1".into()))
        );
        assert_eq!(t("$hw/events/device/d/twin/get"), Some(Request::TwinGet("d".into())));
        assert_eq!(t("$hw/events/device/d/state/update"), Some(Request::StateUpdate("d".into())));
        assert_eq!(
            t("$hw/events/device/d/twin/cloud_updated"),
            Some(Request::TwinCloudUpdated("d".into()))
        );
        assert_eq!(t("$hw/events/node/n1/membership/get"), Some(Request::MembershipGet));
        // results, and the two-segment form, are not requests in one-segment mode
        assert_eq!(t("$hw/events/device/d/twin/update/result"), None);
        assert_eq!(t("$hw/events/device/ns/d/twin/update"), None);
        assert_eq!(t("$hw/events/device//twin/update"), None);
        assert_eq!(t("other/topic"), None);
        // an ID that also appears in the prefix is not mis-split (Go's strings.Index quirk)
        assert_eq!(t("$hw/events/device/e/twin/update"), Some(Request::TwinUpdate("e".into())));
    }

    #[test]
    fn two_segment_ids() {
        let t = |s| parse(s, 2);
        assert_eq!(
            t("$hw/events/device/default/thermo-1/twin/update"),
            Some(Request::TwinUpdate("default/thermo-1".into()))
        );
        assert_eq!(t("$hw/events/device/thermo-1/twin/update"), None);
        assert_eq!(subscriptions(2)[0], "$hw/events/device/+/+/twin/+");
        assert_eq!(subscriptions(1)[1], "$hw/events/device/+/state/update");
    }
}
