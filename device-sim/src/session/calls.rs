//! One typed method per data-channel request: the answer of the kind the request asks for, or
//! [`SessionError::Unexpected`] when the server answers with another kind (a protocol fault,
//! never a refusal: refusals are [`SessionError::Request`]).

use schemas::data::{
    DeviceStatus, ErrorBody, JobOffer, OwnerCheckReason, OwnerClaim, Refusal, Request, Response,
};
use schemas::feed::FeedEntry;
use schemas::job::{JobState, JobUpdate};
use schemas::outbox::{OutboxItem, RequestNo};
use schemas::print::{Capabilities, HeldJobSummary};
use schemas::services::{ContractInfo, DeviceControl, InstructionOffer};
use schemas::settings::SettingsReport;
use schemas::{FeedSeq, InstructionId, JobId, Secret, UnixMillis, UserId};

use super::{DataSession, SessionError};

/// A new print session at the panel, as the cloud opened it.
#[derive(Debug, Clone)]
pub struct LoggedIn {
    pub session: Secret,
    pub expires_at: UnixMillis,
    pub held: Vec<HeldJobSummary>,
}

macro_rules! calls {
    ($($(#[$doc:meta])* fn $name:ident($($arg:ident: $ty:ty),*) -> $ret:ty
        { $request:expr, $answer:pat => $out:expr })*) => {
        impl DataSession {
            $(
                $(#[$doc])*
                pub async fn $name(&self, $($arg: $ty),*) -> Result<$ret, SessionError> {
                    match self.request($request).await? {
                        $answer => Ok($out),
                        other => Err(SessionError::Unexpected(format!(
                            "{} answered with {other:?}",
                            stringify!($name)
                        ))),
                    }
                }
            )*
        }
    };
}

calls! {
    /// Feed entries after `after` (waiting up to `wait_ms` for some), and the newest number;
    /// `ack` moves the cursor first.
    fn sync(after: FeedSeq, wait_ms: u32, limit: u16, ack: Option<FeedSeq>)
        -> (Vec<FeedEntry>, FeedSeq)
        { Request::Sync { after, wait_ms, limit, ack },
          Response::Feed { entries, newest } => (entries, newest) }
    fn ack(upto: FeedSeq) -> FeedSeq
        { Request::Ack { upto }, Response::Acked { acked } => acked }
    /// Takes a job (and with `start`, starts it at once).
    fn fetch_job(job_id: JobId, start: bool) -> JobOffer
        { Request::FetchJob { job_id, start }, Response::Job(offer) => offer }
    /// Reports on the attempt the device holds; the job's state and attempt as the cloud has
    /// them.
    fn update_job(job_id: JobId, attempt: u32, update: JobUpdate) -> (JobState, u32)
        { Request::JobUpdate { job_id, attempt, update },
          Response::JobState { state, attempt, .. } => (state, attempt) }
    fn report_status(status: DeviceStatus) -> UnixMillis
        { Request::ReportStatus { status }, Response::StatusAccepted { at } => at }
    /// Hands over the next requests of the outbox: the number up to which all are handled,
    /// and those refused.
    fn deliver(items: Vec<OutboxItem>) -> (RequestNo, Vec<Refusal>)
        { Request::Deliver { items }, Response::Delivered { upto, refused } => (upto, refused) }
    fn complete_registration() -> UnixMillis
        { Request::CompleteRegistration, Response::RegistrationCompleted { at } => at }
    /// Asks for the owner's confirmation; the deadline, or none when no owner is bound.
    fn owner_check(reason: OwnerCheckReason) -> Option<UnixMillis>
        { Request::OwnerCheck { reason }, Response::OwnerCheck { deadline } => deadline }
    fn confirm_owner(owner: OwnerClaim) -> ()
        { Request::ConfirmOwner { owner }, Response::OwnerConfirmed => () }
    fn report_settings(report: SettingsReport) -> UnixMillis
        { Request::ReportSettings { report }, Response::SettingsRecorded { at } => at }
    fn take_instruction(instruction_id: InstructionId) -> InstructionOffer
        { Request::TakeInstruction { instruction_id }, Response::Instruction(offer) => offer }
    /// Redeems a registration code at a service's URL: the service id and when.
    fn register_service(url: String, code: Secret) -> (String, UnixMillis)
        { Request::RegisterService { url, code },
          Response::ServiceRegistered { service_id, at } => (service_id, at) }
    fn contracts() -> Vec<ContractInfo>
        { Request::Contracts, Response::Contracts { contracts } => contracts }
    fn activate_service(service_id: String, application_id: String) -> DeviceControl
        { Request::ActivateService { service_id, application_id },
          Response::DeviceControl(control) => control }
    fn register_printer(capabilities: Capabilities) -> UnixMillis
        { Request::RegisterPrinter { capabilities }, Response::PrinterRegistered { at } => at }
    fn login(user_id: UserId, pin: Secret) -> LoggedIn
        { Request::Login { user_id, pin },
          Response::LoggedIn { session, expires_at, held } =>
              LoggedIn { session, expires_at, held } }
    fn held_jobs(session: Secret) -> Vec<HeldJobSummary>
        { Request::HeldJobs { session }, Response::Held { held } => held }
    /// Releases held jobs to this device: those released, and those refused with why.
    fn release(session: Secret, jobs: Vec<JobId>) -> (Vec<JobId>, Vec<(JobId, ErrorBody)>)
        { Request::Release { session, jobs },
          Response::Released { released, refused } => (released, refused) }
    fn logout(session: Secret) -> ()
        { Request::Logout { session }, Response::LoggedOut => () }
}
