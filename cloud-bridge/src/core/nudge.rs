//! Poll-now: a hint to each device, or a tree passed on over the customer's LAN (see
//! [`schemas::nudge`]). The tree is laid out breadth first: device k passes the nudge on to
//! devices `fanout·k + 1 … fanout·k + fanout` and polls `k × stagger_ms` after receiving it.

use schemas::api::{PlannedPoll, PollNow, PollNowPlan, PollNowVia};
use schemas::data::ErrorCode;
use schemas::nudge::{Nudge, NudgeNode, token};
use schemas::records::DeviceRecord;
use schemas::services::InstructionBody;
use schemas::{DeviceId, InstructionId, UnixMillis};

use super::tx::{Access, Tx};
use super::{Core, CoreError, CoreResult, Effects, pick_devices, ttl_ms};
use crate::store::Ticket;

/// Most devices in one poll-now.
pub(super) const MAX_POLL_NOW: usize = 10_000;

impl Core {
    /// Plans a poll-now for a customer's devices. With `via: lan` the root's mailbox gets the
    /// tree (and the root a hint, through its feed); the devices returned are to be hinted.
    pub fn poll_now(
        &self,
        customer: &str,
        req: PollNow,
        nudge_id: String,
        instruction_id: InstructionId,
        now: UnixMillis,
    ) -> CoreResult<(PollNowPlan, Ticket, Effects)> {
        let in_use = self.customer_devices(customer);
        let mut devices: Vec<DeviceRecord> = match &req.devices {
            None => in_use,
            Some(ids) => pick_devices(&in_use, ids, |id| {
                let why = format!("device {id} is not a device of {customer:?} in use");
                CoreError::new(ErrorCode::NotFound, why)
            })?,
        };
        devices.sort_by_key(|d| (d.registered_at, d.device_id.clone()));
        devices.dedup_by(|a, b| a.device_id == b.device_id);
        if devices.is_empty() || devices.len() > MAX_POLL_NOW {
            return Err(CoreError::new(
                ErrorCode::InvalidState,
                format!("a poll-now covers 1 to {MAX_POLL_NOW} devices in use"),
            ));
        }
        let not_after = now.saturating_add_ms(ttl_ms(req.ttl_secs, 300, 24 * 3600));
        let mut plan = PollNowPlan {
            nudge_id: nudge_id.clone(),
            created_at: now,
            not_after,
            root: None,
            schedule: Vec::new(),
            hinted: Vec::new(),
        };
        if req.via == PollNowVia::Hint {
            plan.hinted = devices.into_iter().map(|d| d.device_id).collect();
            return Ok((plan, self.read_ticket(), Effects::default()));
        }
        // Devices that said where they listen on the LAN form the tree; the rest get hints.
        let lan_of = |d: &DeviceRecord| {
            d.settings_reported
                .as_ref()
                .and_then(|r| r.report.lan_endpoint.clone())
        };
        let (mut tree, hinted): (Vec<DeviceRecord>, Vec<DeviceRecord>) =
            devices.into_iter().partition(|d| lan_of(d).is_some());
        plan.hinted = hinted.into_iter().map(|d| d.device_id).collect();
        if let Some(root) = &req.root {
            let at = tree
                .iter()
                .position(|d| d.device_id == *root)
                .ok_or_else(|| {
                    CoreError::new(
                        ErrorCode::InvalidState,
                        format!("root {root} is not among the devices with a known LAN endpoint"),
                    )
                })?;
            let root = tree.remove(at);
            tree.insert(0, root);
        }
        if tree.is_empty() {
            return Err(CoreError::new(
                ErrorCode::InvalidState,
                "no device has reported a LAN endpoint; use via: hint",
            ));
        }
        let fanout = usize::from(req.fanout.unwrap_or(3).max(1));
        let stagger = req.stagger_ms.unwrap_or(1000);
        let delay = |k: usize| stagger.saturating_mul(u32::try_from(k).unwrap_or(u32::MAX));
        fn build(
            tree: &[DeviceRecord],
            k: usize,
            fanout: usize,
            node: &dyn Fn(usize, Vec<NudgeNode>) -> NudgeNode,
        ) -> NudgeNode {
            let children = (fanout * k + 1..=fanout * k + fanout)
                .filter(|c| *c < tree.len())
                .map(|c| build(tree, c, fanout, node))
                .collect();
            node(k, children)
        }
        let node = |k: usize, children: Vec<NudgeNode>| {
            let d = &tree[k];
            NudgeNode {
                device_id: d.device_id.clone(),
                lan: lan_of(d).unwrap_or_default(),
                delay_ms: delay(k),
                token: token(
                    &d.secret_sha256,
                    &nudge_id,
                    &d.device_id,
                    not_after,
                    delay(k),
                ),
                children,
            }
        };
        let root = build(&tree, 0, fanout, &node);
        plan.schedule = root
            .walk()
            .into_iter()
            .map(|n| PlannedPoll {
                device_id: n.device_id.clone(),
                delay_ms: n.delay_ms,
                children: n.children.iter().map(|c| c.device_id.clone()).collect(),
            })
            .collect();
        plan.schedule.sort_by_key(|p| p.delay_ms);
        let root_id: DeviceId = root.device_id.clone();
        plan.root = Some(root_id.clone());
        let body = InstructionBody::RelayNudge {
            nudge: Nudge {
                nudge_id,
                not_after,
                node: root,
            },
        };
        let mut tx = Tx::new(self, Access::Write, &[&root_id]);
        tx.put_instruction(instruction_id, &root_id, body, not_after, now)?;
        let (ticket, effects) = tx.commit()?;
        Ok((plan, ticket, effects))
    }
}
