//! The admin API's operations, each declared once: its method and route, who may call it, what
//! it takes (path parameters, query, body) and what it answers. The bridge serves every
//! operation listed here from this declaration (`cloud-bridge/src/admin/`), and the Rust client
//! (`admin-client`) calls any of them with `AdminClient::call::<Op>`.
//!
//! Adding an operation: declare it here in the `operation!` table, then implement the bridge's
//! `Serve` for it and list it in the bridge's router (`cloud-bridge/src/admin/ops.rs`). See
//! ARCHITECTURE.md.

use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::api::{
    ApplicationView, ApplyForService, CancelJob, CandidatesQuery, CompanionCreated, CompanionView,
    CreateCompanion, CreateEnrollmentToken, CreateInstruction, CreateOpsLogin, CreateOwner,
    CreateService, CreateUser, CustomerView, DeviceView, DevicesQuery, EnrollmentTokenCreated,
    FleetView, Health, InstructionView, JobView, JobsQuery, MoveJob, OpsLoginCreated, OpsLoginView,
    OwnerCreated, PollNow, PollNowPlan, PutContract, PutSettings, RequestsQuery, SettingsView,
    SubmitHeldJob, SubmitJob, UpdateService, UserCreated, UserView,
};
use crate::print::{Capabilities, HeldJobRecord};
use crate::records::DeviceRequestRecord;
use crate::services::{ContractRecord, ServiceRecord};
use crate::{ApplicationId, CompanionId, DeviceId, JobId, OpsId, UserId};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Post,
    Put,
    Delete,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Post => "POST",
            Method::Put => "PUT",
            Method::Delete => "DELETE",
        }
    }
}

/// Who may call an operation, as far as the route goes; the rules per device or job (an
/// owner's own devices, the companion linked to one) are the core's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// No token needed.
    Public,
    /// The admin token only.
    Admin,
    /// Any valid token: admin, owner, companion or user.
    Token,
}

/// Whether an operation takes a JSON body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyUse {
    /// No body (`Body = ()`); one sent is ignored.
    None,
    Required,
    /// An empty body is `None` (`Body = Option<T>`).
    Optional,
}

/// One operation of the admin API.
pub trait Operation: 'static {
    const METHOD: Method;
    /// The route, `{name}` standing for each path parameter in order.
    const PATH: &'static str;
    const ACCESS: Access;
    const BODY: BodyUse;
    /// The status of a success: 201 for a creation, 202 for a request passed on.
    const STATUS: u16;
    type Params: PathParams;
    /// The query string (`()` for none).
    type Query: Serialize + DeserializeOwned + JsonSchema + Send + 'static;
    type Body: Serialize + DeserializeOwned + JsonSchema + Send + 'static;
    /// The answer (`()` for an empty one).
    type Answer: Serialize + DeserializeOwned + JsonSchema + Send + 'static;
}

/// One parameter in a route.
pub trait PathSegment: Sized + Send + JsonSchema + 'static {
    fn parse_segment(raw: &str) -> Result<Self, String>;
    fn to_segment(&self) -> String;
}

macro_rules! id_segments {
    ($($id:ty),*) => {$(
        impl PathSegment for $id {
            fn parse_segment(raw: &str) -> Result<Self, String> {
                <$id>::parse(raw).map_err(|e| e.to_string())
            }
            fn to_segment(&self) -> String {
                self.as_str().to_owned()
            }
        }
    )*};
}
id_segments!(DeviceId, JobId, CompanionId, UserId, ApplicationId, OpsId);

/// Free text (a customer, a service id): percent-encoded on the way.
impl PathSegment for String {
    fn parse_segment(raw: &str) -> Result<Self, String> {
        Ok(raw.to_owned())
    }
    fn to_segment(&self) -> String {
        let mut out = String::with_capacity(self.len());
        for b in self.bytes() {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
                out.push(b as char);
            } else {
                out.push_str(&format!("%{b:02X}"));
            }
        }
        out
    }
}

/// The parameters of a route, in order: none, one, or two.
pub trait PathParams: Sized + Send + 'static {
    fn parse(raw: &[String]) -> Result<Self, String>;
    fn segments(&self) -> Vec<String>;
    /// The JSON Schema of each parameter, in order.
    fn schemas(generator: &mut SchemaGenerator) -> Vec<Schema>;
}

impl PathParams for () {
    fn parse(_: &[String]) -> Result<Self, String> {
        Ok(())
    }
    fn segments(&self) -> Vec<String> {
        Vec::new()
    }
    fn schemas(_: &mut SchemaGenerator) -> Vec<Schema> {
        Vec::new()
    }
}

impl<A: PathSegment> PathParams for A {
    fn parse(raw: &[String]) -> Result<Self, String> {
        match raw {
            [a] => A::parse_segment(a),
            _ => Err(format!("{} path parameters, expected 1", raw.len())),
        }
    }
    fn segments(&self) -> Vec<String> {
        vec![self.to_segment()]
    }
    fn schemas(generator: &mut SchemaGenerator) -> Vec<Schema> {
        vec![generator.subschema_for::<A>()]
    }
}

impl<A: PathSegment, B: PathSegment> PathParams for (A, B) {
    fn parse(raw: &[String]) -> Result<Self, String> {
        match raw {
            [a, b] => Ok((A::parse_segment(a)?, B::parse_segment(b)?)),
            _ => Err(format!("{} path parameters, expected 2", raw.len())),
        }
    }
    fn segments(&self) -> Vec<String> {
        vec![self.0.to_segment(), self.1.to_segment()]
    }
    fn schemas(generator: &mut SchemaGenerator) -> Vec<Schema> {
        vec![
            generator.subschema_for::<A>(),
            generator.subschema_for::<B>(),
        ]
    }
}

/// The path of an operation with its parameters filled in.
pub fn path_of<O: Operation>(params: &O::Params) -> String {
    let mut segments = params.segments().into_iter();
    O::PATH
        .split('/')
        .map(|part| {
            if part.starts_with('{') {
                segments.next().unwrap_or_default()
            } else {
                part.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("/")
}

/// Something done for every operation, knowing its type: [`for_each_operation`].
pub trait Visit {
    /// `name` is the operation's type name, `doc` its documentation lines.
    fn visit<O: Operation>(&mut self, name: &'static str, doc: &[&'static str]);
}

/// Declares operations: `Name: METHOD "path", access, body use, status, Params, Query, Body
/// => Answer;`, and [`for_each_operation`] over them in the order declared.
macro_rules! operation {
    ($($(#[doc = $doc:literal])* $name:ident: $method:ident $path:literal, $access:ident,
        $body:ident, $status:literal, $params:ty, $query:ty, $req:ty => $answer:ty;)*) => {
        /// Calls `visitor` with every operation, in the order declared.
        pub fn for_each_operation(visitor: &mut impl Visit) {
            $(visitor.visit::<$name>(stringify!($name), &[$($doc),*]);)*
        }
        $(
        $(#[doc = $doc])*
        #[derive(Debug)]
        pub struct $name;

        impl Operation for $name {
            const METHOD: Method = Method::$method;
            const PATH: &'static str = $path;
            const ACCESS: Access = Access::$access;
            const BODY: BodyUse = BodyUse::$body;
            const STATUS: u16 = $status;
            type Params = $params;
            type Query = $query;
            type Body = $req;
            type Answer = $answer;
        }
    )*};
}

operation! {
    /// Liveness and counts; 503 naming what cannot serve.
    GetHealth: Get "/v1/health", Public, None, 200, (), (), () => Health;
    /// This API's OpenAPI 3.1 document.
    GetOpenApi: Get "/v1/openapi.json", Public, None, 200, (), (), () => serde_json::Value;
    /// Counters (JSON; their names are listed in README.md).
    GetMetrics: Get "/v1/metrics", Admin, None, 200, (), (), () => serde_json::Value;

    /// A token devices register with.
    CreateEnrollment: Post "/v1/enrollment-tokens", Admin, Required, 201,
        (), (), CreateEnrollmentToken => EnrollmentTokenCreated;
    /// The fleet at a glance: devices by condition, presence, customer and model; open jobs;
    /// the last hour of job transitions.
    GetFleet: Get "/v1/fleet", Admin, None, 200, (), (), () => FleetView;
    /// Every device, or those matching the query, or a page of them.
    ListDevices: Get "/v1/devices", Admin, None, 200, (), DevicesQuery, () => Vec<DeviceView>;
    GetDevice: Get "/v1/devices/{id}", Admin, None, 200, DeviceId, (), () => DeviceView;
    /// Refuses the device everywhere from now on; its connections close.
    DisableDevice: Post "/v1/devices/{id}/disable", Admin, None, 200,
        DeviceId, (), () => DeviceView;
    /// Requests accepted from the device's outbox.
    ListDeviceRequests: Get "/v1/devices/{id}/requests", Admin, None, 200,
        DeviceId, RequestsQuery, () => Vec<DeviceRequestRecord>;
    /// Asks the device to report its consent setting (through its outbox).
    QueryConsent: Post "/v1/devices/{id}/consent-query", Admin, None, 202,
        DeviceId, (), () => ();
    ListDeviceJobs: Get "/v1/devices/{id}/jobs", Admin, None, 200, DeviceId, JobsQuery, ()
        => Vec<JobView>;
    CancelJobOp: Post "/v1/jobs/{id}/cancel", Admin, Optional, 200,
        JobId, (), Option<CancelJob> => JobView;
    CreateInstructionOp: Post "/v1/devices/{id}/instructions", Admin, Required, 201,
        DeviceId, (), CreateInstruction => InstructionView;
    ListInstructions: Get "/v1/devices/{id}/instructions", Admin, None, 200,
        DeviceId, (), () => Vec<InstructionView>;
    CreateServiceOp: Post "/v1/services", Admin, Required, 201,
        (), (), CreateService => ServiceRecord;
    ListServices: Get "/v1/services", Admin, None, 200, (), (), () => Vec<ServiceRecord>;
    GetService: Get "/v1/services/{id}", Admin, None, 200, String, (), () => ServiceRecord;
    UpdateServiceOp: Put "/v1/services/{id}", Admin, Required, 200,
        String, (), UpdateService => ServiceRecord;
    /// Customers and their devices in use, by model.
    ListCustomers: Get "/v1/customers", Admin, None, 200, (), (), () => Vec<CustomerView>;
    CustomerDevices: Get "/v1/customers/{customer}/devices", Admin, None, 200,
        String, (), () => Vec<DeviceView>;
    /// The customer's devices a service can be applied for.
    Candidates: Get "/v1/customers/{customer}/candidates", Admin, None, 200,
        String, CandidatesQuery, () => Vec<DeviceView>;
    ApplyForServiceOp: Post "/v1/customers/{customer}/applications", Admin, Required, 201,
        String, (), ApplyForService => ApplicationView;
    /// Every application, newest first, with each device's progress.
    ListApplications: Get "/v1/applications", Admin, None, 200,
        (), (), () => Vec<ApplicationView>;
    GetApplication: Get "/v1/applications/{id}", Admin, None, 200,
        ApplicationId, (), () => ApplicationView;
    /// Makes devices poll now: hints, or a tree over their LAN.
    PollNowOp: Post "/v1/customers/{customer}/poll-now", Admin, Required, 200,
        String, (), PollNow => PollNowPlan;
    ListContracts: Get "/v1/devices/{id}/contracts", Admin, None, 200,
        DeviceId, (), () => Vec<ContractRecord>;
    /// Sets a contract (switching provider within a kind).
    PutContractOp: Put "/v1/devices/{id}/contracts/{service}", Admin, Required, 200,
        (DeviceId, String), (), PutContract => Vec<ContractRecord>;
    CancelContract: Delete "/v1/devices/{id}/contracts/{service}", Admin, None, 200,
        (DeviceId, String), (), () => Vec<ContractRecord>;
    /// A person who prints with held jobs: a PIN for the panel, an API token.
    CreateUserOp: Post "/v1/users", Admin, Required, 201, (), (), CreateUser => UserCreated;
    /// Every user of held printing, oldest first.
    ListUsers: Get "/v1/users", Admin, None, 200, (), (), () => Vec<UserView>;
    CreateOwnerOp: Post "/v1/owners", Admin, Required, 201, (), (), CreateOwner => OwnerCreated;
    /// An MQTT login for operations (watch `fleet/events/` only).
    CreateOpsLoginOp: Post "/v1/ops-logins", Admin, Required, 201,
        (), (), CreateOpsLogin => OpsLoginCreated;
    ListOpsLogins: Get "/v1/ops-logins", Admin, None, 200, (), (), () => Vec<OpsLoginView>;
    /// Revokes an ops login; its sessions close. The id is text: one that cannot be an ops
    /// login's id is a login that does not exist (404).
    RevokeOpsLogin: Delete "/v1/ops-logins/{id}", Admin, None, 200,
        String, (), () => OpsLoginView;

    /// Submits a job: 201 new, 200 the earlier job with the same idempotency key.
    SubmitJobOp: Post "/v1/devices/{id}/jobs", Token, Required, 201,
        DeviceId, (), SubmitJob => JobView;
    GetJob: Get "/v1/jobs/{id}", Token, None, 200, JobId, (), () => JobView;
    /// What the device's printer can do.
    GetCapabilities: Get "/v1/devices/{id}/capabilities", Token, None, 200,
        DeviceId, (), () => Capabilities;
    /// A job for the user's virtual printer.
    SubmitHeld: Post "/v1/users/{id}/held-jobs", Token, Required, 201,
        UserId, (), SubmitHeldJob => HeldJobRecord;
    /// The user's held jobs: held, released (where, when), expired.
    ListHeld: Get "/v1/users/{id}/held-jobs", Token, None, 200,
        UserId, (), () => Vec<HeldJobRecord>;
    /// Moves a queued job to another device's printer queue.
    MoveJobOp: Post "/v1/jobs/{id}/move", Token, Required, 200, JobId, (), MoveJob => JobView;
    GetSettings: Get "/v1/devices/{id}/settings", Token, None, 200,
        DeviceId, (), () => SettingsView;
    /// Sets the endpoints the device uses (through its feed).
    PutSettingsOp: Put "/v1/devices/{id}/settings", Token, Required, 200,
        DeviceId, (), PutSettings => SettingsView;
    /// A companion (phone, PC) of the calling owner, and its token.
    CreateCompanionOp: Post "/v1/companions", Token, Required, 201,
        (), (), CreateCompanion => CompanionCreated;
    GetCompanion: Get "/v1/companions/{id}", Token, None, 200,
        CompanionId, (), () => CompanionView;
    LinkCompanion: Put "/v1/companions/{id}/devices/{device}", Token, None, 200,
        (CompanionId, DeviceId), (), () => CompanionView;
    UnlinkCompanion: Delete "/v1/companions/{id}/devices/{device}", Token, None, 200,
        (CompanionId, DeviceId), (), () => CompanionView;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_filled_in_order_and_text_is_encoded() {
        let device = DeviceId::from_random([1; 8]);
        let path = path_of::<PutContractOp>(&(device.clone(), "toner plus".to_owned()));
        assert_eq!(path, format!("/v1/devices/{device}/contracts/toner%20plus"));
        assert_eq!(path_of::<ListDevices>(&()), "/v1/devices");
        let parsed = <(DeviceId, String)>::parse(&[device.to_string(), "x".into()]).unwrap();
        assert_eq!(parsed, (device, "x".to_owned()));
        assert!(DeviceId::parse_segment("nope").is_err());
    }
}
