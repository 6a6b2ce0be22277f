//! A DNS server for the tests, on loopback: answers A and AAAA queries from a table the test changes at
//! any time (`set`), or fails on purpose (`fail`: SERVFAIL, NXDOMAIN, REFUSED, or no answer at all), and
//! counts the queries it gets per name (`queries`). Messages are parsed and built by `hickory-proto`.
//!
//! It listens on UDP and, on the same port, on TCP: an answer larger than the client's UDP payload size
//! (512 bytes, or its EDNS size) goes out truncated (TC set, no records) and the client asks again over
//! TCP, as a real server makes it. Names match case-insensitively, with or without the trailing dot; a
//! name the table does not hold is NXDOMAIN. The server's tasks end when the `TestDns` is dropped.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use hickory_proto::op::{Edns, Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::task::JoinSet;

/// How a name's queries are answered instead of with its records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// RCODE 2: the server could not answer.
    ServFail,
    /// RCODE 3: the name does not exist.
    NxDomain,
    /// No answer at all: the query is dropped.
    Silent,
    /// RCODE 5: the server will not answer.
    Refused,
}

#[derive(Debug, Clone)]
enum Entry {
    Records(Vec<(IpAddr, u32)>),
    Fail(Failure),
}

#[derive(Debug, Default)]
struct Zone {
    /// By normalised name (lower case, no trailing dot).
    entries: HashMap<String, Entry>,
    queries: HashMap<String, usize>,
}

/// The test's DNS server. See the module's documentation.
pub struct TestDns {
    addr: SocketAddr,
    zone: Arc<Mutex<Zone>>,
    /// The UDP and TCP tasks (and, inside the TCP one, its connections'): aborted on drop.
    tasks: JoinSet<()>,
}

fn normalise(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

impl TestDns {
    /// Binds UDP on 127.0.0.1 at a port the system picks, and TCP on the same port, and starts serving.
    pub async fn start() -> TestDns {
        let (udp, tcp) = bind_pair().await;
        let addr = udp.local_addr().expect("UDP socket's address");
        let zone = Arc::new(Mutex::new(Zone::default()));
        let mut tasks = JoinSet::new();
        tasks.spawn(serve_udp(udp, zone.clone()));
        tasks.spawn(serve_tcp(tcp, zone.clone()));
        TestDns { addr, zone, tasks }
    }

    /// The address to send queries to (UDP or TCP).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Replaces the answer for `name`: these A and AAAA records (address, TTL in seconds), in this order.
    /// An empty list makes the name exist with no records (NODATA), not NXDOMAIN.
    pub fn set(&self, name: &str, records: &[(IpAddr, u32)]) {
        self.zone
            .lock()
            .unwrap()
            .entries
            .insert(normalise(name), Entry::Records(records.to_vec()));
    }

    /// From now on, answers every query for `name` with this failure.
    pub fn fail(&self, name: &str, how: Failure) {
        self.zone
            .lock()
            .unwrap()
            .entries
            .insert(normalise(name), Entry::Fail(how));
    }

    /// How many queries for `name` (of any type, over UDP or TCP, answered or not) were received.
    pub fn queries(&self, name: &str) -> usize {
        let zone = self.zone.lock().unwrap();
        zone.queries.get(&normalise(name)).copied().unwrap_or(0)
    }
}

/// A UDP socket and a TCP listener on the same loopback port. The port the system gives the UDP socket
/// may be taken for TCP: then try again with another.
async fn bind_pair() -> (UdpSocket, TcpListener) {
    let mut last_error = None;
    for _ in 0..20 {
        let udp = UdpSocket::bind("127.0.0.1:0").await.expect("bind UDP");
        let addr = udp.local_addr().expect("UDP socket's address");
        match TcpListener::bind(addr).await {
            Ok(tcp) => return (udp, tcp),
            Err(error) => last_error = Some(error),
        }
    }
    panic!("no loopback port free for both UDP and TCP: {last_error:?}");
}

async fn serve_udp(socket: UdpSocket, zone: Arc<Mutex<Zone>>) {
    let mut buf = vec![0; 65_535];
    loop {
        let Ok((len, peer)) = socket.recv_from(&mut buf).await else {
            continue;
        };
        let Some((request, response)) = answer(&buf[..len], &zone) else {
            continue;
        };
        let Ok(mut bytes) = response.to_vec() else {
            continue;
        };
        if bytes.len() > usize::from(request.max_payload()) {
            let Ok(truncated) = response.truncate().to_vec() else {
                continue;
            };
            bytes = truncated;
        }
        let _ = socket.send_to(&bytes, peer).await;
    }
}

async fn serve_tcp(listener: TcpListener, zone: Arc<Mutex<Zone>>) {
    // Dropped (and its connections' tasks aborted) when this task is aborted.
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                if let Ok((stream, _)) = accepted {
                    connections.spawn(serve_tcp_connection(stream, zone.clone()));
                }
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// DNS over TCP (RFC 1035 §4.2.2, RFC 7766): each message after its length as two bytes.
async fn serve_tcp_connection(mut stream: TcpStream, zone: Arc<Mutex<Zone>>) {
    loop {
        let Ok(len) = stream.read_u16().await else {
            return;
        };
        let mut buf = vec![0; usize::from(len)];
        if stream.read_exact(&mut buf).await.is_err() {
            return;
        }
        let Some((_, response)) = answer(&buf, &zone) else {
            continue;
        };
        let Ok(bytes) = response.to_vec() else {
            return;
        };
        let Ok(len) = u16::try_from(bytes.len()) else {
            return;
        };
        if stream.write_u16(len).await.is_err() || stream.write_all(&bytes).await.is_err() {
            return;
        }
    }
}

/// The request and the response to it; `None` when nothing is to be sent (a message that is not a
/// query, or a name that is silent).
fn answer(bytes: &[u8], zone: &Mutex<Zone>) -> Option<(Message, Message)> {
    let request = Message::from_vec(bytes).ok()?;
    if request.metadata.message_type != MessageType::Query {
        return None;
    }
    let mut response = Message::response(request.metadata.id, request.metadata.op_code);
    response.metadata.recursion_desired = request.metadata.recursion_desired;
    response.metadata.recursion_available = true;
    response.metadata.authoritative = true;
    if let Some(edns) = &request.edns {
        let mut ours = Edns::new();
        ours.set_max_payload(edns.max_payload().max(512));
        response.set_edns(ours);
    }
    let Some(query) = request.queries.first().cloned() else {
        response.metadata.response_code = ResponseCode::FormErr;
        return Some((request, response));
    };
    response.add_query(query.clone());
    if request.metadata.op_code != OpCode::Query {
        response.metadata.response_code = ResponseCode::NotImp;
        return Some((request, response));
    }

    let name = normalise(&query.name().to_ascii());
    let entry = {
        let mut zone = zone.lock().unwrap();
        *zone.queries.entry(name.clone()).or_default() += 1;
        zone.entries.get(&name).cloned()
    };
    match entry {
        None | Some(Entry::Fail(Failure::NxDomain)) => {
            response.metadata.response_code = ResponseCode::NXDomain;
        }
        Some(Entry::Fail(Failure::Silent)) => return None,
        Some(Entry::Fail(Failure::ServFail)) => {
            response.metadata.response_code = ResponseCode::ServFail;
        }
        Some(Entry::Fail(Failure::Refused)) => {
            response.metadata.response_code = ResponseCode::Refused;
        }
        Some(Entry::Records(records)) => {
            for (ip, ttl) in records {
                let data = match (ip, query.query_type()) {
                    (IpAddr::V4(v4), RecordType::A) => RData::A(A(v4)),
                    (IpAddr::V6(v6), RecordType::AAAA) => RData::AAAA(AAAA(v6)),
                    _ => continue,
                };
                // The name as asked, so that its case matches the question's.
                response.add_answer(Record::from_rdata(query.name().clone(), ttl, data));
            }
        }
    }
    Some((request, response))
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::Query;
    use hickory_proto::rr::Name;
    use std::time::Duration;

    async fn ask_udp(server: SocketAddr, name: &str, record_type: RecordType) -> Message {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let mut query = Message::query();
        query.add_query(Query::query(Name::from_ascii(name).unwrap(), record_type));
        socket
            .send_to(&query.to_vec().unwrap(), server)
            .await
            .unwrap();
        let mut buf = vec![0; 65_535];
        let (len, _) = tokio::time::timeout(Duration::from_secs(5), socket.recv_from(&mut buf))
            .await
            .expect("an answer")
            .unwrap();
        let answer = Message::from_vec(&buf[..len]).unwrap();
        assert_eq!(answer.metadata.id, query.metadata.id);
        answer
    }

    /// The server's own behaviour, checked with raw queries: so that a resolver test failing means the
    /// resolver, not the server.
    #[tokio::test]
    async fn the_test_server_answers_from_its_table_and_truncates_over_udp() {
        let dns = TestDns::start().await;
        dns.set(
            "Svc.Test.",
            &[
                ("10.0.0.1".parse().unwrap(), 30),
                ("::1".parse().unwrap(), 40),
            ],
        );
        let a = ask_udp(dns.addr(), "svc.TEST", RecordType::A).await;
        assert_eq!(a.metadata.response_code, ResponseCode::NoError);
        assert_eq!(a.answers.len(), 1);
        assert_eq!(a.answers[0].data, RData::A(A("10.0.0.1".parse().unwrap())));
        assert_eq!(a.answers[0].ttl, 30);
        let aaaa = ask_udp(dns.addr(), "svc.test.", RecordType::AAAA).await;
        assert_eq!(aaaa.answers.len(), 1);
        assert_eq!(aaaa.answers[0].ttl, 40);
        assert_eq!(dns.queries("SVC.test"), 2);

        let unknown = ask_udp(dns.addr(), "other.test", RecordType::A).await;
        assert_eq!(unknown.metadata.response_code, ResponseCode::NXDomain);
        dns.fail("svc.test", Failure::Refused);
        let refused = ask_udp(dns.addr(), "svc.test", RecordType::A).await;
        assert_eq!(refused.metadata.response_code, ResponseCode::Refused);

        // 100 A records do not fit in 512 bytes (no EDNS in these queries): TC, no records.
        let many: Vec<(IpAddr, u32)> = (0..100u32)
            .map(|i| (IpAddr::from([10, 1, 0, i as u8]), 60))
            .collect();
        dns.set("many.test", &many);
        let truncated = ask_udp(dns.addr(), "many.test", RecordType::A).await;
        assert!(truncated.metadata.truncation);
        assert!(truncated.answers.is_empty());
    }
}
