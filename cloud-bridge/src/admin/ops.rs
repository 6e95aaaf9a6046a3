//! What each operation of [`schemas::admin`] does: one function per operation, and the table
//! that serves it. Each function asks the core (which decides), waits until the change or what
//! was read is durable ([`Bridge::finish`], [`Bridge::read`]), and answers.
//!
//! Adding an operation: declare it in `schemas/src/admin.rs`, write its function here and add
//! it to the table below.

use schemas::admin::{self as op, Operation};
use schemas::api::{DeviceView, EnrollmentTokenCreated, JobView, SettingsView};
use schemas::data::ErrorCode;
use schemas::hint::HintKind;
use schemas::services::InstructionBody;
use schemas::{ApplicationId, InstructionId, Secret, UnixMillis};

use super::serve::{Call, Reply, Serve, route};
use super::{ApiFailure, ApiResult, AppState, people, status};
use crate::bridge::Bridge;
use crate::core::{CoreError, NewJob};

/// `Op => function;` for every operation: serves each with its function and lists its route.
macro_rules! operations {
    ($($op:ty => $f:path;)*) => {
        $(impl Serve for $op {
            async fn serve(
                state: &AppState,
                call: Call<Self>,
            ) -> ApiResult<Reply<<Self as Operation>::Answer>> {
                Ok($f(state, call).await?.into())
            }
        })*

        /// Every operation's route.
        pub(crate) fn routes(
            router: axum::Router<AppState>,
        ) -> axum::Router<AppState> {
            $(let router = route::<$op>(router);)*
            router
        }
    };
}

operations! {
    op::GetHealth => status::health;
    op::GetMetrics => status::metrics;
    op::CreateEnrollment => create_enrollment;
    op::ListDevices => list_devices;
    op::GetDevice => get_device;
    op::DisableDevice => disable_device;
    op::ListDeviceRequests => device_requests;
    op::QueryConsent => query_consent;
    op::ListDeviceJobs => device_jobs;
    op::CancelJobOp => cancel_job;
    op::CreateInstructionOp => create_instruction;
    op::ListInstructions => instructions;
    op::CreateServiceOp => create_service;
    op::ListServices => services;
    op::GetService => service;
    op::UpdateServiceOp => update_service;
    op::ListCustomers => customers;
    op::CustomerDevices => customer_devices;
    op::Candidates => candidates;
    op::ApplyForServiceOp => apply_for_service;
    op::GetApplication => application;
    op::PollNowOp => poll_now;
    op::ListContracts => contracts;
    op::PutContractOp => put_contract;
    op::CancelContract => cancel_contract;
    op::CreateUserOp => people::create_user;
    op::CreateOwnerOp => people::create_owner;
    op::CreateOpsLoginOp => people::create_ops_login;
    op::ListOpsLogins => people::ops_logins;
    op::RevokeOpsLogin => people::revoke_ops_login;
    op::SubmitJobOp => submit_job;
    op::GetJob => job;
    op::GetCapabilities => capabilities;
    op::SubmitHeld => people::submit_held;
    op::ListHeld => people::held_jobs;
    op::MoveJobOp => move_job;
    op::GetSettings => settings;
    op::PutSettingsOp => set_settings;
    op::CreateCompanionOp => people::create_companion;
    op::GetCompanion => people::companion;
    op::LinkCompanion => people::link_companion;
    op::UnlinkCompanion => people::unlink_companion;
}

type Result<T> = std::result::Result<T, ApiFailure>;

pub(super) fn bridge(state: &AppState) -> &Bridge {
    &state.bridge
}

/// The time, as the bridge's clock says.
pub(super) fn now(s: &AppState) -> UnixMillis {
    s.bridge.now()
}

/// A payload given as text or as standard base64 (exactly one).
pub(super) fn decode_payload(text: Option<&str>, b64: Option<&str>) -> Result<Vec<u8>> {
    use base64::Engine as _;
    match (text, b64) {
        (Some(text), None) => Ok(text.as_bytes().to_vec()),
        (None, Some(b64)) => base64::engine::general_purpose::STANDARD
            .decode(b64.as_bytes())
            .map_err(|e| ApiFailure::new(ErrorCode::BadRequest, format!("payload_base64: {e}"))),
        _ => Err(ApiFailure::new(
            ErrorCode::BadRequest,
            "give exactly one of payload and payload_base64",
        )),
    }
}

// ------------------------------------------------------------------- devices

async fn create_enrollment(
    s: &AppState,
    c: Call<op::CreateEnrollment>,
) -> Result<EnrollmentTokenCreated> {
    let token = Secret::from_random(rand::random());
    let max_uses = c.body.max_uses.unwrap_or(1);
    let ttl_ms = c.body.ttl_secs.unwrap_or(24 * 3600).saturating_mul(1000);
    let record = bridge(s)
        .change(|core| {
            core.create_enrollment(token.clone(), c.body.customer, max_uses, ttl_ms, now(s))
        })
        .await?;
    Ok(EnrollmentTokenCreated {
        token,
        customer: record.customer,
        expires_at: record.expires_at,
        max_uses,
    })
}

async fn list_devices(s: &AppState, _: Call<op::ListDevices>) -> Result<Vec<DeviceView>> {
    let mut list: Vec<DeviceView> = bridge(s)
        .read(|core| Ok(core.devices().iter().map(DeviceView::from).collect()))
        .await?;
    list.sort_by_key(|d| d.registered_at);
    Ok(list)
}

async fn get_device(s: &AppState, c: Call<op::GetDevice>) -> Result<DeviceView> {
    Ok(bridge(s)
        .read(|core| Ok(DeviceView::from(&core.device(&c.params)?)))
        .await?)
}

async fn disable_device(s: &AppState, c: Call<op::DisableDevice>) -> Result<DeviceView> {
    let b = bridge(s);
    let device = b
        .change(|core| core.disable_device(&c.params, now(s)))
        .await?;
    // Wake its long-polls so they notice.
    b.wake_long_polls(&c.params);
    Ok(DeviceView::from(&device))
}

async fn device_requests(
    s: &AppState,
    c: Call<op::ListDeviceRequests>,
) -> Result<Vec<schemas::records::DeviceRequestRecord>> {
    let limit = c.query.limit.unwrap_or(100).clamp(1, 1000);
    let after = schemas::outbox::RequestNo(c.query.after.unwrap_or(0));
    Ok(bridge(s)
        .read(|core| core.device_requests(&c.params, after, limit))
        .await?)
}

async fn query_consent(s: &AppState, c: Call<op::QueryConsent>) -> Result<()> {
    let b = bridge(s);
    let (ticket, effects) = b.core().query_consent(&c.params, now(s))?;
    Ok(b.finish(ticket, effects).await?)
}

async fn settings(s: &AppState, c: Call<op::GetSettings>) -> Result<SettingsView> {
    Ok(bridge(s)
        .read(|core| {
            core.authorize_settings(&c.principal, &c.params)?;
            Ok(SettingsView::from(&core.device(&c.params)?))
        })
        .await?)
}

async fn set_settings(s: &AppState, c: Call<op::PutSettingsOp>) -> Result<SettingsView> {
    let b = bridge(s);
    let settings = schemas::settings::DeviceSettings {
        endpoints: c.body.endpoints,
    };
    let core = b.core();
    let (_, ticket, effects) = core.set_settings(&c.principal, &c.params, settings, now(s))?;
    let view = SettingsView::from(&core.device(&c.params)?);
    b.finish(ticket, effects).await?;
    Ok(view)
}

// ------------------------------------------------------------------- jobs

async fn submit_job(s: &AppState, c: Call<op::SubmitJobOp>) -> Result<Reply<JobView>> {
    let b = bridge(s);
    let req = c.body;
    let payload = decode_payload(req.payload.as_deref(), req.payload_base64.as_deref())?;
    let new = NewJob {
        payload,
        content_type: req
            .content_type
            .unwrap_or_else(|| "application/octet-stream".into()),
        ttl_ms: req.ttl_secs.map(|s| s.saturating_mul(1000)),
        max_attempts: req.max_attempts,
        idempotency_key: req.idempotency_key,
        submitted_by: Some(c.principal.label()),
        print: req.print,
    };
    let core = b.core();
    core.authorize_submit(&c.principal, &c.params)?;
    let (job, created, ticket, effects) = core.submit_job(&c.params, new, now(s))?;
    b.finish(ticket, effects).await?;
    if created {
        b.metrics()
            .jobs_submitted
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    // An earlier job with the same idempotency key: 200, not 201.
    let status = (!created).then_some(axum::http::StatusCode::OK);
    Ok(Reply {
        answer: job,
        status,
    })
}

async fn job(s: &AppState, c: Call<op::GetJob>) -> Result<JobView> {
    Ok(bridge(s)
        .read(|core| core.readable_job(&c.principal, &c.params))
        .await?)
}

async fn device_jobs(s: &AppState, c: Call<op::ListDeviceJobs>) -> Result<Vec<JobView>> {
    let limit = c.query.limit.unwrap_or(100).clamp(1, 1000);
    let after = c.query.after;
    Ok(bridge(s)
        .read(|core| core.device_jobs(&c.params, after.as_ref(), limit))
        .await?)
}

async fn cancel_job(s: &AppState, c: Call<op::CancelJobOp>) -> Result<JobView> {
    let reason = c.body.and_then(|b| b.reason);
    Ok(bridge(s)
        .change(|core| core.cancel_job(&c.params, reason, now(s)))
        .await?)
}

async fn move_job(s: &AppState, c: Call<op::MoveJobOp>) -> Result<JobView> {
    Ok(bridge(s)
        .change(|core| core.move_job(&c.principal, &c.params, &c.body.to, now(s)))
        .await?)
}

async fn capabilities(
    s: &AppState,
    c: Call<op::GetCapabilities>,
) -> Result<schemas::print::Capabilities> {
    Ok(bridge(s)
        .read(|core| {
            core.authorize_submit(&c.principal, &c.params)?;
            core.device(&c.params)?
                .printer
                .map(|p| p.capabilities)
                .ok_or_else(|| {
                    CoreError::new(
                        ErrorCode::NotFound,
                        format!("device {} has registered no printer queue", c.params),
                    )
                })
        })
        .await?)
}

// ------------------------------------------------------------------- mailbox and services

async fn create_instruction(
    s: &AppState,
    c: Call<op::CreateInstructionOp>,
) -> Result<schemas::api::InstructionView> {
    let req = c.body;
    crate::core::check_name(&req.name)?;
    let size: usize = req.params.iter().map(|(k, v)| k.len() + v.len()).sum();
    if size > 16 * 1024 {
        return Err(ApiFailure::new(
            ErrorCode::BadRequest,
            "params may hold at most 16 KiB",
        ));
    }
    let ttl_ms = crate::core::ttl_ms(req.ttl_secs, 7 * 24 * 3600, 365 * 24 * 3600);
    let body = InstructionBody::Custom {
        name: req.name,
        params: req.params,
    };
    let id = InstructionId::from_random(rand::random());
    Ok(bridge(s)
        .change(|core| core.create_instruction(&c.params, id, body, ttl_ms, now(s)))
        .await?)
}

async fn instructions(
    s: &AppState,
    c: Call<op::ListInstructions>,
) -> Result<Vec<schemas::api::InstructionView>> {
    Ok(bridge(s)
        .read(|core| core.instructions(&c.params, now(s)))
        .await?)
}

async fn create_service(
    s: &AppState,
    c: Call<op::CreateServiceOp>,
) -> Result<schemas::services::ServiceRecord> {
    Ok(bridge(s)
        .change(|core| core.create_service(c.body, now(s)))
        .await?)
}

async fn update_service(
    s: &AppState,
    c: Call<op::UpdateServiceOp>,
) -> Result<schemas::services::ServiceRecord> {
    Ok(bridge(s)
        .change(|core| core.update_service(&c.params, c.body))
        .await?)
}

async fn services(
    s: &AppState,
    _: Call<op::ListServices>,
) -> Result<Vec<schemas::services::ServiceRecord>> {
    Ok(bridge(s).read(|core| Ok(core.services())).await?)
}

async fn service(
    s: &AppState,
    c: Call<op::GetService>,
) -> Result<schemas::services::ServiceRecord> {
    Ok(bridge(s).read(|core| core.service(&c.params)).await?)
}

async fn customers(
    s: &AppState,
    _: Call<op::ListCustomers>,
) -> Result<Vec<schemas::api::CustomerView>> {
    Ok(bridge(s).read(|core| Ok(core.customers())).await?)
}

async fn customer_devices(s: &AppState, c: Call<op::CustomerDevices>) -> Result<Vec<DeviceView>> {
    let mut list: Vec<DeviceView> = bridge(s)
        .read(|core| {
            let devices = core.customer_devices(&c.params);
            Ok(devices.iter().map(DeviceView::from).collect())
        })
        .await?;
    list.sort_by_key(|d| d.registered_at);
    Ok(list)
}

async fn candidates(s: &AppState, c: Call<op::Candidates>) -> Result<Vec<DeviceView>> {
    Ok(bridge(s)
        .read(|core| {
            let list = core.candidates(&c.params, &c.query.service)?;
            Ok(list.iter().map(DeviceView::from).collect())
        })
        .await?)
}

/// Each chosen device gets a use-start instruction with a fresh one-time code, and a hint.
async fn apply_for_service(
    s: &AppState,
    c: Call<op::ApplyForServiceOp>,
) -> Result<schemas::api::ApplicationView> {
    let id = ApplicationId::from_random(rand::random());
    let mut fresh = || {
        (
            InstructionId::from_random(rand::random()),
            Secret::from_random(rand::random()),
        )
    };
    Ok(bridge(s)
        .change(|core| core.apply_for_service(&c.params, c.body, id, &mut fresh, now(s)))
        .await?)
}

async fn application(
    s: &AppState,
    c: Call<op::GetApplication>,
) -> Result<schemas::api::ApplicationView> {
    Ok(bridge(s)
        .read(|core| core.application(&c.params, now(s)))
        .await?)
}

/// Hints, or a tree over the customer's LAN whose root gets it in its mailbox.
async fn poll_now(s: &AppState, c: Call<op::PollNowOp>) -> Result<schemas::api::PollNowPlan> {
    let nudge_id: String = rand::random::<[u8; 16]>()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let instruction = InstructionId::from_random(rand::random());
    let b = bridge(s);
    let plan = b
        .change(|core| core.poll_now(&c.params, c.body, nudge_id, instruction, now(s)))
        .await?;
    for device in &plan.hinted {
        if let Some(newest) = b.core().newest(device) {
            b.notifier().hint(device, HintKind::PollNow, newest);
        }
    }
    Ok(plan)
}

async fn contracts(
    s: &AppState,
    c: Call<op::ListContracts>,
) -> Result<Vec<schemas::services::ContractRecord>> {
    Ok(bridge(s)
        .read(|core| core.device_contracts(&c.params))
        .await?)
}

/// Sets (or with an empty application id, clears) a contract; another provider's contract
/// of the same kind is canceled.
async fn put_contract(
    s: &AppState,
    c: Call<op::PutContractOp>,
) -> Result<Vec<schemas::services::ContractRecord>> {
    let (device, service) = &c.params;
    Ok(bridge(s)
        .change(|core| core.put_contract(device, service, c.body, now(s)))
        .await?)
}

async fn cancel_contract(
    s: &AppState,
    c: Call<op::CancelContract>,
) -> Result<Vec<schemas::services::ContractRecord>> {
    let (device, service) = &c.params;
    Ok(bridge(s)
        .change(|core| core.cancel_contract(device, service, now(s)))
        .await?)
}
