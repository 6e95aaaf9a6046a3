//! Server settings set from outside: the owner (or an administrator) sets which endpoints a
//! device uses; the settings travel as an entry of the device's feed, and the device reports
//! back what it uses.

use schemas::data::ErrorCode;
use schemas::feed::FeedBody;
use schemas::ops::OpsEvent;
use schemas::settings::{
    DeviceSettings, MAX_ENDPOINT_LEN, ReportedSettings, SettingsRecord, SettingsReport,
};
use schemas::{DeviceId, UnixMillis};

use super::{Core, CoreError, CoreResult, Effects, Principal};
use crate::store::Ticket;

impl Core {
    /// Whether `principal` may read and set `device_id`'s settings: the administrator and the
    /// owner the device is bound to; companions never.
    pub fn authorize_settings(
        &self,
        principal: &Principal,
        device_id: &DeviceId,
    ) -> CoreResult<()> {
        authorize(&self.device(device_id)?, principal)
    }

    /// Replaces a device's server settings: a new revision, stored and appended to its feed.
    pub fn set_settings(
        &self,
        principal: &Principal,
        device_id: &DeviceId,
        settings: DeviceSettings,
        now: UnixMillis,
    ) -> CoreResult<(SettingsRecord, Ticket, Effects)> {
        let mut tx = self.device_tx(device_id);
        authorize(tx.device(device_id)?, principal)?;
        settings
            .endpoints
            .validate()
            .map_err(|e| CoreError::new(ErrorCode::InvalidValue, e.to_string()))?;
        let mut device = tx.active_device(device_id)?.clone();
        let record = SettingsRecord {
            revision: device.settings.as_ref().map_or(0, |s| s.revision) + 1,
            settings: settings.clone(),
            set_at: now,
            set_by: principal.label(),
        };
        device.settings = Some(record.clone());
        tx.put_device(device)?;
        let body = FeedBody::Settings {
            revision: record.revision,
            settings,
        };
        tx.append_feed(device_id, body, now)?;
        let (ticket, effects) = tx.commit()?;
        Ok((record, ticket, effects))
    }

    /// Records what the device says it uses. Unchanged reports are not written again.
    pub fn report_settings(
        &self,
        device_id: &DeviceId,
        report: SettingsReport,
        now: UnixMillis,
    ) -> CoreResult<(Ticket, Effects)> {
        report
            .endpoints
            .check_bounds()
            .map_err(|e| CoreError::new(ErrorCode::BadRequest, e.to_string()))?;
        let in_use = [&report.data_in_use, &report.mqtt_in_use];
        if in_use
            .iter()
            .any(|e| e.as_ref().is_some_and(|e| e.len() > MAX_ENDPOINT_LEN))
        {
            return Err(CoreError::new(
                ErrorCode::BadRequest,
                format!("an endpoint in use is longer than {MAX_ENDPOINT_LEN} bytes"),
            ));
        }
        if let Some(lan) = &report.lan_endpoint {
            schemas::settings::parse_broker(lan).map_err(|e| {
                CoreError::new(ErrorCode::BadRequest, format!("lan endpoint {lan:?}: {e}"))
            })?;
        }
        let mut tx = self.device_tx(device_id);
        let device = tx.active_device(device_id)?;
        let newest = device.settings.as_ref().map_or(0, |s| s.revision);
        if report.revision > newest {
            return Err(CoreError::new(
                ErrorCode::BadRequest,
                format!(
                    "settings revision {} was never set for device {device_id} (newest {newest})",
                    report.revision
                ),
            ));
        }
        if device
            .settings_reported
            .as_ref()
            .is_some_and(|r| r.report == report)
        {
            return Ok((self.read_ticket(), Effects::default()));
        }
        let mut device = device.clone();
        let event = OpsEvent::DeviceSettings {
            device_id: device_id.clone(),
            revision: report.revision,
            data_in_use: report.data_in_use.clone(),
            mqtt_in_use: report.mqtt_in_use.clone(),
            at: now,
        };
        device.settings_reported = Some(ReportedSettings { report, at: now });
        tx.put_device(device)?;
        tx.effects.events.push(event);
        tx.commit()
    }
}

/// Whether `principal` may read and set `device`'s settings: the administrator and the owner
/// the device is bound to; companions never.
fn authorize(device: &schemas::records::DeviceRecord, principal: &Principal) -> CoreResult<()> {
    let device_id = &device.device_id;
    match principal {
        Principal::Admin => Ok(()),
        Principal::Owner(owner) if device.owner.as_ref().is_some_and(|o| o.owner_id == *owner) => {
            Ok(())
        }
        Principal::Owner(owner) => Err(CoreError::new(
            ErrorCode::Forbidden,
            format!("device {device_id} is not bound to owner {owner}"),
        )),
        Principal::Companion(_) | Principal::User(_) => Err(CoreError::new(
            ErrorCode::Forbidden,
            "only the device's owner or an administrator sets its server settings",
        )),
    }
}

#[cfg(test)]
mod tests {
    use schemas::records::OwnerRecord;
    use schemas::settings::Endpoints;
    use schemas::{OwnerId, Secret};

    use super::*;
    use crate::core::NewPrincipal;
    use crate::core::tests::{T0, core_with_device, error_code};

    fn settings(data: &[&str], mqtt: &[&str]) -> DeviceSettings {
        DeviceSettings {
            endpoints: Endpoints {
                data: data.iter().map(|s| s.to_string()).collect(),
                mqtt: mqtt.iter().map(|s| s.to_string()).collect(),
            },
        }
    }

    fn report(revision: u64, s: &DeviceSettings) -> SettingsReport {
        SettingsReport {
            revision,
            endpoints: s.endpoints.clone(),
            data_in_use: s.endpoints.data.first().cloned(),
            mqtt_in_use: None,
            lan_endpoint: None,
        }
    }

    #[test]
    fn each_change_is_a_new_revision_in_the_feed() {
        let (core, dev) = core_with_device();
        let first = settings(&["ws://a:1"], &["a:1883"]);
        let (rec, _, effects) = core
            .set_settings(&Principal::Admin, &dev, first.clone(), T0)
            .unwrap();
        assert_eq!((rec.revision, rec.set_by.as_str()), (1, "admin"));
        assert_eq!(effects.feed_grew.len(), 1);
        let second = settings(&["ws://b:1", "ws://a:1"], &[]);
        let (rec, ..) = core
            .set_settings(&Principal::Admin, &dev, second.clone(), T0)
            .unwrap();
        assert_eq!(rec.revision, 2);
        let (entries, _) = core.feed_after(&dev, schemas::FeedSeq::ZERO, 10).unwrap();
        let bodies: Vec<_> = entries.into_iter().map(|e| e.body).collect();
        assert_eq!(
            bodies,
            vec![
                FeedBody::Settings {
                    revision: 1,
                    settings: first
                },
                FeedBody::Settings {
                    revision: 2,
                    settings: second.clone()
                },
            ]
        );
        // The report: recorded once, an event only when it changed.
        let (_, effects) = core.report_settings(&dev, report(2, &second), T0).unwrap();
        assert_eq!(effects.events.len(), 1);
        let (_, effects) = core.report_settings(&dev, report(2, &second), T0).unwrap();
        assert!(effects.events.is_empty());
        let stored = core
            .device(&dev)
            .unwrap()
            .settings_reported
            .clone()
            .unwrap();
        assert_eq!(stored.report.revision, 2);
        // A revision never set is refused.
        assert_eq!(
            error_code(core.report_settings(&dev, report(3, &second), T0)),
            ErrorCode::BadRequest
        );
    }

    #[test]
    fn bad_settings_and_strangers_are_refused_and_nothing_is_written() {
        let (core, dev) = core_with_device();
        let stranger = OwnerId::from_random([9; 8]);
        let new = NewPrincipal::new(stranger.clone(), "Bo", Secret::new("t"));
        core.create_principal::<OwnerRecord>(&new, T0).unwrap();
        let good = settings(&["ws://a:1"], &[]);
        assert_eq!(
            error_code(core.set_settings(&Principal::Owner(stranger), &dev, good, T0)),
            ErrorCode::Forbidden
        );
        for bad in [
            settings(&[], &["a:1"]),
            settings(&["http://a:1"], &[]),
            settings(&["ws://a:1"], &["a"]),
        ] {
            assert_eq!(
                error_code(core.set_settings(&Principal::Admin, &dev, bad, T0)),
                ErrorCode::InvalidValue
            );
        }
        let device = core.device(&dev).unwrap();
        assert_eq!(device.newest, schemas::FeedSeq::ZERO);
        assert!(device.settings.is_none());
    }
}
