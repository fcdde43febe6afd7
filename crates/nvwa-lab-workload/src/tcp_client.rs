//! A client on the host that keeps one TCP connection to a guest service through a port forward
//! across the kernel switch, and proves the connection survived: the same socket answers every
//! request, in order, without a reset or an end of stream.
//!
//! tcp-client --port P --proto echo|redis --stop-file F --report F [--interval-ms I]
//!            [--deadline-s D]
//!
//! It sends one request at a time (every I ms, 100 by default) and waits for its answer as long
//! as it takes (up to the deadline): the client-visible blackout is the longest time between two
//! consecutive answers (the last byte answered before the switch → the first answered after).
//! `echo` sends numbered lines to `nvwa-lab-workload echo`; `redis` sends `INCR` of one key, so
//! each answer must be exactly one more than the one before (no request lost or run twice).
//! It stops cleanly, after an answer, once the stop file exists; it writes a JSON report and
//! exits 0 only if every answer was right and the connection was never lost.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::{num, opt};

fn wall_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
}

#[derive(Clone, Copy, PartialEq)]
enum Proto {
    Echo,
    Redis,
}

struct Conn {
    proto: Proto,
    out: TcpStream,
    input: BufReader<TcpStream>,
    /// redis: the counter's value at the last answer.
    counter: Option<i64>,
}

impl Conn {
    /// One request and its answer; `Err` says what was wrong.
    fn exchange(&mut self, seq: u64) -> Result<(), String> {
        match self.proto {
            Proto::Echo => {
                let line = format!("request {seq} {}", "x".repeat((seq % 64) as usize));
                writeln!(self.out, "{line}").map_err(|e| format!("send of request {seq}: {e}"))?;
                let got = self.line(seq)?;
                if got != line {
                    return Err(format!("request {seq}: sent {line:?}, got {got:?}"));
                }
            }
            Proto::Redis => {
                let key = "nvwa-lab:tcp";
                write!(self.out, "*2\r\n$4\r\nINCR\r\n${}\r\n{key}\r\n", key.len())
                    .map_err(|e| format!("send of request {seq}: {e}"))?;
                let got = self.line(seq)?;
                let n: i64 = got
                    .strip_prefix(':')
                    .and_then(|v| v.parse().ok())
                    .ok_or_else(|| format!("request {seq}: INCR answered {got:?}"))?;
                if let Some(before) = self.counter {
                    if n != before + 1 {
                        return Err(format!(
                            "request {seq}: INCR answered {n} after {before}: a request was lost or ran twice"
                        ));
                    }
                }
                self.counter = Some(n);
            }
        }
        Ok(())
    }

    fn line(&mut self, seq: u64) -> Result<String, String> {
        let mut s = String::new();
        match self.input.read_line(&mut s) {
            Ok(0) => Err(format!(
                "the connection ended (EOF) while request {seq} waited for its answer"
            )),
            Ok(_) => Ok(s.trim_end_matches(['\r', '\n']).to_string()),
            Err(e) => Err(format!("request {seq} got no answer: {e}")),
        }
    }
}

pub fn run(args: &[String]) -> Result<(), String> {
    let port = num(args, "--port", 0)?;
    let proto = match opt(args, "--proto").as_deref() {
        Some("echo") => Proto::Echo,
        Some("redis") => Proto::Redis,
        other => return Err(format!("--proto echo|redis, not {other:?}")),
    };
    let stop = opt(args, "--stop-file").ok_or("tcp-client needs --stop-file PATH")?;
    let report = opt(args, "--report").ok_or("tcp-client needs --report PATH")?;
    let interval = Duration::from_millis(num(args, "--interval-ms", 100)?);
    let deadline = Instant::now() + Duration::from_secs(num(args, "--deadline-s", 1200)?);

    let stream = TcpStream::connect(("127.0.0.1", port as u16))
        .map_err(|e| format!("cannot connect to 127.0.0.1:{port}: {e}"))?;
    let local = stream.local_addr().map_err(|e| e.to_string())?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    let mut conn = Conn {
        proto,
        input: BufReader::new(stream.try_clone().map_err(|e| e.to_string())?),
        out: stream,
        counter: None,
    };
    println!("connected from {local} to 127.0.0.1:{port}");

    // When each answer arrived: (monotonic, wall ms).
    let mut answers: Vec<(Instant, u128)> = Vec::new();
    let mut failure = None;
    let mut seq = 0;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            failure = Some("the deadline passed before the stop file appeared".to_string());
            break;
        }
        conn.input
            .get_ref()
            .set_read_timeout(Some(left))
            .map_err(|e| e.to_string())?;
        seq += 1;
        if let Err(e) = conn.exchange(seq) {
            failure = Some(e);
            break;
        }
        let now = (Instant::now(), wall_ms());
        if let Some((t, _)) = answers.last() {
            let gap = now.0.duration_since(*t).as_millis();
            if gap > 1000 {
                println!("answer {seq} came {gap} ms after the one before");
            }
        }
        answers.push(now);
        if std::path::Path::new(&stop).exists() {
            break;
        }
        std::thread::sleep(interval);
    }
    let gaps: Vec<u128> = answers
        .windows(2)
        .map(|w| w[1].0.duration_since(w[0].0).as_millis())
        .collect();
    // The longest gap is the blackout (less the pause between requests: the time the service
    // did not answer); the longest after it shows how the connection runs once restored.
    let at = (0..gaps.len()).max_by_key(|&i| gaps[i]);
    let pause = interval.as_millis();
    let blackout = at.map_or(0, |i| gaps[i].saturating_sub(pause));
    let slowest_after = at
        .and_then(|i| gaps[i + 1..].iter().max())
        .map_or(0, |g| g.saturating_sub(pause));
    let (before, after) = at.map_or((0, 0), |i| (answers[i].1, answers[i + 1].1));
    let json = format!(
        "{{\"requests\":{seq},\"answers\":{},\"local\":\"{local}\",\"blackout_ms\":{blackout},\"last_answer_before_ms\":{before},\"first_answer_after_ms\":{after},\"answers_after\":{},\"slowest_answer_after_ms\":{slowest_after},\"error\":{}}}\n",
        answers.len(),
        at.map_or(0, |i| answers.len() - i - 1),
        failure
            .as_deref()
            .map_or("null".to_string(), |e| format!("{e:?}"))
    );
    std::fs::write(&report, &json).map_err(|e| format!("cannot write {report}: {e}"))?;
    print!("{json}");
    println!(
        "client-visible blackout: {blackout} ms; afterwards the slowest answer took {slowest_after} ms ({} answers on one connection from {local})",
        answers.len()
    );
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
