//! The daemon's HTTP client alone against a Flux feed: the body URLs of the feed's first pages,
//! fetched over and over, `--concurrency` at a time on one thread (as the daemon's readers run),
//! nothing parsed or written. It says how far the Flux catch-up is from the client's own limit;
//! with `--wrk-scripts DIR` it also writes wrk scripts for the same URLs, one request at a time
//! (`requests.lua`) and eight deep pipelined (`pipelined.lua`):
//!
//! ```sh
//! cargo run --release --example bank_feed -- --events 100000 --port 3900 &
//! cargo run --release --example fetch_rate -- --feed http://127.0.0.1:3900/events --wrk-scripts /tmp
//! wrk -t2 -c16 -d3s -s /tmp/requests.lua http://127.0.0.1:3900
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use hyper::Uri;
use projector::feed::access::Access;
use projector::feed::flux;
use projector::feed::http::{parse_uri, tls, HttpClient, HttpSettings};
use projector::feed::page::EntryBody;

#[derive(Parser)]
struct Args {
    /// The Flux feed whose body URLs are fetched.
    #[arg(long, default_value = "http://127.0.0.1:3900/events")]
    feed: String,
    /// How many pages of 20 entries to take the URLs from.
    #[arg(long, default_value_t = 100)]
    pages: usize,
    /// Requests at once, as `body_concurrency`.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    #[arg(long, default_value_t = 3)]
    seconds: u64,
    /// Also write wrk's request scripts for the same URLs into this folder.
    #[arg(long)]
    wrk_scripts: Option<std::path::PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(measure(args))
}

async fn measure(args: Args) -> anyhow::Result<()> {
    let settings = HttpSettings {
        connect_timeout: Duration::from_secs(5),
        request_timeout: Duration::from_secs(10),
        max_response_bytes: 16 << 20,
        idle_connections: args.concurrency,
    };
    let client = HttpClient::new(settings, Access::anywhere(), tls::default_config()?);
    let urls = Arc::new(body_urls(&client, &args.feed, args.pages).await?);
    anyhow::ensure!(!urls.is_empty(), "the feed has no entries");
    if let Some(dir) = &args.wrk_scripts {
        write_wrk_scripts(dir, &urls)?;
    }

    let done = Arc::new(AtomicU64::new(0));
    let (cpu_before, started) = (cpu_seconds(), Instant::now());
    let deadline = started + Duration::from_secs(args.seconds);
    let workers: Vec<_> = (0..args.concurrency)
        .map(|worker| {
            let (client, urls, done) = (client.clone(), urls.clone(), done.clone());
            let concurrency = args.concurrency;
            tokio::spawn(async move {
                let mut index = worker;
                while Instant::now() < deadline {
                    if client.get(&urls[index % urls.len()]).await.is_ok() {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    index += concurrency;
                }
            })
        })
        .collect();
    for worker in workers {
        worker.await?;
    }
    let (elapsed, cpu) = (started.elapsed(), cpu_seconds() - cpu_before);
    let requests = done.load(Ordering::Relaxed) as f64;
    println!(
        "{:.0} requests/s at {} at once, {:.1} µs of CPU a request ({} URLs)",
        requests / elapsed.as_secs_f64(),
        args.concurrency,
        cpu * 1e6 / requests.max(1.0),
        urls.len()
    );
    Ok(())
}

/// The body URLs of the feed's first `pages` pages.
async fn body_urls(client: &HttpClient, feed: &str, pages: usize) -> anyhow::Result<Vec<Uri>> {
    let feed_url = url::Url::parse(feed)?;
    let (mut urls, mut offset) = (Vec::new(), 0);
    for page in 0..pages {
        let page_url = parse_uri(&format!("{feed}?offset={offset}")).map_err(anyhow::Error::msg)?;
        let bytes = client
            .get(&page_url)
            .await
            .map_err(|err| anyhow::anyhow!("page {page}: {err}"))?;
        let entries =
            flux::parse_page(&bytes, &feed_url, &Access::anywhere()).map_err(anyhow::Error::msg)?;
        if entries.is_empty() {
            break;
        }
        offset += entries.len();
        urls.extend(entries.into_iter().filter_map(|entry| match entry.body {
            EntryBody::At(url) => Some(url),
            EntryBody::Inline(_) => None,
        }));
    }
    Ok(urls)
}

fn write_wrk_scripts(dir: &std::path::Path, urls: &[Uri]) -> anyhow::Result<()> {
    let paths: Vec<String> = urls
        .iter()
        .map(|url| format!("{:?}", url.path_and_query().map_or("/", |p| p.as_str())))
        .collect();
    let table = format!("local paths = {{{}}}\nlocal n = 0\n", paths.join(","));
    let one = "request = function()\n  n = n + 1\n  return wrk.format(\"GET\", paths[(n % #paths) + 1])\nend\n";
    let eight_deep = "request = function()\n  local r = {}\n  for i = 1, 8 do\n    n = n + 1\n    r[i] = wrk.format(\"GET\", paths[(n % #paths) + 1])\n  end\n  return table.concat(r)\nend\n";
    std::fs::write(dir.join("requests.lua"), format!("{table}{one}"))?;
    std::fs::write(dir.join("pipelined.lua"), format!("{table}{eight_deep}"))?;
    Ok(())
}

/// This process's user and system CPU, from /proc (Linux).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // The fields after the command name, which is in parentheses: utime and stime are the 14th
    // and 15th of the whole line, in clock ticks (100 a second).
    let after_name = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks = |n: usize| fields.get(n).and_then(|f| f.parse::<f64>().ok());
    (ticks(11).unwrap_or(0.0) + ticks(12).unwrap_or(0.0)) / 100.0
}
