//! Reading the data channel's frames from a peer that may speak a newer version of protocol 1.
//!
//! A frame that decodes is taken as it is (unknown fields are ignored everywhere). A frame that
//! does not decode is looked at again, as an envelope only: if it is a request (or a response)
//! whose id can be read, only that request fails, with a typed error, and the session goes on;
//! only a frame that is not even an envelope is a connection-level error. The second look costs
//! nothing on frames that decode.

use serde::Deserialize;
use serde::de::{self, IgnoredAny, MapAccess, Visitor};

use crate::RequestId;
use crate::data::{ClientFrame, ErrorBody, ErrorCode, Request, Response, ServerFrame};

/// A frame from a device, as the server reads it.
#[derive(Debug, Clone, PartialEq)]
pub enum FromDevice {
    Frame(ClientFrame),
    /// A request whose body this server does not understand: answer `error` under `id` and go
    /// on. [`ErrorCode::UnknownRequest`] names a kind this server does not know;
    /// [`ErrorCode::BadRequest`] a known kind whose fields it cannot read (a missing field, a
    /// malformed id, an enum value it does not know).
    Rejected {
        id: RequestId,
        error: ErrorBody,
    },
}

impl FromDevice {
    /// Decodes one frame; `Err` is a connection-level error ([`ErrorCode::BadFrame`]).
    pub fn decode(bytes: &[u8]) -> Result<FromDevice, ErrorBody> {
        let error = match crate::decode::<ClientFrame>(bytes) {
            Ok(frame) => return Ok(FromDevice::Frame(frame)),
            Err(e) => e,
        };
        let Ok(ClientEnvelope::Request { id, .. }) = crate::decode::<ClientEnvelope>(bytes) else {
            return Err(ErrorBody::new(ErrorCode::BadFrame, error.to_string()));
        };
        let kind = crate::decode::<ClientEnvelope<Kind>>(bytes)
            .ok()
            .and_then(|e| match e {
                ClientEnvelope::Request { body, .. } => body.0,
                ClientEnvelope::Hello(_) => None,
            });
        let error = match kind {
            Some(kind) if !request_kinds().contains(&kind.as_str()) => ErrorBody::new(
                ErrorCode::UnknownRequest,
                format!(
                    "unknown request kind `{kind}`; this server knows {}",
                    request_kinds().join(", ")
                ),
            ),
            Some(kind) => ErrorBody::new(ErrorCode::BadRequest, format!("{kind}: {error}")),
            None => ErrorBody::new(
                ErrorCode::BadRequest,
                "a request body is a kind name or a map of one kind name to its fields",
            ),
        };
        Ok(FromDevice::Rejected { id, error })
    }
}

/// A frame from the server, as a device reads it.
#[derive(Debug, Clone, PartialEq)]
pub enum FromServer {
    Frame(ServerFrame),
    /// A response whose body this device does not understand (a newer server's answer): the
    /// request `id` failed with `error`, the session goes on.
    Unreadable {
        id: RequestId,
        error: ErrorBody,
    },
    /// An event this device does not know: ignore it.
    UnknownEvent,
}

impl FromServer {
    /// Decodes one frame; `Err` means the frame is not a server frame at all.
    pub fn decode(bytes: &[u8]) -> Result<FromServer, ErrorBody> {
        let error = match crate::decode::<ServerFrame>(bytes) {
            Ok(frame) => return Ok(FromServer::Frame(frame)),
            Err(e) => e,
        };
        match crate::decode::<ServerEnvelope>(bytes) {
            Ok(ServerEnvelope::Response { id, .. }) => Ok(FromServer::Unreadable {
                id,
                error: ErrorBody::new(
                    ErrorCode::Unknown,
                    format!("an answer this device cannot read: {error}"),
                ),
            }),
            Ok(ServerEnvelope::Event(_)) => Ok(FromServer::UnknownEvent),
            Err(_) => Err(ErrorBody::new(ErrorCode::BadFrame, error.to_string())),
        }
    }
}

/// The request kinds this build knows, as they appear on the wire.
pub fn request_kinds() -> &'static [&'static str] {
    variant_names::<Request>()
}

/// The response kinds this build knows, as they appear on the wire.
pub fn response_kinds() -> &'static [&'static str] {
    variant_names::<Response>()
}

/// A client frame with anything as the request's body: only the id must be readable.
#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum ClientEnvelope<B = IgnoredAny> {
    Hello(IgnoredAny),
    Request { id: RequestId, body: B },
}

#[derive(Deserialize)]
#[serde(rename_all = "snake_case")]
enum ServerEnvelope {
    Response {
        id: RequestId,
        #[allow(dead_code)]
        body: IgnoredAny,
    },
    Event(IgnoredAny),
}

/// The kind an externally tagged enum value names: a bare string (a variant without fields) or
/// the one key of a map (a variant with fields); `None` for a map whose key is not a string.
struct Kind(Option<String>);

impl<'de> Deserialize<'de> for Kind {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Kind, D::Error> {
        struct KindVisitor;
        impl<'de> Visitor<'de> for KindVisitor {
            type Value = Kind;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a kind name or a map of one kind name")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Kind, E> {
                Ok(Kind(Some(v.to_owned())))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Kind, A::Error> {
                let Ok(Some(key)) = map.next_key::<String>() else {
                    return Ok(Kind(None));
                };
                map.next_value::<IgnoredAny>()?;
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Kind(Some(key)))
            }
        }
        d.deserialize_any(KindVisitor)
    }
}

/// The variant names an enum's derived `Deserialize` asks for, read by offering it a
/// deserializer that records them and then gives up: the list comes from the type itself.
pub fn variant_names<T: for<'de> Deserialize<'de>>() -> &'static [&'static str] {
    struct Probe<'a>(&'a mut &'static [&'static str]);
    impl<'de> de::Deserializer<'de> for Probe<'_> {
        type Error = de::value::Error;
        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
            Err(de::Error::custom("not an enum"))
        }
        fn deserialize_enum<V: Visitor<'de>>(
            self,
            _name: &'static str,
            variants: &'static [&'static str],
            _visitor: V,
        ) -> Result<V::Value, Self::Error> {
            *self.0 = variants;
            Err(de::Error::custom("variants recorded"))
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
            option unit unit_struct newtype_struct seq tuple tuple_struct map struct identifier
            ignored_any
        }
    }
    let mut names: &'static [&'static str] = &[];
    let _ = T::deserialize(Probe(&mut names));
    names
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encode;
    use crate::job::JobUpdate;
    use crate::{FeedSeq, JobId};
    use serde::Serialize;

    /// A request as a newer device might send it: any kind, any fields.
    fn request(id: u32, body: impl Serialize) -> Vec<u8> {
        #[derive(Serialize)]
        #[serde(rename_all = "snake_case")]
        enum Frame<B> {
            Request { id: RequestId, body: B },
        }
        encode(&Frame::Request {
            id: RequestId(id),
            body,
        })
        .unwrap()
    }

    fn rejected(bytes: &[u8]) -> (RequestId, ErrorCode, String) {
        match FromDevice::decode(bytes).unwrap() {
            FromDevice::Rejected { id, error } => (id, error.code, error.message),
            FromDevice::Frame(f) => panic!("decoded as {f:?}"),
        }
    }

    #[test]
    fn the_request_kinds_are_read_from_the_type() {
        let kinds = request_kinds();
        assert!(kinds.contains(&"sync") && kinds.contains(&"complete_registration"));
        assert!(kinds.contains(&"activate_service"), "{kinds:?}");
        let frame = ClientFrame::Request {
            id: RequestId(1),
            body: Request::Contracts,
        };
        assert!(matches!(
            FromDevice::decode(&encode(&frame).unwrap()),
            Ok(FromDevice::Frame(f)) if f == frame
        ));
        assert!(response_kinds().contains(&"feed"));
    }

    #[test]
    fn an_unknown_request_kind_fails_only_that_request() {
        let (id, code, message) = rejected(&request(7, "teleport"));
        assert_eq!((id, code), (RequestId(7), ErrorCode::UnknownRequest));
        assert!(
            message.contains("`teleport`") && message.contains("sync"),
            "{message}"
        );
        let mut fields = std::collections::BTreeMap::new();
        fields.insert("fly_to", std::collections::BTreeMap::from([("x", 1)]));
        let (id, code, _) = rejected(&request(8, fields));
        assert_eq!((id, code), (RequestId(8), ErrorCode::UnknownRequest));
    }

    #[test]
    fn a_known_kind_with_unreadable_fields_is_a_bad_request() {
        /// Values of mixed types in one map.
        #[derive(Serialize)]
        #[serde(untagged)]
        enum V {
            S(String),
            I(u64),
        }
        // An update kind this server does not know.
        let body = std::collections::BTreeMap::from([(
            "job_update",
            std::collections::BTreeMap::from([
                ("job_id", V::S(JobId::from_random([1; 8]).to_string())),
                ("attempt", V::I(1)),
                ("update", V::S("paused".into())),
            ]),
        )]);
        let (id, code, message) = rejected(&request(9, body));
        assert_eq!((id, code), (RequestId(9), ErrorCode::BadRequest));
        assert!(message.starts_with("job_update: "), "{message}");
        // A malformed job id.
        let body = std::collections::BTreeMap::from([(
            "fetch_job",
            std::collections::BTreeMap::from([("job_id", "not an id")]),
        )]);
        assert_eq!(rejected(&request(10, body)).1, ErrorCode::BadRequest);
        // Neither a name nor a map of one.
        assert_eq!(rejected(&request(11, 42)).1, ErrorCode::BadRequest);
    }

    #[test]
    fn unknown_fields_are_ignored() {
        #[derive(Serialize)]
        struct AckPlus {
            upto: FeedSeq,
            priority: &'static str,
        }
        let body = std::collections::BTreeMap::from([(
            "ack",
            AckPlus {
                upto: FeedSeq(3),
                priority: "high",
            },
        )]);
        assert_eq!(
            FromDevice::decode(&request(12, body)).unwrap(),
            FromDevice::Frame(ClientFrame::Request {
                id: RequestId(12),
                body: Request::Ack { upto: FeedSeq(3) }
            })
        );
        // And a known update stays known.
        let frame = ClientFrame::Request {
            id: RequestId(13),
            body: Request::JobUpdate {
                job_id: JobId::from_random([2; 8]),
                attempt: 1,
                update: JobUpdate::Started,
            },
        };
        assert_eq!(
            FromDevice::decode(&encode(&frame).unwrap()).unwrap(),
            FromDevice::Frame(frame)
        );
    }

    #[test]
    fn what_is_not_an_envelope_is_a_connection_error() {
        for bytes in [&b"\xc1"[..], b"\x93\x01", &encode(&"hello").unwrap()] {
            assert_eq!(
                FromDevice::decode(bytes).unwrap_err().code,
                ErrorCode::BadFrame
            );
        }
        // A request without an id.
        let body = std::collections::BTreeMap::from([(
            "request",
            std::collections::BTreeMap::from([("body", "contracts")]),
        )]);
        assert_eq!(
            FromDevice::decode(&encode(&body).unwrap())
                .unwrap_err()
                .code,
            ErrorCode::BadFrame
        );
    }

    #[test]
    fn a_device_reads_past_what_a_newer_server_adds() {
        #[derive(Serialize)]
        #[serde(rename_all = "snake_case")]
        enum Newer {
            Response { id: RequestId, body: &'static str },
            Event(std::collections::BTreeMap<&'static str, u8>),
        }
        let unreadable = encode(&Newer::Response {
            id: RequestId(4),
            body: "hologram",
        })
        .unwrap();
        assert!(matches!(
            FromServer::decode(&unreadable),
            Ok(FromServer::Unreadable {
                id: RequestId(4),
                ..
            })
        ));
        let event = encode(&Newer::Event([("solar_flare", 1)].into())).unwrap();
        assert_eq!(FromServer::decode(&event), Ok(FromServer::UnknownEvent));
        assert_eq!(
            FromServer::decode(b"\xc1").unwrap_err().code,
            ErrorCode::BadFrame
        );
    }
}
