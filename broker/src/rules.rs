//! What each login may do, checked on every SUBSCRIBE and PUBLISH (and the last will): a device
//! its own notify and presence topics, an ops login `fleet/events/`, the probe nothing. Also the
//! client ids of each ops login, so that revoking it closes its sessions.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rumqttd::protocol::QoS;

use crate::BrokerStats;

/// The client ids each operations login connected with, newest last, at most
/// [`OpsSessions::PER_LOGIN`] per login (a tool that picks a new random client id for every
/// connection would otherwise grow this without bound; the oldest are the ones long gone).
#[derive(Debug, Clone, Default)]
pub(crate) struct OpsSessions(
    pub(crate) Arc<Mutex<HashMap<String, std::collections::VecDeque<String>>>>,
);

impl OpsSessions {
    pub(crate) const PER_LOGIN: usize = 256;

    pub(crate) fn add(&self, login: String, client_id: &str) {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let ids = map.entry(login).or_default();
        ids.retain(|id| id != client_id);
        ids.push_back(client_id.to_owned());
        while ids.len() > Self::PER_LOGIN {
            ids.pop_front();
        }
    }

    pub(crate) fn take(&self, login: &str) -> Vec<String> {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.remove(login).map(Vec::from).unwrap_or_default()
    }
}

/// What one device may do on MQTT.
pub(crate) struct DeviceRules {
    pub(crate) device: String,
    pub(crate) notify: String,
    pub(crate) presence: String,
    pub(crate) stats: Arc<BrokerStats>,
}

impl rumqttd::Authorizer for DeviceRules {
    fn may_subscribe(&self, filter: &str, _qos: QoS) -> bool {
        let allowed = filter == self.notify;
        if !allowed {
            self.stats.refused_subscribe(&self.device, filter);
        }
        allowed
    }

    fn may_publish(&self, topic: &str, qos: QoS, retain: bool) -> bool {
        let allowed = topic == self.presence && qos != QoS::ExactlyOnce && !retain;
        if !allowed {
            self.stats.refused_publish(&self.device, topic, qos, retain);
        }
        allowed
    }
}

/// What an operations login may do: watch ops events.
pub(crate) struct OpsRules {
    pub(crate) stats: Arc<BrokerStats>,
}

impl rumqttd::Authorizer for OpsRules {
    fn may_subscribe(&self, filter: &str, _qos: QoS) -> bool {
        let allowed = filter.starts_with(schemas::topics::OPS_PREFIX) && valid_filter(filter);
        if !allowed {
            self.stats.refused_subscribe("ops", filter);
        }
        allowed
    }

    fn may_publish(&self, topic: &str, qos: QoS, retain: bool) -> bool {
        self.stats.refused_publish("ops", topic, qos, retain);
        false
    }
}

/// The readiness probe and watchdog: may log in, nothing more.
pub(crate) struct NothingAllowed;

impl rumqttd::Authorizer for NothingAllowed {
    fn may_subscribe(&self, _filter: &str, _qos: QoS) -> bool {
        false
    }

    fn may_publish(&self, _topic: &str, _qos: QoS, _retain: bool) -> bool {
        false
    }
}

/// An MQTT topic filter as the specification allows it: `#` only as the last level, `+` only
/// as a whole level, not empty.
pub(crate) fn valid_filter(filter: &str) -> bool {
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        let last = levels.peek().is_none();
        let ok = match level {
            "#" => last,
            "+" => true,
            other => !other.contains(['#', '+']),
        };
        if !ok {
            return false;
        }
    }
    !filter.is_empty()
}
