//! Reading a Prometheus endpoint as Prometheus does: `GET /metrics` over plain HTTP, then the
//! value of one sample by name and labels.

use std::{net::SocketAddr, time::Duration};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The body of `GET /metrics` at `addr`; panics unless the answer is `200` with OpenMetrics
/// text.
pub async fn scrape(addr: SocketAddr) -> String {
    let fetch = async {
        let mut stream = tokio::net::TcpStream::connect(addr)
            .await
            .expect("connect to the metrics endpoint");
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n")
            .await
            .expect("send the request");
        let mut answer = String::new();
        stream
            .read_to_string(&mut answer)
            .await
            .expect("read the answer");
        answer
    };
    let answer = tokio::time::timeout(Duration::from_secs(10), fetch)
        .await
        .expect("the metrics endpoint answers within 10 s");
    let (head, body) = answer.split_once("\r\n\r\n").expect("an HTTP answer");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/openmetrics-text"),
        "{head}"
    );
    assert!(body.trim_end().ends_with("# EOF"), "{body}");
    body.to_owned()
}

/// The value of the sample `name{labels}` (labels as written, in order, e.g.
/// `outcome="OK",cause=""`; empty for none), or `None` if there is no such sample.
pub fn sample(text: &str, name: &str, labels: &str) -> Option<f64> {
    let key = if labels.is_empty() {
        name.to_owned()
    } else {
        format!("{name}{{{labels}}}")
    };
    text.lines().find_map(|line| {
        let (series, value) = line.rsplit_once(' ')?;
        (series == key).then(|| value.parse().expect("a number"))
    })
}

/// The sum of every sample of `name` whose labels contain `part`.
pub fn sum(text: &str, name: &str, part: &str) -> f64 {
    text.lines()
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let labels = series.strip_prefix(name)?.strip_prefix('{')?;
            labels
                .contains(part)
                .then(|| value.parse::<f64>().expect("a number"))
        })
        .sum()
}
