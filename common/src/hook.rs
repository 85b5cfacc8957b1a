//! Operator hooks and scripts: `sh -c`, with a timeout, output kept for the error message.

use std::time::{Duration, Instant};

/// Runs `cmd` with `sh -c` and `env` added, killed after `timeout`. Returns its output, or why it failed.
pub fn run(cmd: &str, timeout: Duration, env: &[(&str, String)]) -> Result<String, String> {
    let mut child = std::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("starting `{cmd}`: {e}"))?;
    let started = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if started.elapsed() >= timeout => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("`{cmd}` did not finish within {} s and was killed", timeout.as_secs()));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(format!("waiting for `{cmd}`: {e}")),
        }
    }
    let out = child.wait_with_output().map_err(|e| format!("reading the output of `{cmd}`: {e}"))?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let text = text.trim().chars().take(2000).collect::<String>();
    if out.status.success() {
        Ok(text)
    } else {
        Err(format!("`{cmd}` failed with {}: {text}", out.status))
    }
}
