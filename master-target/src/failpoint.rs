//! Fault injection for the apply path's failure tests: named points that fail with an I/O error when
//! armed. Compiled in for unit tests and with the `failpoints` feature (then armed from the
//! `SR_FAILPOINTS` variable, `name=N,...`: the N-th hit of `name` fails); a no-op otherwise.

#[cfg(any(test, feature = "failpoints"))]
mod imp {
    use std::collections::HashMap;
    use std::sync::Mutex;

    /// Armed points: name -> hits left before it fails (it fails once, then disarms).
    static ARMED: Mutex<Option<HashMap<String, u32>>> = Mutex::new(None);

    fn with<R>(f: impl FnOnce(&mut HashMap<String, u32>) -> R) -> R {
        let mut g = ARMED.lock().expect("failpoints lock poisoned");
        let map = g.get_or_insert_with(|| {
            let mut m = HashMap::new();
            if let Ok(spec) = std::env::var("SR_FAILPOINTS") {
                for part in spec.split(',').filter(|p| !p.is_empty()) {
                    let (name, n) = part.split_once('=').unwrap_or((part, "1"));
                    m.insert(name.to_string(), n.parse().unwrap_or(1));
                }
            }
            m
        });
        f(map)
    }

    /// Arms `name` to fail at its `nth` hit from now (1: the next one).
    pub fn arm(name: &str, nth: u32) {
        with(|m| m.insert(name.to_string(), nth.max(1)));
    }

    pub fn check(name: &str) -> std::io::Result<()> {
        let fail = with(|m| match m.get_mut(name) {
            Some(1) => {
                m.remove(name);
                true
            }
            Some(n) => {
                *n -= 1;
                false
            }
            None => false,
        });
        if fail {
            return Err(std::io::Error::other(format!("failpoint {name}")));
        }
        Ok(())
    }
}

#[cfg(any(test, feature = "failpoints"))]
pub use imp::{arm, check};

#[cfg(not(any(test, feature = "failpoints")))]
#[inline(always)]
pub fn check(_name: &str) -> std::io::Result<()> {
    Ok(())
}
