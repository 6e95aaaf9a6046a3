//! MQTT topic names. Only this module knows how topics are spelled.
//!
//! - `devices/{device_id}/notify`: hints for one device (cloud → device, QoS 1).
//! - `devices/{device_id}/presence`: the device's online announcement and its last will
//!   (device → cloud; a trigger only, never trusted for data).
//! - `fleet/events/devices/{event}` and `fleet/events/jobs/{state}`: ops events as JSON, with
//!   the device (and job) in the payload. One topic per kind of event, not per device: rumqttd
//!   compares every topic it has not seen before with every filter (one per device), so
//!   per-device event topics would cost the embedded broker O(devices²) as a fleet comes up.
//! - `fleet/events/applications/{application_id}/{event}` and
//!   `fleet/events/services/{service_id}/{event}`: there are few of these, and a provider
//!   follows its own service's topic.

use crate::{ApplicationId, DeviceId};

/// Filter matching every device's notification topic (used to give them small broker segments).
pub const NOTIFY_FILTER: &str = "devices/+/notify";
/// Filter the cloud bridge subscribes to for presence announcements.
pub const PRESENCE_FILTER: &str = "devices/+/presence";
/// Filter matching every ops event.
pub const OPS_FILTER: &str = "fleet/events/#";
/// What every ops event's topic starts with.
pub const OPS_PREFIX: &str = "fleet/events/";

pub fn notify(device: &DeviceId) -> String {
    notify_of(device.as_str())
}

pub fn presence(device: &DeviceId) -> String {
    presence_of(device.as_str())
}

/// [`notify`] for an id not (yet) checked as a [`DeviceId`], as a broker sees its clients.
pub fn notify_of(device: &str) -> String {
    format!("devices/{device}/notify")
}

/// [`presence`] for an id not (yet) checked as a [`DeviceId`].
pub fn presence_of(device: &str) -> String {
    format!("devices/{device}/presence")
}

/// The device id of a presence topic, if `topic` is one.
pub fn parse_presence(topic: &str) -> Option<DeviceId> {
    let rest = topic.strip_prefix("devices/")?;
    let id = rest.strip_suffix("/presence")?;
    DeviceId::parse(id).ok()
}

/// Events about devices (`registered`, `online`, `status`, ...).
pub fn ops_device(event: &str) -> String {
    format!("{OPS_PREFIX}devices/{event}")
}

pub fn ops_application(application: &ApplicationId, event: &str) -> String {
    format!("{OPS_PREFIX}applications/{application}/{event}")
}

/// Events for a service's provider (`activated`, `telemetry`).
pub fn ops_service(service_id: &str, event: &str) -> String {
    format!("{OPS_PREFIX}services/{service_id}/{event}")
}

/// Job transitions by the state reached, and `moved`.
pub fn ops_job(state: &str) -> String {
    format!("{OPS_PREFIX}jobs/{state}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presence_topics_parse_only_valid_device_ids() {
        let id = DeviceId::from_random([1; 8]);
        assert_eq!(parse_presence(&presence(&id)), Some(id.clone()));
        assert_eq!(parse_presence(&notify(&id)), None);
        assert_eq!(parse_presence("devices/#/presence"), None);
        assert_eq!(
            parse_presence("devices/dev-0101010101010101/x/presence"),
            None
        );
    }
}
