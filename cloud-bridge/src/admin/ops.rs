//! What each operation of [`schemas::admin`] does, in one table that serves it: each asks the
//! core (which decides), waits until the change or what was read is durable
//! ([`Bridge::change`], [`Bridge::read`]), and answers. A read or a change of the core is
//! written in the table itself; what does more (makes secrets, decodes a payload, wakes
//! long-polls, publishes hints) is a function below it, or in `people.rs`.
//!
//! Adding an operation: declare it in `schemas/src/admin.rs`, and add its line to the table
//! below.

use schemas::admin::{self as op, Operation};
use schemas::api::{
    CompanionView, DeviceView, EnrollmentTokenCreated, JobView, OpsLoginView, SettingsView,
    UserView,
};
use schemas::data::ErrorCode;
use schemas::hint::HintKind;
use schemas::records::DeviceRecord;
use schemas::services::InstructionBody;
use schemas::{ApplicationId, DeviceId, InstructionId, Secret};

use super::serve::{Call, Reply, Serve, route};
use super::{ApiFailure, ApiResult, AppState, bridge, decode_payload, now, people, status};
use crate::core::{Core, CoreError, CoreResult, NewJob, Principal};

/// One entry per operation, in one of three forms:
/// - `Op => read(|state, call, core| ...)`: a read of the core, answered once what it saw is
///   durable ([`Bridge::read`]);
/// - `Op => change(|state, call, core| ...)`: a change, answered once durable, its effects
///   carried out ([`Bridge::change`]);
/// - `Op => call(function)`: anything else, written as a function below.
///
/// Serves each operation and lists its route.
macro_rules! operations {
    ($($op:ty => $how:ident $what:tt;)*) => {
        $(serve!($how $op, $what);)*

        /// Every operation's route.
        pub(crate) fn routes(
            router: axum::Router<AppState>,
        ) -> axum::Router<AppState> {
            $(let router = route::<$op>(router);)*
            router
        }
    };
}

macro_rules! serve {
    (call $op:ty, ($f:path)) => {
        serve!(@impl $op, state, call, Ok($f(state, call).await?.into()));
    };
    ($how:ident $op:ty, (|$s:tt, $c:tt, $core:ident| $body:expr)) => {
        serve!(@impl $op, state, call, {
            let ($s, $c) = (state, call);
            let answer: <$op as Operation>::Answer = bridge(state).$how(|$core| $body).await?;
            Ok(answer.into())
        });
    };
    (@impl $op:ty, $state:ident, $call:ident, $body:expr) => {
        impl Serve for $op {
            async fn serve(
                $state: &AppState,
                $call: Call<Self>,
            ) -> ApiResult<Reply<<Self as Operation>::Answer>> {
                $body
            }
        }
    };
}

operations! {
    op::GetHealth => call(status::health);
    op::GetOpenApi => call(status::openapi);
    op::GetMetrics => call(status::metrics);
    op::GetFleet => call(status::fleet);
    op::CreateEnrollment => call(create_enrollment);
    op::ListDevices => read(|s, c, core| {
        Ok(core.find_devices(&c.query)?.iter().map(|d| view(s, d)).collect())
    });
    op::GetDevice => read(|s, c, core| Ok(view(s, &core.device(&c.params)?)));
    op::DisableDevice => call(disable_device);
    op::ListDeviceRequests => read(|_, c, core| core.device_requests(&c.params, &c.query));
    op::QueryConsent => change(|s, c, core| core.query_consent(&c.params, now(s)));
    op::ListDeviceJobs => read(|_, c, core| core.device_jobs(&c.params, &c.query));
    op::CancelJobOp => change(|s, c, core| {
        core.cancel_job(&c.params, c.body.and_then(|b| b.reason), now(s))
    });
    op::CreateInstructionOp => call(create_instruction);
    op::ListInstructions => read(|s, c, core| core.instructions(&c.params, now(s)));
    op::CreateServiceOp => change(|s, c, core| core.create_service(c.body, now(s)));
    op::ListServices => read(|_, _, core| Ok(core.services()));
    op::GetService => read(|_, c, core| core.service(&c.params));
    op::UpdateServiceOp => change(|_, c, core| core.update_service(&c.params, c.body));
    op::ListCustomers => read(|_, _, core| Ok(core.customers()));
    op::CustomerDevices => read(|s, c, core| {
        Ok(sorted_views(s, core.customer_devices(&c.params)))
    });
    op::Candidates => read(|s, c, core| {
        let list = core.candidates(&c.params, &c.query.service)?;
        Ok(list.iter().map(|d| view(s, d)).collect())
    });
    op::ApplyForServiceOp => call(apply_for_service);
    op::ListApplications => read(|s, _, core| core.applications(now(s)));
    op::GetApplication => read(|s, c, core| core.application(&c.params, now(s)));
    op::PollNowOp => call(poll_now);
    op::ListContracts => read(|_, c, core| core.device_contracts(&c.params));
    // Sets (or with an empty application id, clears) a contract; another provider's
    // contract of the same kind is canceled.
    op::PutContractOp => change(|s, c, core| {
        let (device, service) = &c.params;
        core.put_contract(device, service, c.body, now(s))
    });
    op::CancelContract => change(|s, c, core| {
        let (device, service) = &c.params;
        core.cancel_contract(device, service, now(s))
    });
    op::CreateUserOp => call(people::create_user);
    op::ListUsers => read(|_, _, core| Ok(core.users().iter().map(UserView::from).collect()));
    op::CreateOwnerOp => call(people::create_owner);
    op::CreateOpsLoginOp => call(people::create_ops_login);
    op::ListOpsLogins => read(|_, _, core| {
        Ok(core.ops_logins().iter().map(OpsLoginView::from).collect())
    });
    op::RevokeOpsLogin => call(people::revoke_ops_login);
    op::SubmitJobOp => call(submit_job);
    op::GetJob => read(|_, c, core| core.readable_job(&c.principal, &c.params));
    op::GetCapabilities => read(|_, c, core| capabilities(core, &c.principal, &c.params));
    op::SubmitHeld => call(people::submit_held);
    op::ListHeld => read(|s, c, core| {
        core.authorize_user(&c.principal, &c.params)?;
        core.held_jobs(&c.params, now(s))
    });
    op::MoveJobOp => change(|s, c, core| {
        core.move_job(&c.principal, &c.params, &c.body.to, now(s))
    });
    op::GetSettings => read(|_, c, core| {
        core.authorize_settings(&c.principal, &c.params)?;
        Ok(SettingsView::from(&core.device(&c.params)?))
    });
    op::PutSettingsOp => call(set_settings);
    op::CreateCompanionOp => call(people::create_companion);
    op::GetCompanion => read(|_, c, core| {
        Ok(CompanionView::from(&core.companion(&c.principal, &c.params)?))
    });
    op::LinkCompanion => call(people::link_companion);
    op::UnlinkCompanion => call(people::unlink_companion);
}

type Result<T> = std::result::Result<T, ApiFailure>;

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

async fn disable_device(s: &AppState, c: Call<op::DisableDevice>) -> Result<DeviceView> {
    let b = bridge(s);
    let device = b
        .change(|core| core.disable_device(&c.params, now(s)))
        .await?;
    // Wake its long-polls so they notice.
    b.wake_long_polls(&c.params);
    Ok(view(s, &device))
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

/// What the device's printer can do, for a caller who may submit to it.
fn capabilities(
    core: &Core,
    principal: &Principal,
    device: &DeviceId,
) -> CoreResult<schemas::print::Capabilities> {
    core.authorize_submit(principal, device)?;
    core.device(device)?
        .printer
        .map(|p| p.capabilities)
        .ok_or_else(|| {
            CoreError::new(
                ErrorCode::NotFound,
                format!("device {device} has registered no printer queue"),
            )
        })
}

/// A device as the API shows it, with its connections as this bridge sees them.
fn view(s: &AppState, d: &DeviceRecord) -> DeviceView {
    DeviceView {
        presence: Some(s.bridge.watch().presence(&d.device_id)),
        ..DeviceView::from(d)
    }
}

/// Devices as the API shows them, oldest registration first.
fn sorted_views(s: &AppState, devices: Vec<DeviceRecord>) -> Vec<DeviceView> {
    let mut list: Vec<DeviceView> = devices.iter().map(|d| view(s, d)).collect();
    list.sort_by_key(|d| d.registered_at);
    list
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
            ErrorCode::InvalidValue,
            "params may hold at most 16 KiB (names and values, in bytes)",
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
