//! Migration-aware placement: start from where experts are and change only
//! what balance needs.
//!
//! The cost of a placement is the number of (rank, logical expert) pairs it has
//! that the old placement lacks: each is one expert received over the network
//! (duplicates on a rank are local copies). The balance guard is the stock
//! placement's: rank loads sorted in descending order must have every prefix
//! sum at most stock's times `1 + max_imbalance` (weak majorization; the full
//! sums are equal), so ours is at least as balanced in every top-k sense.
//!
//! Per layer:
//! 1. Node assignment (hierarchical only): which node holds each expert group.
//!    Candidates are the old one (each group on the node holding most of it),
//!    each exchange of two groups between nodes, and stock's (relabeled); a
//!    candidate is tried only if its node loads can meet the guard and its
//!    lower bound on cost can beat the best placement found so far.
//! 2. Start: replica counts by stock's rule for each node's experts; keep as
//!    many old replicas in place as those counts allow (dropping extras from
//!    the heaviest ranks) and pack the missing replicas, heaviest first, onto
//!    the lightest ranks with a free slot.
//! 3. Repair: while the guard fails, each node looks at the most violated
//!    prefix boundary its ranks straddle (moving load across a boundary inside
//!    a node is what lowers that prefix sum) and proposes exchanges of two
//!    slots between its heaviest ranks inside and lightest ranks outside; each
//!    is scored exactly by the drop in total prefix excess per expert
//!    received. The best move of every node is applied at once when the
//!    moves together still help. When exchanges stop helping, wider pairs
//!    and replica moves (a redundant slot given to another expert) are tried;
//!    then one node is re-packed in part (its smallest replicas put back
//!    heaviest first onto the lightest ranks, as stock does) or replaced by
//!    stock's placement of the same groups, whichever helps most per expert.
//! 4. Polish: give slots back to experts their rank held before wherever the
//!    guard still holds, so that no reception stays that balance does not need.
//!
//! The caller keeps the result only if it is cheaper than the relabeled stock
//! placement, which meets the guard by construction.

use super::guard::{Eval, Guard, Sorted};
use super::hungarian::Assigner;
use super::metrics;
use super::relabel::Presence;
use super::stock::replicate;
use super::Topology;

/// Ranks per node and side of a boundary paired up in a repair step.
const FOCUS: usize = 2;
/// Ranks per node and side of a boundary when exchanges alone stop helping.
const WIDE_FOCUS: usize = 4;
/// Node re-packs or substitutions per node assignment, at most.
const MAX_ESCALATIONS: usize = 8;
/// Node assignments searched per layer, at most.
const MAX_NODE_CANDIDATES: usize = 6;
/// Polish passes over all received experts, at most.
const POLISH_PASSES: usize = 1;

/// Searches a placement cheaper than `relabel_cost` that meets the guard.
///
/// `relabeled` is the relabeled stock placement of this layer; `stock_sorted`
/// its rank loads in descending order.
#[allow(clippy::too_many_arguments)]
pub(crate) fn search(
    topo: &Topology,
    w: &[f64],
    old: &[i64],
    old_has: &Presence,
    stock_sorted: &[f64],
    max_imbalance: f64,
    relabeled: &[usize],
    relabel_cost: usize,
    work: &mut Work,
) -> Option<Vec<usize>> {
    let guard = Guard::new(stock_sorted, max_imbalance);
    let gs = topo.experts_per_group();
    let spr = topo.slots_per_rank();
    let Work {
        tables,
        w32,
        stock_node_of_group,
        state: st,
        sorted,
        sc,
        start,
    } = work;
    for (p, &e) in relabeled.iter().enumerate() {
        stock_node_of_group[e / gs] = topo.node_of_rank(p / spr);
    }
    w32.clear();
    w32.extend(w.iter().map(|&v| (v + 0.0) as f32));
    let ctx = Ctx {
        topo,
        rank_of_slot: &tables.rank_of_slot,
        node_of_rank: &tables.node_of_rank,
        w,
        w32,
        old,
        old_has,
        guard: &guard,
        relabeled,
        stock_node_of_group,
    };
    let mut best: Option<Vec<usize>> = None;
    let mut best_cost = relabel_cost as i64;
    for assignment in ctx.node_candidates(best_cost) {
        if assignment.lower_bound >= best_cost {
            continue;
        }
        ctx.start(&assignment.node_of_group, st, start);
        if !ctx.repair(st, sorted, sc) {
            continue;
        }
        // Exchanges update two loads incrementally; start polish from exact ones.
        ctx.recompute_loads(st);
        ctx.polish(st, sorted);
        if st.cost >= best_cost {
            continue;
        }
        let placement: Vec<usize> = st.slot.iter().map(|&e| e as usize).collect();
        // Final word: the canonical loads, as the tests measure them.
        let ours = metrics::sorted_loads(w, &placement, topo);
        if metrics::prefix_excess(&ours, stock_sorted, max_imbalance) > 0.0 {
            continue;
        }
        best_cost = st.cost;
        best = Some(placement);
        if best_cost == 0 {
            break;
        }
    }
    best
}

/// Per-thread buffers of the search, kept across the layers of one topology.
pub(crate) struct Work {
    tables: Tables,
    w32: Vec<f32>,
    stock_node_of_group: Vec<usize>,
    state: State,
    sorted: Sorted,
    sc: Scratch,
    start: StartBufs,
}

impl Work {
    pub(crate) fn new(topo: &Topology) -> Self {
        let spr = topo.slots_per_rank();
        Work {
            tables: Tables {
                rank_of_slot: (0..topo.slots).map(|p| (p / spr) as u32).collect(),
                node_of_rank: (0..topo.ranks)
                    .map(|r| topo.node_of_rank(r) as u32)
                    .collect(),
            },
            w32: Vec::with_capacity(topo.experts),
            stock_node_of_group: vec![0; topo.groups],
            state: State {
                slot: vec![0; topo.slots],
                cnt: vec![0; topo.experts],
                per: vec![0.0; topo.experts],
                on: vec![0; topo.ranks * topo.experts],
                load: vec![0.0; topo.ranks],
                cost: 0,
                node_of_expert: vec![0; topo.experts],
                gen: vec![0; topo.ranks],
                local: false,
            },
            sorted: Sorted::new(topo.ranks),
            sc: Scratch::default(),
            start: StartBufs::default(),
        }
    }
}

/// Rank of every slot and node of every rank (no divisions in the loops).
struct Tables {
    rank_of_slot: Vec<u32>,
    node_of_rank: Vec<u32>,
}

/// Buffers of `start`.
#[derive(Default)]
struct StartBufs {
    /// Experts of each node in id order: `experts[node_at[n]..node_at[n + 1]]`.
    experts: Vec<usize>,
    node_at: Vec<usize>,
    p2l: Vec<usize>,
    c: Vec<u32>,
    node_w: Vec<f32>,
    at: Vec<usize>,
    keep: Vec<(usize, usize)>,
    prelim: Vec<f64>,
    kept: Vec<u32>,
    load: Vec<f64>,
    free_of: Vec<Vec<usize>>,
    items: Vec<usize>,
}

/// A node assignment of the expert groups, with a lower bound on its cost.
struct NodeAssignment {
    node_of_group: Vec<usize>,
    lower_bound: i64,
}

struct Ctx<'a> {
    topo: &'a Topology,
    /// Rank of every slot and node of every rank (no divisions in the loops).
    rank_of_slot: &'a [u32],
    node_of_rank: &'a [u32],
    w: &'a [f64],
    /// Loads in single precision, for stock's replication rule.
    w32: &'a [f32],
    old: &'a [i64],
    old_has: &'a Presence,
    guard: &'a Guard,
    relabeled: &'a [usize],
    /// Node of each group in the relabeled stock placement.
    stock_node_of_group: &'a [usize],
}

/// A placement under construction with the bookkeeping of its cost and loads.
struct State {
    /// Expert of every slot.
    slot: Vec<u32>,
    /// Replicas of every expert.
    cnt: Vec<u32>,
    /// Load per replica of every expert: `w[e] / cnt[e]`, kept with `cnt`.
    per: Vec<f64>,
    /// `on[r * experts + e]`: copies of `e` on rank `r`.
    on: Vec<u32>,
    /// Load of every rank (canonical: recomputed after each change).
    load: Vec<f64>,
    /// Experts received: pairs (r, e) with `on > 0` that the old placement lacks.
    cost: i64,
    /// Node of every expert.
    node_of_expert: Vec<usize>,
    /// Per rank: bumped whenever a slot of the rank, or the replica count of
    /// an expert on the rank, changes (what the repair's caches depend on).
    gen: Vec<u64>,
    /// Whether every replica lies on its expert's node, so that a node's
    /// experts change only with its own slots (else the caches are off).
    local: bool,
}

/// A change of the placement.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Move {
    /// Exchange the experts of two slots (on two ranks of one node).
    Swap(usize, usize),
    /// Give a slot to another expert (the slot's expert keeps a replica elsewhere).
    Retarget(usize, u32),
}

impl Move {
    /// The first slot the move changes.
    fn slot(self) -> usize {
        match self {
            Move::Swap(p, _) | Move::Retarget(p, _) => p,
        }
    }
}

/// What a move needs to know about one distinct expert of a rank.
#[derive(Clone, Copy, Debug)]
struct SideItem {
    slot: usize,
    expert: usize,
    /// Load per replica.
    per: f64,
    /// Replicas in the layer.
    cnt: u32,
    /// Cost change of this rank losing one copy.
    loss: i64,
    /// Load per replica with one more replica.
    grow: f64,
    /// This rank's load drop when the expert gets one more replica.
    shed: f64,
}

/// What the cached candidate moves of one rank pair were found for.
#[derive(Clone, Copy)]
struct PairKey {
    /// The ranks' generations.
    gens: (u64, u64),
    /// The pair's loads (bits).
    loads: (u64, u64),
    /// Candidates (at most 9); `EMPTY`: nothing cached.
    len: u8,
}

impl PairKey {
    const EMPTY: u8 = u8::MAX;
}

/// Rank pairs (times 2 for `retarget`) above which candidates are not cached.
const PAIR_CACHE_MAX: usize = 1 << 16;

/// The best move of a rank pair per kind and cost class: the first offered
/// with the smallest score (`at`: side indices and cost).
#[derive(Default)]
struct Best {
    set: [[bool; 3]; 3],
    score: [[f64; 3]; 3],
    at: [[(usize, usize, i64); 3]; 3],
}

impl Best {
    #[inline(always)]
    fn offer(&mut self, kind: usize, dc: i64, score: f64, i: usize, j: usize) {
        let class = dc.clamp(0, 2) as usize;
        if !self.set[kind][class] || score < self.score[kind][class] {
            self.set[kind][class] = true;
            self.score[kind][class] = score;
            self.at[kind][class] = (i, j, dc);
        }
    }
}

impl Scratch {
    /// Empties the caches for a new repair (buffers are kept).
    fn reset(&mut self, topo: &Topology, spr: usize) {
        let ranks = topo.ranks;
        if self.side_gen.len() != ranks {
            self.side = vec![
                SideItem {
                    slot: 0,
                    expert: 0,
                    per: 0.0,
                    cnt: 0,
                    loss: 0,
                    grow: 0.0,
                    shed: 0.0,
                };
                ranks * spr
            ];
            self.side_len = vec![0; ranks];
            self.side_gen = vec![u64::MAX; ranks];
            let pairs = ranks
                .saturating_mul(topo.ranks_per_node())
                .saturating_mul(2);
            let pairs = if pairs <= PAIR_CACHE_MAX { pairs } else { 0 };
            let empty = PairKey {
                gens: (0, 0),
                loads: (0, 0),
                len: PairKey::EMPTY,
            };
            self.pair_keys = vec![empty; pairs];
            self.pair_cands = vec![(Move::Swap(0, 0), 0); pairs * 9];
        }
        self.side_gen.iter_mut().for_each(|x| *x = u64::MAX);
        self.pair_keys
            .iter_mut()
            .for_each(|k| k.len = PairKey::EMPTY);
        self.esc.subst.iter_mut().for_each(|p| *p = None);
    }
}

/// Reused buffers of the repair loop.
#[derive(Default)]
struct Scratch {
    /// Ranks of each node in descending load order.
    by_node: Vec<usize>,
    node_fill: Vec<usize>,
    /// Per node: (excess, prefix length - 1) of the worst boundary it straddles.
    node_bound: Vec<(f64, usize)>,
    /// Per node: sorted positions of its heaviest and lightest rank.
    node_span: Vec<(usize, usize)>,
    /// Violated prefix boundaries: (prefix length - 1, excess).
    violated: Vec<(usize, f64)>,
    batch: Vec<Move>,
    one: Vec<(usize, f64)>,
    pairs: Vec<(usize, usize)>,
    cands: Vec<(Move, i64)>,
    /// Per node: its best scored move.
    node_best: Vec<Option<((u8, f64), Move)>>,
    /// Distinct experts of every rank: `side[r * spr..][..side_len[r]]`,
    /// valid while `side_gen[r]` is the rank's generation.
    side: Vec<SideItem>,
    side_len: Vec<usize>,
    side_gen: Vec<u64>,
    /// Candidate moves of each rank pair (heavier rank, lighter rank's
    /// place in its node, `retarget`): `pair_cands[i * 9..][..len]`, valid
    /// while the ranks' generations and loads are the key's.
    pair_keys: Vec<PairKey>,
    pair_cands: Vec<(Move, i64)>,
    gain_a: Vec<i64>,
    gain_b: Vec<i64>,
    assigner: Assigner,
    esc: EscBufs,
}

/// Buffers of `escalate`.
#[derive(Default)]
struct EscBufs {
    /// The state's replica counts (a copy to change and restore).
    cnt: Vec<u32>,
    /// Plans of the node being looked at, one after another.
    plans: Vec<u32>,
    /// Per node: stock's placement of its groups (made once per repair;
    /// `Some(None)`: stock has no node with these groups).
    subst: Vec<Option<Option<Vec<u32>>>>,
    by_load: Vec<usize>,
    load: Vec<f64>,
    free_of: Vec<Vec<usize>>,
}

impl Ctx<'_> {
    fn e(&self) -> usize {
        self.topo.experts
    }
    fn spr(&self) -> usize {
        self.topo.slots_per_rank()
    }
    fn g(&self) -> usize {
        self.topo.ranks_per_node()
    }
    #[inline]
    fn rank_of(&self, slot: usize) -> usize {
        self.rank_of_slot[slot] as usize
    }
    #[inline]
    fn node_of(&self, rank: usize) -> usize {
        self.node_of_rank[rank] as usize
    }
    #[inline]
    fn per(&self, st: &State, x: usize) -> f64 {
        st.per[x]
    }

    // ------------------------------------------------------------------ nodes

    /// Node assignments to try, cheapest bound first (old, group exchanges, stock's).
    fn node_candidates(&self, best_cost: i64) -> Vec<NodeAssignment> {
        let t = self.topo;
        let gs = t.experts_per_group();
        let g = self.g();
        // Per group and node: the group's experts no rank of the node held
        // (each must be received if the group goes there), and group loads.
        // (made when first needed).
        let node_has = self.old_has.unions(g);
        let miss = std::cell::RefCell::new(vec![-1i64; t.groups * t.nodes]);
        let lower_bound = |a: &[usize]| -> i64 {
            let mut miss = miss.borrow_mut();
            let mut lb = 0;
            for (grp, &n) in a.iter().enumerate() {
                let m = &mut miss[grp * t.nodes + n];
                if *m < 0 {
                    *m = (grp * gs..(grp + 1) * gs)
                        .filter(|&e| !node_has.has(n, e))
                        .count() as i64;
                }
                lb += *m;
            }
            lb
        };
        if !t.hierarchical() {
            let a = vec![0; t.groups];
            return vec![NodeAssignment {
                lower_bound: lower_bound(&a),
                node_of_group: a,
            }];
        }
        let group_load: Vec<f64> = (0..t.groups)
            .map(|grp| self.w[grp * gs..(grp + 1) * gs].iter().sum::<f64>())
            .collect();
        let gpn = t.groups_per_node();
        // Affinity: old slots of each group on each node.
        let mut aff = vec![0usize; t.groups * t.nodes];
        for (p, &v) in self.old.iter().enumerate() {
            if v >= 0 {
                let grp = v as usize / gs;
                aff[grp * t.nodes + self.node_of(self.rank_of(p))] += 1;
            }
        }
        // (group, node) pairs by affinity, descending (ties: group, node).
        let mut pairs: Vec<(std::cmp::Reverse<usize>, usize, usize)> = (0..t.groups)
            .flat_map(|grp| (0..t.nodes).map(move |n| (grp, n)))
            .map(|(grp, n)| (std::cmp::Reverse(aff[grp * t.nodes + n]), grp, n))
            .collect();
        pairs.sort_unstable();
        let mut old_assign = vec![usize::MAX; t.groups];
        let mut room = vec![gpn; t.nodes];
        for &(_, grp, n) in &pairs {
            if old_assign[grp] == usize::MAX && room[n] > 0 {
                old_assign[grp] = n;
                room[n] -= 1;
            }
        }
        let mut cands: Vec<Vec<usize>> = vec![old_assign.clone()];
        if gpn > 1 {
            for g1 in 0..t.groups {
                for g2 in g1 + 1..t.groups {
                    if old_assign[g1] != old_assign[g2] {
                        let mut a = old_assign.clone();
                        a.swap(g1, g2);
                        cands.push(a);
                    }
                }
            }
        }
        if !cands.iter().any(|a| a[..] == self.stock_node_of_group[..]) {
            cands.push(self.stock_node_of_group.to_vec());
        }
        let mut node_load = vec![0.0f64; t.nodes];
        let mut out: Vec<NodeAssignment> = cands
            .into_iter()
            .filter(|a| self.nodes_can_meet_guard(a, &group_load, &mut node_load))
            .map(|a| NodeAssignment {
                lower_bound: lower_bound(&a),
                node_of_group: a,
            })
            .filter(|a| a.lower_bound < best_cost)
            .collect();
        out.sort_by_key(|a| a.lower_bound); // stable: old first among equals
        out.truncate(MAX_NODE_CANDIDATES);
        out
    }

    /// Necessary condition: the `j` heaviest nodes' ranks are `j * g` ranks, so
    /// their load is at most the guard's cap on the `j * g` heaviest ranks.
    fn nodes_can_meet_guard(
        &self,
        node_of_group: &[usize],
        group_load: &[f64],
        node_load: &mut [f64],
    ) -> bool {
        let t = self.topo;
        let g = self.g();
        node_load.iter_mut().for_each(|l| *l = 0.0);
        for (grp, &n) in node_of_group.iter().enumerate() {
            node_load[n] += group_load[grp];
        }
        node_load.sort_unstable_by(|a, b| b.total_cmp(a));
        let mut s = 0.0;
        for (j, &x) in node_load.iter().enumerate().take(t.nodes - 1) {
            s += x;
            if s > self.guard.cap[(j + 1) * g - 1] {
                return false;
            }
        }
        true
    }

    // ------------------------------------------------------------------ start

    /// Writes the starting placement for a node assignment into `st` (see
    /// the module docs).
    fn start(&self, node_of_group: &[usize], st: &mut State, b: &mut StartBufs) {
        let t = self.topo;
        let e_n = self.e();
        let spr = self.spr();
        let g = self.g();
        let gs = t.experts_per_group();
        // `on` is zero except where the previous state's slots put copies.
        for (&r, &x) in self.rank_of_slot.iter().zip(&st.slot) {
            st.on[r as usize * e_n + x as usize] = 0;
        }
        for (e, n) in st.node_of_expert.iter_mut().enumerate() {
            *n = node_of_group[e / gs];
        }
        let node_of_expert = &st.node_of_expert;
        // Experts of each node, in id order (a counting sort).
        b.node_at.clear();
        b.node_at.resize(t.nodes + 1, 0);
        for &n in node_of_expert {
            b.node_at[n + 1] += 1;
        }
        for n in 0..t.nodes {
            b.node_at[n + 1] += b.node_at[n];
        }
        b.experts.clear();
        b.experts.resize(e_n, 0);
        {
            let mut fill = b.node_at.clone();
            for (e, &n) in node_of_expert.iter().enumerate() {
                b.experts[fill[n]] = e;
                fill[n] += 1;
            }
        }
        // Replica counts by stock's rule, per node.
        let cnt = &mut st.cnt;
        for n in 0..t.nodes {
            let experts = &b.experts[b.node_at[n]..b.node_at[n + 1]];
            b.node_w.clear();
            b.node_w.extend(experts.iter().map(|&e| self.w32[e]));
            replicate(&b.node_w, t.slots / t.nodes, &mut b.p2l, &mut b.c);
            for (i, &e) in experts.iter().enumerate() {
                cnt[e] = b.c[i];
            }
        }
        // Old replicas that may stay (on a rank of their expert's node),
        // grouped by expert in slot order (a counting sort).
        let stays = |p: usize, v: i64| {
            v >= 0 && node_of_expert[v as usize] == self.node_of(self.rank_of(p))
        };
        let at = &mut b.at;
        at.clear();
        at.resize(e_n + 1, 0);
        for (p, &v) in self.old.iter().enumerate() {
            if stays(p, v) {
                at[v as usize + 1] += 1;
            }
        }
        for x in 0..e_n {
            at[x + 1] += at[x];
        }
        let keep = &mut b.keep;
        keep.clear();
        keep.resize(at[e_n], (0, 0));
        for (p, &v) in self.old.iter().enumerate() {
            if stays(p, v) {
                let x = v as usize;
                keep[at[x]] = (x, p);
                at[x] += 1;
            }
        }
        let prelim = &mut b.prelim;
        prelim.clear();
        prelim.resize(t.ranks, 0.0);
        for &(x, p) in keep.iter() {
            prelim[self.rank_of(p)] += self.w[x] / cnt[x] as f64;
        }
        const FREE: u32 = u32::MAX;
        let slot = &mut st.slot;
        slot.iter_mut().for_each(|s| *s = FREE);
        let kept = &mut b.kept;
        kept.clear();
        kept.resize(e_n, 0);
        let mut i = 0;
        while i < keep.len() {
            let x = keep[i].0;
            let end = i + keep[i..].iter().take_while(|k| k.0 == x).count();
            let list = &mut keep[i..end];
            let mut len = list.len();
            let per = self.w[x] / cnt[x] as f64;
            // Too many: drop a same-rank duplicate first, else the copy on the
            // heaviest rank (dropped entries move to the end of `list`).
            while len > cnt[x] as usize {
                let live = &list[..len];
                let dup = (0..len).rev().find(|&j| {
                    live[..j]
                        .iter()
                        .any(|q| self.rank_of(q.1) == self.rank_of(live[j].1))
                });
                let j = dup.unwrap_or_else(|| {
                    (0..len)
                        .max_by(|&a, &b| {
                            prelim[self.rank_of(live[a].1)]
                                .total_cmp(&prelim[self.rank_of(live[b].1)])
                                .then(a.cmp(&b))
                        })
                        .unwrap_or(0)
                });
                prelim[self.rank_of(list[j].1)] -= per;
                list[j..len].rotate_left(1);
                len -= 1;
            }
            for k in &list[..len] {
                slot[k.1] = x as u32;
            }
            kept[x] = len as u32;
            i = end;
        }
        // Pack the missing replicas of each node, heaviest first, onto its
        // lightest ranks with a free slot.
        b.free_of.resize(g, Vec::new());
        for n in 0..t.nodes {
            let experts = &b.experts[b.node_at[n]..b.node_at[n + 1]];
            let ranks = n * g..(n + 1) * g;
            let load = &mut b.load;
            load.clear();
            load.resize(g, 0.0);
            let free_of = &mut b.free_of;
            free_of.iter_mut().for_each(|f| f.clear());
            for p in (ranks.start * spr..ranks.end * spr).rev() {
                let k = self.rank_of(p) - ranks.start;
                if slot[p] == FREE {
                    free_of[k].push(p);
                } else {
                    let x = slot[p] as usize;
                    load[k] += self.w[x] / cnt[x] as f64;
                }
            }
            let items = &mut b.items;
            items.clear();
            for &x in experts {
                items.extend(std::iter::repeat(x).take((cnt[x] - kept[x]) as usize));
            }
            items.sort_unstable_by(|&a, &b| {
                let la = self.w[a] / cnt[a] as f64;
                let lb = self.w[b] / cnt[b] as f64;
                lb.total_cmp(&la).then(a.cmp(&b))
            });
            for &x in items.iter() {
                let lightest = (0..g)
                    .filter(|&i| !free_of[i].is_empty())
                    .min_by(|&i, &j| load[i].total_cmp(&load[j]).then(i.cmp(&j)));
                let Some(i) = lightest else { break };
                if let Some(p) = free_of[i].pop() {
                    slot[p] = x as u32;
                    load[i] += self.w[x] / cnt[x] as f64;
                }
            }
        }
        // The counts add up to each node's slots, so every slot is filled; a
        // leftover would be a bug, and gets a valid expert rather than a panic.
        for s in slot.iter_mut() {
            if *s == FREE {
                *s = 0;
            }
        }
        st.cnt.iter_mut().for_each(|c| *c = 0);
        st.gen.iter_mut().for_each(|x| *x = 0);
        st.cost = 0;
        self.count(st);
    }

    /// Computes counts, presence, cost and loads of a fresh state (all zero)
    /// from its slots.
    fn count(&self, st: &mut State) {
        let e_n = self.e();
        for (p, &x) in st.slot.iter().enumerate() {
            let (r, x) = (self.rank_of(p), x as usize);
            st.cnt[x] += 1;
            if st.on[r * e_n + x] == 0 && !self.old_has.has(r, x) {
                st.cost += 1;
            }
            st.on[r * e_n + x] += 1;
        }
        for ((per, &w), &c) in st.per.iter_mut().zip(self.w).zip(&st.cnt) {
            *per = w / c as f64;
        }
        st.local = st
            .slot
            .iter()
            .enumerate()
            .all(|(p, &x)| st.node_of_expert[x as usize] == self.node_of(self.rank_of(p)));
        self.recompute_loads(st);
    }

    fn recompute_loads(&self, st: &mut State) {
        st.load.iter_mut().for_each(|l| *l = 0.0);
        for (&r, &x) in self.rank_of_slot.iter().zip(&st.slot) {
            st.load[r as usize] += st.per[x as usize];
        }
    }

    // ------------------------------------------------------------------ moves

    #[inline]
    fn on(&self, st: &State, r: usize, x: usize) -> u32 {
        st.on[r * self.e() + x]
    }

    /// Cost change of rank `r` losing one copy of `x`.
    #[inline]
    fn loss(&self, st: &State, r: usize, x: usize) -> i64 {
        -i64::from(self.on(st, r, x) == 1 && !self.old_has.has(r, x))
    }

    /// Cost change of rank `r` gaining one copy of `x`.
    #[inline]
    fn gain(&self, st: &State, r: usize, x: usize) -> i64 {
        i64::from(self.on(st, r, x) == 0 && !self.old_has.has(r, x))
    }

    /// Cost change of a move.
    fn move_cost(&self, st: &State, m: Move) -> i64 {
        match m {
            Move::Swap(pa, pb) => {
                let (a, b) = (self.rank_of(pa), self.rank_of(pb));
                let (x, y) = (st.slot[pa] as usize, st.slot[pb] as usize);
                self.loss(st, a, x)
                    + self.gain(st, a, y)
                    + self.loss(st, b, y)
                    + self.gain(st, b, x)
            }
            Move::Retarget(p, y) => {
                let a = self.rank_of(p);
                let x = st.slot[p] as usize;
                self.loss(st, a, x) + self.gain(st, a, y as usize)
            }
        }
    }

    /// Writes the rank loads a move changes into `out` as `(rank, new load)`.
    fn move_loads(&self, st: &State, m: Move, out: &mut Vec<(usize, f64)>) {
        out.clear();
        match m {
            Move::Swap(pa, pb) => {
                let (a, b) = (self.rank_of(pa), self.rank_of(pb));
                let (x, y) = (st.slot[pa] as usize, st.slot[pb] as usize);
                let d = self.per(st, x) - self.per(st, y);
                out.push((a, st.load[a] - d));
                out.push((b, st.load[b] + d));
            }
            Move::Retarget(p, y) => {
                // Replica counts change, so every holder of either expert moves.
                let a = self.rank_of(p);
                let x = st.slot[p] as usize;
                let y = y as usize;
                let (cx, cy) = (st.cnt[x] as f64, st.cnt[y] as f64);
                let (lx0, lx1) = (self.w[x] / cx, self.w[x] / (cx - 1.0));
                let (ly0, ly1) = (self.w[y] / cy, self.w[y] / (cy + 1.0));
                let g = self.g();
                let node = self.node_of(a);
                for r in node * g..(node + 1) * g {
                    let (ox, oy) = (self.on(st, r, x) as f64, self.on(st, r, y) as f64);
                    let (nx, ny) = if r == a {
                        (ox - 1.0, oy + 1.0)
                    } else {
                        (ox, oy)
                    };
                    if ox == 0.0 && ny == 0.0 {
                        continue;
                    }
                    let mut d = 0.0;
                    if ox > 0.0 {
                        d += nx * lx1 - ox * lx0;
                    }
                    if ny > 0.0 {
                        d += ny * ly1 - oy * ly0;
                    }
                    out.push((r, st.load[r] + d));
                }
            }
        }
    }

    fn apply(&self, st: &mut State, m: Move) {
        match m {
            Move::Swap(pa, pb) => {
                let (x, y) = (st.slot[pa], st.slot[pb]);
                let d = self.per(st, x as usize) - self.per(st, y as usize);
                self.put(st, pa, y);
                self.put(st, pb, x);
                // The replica counts (and loads per replica) end as they
                // were: only the two ranks change.
                st.gen[self.rank_of(pa)] += 1;
                st.gen[self.rank_of(pb)] += 1;
                // Counts are unchanged: only the two ranks' loads move. The
                // final check recomputes every load from scratch.
                st.load[self.rank_of(pa)] -= d;
                st.load[self.rank_of(pb)] += d;
            }
            Move::Retarget(p, y) => {
                self.set_slot(st, p, y);
                self.recompute_loads(st);
            }
        }
    }

    /// Sets one slot, keeping counts, presence and cost (not loads) current.
    fn set_slot(&self, st: &mut State, p: usize, y: u32) {
        let x = st.slot[p];
        if x == y {
            return;
        }
        self.put(st, p, y);
        // The rank, and every rank holding either expert (their replica
        // counts changed; replicas lie on their expert's node).
        let g = self.g();
        st.gen[self.rank_of(p)] += 1;
        for e in [x as usize, y as usize] {
            let node = st.node_of_expert[e];
            for r in node * g..(node + 1) * g {
                if self.on(st, r, e) > 0 {
                    st.gen[r] += 1;
                }
            }
        }
    }

    /// `set_slot` without the generations.
    fn put(&self, st: &mut State, p: usize, y: u32) {
        let x = st.slot[p];
        if x == y {
            return;
        }
        let r = self.rank_of(p);
        let e_n = self.e();
        st.cost += self.loss(st, r, x as usize);
        st.on[r * e_n + x as usize] -= 1;
        st.cnt[x as usize] -= 1;
        st.per[x as usize] = self.w[x as usize] / st.cnt[x as usize] as f64;
        st.cost += self.gain(st, r, y as usize);
        st.on[r * e_n + y as usize] += 1;
        st.cnt[y as usize] += 1;
        st.per[y as usize] = self.w[y as usize] / st.cnt[y as usize] as f64;
        st.slot[p] = y;
    }

    // ----------------------------------------------------------------- repair

    /// Applies moves until the guard holds; false if it gets stuck.
    fn repair(&self, st: &mut State, sorted: &mut Sorted, sc: &mut Scratch) -> bool {
        sc.reset(self.topo, self.spr());
        let mut escalations = 0;
        for _ in 0..2 * self.topo.slots + 16 {
            let ev = sorted.update(&st.load, self.guard);
            if ev.worst <= 0.0 {
                return true;
            }
            if self.step(st, sorted, ev, FOCUS, false, sc)
                || self.step(st, sorted, ev, WIDE_FOCUS, true, sc)
            {
                continue;
            }
            if escalations < MAX_ESCALATIONS && self.escalate(st, sorted, ev, sc) {
                escalations += 1;
                continue;
            }
            return false;
        }
        false
    }

    /// Rank pairs (heavier, lighter) of one node on both sides of a violated
    /// prefix boundary: each node uses the most violated boundary its ranks
    /// straddle, with up to `focus` ranks per side.
    fn pairs(&self, st: &State, sorted: &Sorted, focus: usize, sc: &mut Scratch) {
        let t = self.topo;
        let n = sorted.order.len();
        let g = self.g();
        sc.by_node.clear();
        sc.by_node.resize(n, 0);
        sc.node_fill.clear();
        sc.node_fill.resize(t.nodes, 0);
        for &r in &sorted.order {
            let node = self.node_of(r);
            sc.by_node[node * g + sc.node_fill[node]] = r;
            sc.node_fill[node] += 1;
        }
        sc.node_bound.clear();
        sc.node_bound.resize(t.nodes, (0.0, usize::MAX));
        sc.node_span.clear();
        sc.node_span.extend((0..t.nodes).map(|node| {
            let list = &sc.by_node[node * g..(node + 1) * g];
            (sorted.pos[list[0]], sorted.pos[list[g - 1]])
        }));
        // Violated boundaries in order; per node the first most violated one
        // its ranks straddle (a NaN excess never counts).
        sc.violated.clear();
        sc.violated.extend(
            sorted.exc[..n.saturating_sub(1)]
                .iter()
                .enumerate()
                .filter(|&(_, &v)| v > 0.0)
                .map(|(k, &v)| (k, v)),
        );
        for (bound, &(first, last)) in sc.node_bound.iter_mut().zip(&sc.node_span) {
            let from = sc.violated.partition_point(|&(k, _)| k < first);
            for &(k, v) in sc.violated[from..].iter().take_while(|&&(k, _)| k < last) {
                if v > bound.0 {
                    *bound = (v, k);
                }
            }
        }
        sc.pairs.clear();
        for node in 0..t.nodes {
            let k = sc.node_bound[node].1;
            if k == usize::MAX {
                continue;
            }
            let list = &sc.by_node[node * g..(node + 1) * g];
            let split = list.partition_point(|&r| sorted.pos[r] <= k);
            let (inside, outside) = list.split_at(split);
            for &a in inside.iter().take(focus) {
                for &b in outside.iter().rev().take(focus) {
                    if st.load[a] > st.load[b] {
                        sc.pairs.push((a, b));
                    }
                }
            }
        }
    }

    /// Scores the candidate moves of the pairs exactly and applies the best
    /// one of every node together when that helps (moves that receive nothing
    /// and moves that do are not mixed), else the best one alone. False if no
    /// move helps.
    fn step(
        &self,
        st: &mut State,
        sorted: &mut Sorted,
        ev: Eval,
        focus: usize,
        retarget: bool,
        sc: &mut Scratch,
    ) -> bool {
        self.pairs(st, sorted, focus, sc);
        sc.cands.clear();
        for i in 0..sc.pairs.len() {
            let (a, b) = sc.pairs[i];
            self.pair_candidates(st, a, b, retarget, sc);
        }
        // Each node's best move (ties keep candidate order). Moves that
        // receive nothing rank before all others, so a node's moves that do
        // are scored only when none of the free ones helps.
        let better = |a: (u8, f64), b: (u8, f64)| a.0 < b.0 || (a.0 == b.0 && a.1 < b.1);
        sc.node_best.clear();
        sc.node_best.resize(self.topo.nodes, None);
        let mut from = 0;
        while from < sc.cands.len() {
            // The candidates of one node are consecutive (pairs go by node).
            let node = self.node_of(self.rank_of(sc.cands[from].0.slot()));
            let to = from
                + sc.cands[from..]
                    .iter()
                    .take_while(|c| self.node_of(self.rank_of(c.0.slot())) == node)
                    .count();
            for free in [true, false] {
                for &(m, dc) in &sc.cands[from..to] {
                    if (dc <= 0) != free {
                        continue;
                    }
                    self.move_loads(st, m, &mut sorted.changes);
                    if let Some(key) = self.key(ev.phi - sorted.phi(self.guard), dc) {
                        let cell = &mut sc.node_best[node];
                        if cell.map_or(true, |(k, _)| better(key, k)) {
                            *cell = Some((key, m));
                        }
                    }
                }
                if sc.node_best[node].is_some_and(|(k, _)| k.0 == 0) {
                    break;
                }
            }
            from = to;
        }
        // The best move, plus the best of every other node: moves of
        // different nodes change disjoint ranks, so their load changes simply
        // add up and one evaluation of the sum decides.
        let Some((first_key, first)) =
            sc.node_best
                .iter()
                .flatten()
                .copied()
                .reduce(|a, b| if better(b.0, a.0) { b } else { a })
        else {
            return false;
        };
        sc.batch.clear();
        sc.batch.push(first);
        for &(key, m) in sc.node_best.iter().flatten() {
            if m != first && key.0 == first_key.0 {
                sc.batch.push(m);
            }
        }
        if sc.batch.len() > 1 {
            let mut all = std::mem::take(&mut sorted.changes);
            all.clear();
            let mut dc = 0;
            for &m in &sc.batch {
                self.move_loads(st, m, &mut sc.one);
                all.extend_from_slice(&sc.one);
                dc += self.move_cost(st, m);
            }
            sorted.changes = all;
            let together = self.key(ev.phi - sorted.phi(self.guard), dc);
            if together.is_some_and(|k| k.0 == first_key.0) {
                for i in 0..sc.batch.len() {
                    self.apply(st, sc.batch[i]);
                }
                return true;
            }
        }
        self.apply(st, first);
        true
    }

    /// Ranking key of a move (smaller is better): free moves first, by gain,
    /// then gain per expert received; `None` if it does not help.
    fn key(&self, gain: f64, dc: i64) -> Option<(u8, f64)> {
        if gain <= self.guard.tiny {
            None
        } else if dc <= 0 {
            Some((0, -gain + dc as f64 * self.guard.tiny))
        } else {
            Some((1, -(gain / dc as f64)))
        }
    }

    /// Candidate moves between heavier rank `a` and lighter rank `b` of one
    /// node, with their cost: per kind and cost, the one that best evens out
    /// the pair. Kinds: exchanges; with `retarget`, also a redundant slot of
    /// one rank given to an expert of the other.
    fn pair_candidates(&self, st: &State, a: usize, b: usize, retarget: bool, sc: &mut Scratch) {
        let (la, lb) = (st.load[a], st.load[b]);
        let d = la - lb;
        if d <= 0.0 {
            return;
        }
        // The candidates depend only on the two ranks' slots and their
        // experts' counts (the ranks' generations) and on their loads.
        let g = self.g();
        let gens = (st.gen[a], st.gen[b]);
        let loads = (la.to_bits(), lb.to_bits());
        let slot = (a * g + (b - self.node_of(b) * g)) * 2 + usize::from(retarget);
        let cached = st.local && slot < sc.pair_keys.len();
        if cached {
            let key = sc.pair_keys[slot];
            if key.len != PairKey::EMPTY && key.gens == gens && key.loads == loads {
                let at = slot * 9;
                sc.cands
                    .extend_from_slice(&sc.pair_cands[at..at + key.len as usize]);
                return;
            }
        }
        self.side(st, a, sc);
        self.side(st, b, sc);
        let spr = self.spr();
        let side_a = &sc.side[a * spr..a * spr + sc.side_len[a]];
        let side_b = &sc.side[b * spr..b * spr + sc.side_len[b]];
        // Cost changes of each rank gaining one copy of the other's experts.
        sc.gain_b.clear();
        sc.gain_b
            .extend(side_a.iter().map(|x| self.gain(st, b, x.expert)));
        sc.gain_a.clear();
        sc.gain_a
            .extend(side_b.iter().map(|y| self.gain(st, a, y.expert)));
        // Per kind and cost class (costs <= 0 share class 0): the first move
        // with the smallest score.
        let mut best = Best::default();
        for (i, (xa, &gain_b)) in side_a.iter().zip(&sc.gain_b).enumerate() {
            for (j, (yb, &gain_a)) in side_b.iter().zip(&sc.gain_a).enumerate() {
                if xa.expert == yb.expert {
                    continue;
                }
                // a gives x, takes y.
                let delta = xa.per - yb.per;
                if delta > 0.0 && delta < d {
                    let dc = xa.loss + gain_a + yb.loss + gain_b;
                    best.offer(0, dc, (d - 2.0 * delta).abs(), i, j);
                }
                if !retarget {
                    continue;
                }
                // b's slot (a redundant replica of y) becomes another replica of x.
                if yb.cnt >= 2 {
                    let na = la - xa.shed;
                    let nb = lb - yb.per + xa.grow;
                    best.offer(1, yb.loss + gain_b, (na - nb).abs(), i, j);
                }
                // a's slot (a redundant replica of x) becomes another replica of y.
                if xa.cnt >= 2 {
                    let na = la - xa.per + yb.grow;
                    let nb = lb - yb.shed;
                    best.offer(2, xa.loss + gain_a, (na - nb).abs(), i, j);
                }
            }
        }
        let first = sc.cands.len();
        for kind in 0..3 {
            for class in 0..3 {
                if !best.set[kind][class] {
                    continue;
                }
                let (i, j, dc) = best.at[kind][class];
                let (xa, yb) = (&side_a[i], &side_b[j]);
                let m = match kind {
                    0 => Move::Swap(xa.slot, yb.slot),
                    1 => Move::Retarget(yb.slot, xa.expert as u32),
                    _ => Move::Retarget(xa.slot, yb.expert as u32),
                };
                sc.cands.push((m, dc));
            }
        }
        if cached {
            let len = sc.cands.len() - first;
            let at = slot * 9;
            sc.pair_cands[at..at + len].copy_from_slice(&sc.cands[first..]);
            sc.pair_keys[slot] = PairKey {
                gens,
                loads,
                len: len as u8,
            };
        }
    }

    /// Caches one entry per distinct expert of rank `r` (kept while the
    /// rank's generation is unchanged).
    fn side(&self, st: &State, r: usize, sc: &mut Scratch) {
        let gen = st.gen[r];
        if st.local && sc.side_gen[r] == gen {
            return;
        }
        sc.side_gen[r] = gen;
        let spr = self.spr();
        let mut len = 0;
        let row = &st.slot[r * spr..(r + 1) * spr];
        for (i, &xv) in row.iter().enumerate() {
            if row[..i].contains(&xv) {
                continue;
            }
            let x = xv as usize;
            let (per, on) = (self.per(st, x), self.on(st, r, x));
            let grow = self.w[x] / (st.cnt[x] + 1) as f64;
            sc.side[r * spr + len] = SideItem {
                slot: r * spr + i,
                expert: x,
                per,
                cnt: st.cnt[x],
                loss: self.loss(st, r, x),
                grow,
                shed: on as f64 * (per - grow),
            };
            len += 1;
        }
        sc.side_len[r] = len;
    }

    // ------------------------------------------------------------- escalation

    /// Applies the node re-pack or substitution with the best prefix-excess
    /// reduction per expert received, among nodes whose ranks straddle a
    /// violated prefix boundary; false if none reduces it.
    fn escalate(&self, st: &mut State, sorted: &mut Sorted, ev: Eval, sc: &mut Scratch) -> bool {
        let g = self.g();
        let items = g * self.spr();
        // The failed steps' `pairs` left each node's worst straddled
        // boundary in `node_bound` (the state has not changed since).
        let mut esc = std::mem::take(&mut sc.esc);
        esc.cnt.clear();
        esc.cnt.extend_from_slice(&st.cnt);
        if esc.subst.len() != self.topo.nodes {
            esc.subst = vec![None; self.topo.nodes];
        }
        // (score, node, plan index in `esc.plans`)
        let mut best: Option<(f64, usize, usize)> = None;
        esc.plans.clear();
        for node in 0..self.topo.nodes {
            if sc.node_bound[node].1 == usize::MAX {
                continue;
            }
            let first_plan = esc.plans.len();
            self.plan_repacks(st, node, &mut esc);
            // Stock's placement of the node's groups does not depend on the
            // state: made once per repair.
            if esc.subst[node].is_none() {
                let plan = self.plan_substitute(st, node, &mut sc.assigner);
                esc.subst[node] = Some(plan);
            }
            if let Some(Some(plan)) = &esc.subst[node] {
                if plan[..] != st.slot[node * items..(node + 1) * items] {
                    esc.plans.extend_from_slice(plan);
                }
            }
            let count = (esc.plans.len() - first_plan) / items;
            for k in 0..count {
                let at = first_plan + k * items;
                let dc = self.node_effect(
                    st,
                    node,
                    &esc.plans[at..at + items],
                    &mut esc.cnt,
                    &mut sorted.changes,
                );
                let gain = ev.phi - sorted.phi(self.guard);
                if gain <= self.guard.tiny {
                    continue;
                }
                let score = gain / dc.max(1) as f64;
                if best.as_ref().map_or(true, |(s, _, _)| score > *s) {
                    best = Some((score, node, at));
                }
            }
        }
        let applied = match best {
            Some((_, node, at)) => {
                let base = node * items;
                for i in 0..items {
                    self.set_slot(st, base + i, esc.plans[at + i]);
                }
                self.recompute_loads(st);
                true
            }
            None => false,
        };
        sc.esc = esc;
        applied
    }

    /// Appends to `esc.plans` the node's slots after taking its `m` lightest
    /// replicas out and putting them back heaviest first, each on the
    /// lightest rank with a free slot (at equal load, preferring a rank that
    /// needs no transfer), for `m` = ranks per node, doubling while below the
    /// node's slots. Plans that move nothing are left out.
    fn plan_repacks(&self, st: &State, node: usize, esc: &mut EscBufs) {
        let g = self.g();
        let spr = self.spr();
        let base = node * g * spr;
        let current: &[u32] = &st.slot[base..base + g * spr];
        let per = |i: usize| self.per(st, current[i] as usize);
        // Slots by replica load, lightest first (ties: expert, slot).
        let by_load = &mut esc.by_load;
        by_load.clear();
        by_load.extend(0..current.len());
        by_load.sort_unstable_by(|&p, &q| {
            per(p)
                .total_cmp(&per(q))
                .then(current[p].cmp(&current[q]))
                .then(p.cmp(&q))
        });
        esc.free_of.resize(g, Vec::new());
        let mut m = g;
        while m < current.len() {
            let taken = &by_load[..m];
            let at = esc.plans.len();
            esc.plans.extend_from_slice(current);
            let plan = &mut esc.plans[at..];
            let load = &mut esc.load;
            load.clear();
            load.extend((node * g..(node + 1) * g).map(|r| st.load[r]));
            let free_of = &mut esc.free_of;
            free_of.iter_mut().for_each(|f| f.clear());
            for &i in taken {
                load[i / spr] -= per(i);
                free_of[i / spr].push(i);
            }
            for f in free_of.iter_mut() {
                f.sort_unstable_by(|a, b| b.cmp(a));
            }
            // Heaviest first: `taken` is lightest first.
            for &i in taken.iter().rev() {
                let x = current[i];
                let xr = x as usize;
                let no_transfer = |k: usize| {
                    let r = node * g + k;
                    self.old_has.has(r, xr) || self.on(st, r, xr) > 0
                };
                let pick = (0..g).filter(|&k| !free_of[k].is_empty()).min_by(|&k, &j| {
                    load[k]
                        .total_cmp(&load[j])
                        .then(no_transfer(j).cmp(&no_transfer(k)))
                        .then(k.cmp(&j))
                });
                let Some(k) = pick else { break };
                if let Some(p) = free_of[k].pop() {
                    plan[p] = x;
                    load[k] += per(i);
                }
            }
            if plan[..] == current[..] {
                esc.plans.truncate(at);
            }
            m *= 2;
        }
    }

    /// The node's slots taken from the relabeled stock placement of the same
    /// groups, its ranks matched to this node's old ranks by an exact
    /// assignment. `None` if stock has no node with exactly these groups.
    fn plan_substitute(
        &self,
        st: &State,
        node: usize,
        assigner: &mut Assigner,
    ) -> Option<Vec<u32>> {
        let t = self.topo;
        let g = self.g();
        let spr = self.spr();
        let gs = t.experts_per_group();
        let stock = &self.stock_node_of_group;
        let first = (0..t.groups).find(|&grp| st.node_of_expert[grp * gs] == node)?;
        let m = stock[first];
        if (0..t.groups).any(|grp| (stock[grp] == m) != (st.node_of_expert[grp * gs] == node)) {
            return None;
        }
        let mut cost = vec![0i64; g * g];
        for i in 0..g {
            let src = &self.relabeled[(m * g + i) * spr..(m * g + i + 1) * spr];
            for j in 0..g {
                let r = node * g + j;
                cost[i * g + j] = src
                    .iter()
                    .enumerate()
                    .filter(|&(k, &x)| !src[..k].contains(&x) && !self.old_has.has(r, x))
                    .count() as i64;
            }
        }
        let perm = assigner.assign(&cost, g);
        let mut plan = vec![0u32; g * spr];
        for (i, &j) in perm.iter().enumerate() {
            let src = (m * g + i) * spr;
            for k in 0..spr {
                plan[j * spr + k] = self.relabeled[src + k] as u32;
            }
        }
        Some(plan)
    }

    /// Writes the node ranks' loads under `plan` into `changes`; returns the
    /// plan's cost change. `cnt` holds the state's replica counts and is
    /// back to them on return.
    fn node_effect(
        &self,
        st: &State,
        node: usize,
        plan: &[u32],
        cnt: &mut [u32],
        changes: &mut Vec<(usize, f64)>,
    ) -> i64 {
        let g = self.g();
        let spr = self.spr();
        let base = node * g * spr;
        let current = &st.slot[base..base + g * spr];
        for &x in current {
            cnt[x as usize] -= 1;
        }
        for &x in plan {
            cnt[x as usize] += 1;
        }
        let received = |r: usize, row: &[u32]| {
            row.iter()
                .enumerate()
                .filter(|&(k, &x)| !row[..k].contains(&x) && !self.old_has.has(r, x as usize))
                .count() as i64
        };
        changes.clear();
        let mut dc = 0i64;
        for i in 0..g {
            let r = node * g + i;
            let row = &plan[i * spr..(i + 1) * spr];
            let load = row
                .iter()
                .map(|&x| self.w[x as usize] / cnt[x as usize] as f64)
                .sum();
            changes.push((r, load));
            dc += received(r, row) - received(r, &current[i * spr..(i + 1) * spr]);
        }
        for &x in plan {
            cnt[x as usize] -= 1;
        }
        for &x in current {
            cnt[x as usize] += 1;
        }
        dc
    }

    // ----------------------------------------------------------------- polish

    /// Gives slots back to experts their rank held before wherever the guard
    /// still holds afterwards.
    fn polish(&self, st: &mut State, sorted: &mut Sorted) {
        let t = self.topo;
        let spr = self.spr();
        let g = self.g();
        for _ in 0..POLISH_PASSES {
            let mut improved = false;
            sorted.update(&st.load, self.guard);
            for p in 0..t.slots {
                let a = self.rank_of(p);
                let x = st.slot[p] as usize;
                if self.old_has.has(a, x) {
                    continue;
                }
                let node = self.node_of(a);
                let mut chosen: Option<(Move, i64)> = None;
                // Experts this rank held before (its old slots) and lost since.
                for q in a * spr..(a + 1) * spr {
                    let Ok(y) = usize::try_from(self.old[q]) else {
                        continue;
                    };
                    if y == x || self.on(st, a, y) > 0 || st.node_of_expert[y] != node {
                        continue;
                    }
                    let mut try_move = |m: Move, st: &State, sorted: &mut Sorted| {
                        let dc = self.move_cost(st, m);
                        if dc >= 0 || chosen.is_some_and(|(_, c)| c <= dc) {
                            return;
                        }
                        self.move_loads(st, m, &mut sorted.changes);
                        if sorted.holds(self.guard) {
                            chosen = Some((m, dc));
                        }
                    };
                    if st.cnt[x] >= 2 {
                        try_move(Move::Retarget(p, y as u32), st, sorted);
                    }
                    for r in node * g..(node + 1) * g {
                        if r == a || self.on(st, r, y) == 0 {
                            continue;
                        }
                        if let Some(pb) =
                            (r * spr..(r + 1) * spr).find(|&s| st.slot[s] as usize == y)
                        {
                            try_move(Move::Swap(p, pb), st, sorted);
                        }
                    }
                }
                if let Some((m, _)) = chosen {
                    self.apply(st, m);
                    sorted.update(&st.load, self.guard);
                    improved = true;
                }
            }
            if !improved {
                break;
            }
        }
    }
}
