//! WebSocket proxying through wsgate with real tokio-tungstenite peers: messages of every size class,
//! fragmentation, pings, subprotocols, close codes, concurrency, balancing, and handshake errors.

mod common;

use common::*;
use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn text_and_binary_messages_round_trip() {
    let backend = TestBackend::start("b1").await;
    let (_gateway, addr) = gateway(&config_text(&[backend.addr], "")).await;
    let mut ws = ws_connect(addr, "/ws").await;
    for len in [0usize, 125, 126, 65535, 65536, 1 << 20] {
        let text = "x".repeat(len);
        within("send", ws.send(Message::text(text.clone())))
            .await
            .expect("send text");
        assert_eq!(next_message(&mut ws).await, Message::text(text));
        let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        within("send", ws.send(Message::binary(data.clone())))
            .await
            .expect("send binary");
        assert_eq!(next_message(&mut ws).await, Message::binary(data));
    }
}
