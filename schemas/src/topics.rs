//! MQTT topic names. Only this module knows how topics are spelled.
//!
//! - `devices/{device_id}/notify`: hints for one device (cloud → device, QoS 1).
//! - `devices/{device_id}/presence`: the device's online announcement and its last will
//!   (device → cloud; a trigger only, never trusted for data).
//! - `fleet/events/devices/{device_id}/{event}` and `fleet/events/jobs/{device_id}/{state}`:
//!   ops events as JSON.

use crate::{ApplicationId, DeviceId};

/// Filter matching every device's notification topic (used to give them small broker segments).
pub const NOTIFY_FILTER: &str = "devices/+/notify";
/// Filter the cloud bridge subscribes to for presence announcements.
pub const PRESENCE_FILTER: &str = "devices/+/presence";
/// Filter matching every ops event.
pub const OPS_FILTER: &str = "fleet/events/#";

pub fn notify(device: &DeviceId) -> String {
    format!("devices/{device}/notify")
}

pub fn presence(device: &DeviceId) -> String {
    format!("devices/{device}/presence")
}

/// The device id of a presence topic, if `topic` is one.
pub fn parse_presence(topic: &str) -> Option<DeviceId> {
    let rest = topic.strip_prefix("devices/")?;
    let id = rest.strip_suffix("/presence")?;
    DeviceId::parse(id).ok()
}

pub fn ops_device(device: &DeviceId, event: &str) -> String {
    format!("fleet/events/devices/{device}/{event}")
}

pub fn ops_application(application: &ApplicationId, event: &str) -> String {
    format!("fleet/events/applications/{application}/{event}")
}

/// Events for a service's provider (`activated`, `telemetry`).
pub fn ops_service(service_id: &str, event: &str) -> String {
    format!("fleet/events/services/{service_id}/{event}")
}

pub fn ops_job(device: &DeviceId, state: &str) -> String {
    format!("fleet/events/jobs/{device}/{state}")
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
