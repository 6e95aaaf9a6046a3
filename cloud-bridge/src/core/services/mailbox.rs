//! The instruction mailbox: an instruction is an `i/` record and a feed entry pointing at it; a
//! device takes it once, and never after its expiry.

use schemas::api::InstructionView;
use schemas::data::ErrorCode;
use schemas::feed::FeedBody;
use schemas::services::{InstructionBody, InstructionOffer, InstructionRecord};
use schemas::{DeviceId, InstructionId, UnixMillis};

use crate::core::tx::{Access, Tx};
use crate::core::{Core, CoreError, CoreResult, Effects};
use crate::store::Ticket;

impl Core {
    /// An instruction of the device maker's own kind, for one device.
    pub fn create_instruction(
        &self,
        device_id: &DeviceId,
        instruction_id: InstructionId,
        body: InstructionBody,
        ttl_ms: u64,
        now: UnixMillis,
    ) -> CoreResult<(InstructionView, Ticket, Effects)> {
        let mut tx = Tx::new(self, Access::Write, &[device_id]);
        tx.active_device(device_id)?;
        let expires_at = now.saturating_add_ms(ttl_ms);
        let record = tx.put_instruction(instruction_id, device_id, body, expires_at, now)?;
        let (ticket, effects) = tx.commit()?;
        Ok((InstructionView::new(&record, now), ticket, effects))
    }

    /// A device's mailbox, oldest first.
    pub fn instructions(
        &self,
        device_id: &DeviceId,
        now: UnixMillis,
    ) -> CoreResult<Vec<InstructionView>> {
        self.device(device_id)?;
        let mut list: Vec<InstructionView> = self.with_registry(|r| {
            r.instructions
                .values()
                .filter(|i| i.device_id == *device_id)
                .map(|i| InstructionView::new(i, now))
                .collect()
        });
        list.sort_by_key(|i| (i.created_at, i.instruction_id.clone()));
        Ok(list)
    }

    /// The device takes an instruction. Taking it again answers the same (a device that crashed
    /// in between); after its expiry an instruction not yet taken is refused for good.
    pub fn take_instruction(
        &self,
        device_id: &DeviceId,
        instruction_id: &InstructionId,
        now: UnixMillis,
    ) -> CoreResult<(InstructionOffer, Ticket)> {
        let mut tx = Tx::new(self, Access::Write, &[device_id]);
        tx.active_device(device_id)?;
        let record = tx
            .instruction(instruction_id)?
            .filter(|i| i.device_id == *device_id)
            .ok_or_else(|| {
                CoreError::new(
                    ErrorCode::NotFound,
                    format!("no instruction {instruction_id}"),
                )
            })?;
        let offer = |r: &InstructionRecord, taken_at| InstructionOffer {
            instruction_id: r.instruction_id.clone(),
            body: r.body.clone(),
            created_at: r.created_at,
            expires_at: r.expires_at,
            taken_at,
        };
        if let Some(at) = record.taken_at {
            return Ok((offer(record, at), self.read_ticket()));
        }
        if now > record.expires_at {
            return Err(CoreError::new(
                ErrorCode::Expired,
                format!(
                    "instruction {instruction_id} expired at {} (unix ms); it must not be acted on",
                    record.expires_at.0
                ),
            ));
        }
        let mut record = record.clone();
        record.taken_at = Some(now);
        let answer = offer(&record, now);
        tx.put_instruction_record(record)?;
        tx.commit_answer(answer)
    }
}

impl Tx<'_> {
    /// Puts an instruction in a device's mailbox: an `i/` record and a feed entry.
    pub(crate) fn put_instruction(
        &mut self,
        instruction_id: InstructionId,
        device_id: &DeviceId,
        body: InstructionBody,
        expires_at: UnixMillis,
        now: UnixMillis,
    ) -> CoreResult<InstructionRecord> {
        let record = InstructionRecord {
            instruction_id: instruction_id.clone(),
            device_id: device_id.clone(),
            body,
            created_at: now,
            expires_at,
            taken_at: None,
        };
        self.insert_instruction(record.clone())?;
        let entry = FeedBody::Instruction {
            instruction_id,
            expires_at,
        };
        self.append_feed(device_id, entry, now)?;
        Ok(record)
    }
}
