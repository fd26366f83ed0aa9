//! Decoding failures, each mapped to the ERR_REPLY that answers it.

use bytes::Bytes;

use crate::message::Message;
use crate::types::{Opcode, Status};

/// Why a message could not be decoded, in the terms of an ERR_REPLY.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{status}{}: {reason}", param_suffix(*.err_param))]
pub struct DecodeError {
    /// The STATUS to answer with.
    pub status: Status,
    /// The parameter type at fault, for BAD_PARAM_* and MISSING_PARAM.
    pub err_param: Option<u16>,
    /// The offending value or bits.
    pub err_value: Bytes,
    /// The request's XID, when the header got that far; a reply needs it.
    pub xid: Option<u32>,
    /// The message's opcode, when the header got that far.
    pub opcode: Option<Opcode>,
    /// A human explanation for logs.
    pub reason: &'static str,
}

fn param_suffix(p: Option<u16>) -> String {
    match p {
        Some(p) => format!(" (param {p})"),
        None => String::new(),
    }
}

impl DecodeError {
    /// The ERR_REPLY that answers the bad message, if one should be sent.
    ///
    /// None when the XID is unknown (the header itself was cut short) or the
    /// bad message was itself a reply: replying to a reply could ping-pong.
    pub fn to_err_reply(&self) -> Option<Message> {
        let xid = self.xid?;
        if self.opcode.is_some_and(Opcode::is_reply) {
            return None;
        }
        let mut m = Message::err_reply(xid, self.status);
        m.params.err_param = self.err_param;
        if !self.err_value.is_empty() {
            m.params.err_value = Some(self.err_value.clone());
        }
        Some(m)
    }
}
