//! Where this process sits in a data-parallel job, read from the
//! launcher's environment: torchrun's (RANK, WORLD_SIZE, LOCAL_RANK,
//! MASTER_ADDR, MASTER_PORT; TORCHELASTIC_USE_AGENT_STORE when torchrun
//! serves the rendezvous store itself) or Slurm's (SLURM_PROCID,
//! SLURM_NTASKS, SLURM_LOCALID, the first host of SLURM_JOB_NODELIST;
//! MASTER_PORT or 29500).
use anyhow::{bail, Context, Result};

/// torchrun's and PyTorch's default rendezvous port.
pub const DEFAULT_PORT: u16 = 29500;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    pub rank: usize,
    pub world_size: usize,
    /// Rank on this node: the CUDA device this process drives.
    pub local_rank: usize,
    pub master_addr: String,
    pub master_port: u16,
    /// torchrun already serves the store at MASTER_ADDR:MASTER_PORT, so
    /// every rank connects as a client (keys under /worker/attempt_<n>).
    pub agent_store: bool,
    /// TORCHELASTIC_RESTART_COUNT: keeps a restarted attempt's keys apart.
    pub restart_count: u64,
    /// Which launcher's variables were read (for messages).
    pub source: &'static str,
}

fn parse<T: std::str::FromStr>(get: &dyn Fn(&str) -> Option<String>, key: &str) -> Result<Option<T>> {
    match get(key) {
        None => Ok(None),
        Some(v) => v
            .trim()
            .parse::<T>()
            .map(Some)
            .map_err(|_| anyhow::anyhow!("environment variable {key}={v:?} is not a valid number")),
    }
}

impl Launch {
    /// Reads the process environment; `None` when no launcher set a world.
    pub fn from_env() -> Result<Option<Launch>> {
        Launch::from_vars(&|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
    }

    /// As `from_env`, over any variable lookup (tests).
    pub fn from_vars(get: &dyn Fn(&str) -> Option<String>) -> Result<Option<Launch>> {
        let port = parse::<u16>(get, "MASTER_PORT")?;
        if let Some(world_size) = parse::<usize>(get, "WORLD_SIZE")? {
            let rank = parse::<usize>(get, "RANK")?.context("WORLD_SIZE is set but RANK is not")?;
            let local_rank = parse::<usize>(get, "LOCAL_RANK")?.unwrap_or(0);
            let launch = Launch {
                rank,
                world_size,
                local_rank,
                master_addr: get("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into()),
                master_port: port.unwrap_or(DEFAULT_PORT),
                agent_store: get("TORCHELASTIC_USE_AGENT_STORE").is_some_and(|v| v.eq_ignore_ascii_case("true")),
                restart_count: parse::<u64>(get, "TORCHELASTIC_RESTART_COUNT")?.unwrap_or(0),
                source: "RANK/WORLD_SIZE",
            };
            return launch.checked().map(Some);
        }
        if let Some(world_size) = parse::<usize>(get, "SLURM_NTASKS")? {
            let rank = parse::<usize>(get, "SLURM_PROCID")?.context("SLURM_NTASKS is set but SLURM_PROCID is not")?;
            let local_rank = parse::<usize>(get, "SLURM_LOCALID")?.unwrap_or(0);
            let master_addr = match get("MASTER_ADDR") {
                Some(a) => a,
                None => {
                    let list = get("SLURM_JOB_NODELIST")
                        .or_else(|| get("SLURM_NODELIST"))
                        .context("SLURM_NTASKS is set but neither MASTER_ADDR nor SLURM_JOB_NODELIST is")?;
                    first_host(&list)?
                }
            };
            let launch = Launch {
                rank,
                world_size,
                local_rank,
                master_addr,
                master_port: port.unwrap_or(DEFAULT_PORT),
                agent_store: false,
                restart_count: 0,
                source: "SLURM_PROCID/SLURM_NTASKS",
            };
            return launch.checked().map(Some);
        }
        Ok(None)
    }

    fn checked(self) -> Result<Launch> {
        if self.world_size == 0 || self.rank >= self.world_size {
            bail!(
                "{}: rank {} is not below world size {}",
                self.source,
                self.rank,
                self.world_size
            );
        }
        Ok(self)
    }
}

/// The first host of a Slurm node list: `node[01-04,07],gpu5` -> `node01`.
pub fn first_host(list: &str) -> Result<String> {
    let list = list.trim();
    // The first entry ends at the first comma outside brackets.
    let mut depth = 0usize;
    let mut end = list.len();
    for (i, c) in list.char_indices() {
        match c {
            '[' => depth += 1,
            ']' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                end = i;
                break;
            }
            _ => {}
        }
    }
    let first = &list[..end];
    let Some(open) = first.find('[') else {
        if first.is_empty() {
            bail!("SLURM_JOB_NODELIST {list:?} names no host");
        }
        return Ok(first.to_string());
    };
    let close = first
        .find(']')
        .with_context(|| format!("SLURM_JOB_NODELIST {list:?}: unclosed '['"))?;
    let (prefix, ranges, suffix) = (&first[..open], &first[open + 1..close], &first[close + 1..]);
    // A range's lower bound keeps its zero padding: [01-04] starts at 01.
    let lo = ranges
        .split(',')
        .next()
        .unwrap_or("")
        .split('-')
        .next()
        .unwrap_or("")
        .trim();
    if lo.is_empty() || !lo.chars().all(|c| c.is_ascii_digit()) {
        bail!("SLURM_JOB_NODELIST {list:?}: cannot read the range [{ranges}]");
    }
    Ok(format!("{prefix}{lo}{suffix}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn vars(pairs: &[(&str, &str)]) -> Option<Launch> {
        let m: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Launch::from_vars(&|k| m.get(k).cloned()).unwrap()
    }

    #[test]
    fn slurm_node_lists() {
        assert_eq!(first_host("node[01-04,07]").unwrap(), "node01");
        assert_eq!(first_host("node[7,9-12]-ib,gpu[1-2]").unwrap(), "node7-ib");
        assert_eq!(first_host("a1,b[1-3]").unwrap(), "a1");
        assert_eq!(first_host("gpu-a100-[003-010]").unwrap(), "gpu-a100-003");
        assert!(first_host("node[01-04").is_err());
        assert!(first_host("").is_err());
    }

    #[test]
    fn torchrun_and_slurm_envs() {
        assert_eq!(vars(&[]), None);
        let t = vars(&[
            ("RANK", "3"),
            ("WORLD_SIZE", "4"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "10.0.0.2"),
            ("MASTER_PORT", "1234"),
            ("TORCHELASTIC_USE_AGENT_STORE", "True"),
            ("TORCHELASTIC_RESTART_COUNT", "2"),
        ])
        .unwrap();
        assert_eq!(
            (
                t.rank,
                t.world_size,
                t.local_rank,
                t.master_addr.as_str(),
                t.master_port
            ),
            (3, 4, 1, "10.0.0.2", 1234)
        );
        assert!(t.agent_store && t.restart_count == 2);
        let s = vars(&[
            ("SLURM_PROCID", "5"),
            ("SLURM_NTASKS", "8"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_JOB_NODELIST", "gn[12-13]"),
        ])
        .unwrap();
        assert_eq!(
            (
                s.rank,
                s.world_size,
                s.local_rank,
                s.master_addr.as_str(),
                s.master_port
            ),
            (5, 8, 1, "gn12", 29500)
        );
        assert!(!s.agent_store);
        let m: HashMap<&str, &str> = [("RANK", "2"), ("WORLD_SIZE", "2")].into();
        let e = Launch::from_vars(&|k| m.get(k).map(|v| v.to_string())).unwrap_err();
        assert!(format!("{e}").contains("not below world size"), "{e}");
        let m: HashMap<&str, &str> = [("RANK", "x"), ("WORLD_SIZE", "2")].into();
        let e = Launch::from_vars(&|k| m.get(k).map(|v| v.to_string())).unwrap_err();
        assert!(format!("{e}").contains("RANK"), "{e}");
    }
}
