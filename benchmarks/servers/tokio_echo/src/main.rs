//! Baseline: a Tokio echo server for benchmarks/compare.py.
//!
//! What a careful Tokio user writes for a length-prefixed protocol: a
//! current_thread runtime (one core, like the Python servers it is compared
//! with), one task per connection, and tokio-util's `Framed` with a
//! `LengthDelimitedCodec` (4-byte big-endian length field, 8 MiB limit: the
//! same wire format and limit as fastnet's default `LengthPrefixed()`).
//!
//! Each task awaits one frame, then takes every further frame that is ready
//! without waiting (`now_or_never`), `feed`s each reply into the write buffer
//! and `flush`es once per batch: one write per read, as fastnet does. Frames
//! are decoded and re-encoded (the codec copies the payload into its write
//! buffer), so the server does the per-frame work a real handler does.
//!
//! Usage: `tokio_echo [--host HOST] [--port PORT]` prints
//! `listening on HOST:PORT` once it accepts connections and exits 0 on
//! SIGINT or SIGTERM. A frame above the limit closes its connection.

use std::io;
use std::net::SocketAddr;

use futures::{FutureExt, SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::codec::{Framed, LengthDelimitedCodec};

/// Same limit as fastnet's DEFAULT_MAX_FRAME_SIZE, so both refuse the same input.
const MAX_FRAME: usize = 8 * 1024 * 1024;

/// Pause after a failed accept (EMFILE): long enough not to spin on a full
/// descriptor table, short enough not to matter in a benchmark. A guess.
const ACCEPT_BACKOFF: std::time::Duration = std::time::Duration::from_millis(100);

fn codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .length_field_length(4)
        .big_endian()
        .max_frame_length(MAX_FRAME)
        .new_codec()
}

async fn echo(socket: TcpStream) -> io::Result<()> {
    // asyncio and uvloop set TCP_NODELAY on every TCP transport; do the same,
    // so small replies are not held back by Nagle's algorithm here only.
    socket.set_nodelay(true)?;
    let mut framed = Framed::new(socket, codec());
    while let Some(frame) = framed.next().await {
        framed.feed(frame?.freeze()).await?;
        // The rest of this read's frames, without waiting for more bytes.
        let mut closed = false;
        while let Some(next) = framed.next().now_or_never() {
            match next {
                Some(frame) => framed.feed(frame?.freeze()).await?,
                None => {
                    closed = true;
                    break;
                }
            }
        }
        framed.flush().await?;
        if closed {
            break;
        }
    }
    Ok(())
}

fn parse_args() -> Result<SocketAddr, String> {
    let mut host = String::from("127.0.0.1");
    let mut port = String::from("0");
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let value = args.next().ok_or_else(|| format!("{arg} needs a value"))?;
        match arg.as_str() {
            "--host" => host = value,
            "--port" => port = value,
            _ => return Err(format!("unknown argument {arg} (known: --host, --port)")),
        }
    }
    let port: u16 = port.parse().map_err(|_| format!("bad port {port:?}"))?;
    let ip = host.parse().map_err(|_| format!("bad host {host:?} (an IP address)"))?;
    Ok(SocketAddr::new(ip, port))
}

async fn serve(addr: SocketAddr) -> io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    println!("listening on {}:{}", local.ip(), local.port());
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((socket, _)) => {
                    tokio::spawn(async move {
                        // A peer that resets or sends an oversized frame ends
                        // its own connection only.
                        let _ = echo(socket).await;
                    });
                }
                // EMFILE and the like: pause, then keep accepting, as
                // asyncio's own accept loop does.
                Err(err) => {
                    eprintln!("tokio_echo: accept failed: {err}");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
            _ = terminate.recv() => return Ok(()),
            _ = interrupt.recv() => return Ok(()),
        }
    }
}

fn main() {
    let addr = match parse_args() {
        Ok(addr) => addr,
        Err(message) => {
            eprintln!("tokio_echo: {message}");
            std::process::exit(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    if let Err(err) = runtime.block_on(serve(addr)) {
        eprintln!("tokio_echo: cannot listen on {addr}: {err}");
        std::process::exit(1);
    }
}
