//! Every message that crosses a wire or lands on disk, and nothing else.
//!
//! - [`ids`]: newtypes for identifiers, so a device id can never be passed where a job id is meant.
//! - [`codec`]: MessagePack with named fields (never positional arrays: adding a field must not
//!   break an old reader), size-checked, errors as values.
//! - [`hint`], [`topics`]: what travels on MQTT. A hint carries a kind and the newest feed
//!   sequence number; never a payload, never a secret.
//! - [`data`]: the WebSocket data channel's frames, error codes and close codes.
//! - [`feed`], [`job`]: feed entries and the job lifecycle shared by the cloud and the device.
//! - [`nudge`]: poll-now nudges passed on over the LAN as a tree, with tokens only the cloud makes.
//! - [`outbox`]: requests a device makes on its own, delivered in order from a durable outbox;
//!   [`status`]: the device state it reports.
//! - [`print`]: printer capabilities and the print settings a job asks for.
//! - [`records`]: what the cloud bridge stores on disk.
//! - [`services`]: services customers apply for, the instruction mailbox, enrollment codes.
//! - [`settings`]: server settings (endpoints) given to a device from outside, and its report.
//! - [`ops`]: fleet events for operations (JSON, so any MQTT client can read them).
//! - [`api`]: the admin HTTP API's JSON bodies; [`admin`]: its operations, each declared once
//!   (route, access, types), served by the bridge and called by the client from there;
//!   [`openapi`]: the OpenAPI document built from them.

pub mod admin;
pub mod agent;
pub mod api;
pub mod codec;
pub mod data;
pub mod feed;
pub mod fleet;
pub mod hint;
pub mod ids;
pub mod job;
pub mod nudge;
pub mod openapi;
pub mod ops;
pub mod outbox;
pub mod principals;
pub mod print;
pub mod records;
pub mod services;
pub mod settings;
pub mod status;
pub mod tolerant;
pub mod topics;

pub use codec::{DecodeError, EncodeError, decode, encode};
pub use ids::{
    ApplicationId, CompanionId, DeviceId, FeedSeq, IdError, InstructionId, JobId, OpsId, OwnerId,
    RequestId, Secret, UnixMillis, UserId,
};

/// Version of the data-channel protocol, checked in the hello.
pub const PROTOCOL_VERSION: u16 = 1;

/// Largest data-channel frame either side accepts, in bytes. Job payloads larger than this
/// minus framing overhead are refused at submission.
pub const MAX_FRAME_BYTES: usize = 1024 * 1024;

/// Largest job payload accepted by the admin API (leaves room for the frame around it).
pub const MAX_PAYLOAD_BYTES: usize = MAX_FRAME_BYTES - 4 * 1024;

/// Largest admin API request body: room for a job's payload of [`MAX_PAYLOAD_BYTES`] in base64
/// and the JSON around it.
pub const MAX_BODY_BYTES: usize = 2 * MAX_FRAME_BYTES;
