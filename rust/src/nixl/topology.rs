//! Where ranks run and how each pair should move bytes.
//!
//! A node is the set of ranks that can use host-local transports with each
//! other: the same kernel (boot id) and the same PID namespace (UCX's cma
//! copies between process address spaces by PID; cuda_ipc needs the same
//! host too). Host names are not used: two containers on one host may share
//! a name or not, and only these facts decide what UCX can do.
//!
//! Every rank computes the same topology from the facts all ranks report at
//! set-up, so each pair agrees on its direction and schedule round without
//! talking.

use crate::protocol::Direction;

/// What one rank reports about itself at set-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankFacts {
    /// `boot id / pid namespace` (see the module docs).
    pub node_key: String,
    /// An RDMA device is present and UCX may use it (zero-copy GET across nodes).
    pub rdma: bool,
    /// UCX's cuda_ipc may do GET zero-copy (GPU READ inside a node).
    pub cuda_get_zcopy: bool,
    /// UCX may use cma between processes of a node (host READ inside a node).
    pub host_get: bool,
}

/// How the direction of each pair is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirectionChoice {
    /// READ where the path does zero-copy GET (cma, cuda_ipc with GET
    /// zero-copy, RDMA); WRITE where GET would be emulated (tcp).
    Auto,
    Read,
    Write,
}

/// Cross-node scheduling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schedule {
    /// Cross-node traffic in rounds; in each round a node exchanges with at
    /// most one other node. Same-node traffic runs alongside.
    Rounds,
    /// Everything at once.
    All,
}

/// The agreed topology.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    /// Node index of every rank (nodes numbered by their lowest rank).
    pub node_of_rank: Vec<u32>,
    /// `direction[a][b]`
    pub direction: Vec<Vec<Direction>>,
    /// `round_of[a][b]`: 0 inside a node, 1.. across nodes.
    pub round_of: Vec<Vec<u32>>,
}

impl Topology {
    /// Computes the topology from every rank's facts (index = rank).
    /// `vram`: the registered memory is GPU memory. `nodes`: an explicit node
    /// id per rank, overriding the facts.
    pub fn new(
        facts: &[RankFacts],
        vram: bool,
        choice: DirectionChoice,
        schedule: Schedule,
        nodes: Option<&[u32]>,
    ) -> Topology {
        let world = facts.len();
        let node_of_rank = match nodes {
            Some(n) if n.len() == world => renumber(n),
            _ => {
                let keys: Vec<&str> = facts.iter().map(|f| f.node_key.as_str()).collect();
                renumber(&keys)
            }
        };
        let n_nodes = node_of_rank.iter().max().map_or(0, |&m| m + 1);
        let mut direction = vec![vec![Direction::Read; world]; world];
        let mut round_of = vec![vec![0u32; world]; world];
        for a in 0..world {
            for b in 0..world {
                if a == b {
                    continue;
                }
                let same = node_of_rank[a] == node_of_rank[b];
                direction[a][b] = match choice {
                    DirectionChoice::Read => Direction::Read,
                    DirectionChoice::Write => Direction::Write,
                    DirectionChoice::Auto => {
                        let zero_copy_get = if same {
                            if vram {
                                facts[a].cuda_get_zcopy && facts[b].cuda_get_zcopy
                            } else {
                                facts[a].host_get && facts[b].host_get
                            }
                        } else {
                            facts[a].rdma && facts[b].rdma
                        };
                        if zero_copy_get {
                            Direction::Read
                        } else {
                            Direction::Write
                        }
                    }
                };
                if !same && schedule == Schedule::Rounds {
                    round_of[a][b] = pairing_round(node_of_rank[a], node_of_rank[b], n_nodes);
                }
            }
        }
        Topology {
            node_of_rank,
            direction,
            round_of,
        }
    }
}

/// Dense ids in order of first appearance (rank 0's node is 0).
pub fn renumber<T: PartialEq>(keys: &[T]) -> Vec<u32> {
    let mut seen: Vec<&T> = Vec::new();
    keys.iter()
        .map(|k| match seen.iter().position(|s| *s == k) {
            Some(i) => i as u32,
            None => {
                seen.push(k);
                (seen.len() - 1) as u32
            }
        })
        .collect()
}

/// The round (1-based) in which nodes `a != b` are paired by the circle
/// method: with `m` = `n` rounded up to even, round `r` pairs node `m-1`
/// with `r` and `(r+k) mod (m-1)` with `(r-k) mod (m-1)`; each node meets
/// every other exactly once in `m-1` rounds.
pub fn pairing_round(a: u32, b: u32, n: u32) -> u32 {
    let m = n + n % 2;
    if m < 2 || a == b {
        return 0;
    }
    let p = m - 1;
    for r in 0..p {
        if (a == p && b == r) || (b == p && a == r) {
            return r + 1;
        }
        if a < p && b < p && (a + b) % p == (2 * r) % p {
            return r + 1;
        }
    }
    0
}

/// This process's node key: boot id and PID namespace.
pub fn local_node_key() -> String {
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown-boot".into());
    let pid_ns = std::fs::read_link("/proc/self/ns/pid")
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "unknown-pidns".into());
    format!("{boot}/{pid_ns}")
}

/// Whether UCX here may use RDMA (a device exists and `UCX_TLS` allows it).
pub fn local_rdma() -> bool {
    let has_dev = std::fs::read_dir("/sys/class/infiniband")
        .map(|mut d| d.next().is_some())
        .unwrap_or(false);
    has_dev && tls_allows_rdma(std::env::var("UCX_TLS").ok().as_deref())
}

fn tls_allows_rdma(tls: Option<&str>) -> bool {
    let Some(tls) = tls else { return true };
    let tls = tls.trim();
    if let Some(excluded) = tls.strip_prefix('^') {
        return !excluded.split(',').any(|t| {
            matches!(
                t.trim(),
                "rc" | "dc" | "ud" | "ib" | "rc_x" | "dc_x" | "ud_x"
            )
        });
    }
    tls.split(',').any(|t| {
        let t = t.trim();
        t == "all" || t.starts_with("rc") || t.starts_with("dc") || t.starts_with("ud") || t == "ib"
    })
}

/// Whether `UCX_TLS` allows transport `name` (or one of `aliases`).
fn tls_allows(tls: Option<&str>, names: &[&str]) -> bool {
    let Some(tls) = tls else { return true };
    let tls = tls.trim();
    if let Some(excluded) = tls.strip_prefix('^') {
        return !excluded.split(',').any(|t| names.contains(&t.trim()));
    }
    tls.split(',').any(|t| {
        let t = t.trim();
        t == "all" || names.contains(&t)
    })
}

/// Whether UCX may use cma between processes of this node (`UCX_TLS`).
pub fn local_host_get() -> bool {
    tls_allows(
        std::env::var("UCX_TLS").ok().as_deref(),
        &["cma", "sm", "shm"],
    )
}

/// Whether UCX's cuda_ipc may do GET zero-copy (`UCX_TLS` allows cuda_ipc and
/// `UCX_CUDA_IPC_ENABLE_GET_ZCOPY` is not off).
pub fn local_cuda_get_zcopy() -> bool {
    tls_allows(
        std::env::var("UCX_TLS").ok().as_deref(),
        &["cuda_ipc", "cuda"],
    ) && !matches!(
        std::env::var("UCX_CUDA_IPC_ENABLE_GET_ZCOPY")
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase()
            .as_str(),
        "n" | "no" | "0" | "off" | "false"
    )
}

/// `UCX_*` settings of this process, for error messages.
pub fn ucx_settings() -> String {
    let mut v: Vec<String> = std::env::vars()
        .filter(|(k, _)| k.starts_with("UCX_"))
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    v.sort();
    if v.is_empty() {
        "no UCX_* variables set".into()
    } else {
        v.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(key: &str, rdma: bool) -> RankFacts {
        RankFacts {
            node_key: key.into(),
            rdma,
            cuda_get_zcopy: true,
            host_get: true,
        }
    }

    #[test]
    fn pairing_rounds_form_a_round_robin() {
        for n in 2..9u32 {
            let m = n + n % 2;
            for a in 0..n {
                let mut rounds: Vec<u32> = (0..n)
                    .filter(|&b| b != a)
                    .map(|b| pairing_round(a, b, n))
                    .collect();
                assert!(
                    rounds.iter().all(|&r| r >= 1 && r < m),
                    "n={n} a={a} {rounds:?}"
                );
                rounds.sort_unstable();
                let before = rounds.len();
                rounds.dedup();
                assert_eq!(
                    rounds.len(),
                    before,
                    "node {a} meets two nodes in one round (n={n})"
                );
                for b in 0..n {
                    assert_eq!(pairing_round(a, b, n), pairing_round(b, a, n));
                }
            }
        }
    }

    #[test]
    fn nodes_from_facts_and_directions() {
        let f = vec![
            facts("h0", false),
            facts("h0", false),
            facts("h1", false),
            facts("h1", false),
        ];
        let t = Topology::new(&f, false, DirectionChoice::Auto, Schedule::Rounds, None);
        assert_eq!(t.node_of_rank, vec![0, 0, 1, 1]);
        assert_eq!(t.direction[0][1], Direction::Read); // cma inside a node
        assert_eq!(t.direction[0][2], Direction::Write); // tcp across
        assert_eq!(t.round_of[0][1], 0);
        assert_eq!(t.round_of[0][2], 1);
        let r = Topology::new(
            &f,
            false,
            DirectionChoice::Read,
            Schedule::All,
            Some(&[5, 5, 5, 9]),
        );
        assert_eq!(r.node_of_rank, vec![0, 0, 0, 1]);
        assert_eq!(r.direction[0][3], Direction::Read);
        assert_eq!(r.round_of[0][3], 0);
        let rd = vec![facts("a", true), facts("b", true)];
        let t = Topology::new(&rd, false, DirectionChoice::Auto, Schedule::Rounds, None);
        assert_eq!(t.direction[0][1], Direction::Read); // RDMA GET
    }

    #[test]
    fn without_cma_a_node_writes() {
        let mut f = vec![facts("h", false), facts("h", false)];
        f[1].host_get = false;
        let t = Topology::new(&f, false, DirectionChoice::Auto, Schedule::Rounds, None);
        assert_eq!(t.direction[0][1], Direction::Write);
        assert!(tls_allows(Some("tcp,cma"), &["cma"]) && !tls_allows(Some("tcp"), &["cma"]));
        assert!(!tls_allows(Some("^cma"), &["cma"]) && tls_allows(None, &["cma"]));
    }

    #[test]
    fn tls_parsing() {
        assert!(tls_allows_rdma(None));
        assert!(!tls_allows_rdma(Some("tcp")));
        assert!(tls_allows_rdma(Some("rc,sm")));
        assert!(!tls_allows_rdma(Some("^rc,ud")));
        assert!(tls_allows_rdma(Some("^tcp")));
    }
}
