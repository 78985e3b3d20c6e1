#![allow(clippy::unwrap_used)]

use std::net::Ipv6Addr;

use tokio::io::AsyncWriteExt;
use tokio_stream::StreamExt;

use super::*;

fn limits(max: usize, per_peer: usize, timeout: Duration) -> Limits {
    Limits {
        max_connections: max,
        per_peer,
        handshake_timeout: timeout,
    }
}

async fn plain(limits: Limits) -> (Incoming<Plain>, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    (Incoming::new(listener, limits, Plain), addr)
}

/// Polls `incoming` for `dur`: the connections it yields (none is expected unless sent a preface).
async fn drive(incoming: &mut Incoming<Plain>, dur: Duration) -> Vec<Conn<TcpStream>> {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(dur, async {
        while let Some(c) = incoming.next().await {
            out.push(c.unwrap());
        }
    })
    .await;
    out
}

#[test]
fn peers_are_counted_by_address_and_ipv6_by_its_64() {
    let v4: IpAddr = "10.1.2.3".parse().unwrap();
    assert_eq!(peer_key(v4), v4);
    let mapped: IpAddr = "::ffff:10.1.2.3".parse().unwrap();
    assert_eq!(peer_key(mapped), v4);
    let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
    let b: IpAddr = "2001:db8:1:2:bbbb::2".parse().unwrap();
    assert_eq!(peer_key(a), peer_key(b));
    assert_eq!(
        peer_key(a),
        IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 1, 2, 0, 0, 0, 0))
    );
}

#[test]
fn a_peer_gets_its_limit_and_its_entry_goes_with_its_last_connection() {
    let peers = Arc::new(Peers {
        limit: 2,
        open: Mutex::default(),
    });
    let ip: IpAddr = "192.0.2.7".parse().unwrap();
    let other: IpAddr = "192.0.2.8".parse().unwrap();
    let a = peers.admit(ip).unwrap();
    let b = peers.admit(ip).unwrap();
    assert!(peers.admit(ip).is_none(), "a third from the same address");
    let c = peers.admit(other).unwrap();
    assert_eq!(peers.tracked(), 2);
    drop(a);
    let a = peers.admit(ip).unwrap();
    drop((a, b, c));
    assert_eq!(peers.tracked(), 0, "no entry is left for peers that left");

    // A flood from many addresses: the table shrinks again once they are gone.
    let many: Vec<PeerCount> = (0..5000u32)
        .map(|i| peers.admit(IpAddr::from(i.to_be_bytes())).unwrap())
        .collect();
    assert_eq!(peers.tracked(), 5000);
    drop(many);
    let capacity = peers.open.lock().unwrap().capacity();
    assert!(capacity <= SHRINK_PEERS_ABOVE, "capacity {capacity}");
}

#[tokio::test]
async fn a_preface_is_replayed_to_tonic_and_anything_else_is_closed() {
    let (mut incoming, addr) = plain(limits(8, 8, Duration::from_secs(5))).await;
    let mut good = TcpStream::connect(addr).await.unwrap();
    good.write_all(PREFACE).await.unwrap();
    good.write_all(b"rest").await.unwrap();
    let mut bad = TcpStream::connect(addr).await.unwrap();
    bad.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();

    let mut conn = tokio::time::timeout(Duration::from_secs(5), incoming.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let mut got = vec![0u8; PREFACE.len() + 4];
    conn.read_exact(&mut got).await.unwrap();
    assert_eq!(&got[..PREFACE.len()], PREFACE);
    assert_eq!(&got[PREFACE.len()..], b"rest");
    assert_eq!(conn.connect_info().remote_addr(), good.local_addr().ok());

    // The HTTP/1 request is closed: its reader sees the end.
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            tokio::select! {
                n = bad.read(&mut buf) => return n,
                _ = incoming.next() => {}
            }
        }
    })
    .await
    .unwrap();
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
}

#[tokio::test]
async fn a_silent_connection_is_closed_at_the_deadline_and_frees_its_slot() {
    let (mut incoming, addr) = plain(limits(1, 1, Duration::from_millis(300))).await;
    let mut silent = TcpStream::connect(addr).await.unwrap();
    // Accepted and in its handshake: it holds the only slot.
    drive(&mut incoming, Duration::from_millis(50)).await;
    assert_eq!(incoming.open(), 1);
    let started = Instant::now();
    while incoming.open() > 0 {
        assert!(drive(&mut incoming, Duration::from_millis(20))
            .await
            .is_empty());
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the slot is never freed"
        );
    }
    assert!(
        started.elapsed() >= Duration::from_millis(200),
        "closed before the deadline"
    );
    let mut buf = [0u8; 1];
    assert!(matches!(silent.read(&mut buf).await, Ok(0) | Err(_)));

    // The next connection gets the slot and is served.
    let mut next = TcpStream::connect(addr).await.unwrap();
    next.write_all(PREFACE).await.unwrap();
    let conns = drive(&mut incoming, Duration::from_secs(1)).await;
    assert_eq!(conns.len(), 1);
    assert_eq!(incoming.open(), 1);
    drop(conns);
    drive(&mut incoming, Duration::from_millis(20)).await;
    assert_eq!(
        incoming.open(),
        0,
        "tonic dropping a connection frees its slot"
    );
}
