//! The watch on a MySQL session's command phase: `COM_CHANGE_USER` never reaches the
//! server as the app wrote it.
//!
//! The app holds dummy credentials; a `COM_CHANGE_USER` it sends (connection pools do,
//! to reset a session; `mysqli::change_user`, Connector/Python's `cmd_change_user`)
//! carries its dummy user name and a scramble of its dummy password. The broker does
//! not re-authenticate the session (the server's reply would have to be read on the
//! download path, which the kernel carries), so the command is held back and the app
//! gets an ERR packet naming the service, as a server that refuses the change would
//! send; the session stays the brokered user's, as MySQL leaves it after a failed
//! `COM_CHANGE_USER`. Every other byte passes untouched.
//!
//! The guard frames the client's byte stream into packets (a 3-byte length and a
//! sequence id, then the payload; a command is the first byte of a packet with sequence
//! id 0) across reads of any size, holding at most the 5 bytes of a header and command
//! byte. The refused command's payload is dropped as it arrives, however large.
//!
//! A 4 GiB command (256 continuation packets of 16 MiB) brings the sequence id back to
//! 0 in its 257th packet; if that packet's first byte is 0x11 the guard takes it for a
//! command. No real client sends such a statement; the server would refuse it
//! (`max_allowed_packet` is at most 1 GiB).

use super::{errors::err_payload, proto};
use crate::connector::{KernelUpload, UploadFilter};

/// `COM_CHANGE_USER`.
pub const COM_CHANGE_USER: u8 = 0x11;

/// `ER_NOT_SUPPORTED_YET`, as the client reports the refusal.
const REFUSED: (u16, &str) = (1235, "42000");

#[derive(Debug)]
enum State {
    /// At a packet boundary, with the first bytes of the next packet (at most 5: the
    /// header and the command byte).
    Head { buf: [u8; 5], len: usize },
    /// Inside a packet that passes: this many bytes of it still to come.
    Pass(u64),
    /// Inside the refused command: this many bytes of it still to drop; then the reply.
    Drop(u64),
}

/// See the module documentation.
#[derive(Debug)]
pub struct ChangeUserGuard {
    service: String,
    state: State,
    /// Commands refused so far.
    pub refused: u32,
}

impl ChangeUserGuard {
    #[must_use]
    pub fn new(service: &str) -> Self {
        Self {
            service: service.to_owned(),
            state: State::Head {
                buf: [0; 5],
                len: 0,
            },
            refused: 0,
        }
    }

    /// The refused command is consumed: answer it.
    fn refuse(&mut self, reply: &mut Vec<u8>) {
        self.refused += 1;
        tracing::warn!(
            service = %self.service,
            "refused COM_CHANGE_USER: the app's credentials never reach the server"
        );
        reply.extend_from_slice(&self.refusal());
        self.state = State::Head {
            buf: [0; 5],
            len: 0,
        };
    }

    fn refusal(&self) -> Vec<u8> {
        let message = format!(
            "COM_CHANGE_USER is not supported through the credential broker (service `{}`): \
             the broker logs every connection in with the service's credentials; open a new \
             connection instead",
            self.service
        );
        // The reply to a command has sequence id 1.
        proto::encode(1, &err_payload(REFUSED.0, REFUSED.1, &message)).to_vec()
    }
}

impl UploadFilter for ChangeUserGuard {
    fn feed(&mut self, mut data: &[u8], up: &mut Vec<u8>, reply: &mut Vec<u8>) {
        while !data.is_empty() {
            match &mut self.state {
                State::Pass(left) => {
                    let n = usize::try_from(*left).map_or(data.len(), |l| l.min(data.len()));
                    up.extend_from_slice(&data[..n]);
                    data = &data[n..];
                    *left -= n as u64;
                    if *left == 0 {
                        self.state = State::Head {
                            buf: [0; 5],
                            len: 0,
                        };
                    }
                }
                State::Drop(left) => {
                    let n = usize::try_from(*left).map_or(data.len(), |l| l.min(data.len()));
                    data = &data[n..];
                    *left -= n as u64;
                    if *left == 0 {
                        self.refuse(reply);
                    }
                }
                State::Head { buf, len } => {
                    let take = (5 - *len).min(data.len());
                    buf[*len..*len + take].copy_from_slice(&data[..take]);
                    *len += take;
                    data = &data[take..];
                    if *len < 4 {
                        continue;
                    }
                    let payload = u64::from(u32::from_le_bytes([buf[0], buf[1], buf[2], 0]));
                    let seq = buf[3];
                    if payload == 0 {
                        // An empty packet (the end of a LOAD DATA upload): 4 bytes; a
                        // fifth byte read belongs to the next packet.
                        up.extend_from_slice(&buf[..4]);
                        let next = (*len == 5).then_some(buf[4]);
                        self.state = State::Head {
                            buf: [0; 5],
                            len: 0,
                        };
                        if let (Some(b), State::Head { buf, len }) = (next, &mut self.state) {
                            buf[0] = b;
                            *len = 1;
                        }
                        continue;
                    }
                    if *len < 5 {
                        continue;
                    }
                    let command = seq == 0 && buf[4] == COM_CHANGE_USER;
                    if !command {
                        up.extend_from_slice(&buf[..5]);
                    }
                    self.state = match (command, payload - 1) {
                        (true, 0) => {
                            // Nothing more of it to drop: the reply is due now.
                            self.refuse(reply);
                            continue;
                        }
                        (true, rest) => State::Drop(rest),
                        (false, 0) => State::Head {
                            buf: [0; 5],
                            len: 0,
                        },
                        (false, rest) => State::Pass(rest),
                    };
                }
            }
        }
    }

    fn kernel_upload(&self) -> KernelUpload {
        KernelUpload::MysqlCommands
    }

    fn resume(&mut self, left: u32) {
        self.state = if left == 0 {
            State::Head {
                buf: [0; 5],
                len: 0,
            }
        } else {
            State::Pass(u64::from(left))
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(seq: u8, payload: &[u8]) -> Vec<u8> {
        proto::encode(seq, payload).to_vec()
    }

    /// Feeds `stream` in pieces of `step` bytes; returns (upstream bytes, reply bytes).
    fn run(stream: &[u8], step: usize) -> (Vec<u8>, Vec<u8>, u32) {
        let mut g = ChangeUserGuard::new("db");
        let (mut up, mut reply) = (Vec::new(), Vec::new());
        for chunk in stream.chunks(step) {
            g.feed(chunk, &mut up, &mut reply);
        }
        (up, reply, g.refused)
    }

    #[test]
    fn other_commands_pass_byte_for_byte_however_cut() {
        let mut s = packet(0, b"\x03select 1");
        s.extend(packet(0, b"\x0e")); // COM_PING, payload of one byte
        s.extend(packet(2, b"")); // empty packet (end of LOAD DATA)
        s.extend(packet(0, &[&[0x03][..], &vec![b'x'; 70_000]].concat()));
        s.extend(packet(1, b"\x11not a command")); // seq != 0: data, not a command
        for step in [1, 2, 3, 4, 5, 7, 1000, s.len()] {
            let (up, reply, refused) = run(&s, step);
            assert_eq!(up, s, "step {step}");
            assert!(reply.is_empty());
            assert_eq!(refused, 0);
        }
    }

    #[test]
    fn change_user_is_held_back_and_answered() {
        let mut cu = vec![COM_CHANGE_USER];
        cu.extend_from_slice(b"dummy\0\x14");
        cu.extend_from_slice(&[7u8; 20]);
        cu.extend_from_slice(b"appdb\0");
        let before = packet(0, b"\x03select 1");
        let after = packet(0, b"\x03select 2");
        let s = [before.clone(), packet(0, &cu), after.clone()].concat();
        for step in [1, 3, 5, 9, s.len()] {
            let (up, reply, refused) = run(&s, step);
            assert_eq!(up, [before.clone(), after.clone()].concat(), "step {step}");
            assert_eq!(refused, 1);
            let (seq, payload) = (reply[3], &reply[4..]);
            assert_eq!(seq, 1);
            assert_eq!(payload[0], 0xff);
            assert_eq!(u16::from_le_bytes([payload[1], payload[2]]), 1235);
            let text = String::from_utf8_lossy(payload);
            assert!(
                text.contains("COM_CHANGE_USER") && text.contains("`db`"),
                "{text}"
            );
            assert!(!text.contains("dummy"));
        }
        // A bare command byte (no payload after it) is answered as well.
        let (up, reply, refused) = run(&packet(0, &[COM_CHANGE_USER]), 1);
        assert!(up.is_empty());
        assert_eq!((refused, reply[3]), (1, 1));
    }

    #[test]
    fn resumes_mid_packet_where_the_kernel_left_off() {
        let mut g = ChangeUserGuard::new("db");
        g.resume(3);
        let (mut up, mut reply) = (Vec::new(), Vec::new());
        let cu = packet(0, &[COM_CHANGE_USER, b'u', 0]);
        let s = [b"abc".to_vec(), cu].concat();
        g.feed(&s, &mut up, &mut reply);
        assert_eq!(up, b"abc");
        assert_eq!(g.refused, 1);
    }
}
