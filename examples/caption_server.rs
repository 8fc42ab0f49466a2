//! A fast stand-in for an OpenAI-compatible server, for benchmarking the
//! caption client (bench/caption_bench.py): HTTP/1.1 keep-alive, answers
//! every POST with a small chat completion at once, so the client is what
//! gets measured. Prints `listening <port>` on stdout.
//!
//! usage: caption_server [PORT] [THREADS]
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

async fn serve(stream: TcpStream, served: Arc<AtomicU64>) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::with_capacity(64 * 1024, r);
    let mut line = String::new();
    let mut body = Vec::new();
    loop {
        let mut len = 0usize;
        let mut first = true;
        loop {
            line.clear();
            if r.read_line(&mut line).await? == 0 {
                return Ok(());
            }
            if line == "\r\n" && !first {
                break;
            }
            first = false;
            if let Some((k, v)) = line.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    len = v.trim().parse().unwrap_or(0);
                }
            }
        }
        body.resize(len, 0);
        r.read_exact(&mut body).await?;
        let n = served.fetch_add(1, Ordering::Relaxed);
        let reply = format!(
            r#"{{"id":"b{n}","object":"chat.completion","model":"bench","choices":[{{"index":0,"message":{{"role":"assistant","content":"Benchmark caption number {n} of an axial slice showing the brain."}},"finish_reason":"stop"}}]}}"#
        );
        let head = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            reply.len()
        );
        w.write_all(head.as_bytes()).await?;
        w.write_all(reply.as_bytes()).await?;
    }
}

fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let port: u16 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let threads: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(1);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let l = TcpListener::bind(("127.0.0.1", port)).await?;
        println!("listening {}", l.local_addr()?.port());
        let served = Arc::new(AtomicU64::new(0));
        loop {
            let (s, _) = l.accept().await?;
            let served = served.clone();
            tokio::spawn(async move {
                let _ = serve(s, served).await;
            });
        }
    })
}
