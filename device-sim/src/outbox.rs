//! The device's outbox rules: numbering, consent, and what happens when it is full.
//!
//! - A request is numbered when it is made and kept until the cloud has handled it.
//! - Device information (status) is not even queued while the user withholds consent, and
//!   withdrawing consent drops any still queued.
//! - At most `limit` requests wait. When full, a new status report replaces the oldest queued
//!   one (a newer status supersedes it); a panel job request is refused with
//!   [`OutboxFull`] so the panel can tell the user; a consent report is always kept, replacing
//!   an older one still waiting.

use schemas::UnixMillis;
use schemas::agent::AgentState;
use schemas::outbox::{Consent, DeviceRequest, OutboxItem, RequestNo};

/// What became of a request made on the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Submitted {
    /// Queued under this number; it is sent as soon as the data channel allows.
    Queued(RequestNo),
    /// Device information while the user withholds consent: dropped, never sent.
    Withheld,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the outbox holds {limit} requests already; try again once the device is online")]
pub struct OutboxFull {
    pub limit: usize,
}

/// Whether the user currently permits sending device information.
pub fn consent_granted(state: &AgentState) -> bool {
    state.consent.is_some_and(|c| c.granted)
}

/// Queues `body` under the next number, following the rules above.
pub fn admit(
    state: &mut AgentState,
    body: DeviceRequest,
    now: UnixMillis,
    limit: usize,
) -> Result<Submitted, OutboxFull> {
    if body.is_device_information() && !consent_granted(state) {
        return Ok(Submitted::Withheld);
    }
    let outbox = &mut state.outbox;
    match &body {
        DeviceRequest::Consent { .. } => {
            outbox.retain(|i| !matches!(i.body, DeviceRequest::Consent { .. }));
        }
        _ if outbox.len() >= limit => {
            // New device information replaces the oldest of the same kind (status, or telemetry
            // for the same service): the newest reading matters most.
            let same = |b: &DeviceRequest| match (b, &body) {
                (DeviceRequest::Status { .. }, DeviceRequest::Status { .. }) => true,
                (
                    DeviceRequest::Telemetry { service_id: a, .. },
                    DeviceRequest::Telemetry { service_id: b, .. },
                ) => a == b,
                _ => false,
            };
            let oldest_status = if body.is_device_information() {
                outbox.iter().position(|i| same(&i.body))
            } else {
                None
            };
            match oldest_status {
                Some(i) => {
                    outbox.remove(i);
                }
                None => return Err(OutboxFull { limit }),
            }
        }
        _ => {}
    }
    let no = state.last_request.next();
    state.last_request = no;
    outbox.push_back(OutboxItem {
        no,
        made_at: now,
        body,
    });
    Ok(Submitted::Queued(no))
}

/// Records a change of consent made at the panel (online or not) and queues its report.
/// Withdrawing it drops device information still waiting to be sent.
pub fn set_consent(
    state: &mut AgentState,
    granted: bool,
    now: UnixMillis,
    limit: usize,
) -> Consent {
    let consent = Consent {
        granted,
        changed_at: now,
    };
    state.consent = Some(consent);
    if !granted {
        state.outbox.retain(|i| !i.body.is_device_information());
    }
    report_consent(state, now, limit);
    consent
}

/// Queues a report of the current consent (after a change, or when the cloud asks).
pub fn report_consent(state: &mut AgentState, now: UnixMillis, limit: usize) {
    if let Some(c) = state.consent {
        let body = DeviceRequest::Consent {
            granted: c.granted,
            changed_at: c.changed_at,
        };
        // A consent report is always admitted (see the module rules).
        let _ = admit(state, body, now, limit);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use schemas::data::{DeviceState, DeviceStatus};

    use super::*;

    fn status(n: u64) -> DeviceRequest {
        DeviceRequest::Status {
            status: DeviceStatus {
                state: DeviceState::Idle,
                detail: n.to_string(),
                observed_at: UnixMillis(n),
            },
        }
    }

    fn panel() -> DeviceRequest {
        DeviceRequest::PanelJob {
            action: "scan_to_cloud".into(),
            params: BTreeMap::new(),
        }
    }

    fn kinds(state: &AgentState) -> Vec<(u64, &'static str)> {
        state
            .outbox
            .iter()
            .map(|i| (i.no.0, i.body.kind()))
            .collect()
    }

    #[test]
    fn status_is_withheld_without_consent_and_dropped_when_consent_is_withdrawn() {
        let mut state = AgentState::default();
        assert_eq!(
            admit(&mut state, status(1), UnixMillis(1), 10),
            Ok(Submitted::Withheld)
        );
        set_consent(&mut state, true, UnixMillis(2), 10);
        assert_eq!(
            admit(&mut state, status(3), UnixMillis(3), 10),
            Ok(Submitted::Queued(RequestNo(2)))
        );
        admit(&mut state, panel(), UnixMillis(4), 10).unwrap();
        set_consent(&mut state, false, UnixMillis(5), 10);
        // The status is gone, the panel job stays, one consent report (the newest) waits.
        assert_eq!(kinds(&state), [(3, "panel_job"), (4, "consent")]);
        assert!(matches!(
            state.outbox.back().unwrap().body,
            DeviceRequest::Consent { granted: false, .. }
        ));
    }

    #[test]
    fn a_full_outbox_replaces_old_status_but_refuses_panel_jobs() {
        let mut state = AgentState::default();
        set_consent(&mut state, true, UnixMillis(0), 3);
        admit(&mut state, status(1), UnixMillis(1), 3).unwrap();
        admit(&mut state, panel(), UnixMillis(2), 3).unwrap();
        assert_eq!(
            kinds(&state),
            [(1, "consent"), (2, "status"), (3, "panel_job")]
        );
        admit(&mut state, status(4), UnixMillis(4), 3).unwrap();
        assert_eq!(
            kinds(&state),
            [(1, "consent"), (3, "panel_job"), (4, "status")]
        );
        admit(&mut state, status(5), UnixMillis(5), 3).unwrap();
        assert_eq!(
            admit(&mut state, panel(), UnixMillis(6), 3),
            Err(OutboxFull { limit: 3 })
        );
        assert_eq!(
            kinds(&state),
            [(1, "consent"), (3, "panel_job"), (5, "status")]
        );
        // A refused request took no number; numbers only go up.
        set_consent(&mut state, true, UnixMillis(7), 3);
        assert_eq!(state.outbox.back().unwrap().no, RequestNo(6));
    }
}
