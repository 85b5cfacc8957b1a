//! A managed deployment on two sites of a [`Topology`]: site A holds the protected machine's agent
//! and its process server, site B the master target and the configuration server, the WAN between
//! them. `srctl quickstart --sites`, the two-site tests and the WAN benchmark all start it here.
//!
//! ```text
//! site A: agent-1 (disk0), ps-1, [extra hosts]  ==WAN==  site B: mt-1, cs, [extra hosts]
//! ```

use crate::netns::{Family, Site, Topology};
use crate::wan::Impairment;
use crate::{Component, ControlPlane, DiskSpec, Local, Options, Placement, Proc};
use anyhow::Context;
use std::path::{Path, PathBuf};

/// The hosts every two-site deployment has.
pub const HOSTS: [(&str, Site); 4] = [("agent-1", Site::A), ("ps-1", Site::A), ("mt-1", Site::B), ("cs", Site::B)];

pub struct TwoSites {
    pub topo: Topology,
    pub cp: ControlPlane,
    pub admin: String,
    /// agent-1, ps-1, mt-1 and their files.
    pub local: Local,
    /// The protected disk (an image file agent-1 fronts).
    pub disk: PathBuf,
    pub family: Family,
    /// The configuration server, then mt-1, ps-1, agent-1 (stopped in reverse when dropped).
    pub procs: Vec<Proc>,
}

impl TwoSites {
    /// Builds the topology (with `extra` hosts), starts the configuration server on site B, registers
    /// and starts agent-1 (fronting `disk`), ps-1 and mt-1.
    pub fn start(
        dir: &Path,
        wan: Impairment,
        seed: u64,
        family: Family,
        disk: &Path,
        opts: &Options,
        extra: &[(&str, Site)],
    ) -> anyhow::Result<TwoSites> {
        let mut hosts = HOSTS.to_vec();
        hosts.extend_from_slice(extra);
        let topo = Topology::create(&hosts, wan, seed).context("building the two sites")?;
        let cp = ControlPlane::create_on(&dir.join("cp"), topo.host("cs"), family, "")?;
        let cs = cp.start().context("starting the configuration server on site B")?;
        let admin = cp.admin_token()?;
        let placement = Placement {
            family,
            agent: topo.host("agent-1").clone(),
            ps: topo.host("ps-1").clone(),
            mt: topo.host("mt-1").clone(),
        };
        let local = Local::managed_placed(
            &dir.join("dep"),
            vec![DiskSpec { id: 1, name: "disk0".into(), path: disk.to_path_buf() }],
            opts,
            &cp,
            &admin,
            "",
            Some(placement),
        )?;
        let mut s = TwoSites { topo, cp, admin, local, disk: disk.to_path_buf(), family, procs: vec![cs] };
        for c in [Component::MasterTarget, Component::ProcessServer, Component::Agent] {
            let p = s.local.start(c).with_context(|| format!("starting {}", c.binary()))?;
            s.procs.push(p);
        }
        Ok(s)
    }

    /// An admin call to the configuration server's API.
    pub fn api(&self, method: &str, path: &str, body: Option<serde_json::Value>) -> anyhow::Result<serde_json::Value> {
        let client = self.cp.client(&self.admin)?;
        let b = body.map(|v| v.to_string());
        let (code, text) = client.request(self.cp.api, method, path, b.as_deref())?;
        let v: serde_json::Value = serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text));
        if code != 200 {
            anyhow::bail!("{method} {path}: {code} {v}");
        }
        Ok(v)
    }

    /// Waits (up to 30 s) for agent-1 to report, creates policy "p" from `policy` (the API's fields:
    /// `rpo_threshold_secs`, `journal_limit_percent`, ...) and enables protection; the item's id and
    /// the job that brings it to Protected.
    pub fn protect(&mut self, policy: serde_json::Value) -> anyhow::Result<(u64, u64)> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let m = self.api("GET", "/v1/machines", None)?;
            if m.as_array().is_some_and(|m| m.iter().any(|m| m["name"] == "agent-1")) {
                break;
            }
            if std::time::Instant::now() > deadline {
                anyhow::bail!("agent-1 did not report to the configuration server across the WAN within 30 s");
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let mut body = policy;
        body["name"] = "p".into();
        self.api("POST", "/v1/policies", Some(body))?;
        let v = self.api("POST", "/v1/items", Some(serde_json::json!({ "machine": "agent-1", "policy": "p" })))?;
        let item = v["item"]["id"].as_u64().context("no item id in the answer")?;
        let job = v["job"].as_u64().context("no job id in the answer")?;
        self.local.item = item;
        Ok((item, job))
    }

    /// The protected item as the configuration server shows it.
    pub fn item(&self) -> anyhow::Result<serde_json::Value> {
        self.api("GET", &format!("/v1/items/{}", self.local.item), None)
    }
}

impl Drop for TwoSites {
    fn drop(&mut self) {
        // The services stop before their hosts' namespaces go.
        while let Some(p) = self.procs.pop() {
            drop(p);
        }
    }
}
