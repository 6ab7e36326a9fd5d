//! The front door's packet-size guard: follows the MQTT framing of what a device sends
//! (fixed header and remaining length only, plus the client id of its CONNECT) so that a
//! packet bigger than the broker reads is refused here, counted and logged with the
//! client id, instead of silently dropping the connection inside rumqttd. It interprets
//! nothing else: every byte it accepts goes to the broker unchanged.

/// What the guard found wrong with the device's stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TooLarge {
    /// The packet's size (its remaining length).
    pub size: usize,
    /// The device's client id, when its CONNECT was seen.
    pub client_id: Option<String>,
}

#[derive(Debug)]
enum State {
    /// Expecting the first byte of a fixed header.
    Type,
    /// Reading the remaining-length varint.
    Length {
        connect: bool,
        value: usize,
        shift: u32,
    },
    /// Inside a packet's body.
    Body { connect: bool, remaining: usize },
}

/// Longest CONNECT body kept to read the client id from.
const MAX_CONNECT: usize = 64 * 1024;

/// Follows one device's byte stream.
#[derive(Debug)]
pub struct PacketGuard {
    max_packet: usize,
    state: State,
    connect: Vec<u8>,
    client_id: Option<String>,
}

impl PacketGuard {
    /// A guard refusing packets whose remaining length exceeds `max_packet`.
    pub fn new(max_packet: usize) -> Self {
        Self {
            max_packet,
            state: State::Type,
            connect: Vec::new(),
            client_id: None,
        }
    }

    /// The client id of the device's CONNECT, once seen.
    #[cfg(test)]
    pub fn client_id(&self) -> Option<&str> {
        self.client_id.as_deref()
    }

    /// Follows `bytes`; `Err` as soon as a packet's header announces more than the limit.
    pub fn feed(&mut self, mut bytes: &[u8]) -> Result<(), TooLarge> {
        while let Some((&b, rest)) = bytes.split_first() {
            match &mut self.state {
                State::Type => {
                    let connect = b >> 4 == 1 && self.client_id.is_none();
                    self.state = State::Length {
                        connect,
                        value: 0,
                        shift: 0,
                    };
                    bytes = rest;
                }
                State::Length {
                    connect,
                    value,
                    shift,
                } => {
                    *value |= usize::from(b & 0x7f) << *shift;
                    *shift += 7;
                    bytes = rest;
                    if b & 0x80 != 0 && *shift < 28 {
                        continue;
                    }
                    let (connect, size) = (*connect, *value);
                    if size > self.max_packet {
                        return Err(TooLarge {
                            size,
                            client_id: self.client_id.clone(),
                        });
                    }
                    self.connect.clear();
                    self.state = if size == 0 {
                        State::Type
                    } else {
                        State::Body {
                            connect,
                            remaining: size,
                        }
                    };
                }
                State::Body { connect, remaining } => {
                    let take = (*remaining).min(bytes.len());
                    if *connect && self.connect.len() + take <= MAX_CONNECT {
                        self.connect.extend_from_slice(&bytes[..take]);
                    }
                    *remaining -= take;
                    bytes = &bytes[take..];
                    if *remaining == 0 {
                        if *connect {
                            self.client_id = connect_client_id(&self.connect);
                            self.connect = Vec::new();
                        }
                        self.state = State::Type;
                    }
                }
            }
        }
        Ok(())
    }
}

/// The client id of a CONNECT body (MQTT 3.1.1 or 5), if it parses.
fn connect_client_id(body: &[u8]) -> Option<String> {
    let name_len = usize::from(u16::from_be_bytes([*body.first()?, *body.get(1)?]));
    let mut at = 2 + name_len;
    let level = *body.get(at)?;
    at += 1 + 1 + 2; // level, flags, keep-alive
    if level == 5 {
        let (props, used) = varint(body.get(at..)?)?;
        at += used + props;
    }
    let id_len = usize::from(u16::from_be_bytes([*body.get(at)?, *body.get(at + 1)?]));
    let id = body.get(at + 2..at + 2 + id_len)?;
    Some(String::from_utf8_lossy(id).into_owned())
}

/// An MQTT variable byte integer and how many bytes it took.
fn varint(bytes: &[u8]) -> Option<(usize, usize)> {
    let mut value = 0usize;
    for (i, b) in bytes.iter().take(4).enumerate() {
        value |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some((value, i + 1));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn remaining_length(mut n: usize) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            let mut b = (n % 128) as u8;
            n /= 128;
            if n > 0 {
                b |= 0x80;
            }
            out.push(b);
            if n == 0 {
                return out;
            }
        }
    }

    fn packet(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut p = vec![kind];
        p.extend(remaining_length(body.len()));
        p.extend_from_slice(body);
        p
    }

    fn connect(level: u8, client_id: &str) -> Vec<u8> {
        let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', level, 0x02, 0, 10];
        if level == 5 {
            body.push(0); // no properties
        }
        body.extend((client_id.len() as u16).to_be_bytes());
        body.extend(client_id.as_bytes());
        packet(0x10, &body)
    }

    #[test]
    fn packets_within_the_limit_pass_and_the_client_id_is_read_from_connect() {
        for level in [4, 5] {
            let mut g = PacketGuard::new(1024);
            let mut stream = connect(level, "pump-7");
            stream.extend(packet(0x32, &[0u8; 1000]));
            stream.extend(packet(0xc0, &[])); // PINGREQ
                                              // Byte by byte: the framing survives any split.
            for b in &stream {
                g.feed(std::slice::from_ref(b)).expect("within the limit");
            }
            assert_eq!(g.client_id(), Some("pump-7"), "MQTT level {level}");
        }
    }

    #[test]
    fn a_packet_over_the_limit_is_refused_from_its_header_naming_the_client() {
        let mut g = PacketGuard::new(1024);
        g.feed(&connect(4, "big-1")).expect("connect");
        let header = {
            let mut h = vec![0x32];
            h.extend(remaining_length(2 * 1024 * 1024));
            h
        };
        assert_eq!(
            g.feed(&header),
            Err(TooLarge {
                size: 2 * 1024 * 1024,
                client_id: Some("big-1".into())
            })
        );
    }
}
