//! The notification channel's side of the bridge: devices announcing themselves on MQTT, and
//! who may log in to the broker.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use schemas::DeviceId;
use schemas::hint::{HintKind, Presence};
use schemas::ops::{Channel, OpsEvent};

use super::Bridge;
use crate::core::AuthFailure;

impl Bridge {
    /// A device announced itself on MQTT. Untrusted: it can at most cause a hint carrying
    /// nothing but a sequence number, and an ops event.
    pub fn on_presence(&self, device: &DeviceId, presence: Presence) {
        let at = self.now();
        let Some(pending) = self.core().presence(device) else {
            return;
        };
        match presence {
            Presence::Online => {
                // Back within the grace period: it replaced its own connection.
                if self.inner.departures.back(device) {
                    self.inner
                        .metrics
                        .mqtt_offline_withdrawn
                        .fetch_add(1, Ordering::Relaxed);
                } else {
                    self.core().observe(OpsEvent::DeviceOnline {
                        device_id: device.clone(),
                        channel: Channel::Mqtt,
                        at,
                    });
                }
                if let Some(newest) = pending {
                    self.inner
                        .metrics
                        .presence_hints
                        .fetch_add(1, Ordering::Relaxed);
                    self.inner.notifier.hint(device, HintKind::Pending, newest);
                }
            }
            Presence::Offline => self.inner.departures.left(device, at),
        }
    }

    /// An [`broker::Authenticator`] backed by the registry. Devices log in with their id as
    /// client id and username and their secret as password; operations tools with an ops
    /// login (`POST /v1/ops-logins`: its id as username), under any client id that is not a
    /// device id.
    pub fn mqtt_authenticator(&self) -> Arc<dyn broker::Authenticator> {
        Arc::new(MqttAuth {
            bridge: self.clone(),
        })
    }
}

impl crate::notifier::PresenceSink for Bridge {
    fn presence(&self, device: &DeviceId, presence: Presence) {
        self.on_presence(device, presence);
    }
}

#[derive(Debug)]
struct MqttAuth {
    bridge: Bridge,
}

impl broker::Authenticator for MqttAuth {
    fn authenticate(
        &self,
        client_id: &str,
        username: &str,
        password: &str,
    ) -> Result<broker::Login, broker::Refusal> {
        use broker::Refusal;
        if username.starts_with(schemas::OpsId::PREFIX) {
            let login = self.bridge.core().authenticate_ops(username, password);
            return match login {
                Err(crate::core::OpsLoginFailure::BadCredentials) => Err(Refusal::BadCredentials),
                Err(crate::core::OpsLoginFailure::Revoked) => Err(Refusal::NotAuthorized),
                // A device's id would take over that device's session.
                Ok(_) if DeviceId::parse(client_id).is_ok() => Err(Refusal::IdentifierRejected),
                Ok(id) => Ok(broker::Login::Ops(id.as_str().to_owned())),
            };
        }
        match self.bridge.authenticate(username, password) {
            Ok(_) if client_id == username => Ok(broker::Login::Device(username.to_owned())),
            Ok(_) => Err(Refusal::IdentifierRejected),
            Err(AuthFailure::Disabled | AuthFailure::Invalidated) => Err(Refusal::NotAuthorized),
            Err(AuthFailure::UnknownDevice | AuthFailure::WrongSecret) => {
                Err(Refusal::BadCredentials)
            }
        }
    }
}
