//! A device's outbox, as the cloud receives it: status reports, consent changes and job
//! requests made at the panel, each acted on once and in the device's order.
//!
//! Deduplication needs one number per device: requests are numbered by the device and
//! delivered in order, so anything at or below the highest number accepted is a resend.

use schemas::api::RequestsQuery;
use schemas::data::{DeviceStatus, ErrorBody, ErrorCode, Refusal};
use schemas::feed::FeedBody;
use schemas::ops::OpsEvent;
use schemas::outbox::{DeviceRequest, MAX_DELIVER_ITEMS, OutboxItem, RequestNo};
use schemas::records::{
    CONSENT_HISTORY, ConsentRecord, CountersRecord, DeviceRecord, DeviceRequestRecord,
};
use schemas::{DeviceId, UnixMillis};

use super::keys::{Kind, request_key};
use super::tx::{Access, Tx};
use super::{Core, CoreError, CoreResult, Effects, decode, encode};
use crate::store::Ticket;

/// Refuses device information from a device whose last reported consent withholds it.
pub(super) fn check_consent(device: &DeviceRecord) -> CoreResult<()> {
    match device.consent {
        Some(c) if !c.granted => Err(CoreError::new(
            ErrorCode::ConsentWithheld,
            format!(
                "device {} has not permitted sending device information",
                device.device_id
            ),
        )),
        _ => Ok(()),
    }
}

/// Checks a status report, however it arrived.
pub(super) fn check_status(status: &DeviceStatus) -> Result<(), ErrorBody> {
    if status.detail.len() > 1024 {
        return Err(ErrorBody::new(
            ErrorCode::BadRequest,
            "status detail longer than 1024 bytes",
        ));
    }
    Ok(())
}

/// Records a device's status; returns the ops event announcing it.
pub(super) fn apply_status(
    device: &mut DeviceRecord,
    status: DeviceStatus,
    now: UnixMillis,
) -> OpsEvent {
    device.last_status = Some(status.clone());
    device.last_status_at = Some(now);
    OpsEvent::DeviceStatus {
        device_id: device.device_id.clone(),
        status,
        at: now,
    }
}

/// Checks a request's contents; `Err` is the refusal sent back.
fn validate(body: &DeviceRequest) -> Result<(), ErrorBody> {
    let bad = |m: String| Err(ErrorBody::new(ErrorCode::BadRequest, m));
    match body {
        DeviceRequest::Status { status } => check_status(status),
        DeviceRequest::PanelJob { action, params } => {
            if action.is_empty() || action.len() > 64 {
                return bad("action must be 1 to 64 bytes".into());
            }
            if params.len() > 32 {
                return bad(format!("{} params; at most 32", params.len()));
            }
            if let Some((k, _)) = params.iter().find(|(k, v)| k.len() > 64 || v.len() > 1024) {
                return bad(format!(
                    "param {k:?}: keys take at most 64 bytes, values 1024"
                ));
            }
            Ok(())
        }
        DeviceRequest::Unknown => bad("unknown request kind".into()),
        DeviceRequest::Counters { counters } => {
            if counters.per_media.len() > 64 || counters.per_media.keys().any(|k| k.len() > 64) {
                return bad("at most 64 media sizes of at most 64 bytes".into());
            }
            if !counters.is_consistent() {
                return bad(format!(
                    "a torn reading: total {} is not color + mono ({} + {}) and the sum over media",
                    counters.total, counters.color, counters.mono
                ));
            }
            Ok(())
        }
        // Checked against the device's contracts where it is acted on.
        DeviceRequest::Consent { .. } | DeviceRequest::Telemetry { .. } => Ok(()),
    }
}

impl Core {
    /// Acts on the next requests of a device's outbox. Returns the number everything up to
    /// which is handled, and the requests refused (with why).
    pub fn deliver(
        &self,
        device_id: &DeviceId,
        items: Vec<OutboxItem>,
        now: UnixMillis,
    ) -> CoreResult<(RequestNo, Vec<Refusal>, Ticket, Effects)> {
        if items.len() > MAX_DELIVER_ITEMS {
            return Err(CoreError::new(
                ErrorCode::BadRequest,
                format!(
                    "{} requests in one delivery; at most {MAX_DELIVER_ITEMS}",
                    items.len()
                ),
            ));
        }
        if items.windows(2).any(|w| w[0].no >= w[1].no) {
            return Err(CoreError::new(
                ErrorCode::BadRequest,
                "requests must be in increasing order of their numbers",
            ));
        }
        // Telemetry is checked against the services, in the registry.
        let telemetry = items
            .iter()
            .any(|i| matches!(i.body, DeviceRequest::Telemetry { .. }));
        let access = if telemetry {
            Access::Read
        } else {
            Access::None
        };
        let mut tx = Tx::new(self, access, &[device_id]);
        let mut device = tx.active_device(device_id)?.clone();
        let before = device.delivered;
        let mut refused = Vec::new();
        let mut effects = Effects::default();
        for item in items {
            if item.no <= device.delivered {
                continue; // Acted on before: a resend.
            }
            device.delivered = item.no;
            let verdict = validate(&item.body)
                .and_then(|()| {
                    if item.body.is_device_information() {
                        check_consent(&device).map_err(|e| e.body())
                    } else {
                        Ok(())
                    }
                })
                .and_then(|()| match &item.body {
                    DeviceRequest::Telemetry {
                        service_id,
                        readings,
                    } => tx
                        .check_telemetry(device_id, service_id, readings)
                        .map_err(|e| e.body()),
                    DeviceRequest::Counters { counters } => match &device.counters {
                        Some(earlier) => match counters.went_backwards(&earlier.counters) {
                            Some(what) => Err(ErrorBody::new(
                                ErrorCode::InvalidState,
                                format!("counters never go backwards: {what}"),
                            )),
                            None => Ok(()),
                        },
                        None => Ok(()),
                    },
                    _ => Ok(()),
                });
            if let Err(error) = verdict {
                // Not stored: refused device information must not be kept either.
                refused.push(Refusal { no: item.no, error });
                continue;
            }
            match &item.body {
                DeviceRequest::Status { status } => {
                    let event = apply_status(&mut device, status.clone(), now);
                    effects.events.push(event);
                }
                DeviceRequest::Consent {
                    granted,
                    changed_at,
                } => {
                    let record = ConsentRecord {
                        granted: *granted,
                        changed_at: *changed_at,
                        recorded_at: now,
                    };
                    let is_change = device
                        .consent
                        .is_none_or(|c| (c.granted, c.changed_at) != (*granted, *changed_at));
                    if is_change {
                        device.consent_changes.push(record);
                        let excess = device.consent_changes.len().saturating_sub(CONSENT_HISTORY);
                        device.consent_changes.drain(..excess);
                    }
                    device.consent = Some(record);
                    effects.events.push(OpsEvent::DeviceConsent {
                        device_id: device_id.clone(),
                        granted: *granted,
                        changed_at: *changed_at,
                        at: now,
                    });
                }
                DeviceRequest::PanelJob { action, .. } => {
                    effects.events.push(OpsEvent::DeviceRequest {
                        device_id: device_id.clone(),
                        no: item.no,
                        action: action.clone(),
                        at: now,
                    });
                }
                DeviceRequest::Telemetry {
                    service_id,
                    readings,
                } => {
                    effects.events.push(OpsEvent::Telemetry {
                        device_id: device_id.clone(),
                        service_id: service_id.clone(),
                        readings: readings.clone(),
                        at: now,
                    });
                }
                DeviceRequest::Counters { counters } => {
                    device.counters = Some(CountersRecord {
                        counters: counters.clone(),
                        read_at: item.made_at,
                        received_at: now,
                    });
                }
                DeviceRequest::Unknown => {}
            }
            let record = DeviceRequestRecord {
                device_id: device_id.clone(),
                no: item.no,
                made_at: item.made_at,
                received_at: now,
                body: item.body,
            };
            tx.put_raw(request_key(device_id, record.no), encode(&record)?);
        }
        let upto = device.delivered;
        if upto == before {
            return Ok((upto, refused, self.read_ticket(), effects));
        }
        tx.put_device(device)?;
        tx.effects = effects;
        let (ticket, effects) = tx.commit()?;
        Ok((upto, refused, ticket, effects))
    }

    /// The requests accepted from a device after `after`, oldest first, at most `limit`.
    pub fn device_requests(
        &self,
        device_id: &DeviceId,
        page: &RequestsQuery,
    ) -> CoreResult<Vec<DeviceRequestRecord>> {
        self.device(device_id)?;
        let first = request_key(device_id, RequestNo::ZERO);
        let after = page.after.map(|no| request_key(device_id, RequestNo(no)));
        let pairs = self.device_page(Kind::DeviceRequest, device_id, first, after, page)?;
        Ok(pairs
            .into_iter()
            .map(|(k, v)| decode::<DeviceRequestRecord>(&k, &v))
            .collect::<Result<Vec<_>, _>>()?)
    }

    /// Asks the device, through its feed, to report its consent setting.
    pub fn query_consent(
        &self,
        device_id: &DeviceId,
        now: UnixMillis,
    ) -> CoreResult<(Ticket, Effects)> {
        let mut tx = self.device_tx(device_id);
        tx.active_device(device_id)?;
        tx.append_feed(device_id, FeedBody::ConsentQuery, now)?;
        tx.commit()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use schemas::api::Order;
    use schemas::data::{DeviceState, DeviceStatus};

    use super::*;
    use crate::core::tests::{core_with_device, error_code};

    fn item(no: u64, body: DeviceRequest) -> OutboxItem {
        OutboxItem {
            no: RequestNo(no),
            made_at: UnixMillis(no),
            body,
        }
    }

    fn panel(n: u32) -> DeviceRequest {
        DeviceRequest::PanelJob {
            action: "scan_to_cloud".into(),
            params: BTreeMap::from([("n".into(), n.to_string())]),
        }
    }

    fn status(detail: &str) -> DeviceRequest {
        DeviceRequest::Status {
            status: DeviceStatus {
                state: DeviceState::Idle,
                detail: detail.into(),
                observed_at: UnixMillis(1),
            },
        }
    }

    fn consent(granted: bool, at: u64) -> DeviceRequest {
        DeviceRequest::Consent {
            granted,
            changed_at: UnixMillis(at),
        }
    }

    #[test]
    fn resends_are_acknowledged_without_acting_twice() {
        let (core, dev) = core_with_device();
        let first: Vec<_> = (1..=3).map(|n| item(n, panel(n as u32))).collect();
        let (upto, refused, _, effects) = core.deliver(&dev, first.clone(), UnixMillis(5)).unwrap();
        assert_eq!(
            (upto, refused.len(), effects.events.len()),
            (RequestNo(3), 0, 3)
        );
        // The device crashed before it dropped them, and sends them again with a new one.
        let mut again = first;
        again.push(item(4, panel(4)));
        let (upto, _, _, effects) = core.deliver(&dev, again, UnixMillis(6)).unwrap();
        assert_eq!((upto, effects.events.len()), (RequestNo(4), 1));
        let log = core
            .device_requests(&dev, &RequestsQuery::default())
            .unwrap();
        let nos: Vec<u64> = log.iter().map(|r| r.no.0).collect();
        assert_eq!(nos, [1, 2, 3, 4]);
        let newest = |after| {
            let page = RequestsQuery {
                after,
                limit: Some(2),
                order: Order::Newest,
            };
            let log = core.device_requests(&dev, &page).unwrap();
            log.iter().map(|r| r.no.0).collect::<Vec<u64>>()
        };
        assert_eq!((newest(None), newest(Some(3))), (vec![4, 3], vec![2, 1]));
    }

    #[test]
    fn status_is_refused_and_not_kept_while_consent_is_withheld() {
        let (core, dev) = core_with_device();
        let items = vec![
            item(1, consent(false, 1)),
            item(2, status("before")),
            item(3, consent(true, 3)),
            item(4, status("after")),
        ];
        let (upto, refused, _, _) = core.deliver(&dev, items, UnixMillis(9)).unwrap();
        assert_eq!(upto, RequestNo(4));
        assert_eq!(refused.len(), 1);
        assert_eq!(refused[0].no, RequestNo(2));
        assert_eq!(refused[0].error.code, ErrorCode::ConsentWithheld);
        let device = core.device(&dev).unwrap();
        assert_eq!(
            device.last_status.as_ref().map(|s| s.detail.as_str()),
            Some("after")
        );
        assert_eq!(device.consent_changes.len(), 2);
        let kinds: Vec<u64> = core
            .device_requests(&dev, &RequestsQuery::default())
            .unwrap()
            .iter()
            .map(|r| r.no.0)
            .collect();
        assert_eq!(kinds, [1, 3, 4]);
        // The direct report is held to the same rule.
        core.deliver(&dev, vec![item(5, consent(false, 5))], UnixMillis(10))
            .unwrap();
        assert_eq!(
            error_code(core.report_status(
                &dev,
                DeviceStatus {
                    state: DeviceState::Busy,
                    detail: String::new(),
                    observed_at: UnixMillis(11),
                },
                UnixMillis(11),
            )),
            ErrorCode::ConsentWithheld
        );
    }

    #[test]
    fn bad_requests_are_refused_one_by_one_and_do_not_block_the_rest() {
        let (core, dev) = core_with_device();
        let items = vec![
            item(1, DeviceRequest::Unknown),
            item(
                2,
                DeviceRequest::PanelJob {
                    action: String::new(),
                    params: BTreeMap::new(),
                },
            ),
            item(3, panel(3)),
        ];
        let (upto, refused, _, _) = core.deliver(&dev, items, UnixMillis(9)).unwrap();
        assert_eq!(upto, RequestNo(3));
        let codes: Vec<_> = refused.iter().map(|r| (r.no.0, r.error.code)).collect();
        assert_eq!(
            codes,
            [(1, ErrorCode::BadRequest), (2, ErrorCode::BadRequest)]
        );
        let out_of_order = vec![item(5, panel(5)), item(4, panel(4))];
        assert_eq!(
            error_code(core.deliver(&dev, out_of_order, UnixMillis(10))),
            ErrorCode::BadRequest
        );
        assert_eq!(core.device(&dev).unwrap().delivered, RequestNo(3));
    }
}
