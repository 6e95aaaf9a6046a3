//! Instructions from the mailbox: taken once, acted on before their expiry.

use schemas::InstructionId;
use schemas::services::InstructionBody;

use crate::lan;
use crate::session::{DataSession, SessionError};

use super::{Agent, AgentEvent, WorkError};

impl Agent {
    /// Takes an instruction from the mailbox and acts on it. The cloud refuses one that has
    /// expired: it is skipped, never acted on.
    pub(super) async fn take_instruction(
        &mut self,
        session: &DataSession,
        instruction_id: &InstructionId,
    ) -> Result<(), WorkError> {
        let offer = match session.take_instruction(instruction_id.clone()).await {
            Ok(offer) => offer,
            Err(SessionError::Request(error)) => {
                tracing::info!(%instruction_id, %error, "instruction skipped");
                self.emit(AgentEvent::InstructionSkipped {
                    instruction_id: instruction_id.clone(),
                    error,
                });
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        };
        self.emit(AgentEvent::InstructionTaken {
            instruction_id: instruction_id.clone(),
            kind: offer.body.kind(),
        });
        match offer.body {
            InstructionBody::UseStart {
                service_id,
                registration_url,
                registration_code,
                ..
            } => {
                match session
                    .register_service(registration_url, registration_code)
                    .await
                {
                    Ok((service_id, _)) => {
                        tracing::info!(%service_id, "registered for a service");
                        self.emit(AgentEvent::ServiceRegistered { service_id });
                    }
                    // A refusal is final (and recorded by the cloud for the administrator).
                    Err(SessionError::Request(error)) => {
                        tracing::warn!(%service_id, %error, "service registration refused");
                        self.emit(AgentEvent::ServiceRefused { service_id, error });
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            InstructionBody::RelayNudge { nudge } => {
                let now = lan::cloud_now(self.skew_ms);
                let verdict = match &self.nudges {
                    Some(check) => check.accept(&nudge, now),
                    None => Err("no identity to check the nudge against".into()),
                };
                match verdict {
                    Ok(accepted) => {
                        lan::pass_on(&nudge);
                        self.nudged(accepted);
                    }
                    Err(reason) => self.emit(AgentEvent::NudgeRefused { reason }),
                }
            }
            InstructionBody::Custom { name, params } => {
                self.emit(AgentEvent::CustomInstruction {
                    instruction_id: instruction_id.clone(),
                    name,
                    params,
                });
            }
            InstructionBody::Unknown => {}
        }
        Ok(())
    }
}
