//! EPLB placement policies: per-layer expert loads -> `phy2log`, the logical
//! expert held by every physical slot.
//!
//! Three methods share one entry point, [`rebalance_experts`]:
//!
//! * [`Method::Stock`]: DeepSeek's published EPLB algorithm (balanced packing of
//!   expert groups to nodes, replication of the heaviest experts inside each
//!   node, balanced packing of the replicas to the node's ranks), written from
//!   its description. It ignores where experts are now.
//! * [`Method::Relabel`]: the stock placement with its nodes, and its ranks
//!   inside each node, renamed to overlap the old placement as much as
//!   possible (an exact two-level assignment). Balance depends only on which
//!   set each rank gets, so the sorted rank loads are exactly the stock ones.
//! * [`Method::Migrate`] (the default): starts from the old placement and
//!   changes only what balance needs (see `migrate.rs`); per layer it keeps the
//!   cheaper of that search and the relabeled stock placement.
//!
//! Invariants of every result (checked by `rust/tests/policy_props.rs`):
//! every slot holds a logical expert in `0..num_logical_experts`; every logical
//! expert has at least one replica; in the hierarchical case
//! (`num_groups % num_nodes == 0`) every replica of an expert lies on the node
//! of its group and each node holds `num_groups / num_nodes` whole groups; the
//! result is a pure function of the input (same bytes on every rank and for
//! every thread count). For `Migrate` and `Relabel`, the rank loads sorted in
//! descending order have prefix sums at most the stock placement's on the same
//! load, times `1 + max_imbalance` (plus a rounding allowance of
//! [`LOAD_EPS`] times the layer's total load).
//!
//! A rank's load is the sum over its slots of `load(expert) / replicas(expert)`,
//! the convention of DeepSeek's reference.

mod guard;
mod hungarian;
pub mod metrics;
mod migrate;
mod relabel;
mod stock;

use std::fmt;

/// Relative rounding allowance of the balance guard (times the layer's total load).
pub const LOAD_EPS: f64 = 1e-12;

/// How a placement is computed; see the module documentation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// DeepSeek's EPLB algorithm; ignores the old placement.
    Stock,
    /// Stock, with nodes and ranks renamed to match the old placement.
    Relabel,
    /// Migration-aware search from the old placement (falls back to `Relabel`).
    Migrate,
}

impl Method {
    /// Parses `"stock"`, `"relabel"` or `"migrate"`.
    pub fn parse(name: &str) -> Result<Method, PolicyError> {
        match name {
            "stock" => Ok(Method::Stock),
            "relabel" => Ok(Method::Relabel),
            "migrate" => Ok(Method::Migrate),
            other => Err(PolicyError::bad(
                "method",
                format!("expected 'stock', 'relabel' or 'migrate', got {other:?}"),
            )),
        }
    }
}

/// Options of [`rebalance_experts`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Options {
    /// What to compute.
    pub method: Method,
    /// Fraction by which the sorted rank-load prefix sums may exceed stock's
    /// (`Migrate` only); finite and `>= 0`.
    pub max_imbalance: f64,
    /// Worker threads over layers; `0` = available parallelism. The result
    /// does not depend on it.
    pub threads: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            method: Method::Migrate,
            max_imbalance: 0.0,
            threads: 0,
        }
    }
}

/// One call's input: loads, shape and (optionally) the old placement.
#[derive(Clone, Copy, Debug)]
pub struct Request<'a> {
    /// Row-major `[num_layers, num_logical_experts]` loads (finite, `>= 0`).
    pub weight: &'a [f64],
    /// Number of MoE layers.
    pub num_layers: usize,
    /// Logical experts per layer.
    pub num_logical_experts: usize,
    /// Physical slots per layer (a multiple of `num_ranks`, `>= num_logical_experts`).
    pub num_replicas: usize,
    /// Expert groups (hierarchical when `num_groups % num_nodes == 0`).
    pub num_groups: usize,
    /// Nodes (ranks of a node share the fast interconnect).
    pub num_nodes: usize,
    /// EP ranks; rank `r` owns slots `r * S .. (r + 1) * S`, `S = num_replicas / num_ranks`.
    pub num_ranks: usize,
    /// Row-major `[num_layers, num_replicas]` old placement, `-1` = empty slot.
    pub old: Option<&'a [i64]>,
}

/// Why a request was refused. Every message starts with the argument's name.
#[derive(Clone, Debug, PartialEq)]
pub enum PolicyError {
    /// An argument has a value the policy cannot use.
    BadArgument {
        /// The argument, as named in the Python API.
        name: &'static str,
        /// What is wrong and what was expected.
        message: String,
    },
    /// A load is negative, NaN or infinite.
    BadLoad {
        /// Layer of the load.
        layer: usize,
        /// Logical expert of the load.
        expert: usize,
        /// The value.
        value: f64,
    },
    /// An old placement entry is outside `-1..num_logical_experts`.
    BadOldExpert {
        /// Layer of the entry.
        layer: usize,
        /// Physical slot of the entry.
        slot: usize,
        /// The value.
        value: i64,
    },
}

impl PolicyError {
    fn bad(name: &'static str, message: String) -> PolicyError {
        PolicyError::BadArgument { name, message }
    }

    /// The argument the error is about.
    pub fn argument(&self) -> &'static str {
        match self {
            PolicyError::BadArgument { name, .. } => name,
            PolicyError::BadLoad { .. } => "weight",
            PolicyError::BadOldExpert { .. } => "old_global_expert_indices",
        }
    }
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PolicyError::BadArgument { name, message } => write!(f, "{name}: {message}"),
            PolicyError::BadLoad {
                layer,
                expert,
                value,
            } => write!(
                f,
                "weight: load {value} at [layer {layer}, expert {expert}]; loads must be \
                 finite and >= 0"
            ),
            PolicyError::BadOldExpert { layer, slot, value } => write!(
                f,
                "old_global_expert_indices: {value} at [layer {layer}, slot {slot}] is not a \
                 logical expert id or -1"
            ),
        }
    }
}

impl std::error::Error for PolicyError {}

/// The validated shape of one layer's problem.
///
/// `groups` and `nodes` are the effective ones: `(1, 1)` when
/// `num_groups % num_nodes != 0` (DeepSeek's global fallback).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Topology {
    /// Logical experts.
    pub experts: usize,
    /// Physical slots.
    pub slots: usize,
    /// Ranks.
    pub ranks: usize,
    /// Effective expert groups.
    pub groups: usize,
    /// Effective nodes.
    pub nodes: usize,
}

impl Topology {
    /// Slots per rank.
    pub fn slots_per_rank(&self) -> usize {
        self.slots / self.ranks
    }
    /// Ranks per node.
    pub fn ranks_per_node(&self) -> usize {
        self.ranks / self.nodes
    }
    /// Logical experts per group.
    pub fn experts_per_group(&self) -> usize {
        self.experts / self.groups
    }
    /// Groups per node.
    pub fn groups_per_node(&self) -> usize {
        self.groups / self.nodes
    }
    /// Node of a rank.
    pub fn node_of_rank(&self, rank: usize) -> usize {
        rank / self.ranks_per_node()
    }
    /// Whether placement respects nodes (more than one effective node).
    pub fn hierarchical(&self) -> bool {
        self.nodes > 1
    }

    /// Validates the shape arguments (DeepSeek's rules) and derives the topology.
    pub fn new(
        num_logical_experts: usize,
        num_replicas: usize,
        num_groups: usize,
        num_nodes: usize,
        num_ranks: usize,
    ) -> Result<Topology, PolicyError> {
        let positive = |name: &'static str, v: usize| {
            if v == 0 {
                Err(PolicyError::bad(
                    name,
                    "expected a positive int, got 0".into(),
                ))
            } else {
                Ok(())
            }
        };
        positive("num_logical_experts", num_logical_experts)?;
        positive("num_replicas", num_replicas)?;
        positive("num_groups", num_groups)?;
        positive("num_nodes", num_nodes)?;
        positive("num_ranks", num_ranks)?;
        if num_replicas % num_ranks != 0 {
            return Err(PolicyError::bad(
                "num_replicas",
                format!("{num_replicas} is not a multiple of num_ranks {num_ranks}"),
            ));
        }
        if num_replicas < num_logical_experts {
            return Err(PolicyError::bad(
                "num_replicas",
                format!(
                    "{num_replicas} is fewer than the {num_logical_experts} logical experts \
                     (every expert needs a slot)"
                ),
            ));
        }
        let (groups, nodes) = if num_groups % num_nodes == 0 {
            if num_logical_experts % num_groups != 0 {
                return Err(PolicyError::bad(
                    "num_groups",
                    format!(
                        "{num_groups} does not divide the {num_logical_experts} logical experts"
                    ),
                ));
            }
            if num_ranks % num_nodes != 0 {
                return Err(PolicyError::bad(
                    "num_ranks",
                    format!("{num_ranks} is not a multiple of num_nodes {num_nodes}"),
                ));
            }
            (num_groups, num_nodes)
        } else {
            (1, 1)
        };
        Ok(Topology {
            experts: num_logical_experts,
            slots: num_replicas,
            ranks: num_ranks,
            groups,
            nodes,
        })
    }
}

/// Checks the loads and the old placement of a request (shapes and values).
fn validate(req: &Request<'_>, topo: &Topology, opts: &Options) -> Result<(), PolicyError> {
    let n_w = req
        .num_layers
        .checked_mul(topo.experts)
        .ok_or_else(|| PolicyError::bad("weight", "num_layers * num_experts overflows".into()))?;
    if req.weight.len() != n_w {
        return Err(PolicyError::bad(
            "weight",
            format!(
                "{} values for [num_layers {}, num_logical_experts {}]",
                req.weight.len(),
                req.num_layers,
                topo.experts
            ),
        ));
    }
    if let Some(i) = req
        .weight
        .iter()
        .position(|&v| !(v.is_finite() && v >= 0.0))
    {
        return Err(PolicyError::BadLoad {
            layer: i / topo.experts,
            expert: i % topo.experts,
            value: req.weight[i],
        });
    }
    if !(opts.max_imbalance.is_finite() && opts.max_imbalance >= 0.0) {
        return Err(PolicyError::bad(
            "max_imbalance",
            format!(
                "expected a finite fraction >= 0, got {}",
                opts.max_imbalance
            ),
        ));
    }
    if let Some(old) = req.old {
        let n_o = req.num_layers.checked_mul(topo.slots).ok_or_else(|| {
            PolicyError::bad(
                "old_global_expert_indices",
                "num_layers * num_replicas overflows".into(),
            )
        })?;
        if old.len() != n_o {
            return Err(PolicyError::bad(
                "old_global_expert_indices",
                format!(
                    "{} values, expected [num_layers {}, num_replicas {}]",
                    old.len(),
                    req.num_layers,
                    topo.slots
                ),
            ));
        }
        let e = topo.experts as i64;
        if let Some(i) = old.iter().position(|&v| v < -1 || v >= e) {
            return Err(PolicyError::BadOldExpert {
                layer: i / topo.slots,
                slot: i % topo.slots,
                value: old[i],
            });
        }
    }
    Ok(())
}

/// Computes `phy2log` (row-major `[num_layers, num_replicas]`) for `req`.
///
/// Errors name the offending argument; nothing is computed on bad input.
pub fn rebalance_experts(req: &Request<'_>, opts: &Options) -> Result<Vec<i64>, PolicyError> {
    let topo = Topology::new(
        req.num_logical_experts,
        req.num_replicas,
        req.num_groups,
        req.num_nodes,
        req.num_ranks,
    )?;
    validate(req, &topo, opts)?;
    let len = req
        .num_layers
        .checked_mul(topo.slots)
        .filter(|&n| n <= isize::MAX as usize / 8)
        .ok_or_else(|| {
            PolicyError::bad(
                "num_replicas",
                format!(
                    "{} slots x {} layers do not fit in memory",
                    topo.slots, req.num_layers
                ),
            )
        })?;
    let mut out = vec![0i64; len];
    let threads = effective_threads(opts.threads, req.num_layers);
    let per = req.num_layers.div_ceil(threads.max(1)).max(1);
    let run_chunk = |first_layer: usize, chunk: &mut [i64]| {
        let mut work = LayerWork::new(&topo);
        for (i, row) in chunk.chunks_mut(topo.slots).enumerate() {
            let l = first_layer + i;
            let w = &req.weight[l * topo.experts..(l + 1) * topo.experts];
            let old = req.old.map(|o| &o[l * topo.slots..(l + 1) * topo.slots]);
            work.plan_layer(w, old, opts, row);
        }
    };
    if threads <= 1 || req.num_layers <= 1 {
        run_chunk(0, &mut out);
    } else {
        std::thread::scope(|s| {
            for (c, chunk) in out.chunks_mut(per * topo.slots).enumerate() {
                let run = &run_chunk;
                s.spawn(move || run(c * per, chunk));
            }
        });
    }
    Ok(out)
}

fn effective_threads(requested: usize, layers: usize) -> usize {
    let t = if requested == 0 {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    } else {
        requested
    };
    t.min(layers).max(1)
}

/// Whether the migration-aware search runs: it keeps a rank x expert table,
/// so beyond `2^24` entries (far past real deployments) layers keep the
/// relabeled stock placement instead.
fn searchable(topo: &Topology) -> bool {
    topo.ranks
        .checked_mul(topo.experts)
        .is_some_and(|n| n <= 1 << 24)
}

/// Per-thread scratch state for planning layers of one topology.
struct LayerWork<'t> {
    topo: &'t Topology,
    stock: stock::Stock,
    stock_out: Vec<usize>,
    relabeled: Vec<usize>,
    /// The search's buffers, made on the first layer that searches.
    search: Option<migrate::Work>,
}

impl<'t> LayerWork<'t> {
    fn new(topo: &'t Topology) -> Self {
        LayerWork {
            topo,
            stock: stock::Stock::new(topo),
            stock_out: vec![0; topo.slots],
            relabeled: vec![0; topo.slots],
            search: None,
        }
    }

    fn plan_layer(&mut self, w: &[f64], old: Option<&[i64]>, opts: &Options, out: &mut [i64]) {
        let topo = self.topo;
        self.stock.run(w, &mut self.stock_out);
        let old = match (opts.method, old) {
            (Method::Stock, _) | (_, None) => {
                for (o, &e) in out.iter_mut().zip(&self.stock_out) {
                    *o = e as i64;
                }
                return;
            }
            (_, Some(old)) => old,
        };
        let search = opts.method == Method::Migrate && searchable(topo);
        // Which ranks held which expert: for relabeling and the search (not
        // made for shapes past both, where it could be huge).
        let old_has = (search || relabel::renames(topo)).then(|| relabel::Presence::of(topo, old));
        let no_presence = relabel::Presence::empty();
        let old_has = old_has.as_ref().unwrap_or(&no_presence);
        let relabel_cost =
            relabel::relabel(topo, &self.stock_out, old, old_has, &mut self.relabeled);
        let mut found = None;
        if search && relabel_cost > 0 {
            let targets = metrics::sorted_loads(w, &self.stock_out, topo);
            let work = self.search.get_or_insert_with(|| migrate::Work::new(topo));
            found = migrate::search(
                topo,
                w,
                old,
                old_has,
                &targets,
                opts.max_imbalance,
                &self.relabeled,
                relabel_cost,
                work,
            );
        }
        let best = found.as_deref_mut().unwrap_or(&mut self.relabeled);
        relabel::keep_slots(topo, best, old);
        for (o, &e) in out.iter_mut().zip(best.iter()) {
            *o = e as i64;
        }
    }
}

/// `log2phy` and `logcnt` of a placement, in DeepSeek's conventions.
///
/// `phy2log` is row-major `[num_layers, num_slots]` (`-1` = empty slot, ignored).
/// Returns `(log2phy, max_count, logcnt)`: `logcnt[l, e]` counts the replicas
/// of `e`; `log2phy[l, e, i]` (row-major `[num_layers, num_logical_experts,
/// max_count]`) is the slot of its `i`-th replica in slot order, `-1` past
/// `logcnt[l, e]`; `max_count` is the largest count over all layers (0 if none).
pub fn log2phy_logcnt(
    phy2log: &[i64],
    num_layers: usize,
    num_slots: usize,
    num_logical_experts: usize,
) -> Result<(Vec<i64>, usize, Vec<i64>), PolicyError> {
    let n = num_layers
        .checked_mul(num_slots)
        .ok_or_else(|| PolicyError::bad("phy2log", "num_layers * num_slots overflows".into()))?;
    if phy2log.len() != n {
        return Err(PolicyError::bad(
            "phy2log",
            format!(
                "{} values, expected [num_layers {num_layers}, num_slots {num_slots}]",
                phy2log.len()
            ),
        ));
    }
    let e = num_logical_experts;
    if let Some(i) = phy2log
        .iter()
        .position(|&v| v < -1 || (v >= 0 && v as u64 >= e as u64))
    {
        return Err(PolicyError::bad(
            "phy2log",
            format!(
                "{} at [layer {}, slot {}] is not in -1..{e} (num_logical_experts {e})",
                phy2log[i],
                i / num_slots.max(1),
                i % num_slots.max(1)
            ),
        ));
    }
    let cnt_len = num_layers
        .checked_mul(e)
        .ok_or_else(|| PolicyError::bad("num_logical_experts", "too large".into()))?;
    let mut logcnt = vec![0i64; cnt_len];
    for l in 0..num_layers {
        for &v in &phy2log[l * num_slots..(l + 1) * num_slots] {
            if v >= 0 {
                logcnt[l * e + v as usize] += 1;
            }
        }
    }
    let max_count = logcnt.iter().copied().max().unwrap_or(0).max(0) as usize;
    let map_len = cnt_len
        .checked_mul(max_count)
        .filter(|&n| n <= isize::MAX as usize / 8)
        .ok_or_else(|| PolicyError::bad("phy2log", "log2phy would not fit in memory".into()))?;
    let mut log2phy = vec![-1i64; map_len];
    let mut seen = vec![0usize; e];
    for l in 0..num_layers {
        seen.iter_mut().for_each(|s| *s = 0);
        for (p, &v) in phy2log[l * num_slots..(l + 1) * num_slots]
            .iter()
            .enumerate()
        {
            if v >= 0 {
                let x = v as usize;
                log2phy[(l * e + x) * max_count + seen[x]] = p as i64;
                seen[x] += 1;
            }
        }
    }
    Ok((log2phy, max_count, logcnt))
}
