//! The planner's contract as executable checks.
//!
//! [`check_plan`] is the single statement of what [`plan_rebalance`] promises
//! for a valid input; [`check_rejection`] states when it may refuse one. Both
//! are used by the property tests (`rust/tests/plan_props.rs`), by the stable
//! replay test (`rust/tests/plan_fuzz_replay.rs`) and, through [`fuzz_one`], by
//! the `cargo fuzz` target in `fuzz/`. Nothing here panics on any input
//! (mismatched shapes and out-of-range indices in a plan are reported as
//! `Err`), so a panic in a fuzz run always points at the planner.

use std::collections::BTreeSet;

use eplb_xfer::plan::{plan_rebalance, PlanError, RankLayerPlan, TransferPlan};

macro_rules! ensure {
    ($cond:expr, $($fmt:tt)+) => {
        if !$cond {
            return Err(format!($($fmt)+));
        }
    };
}

/// How one row of one rank must be filled, derived from `old` / `new` only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RowKind {
    /// `new == -1` or `new == old`: the row keeps its content.
    Unchanged,
    /// The rank holds the expert in `old`; copy from its lowest such row.
    Local { expert: i64, src_row: u32 },
    /// Lowest row of the rank needing an expert it does not hold: received.
    Recv { expert: i64 },
    /// Further row needing the same expert: filled from the received row.
    Dup { expert: i64, src_row: u32 },
}

/// Checks that `plan` is a correct plan of `plan_rebalance(old, new, ...)`.
///
/// This is the planner's whole contract in one place:
///
/// - the inputs are valid (shape, `ep_size > 0` dividing `num_slots`, values
///   `>= -1`, every expert of `new[l]` present in `old[l]`, `nodes` of length
///   `ep_size`): the planner must not accept anything else;
/// - the header matches (`num_layers`, `num_slots`, `ep_size`, `n_local`,
///   one `LayerPlan` per layer, one `RankLayerPlan` per rank) and every row /
///   rank index in the plan is in range;
/// - every row is classified exactly once, as the spec says: rows with
///   `new == -1` or `new == old` are `unchanged`; a row needing an expert the
///   rank holds is a `local_copy` from the rank's lowest row holding it; the
///   lowest row needing an expert the rank does not hold is a `recv` (so each
///   missing expert is received exactly once per rank and layer), and its other
///   rows needing it are `dup_fills` from that row;
/// - a recv reads a peer (never itself) that really holds the expert in `old`,
///   at that peer's lowest row holding it; with `nodes`, a same-node holder is
///   chosen whenever one exists;
/// - sends are exactly the recvs seen from the source side (same
///   `(src_rank, src_row, expert, reader)` set), with non-empty, strictly
///   ascending, in-range readers;
/// - simulating the plan (local copies and recvs into a one-layer buffer, then
///   dup fills from the buffer, then committing `changed_rows`) turns `old`
///   into `new` (with `-1` in `new` keeping the old content);
/// - the ordering contracts of every list hold, `changed_runs` are the
///   maximal runs of `changed_rows`, the `total_*` counters and `rank_layer`
///   agree with the lists;
/// - determinism: planning the same inputs again gives an identical plan.
///
/// Which holder serves which receiver (load balancing, rotation) is not part
/// of this check; `plan_props.rs` compares it with a reference implementation.
pub fn check_plan(
    old: &[i64],
    new: &[i64],
    num_layers: usize,
    num_slots: usize,
    ep_size: usize,
    nodes: Option<&[usize]>,
    plan: &TransferPlan,
) -> Result<(), String> {
    // Inputs: a plan exists only for valid inputs.
    ensure!(ep_size > 0, "plan built for ep_size 0");
    ensure!(num_slots > 0, "plan built for num_slots 0");
    let total = num_layers.checked_mul(num_slots);
    ensure!(
        total == Some(old.len()) && total == Some(new.len()),
        "plan built for a shape mismatch: {num_layers} x {num_slots} vs old {} / new {}",
        old.len(),
        new.len()
    );
    ensure!(
        num_slots % ep_size == 0,
        "plan built although num_slots {num_slots} % ep_size {ep_size} != 0"
    );
    ensure!(
        u32::try_from(num_slots).is_ok(),
        "plan built for num_slots {num_slots} > u32::MAX"
    );
    if let Some(nodes) = nodes {
        ensure!(
            nodes.len() == ep_size,
            "plan built for node_of_rank of length {} with ep_size {ep_size}",
            nodes.len()
        );
    }
    for (array, values) in [("old", old), ("new", new)] {
        if let Some(i) = values.iter().position(|&v| v < -1) {
            return Err(format!(
                "plan built although {array}[{i}] = {} < -1",
                values[i]
            ));
        }
    }
    let n_local = num_slots / ep_size;

    // Header.
    ensure!(
        plan.num_layers == num_layers
            && plan.num_slots == num_slots
            && plan.ep_size == ep_size
            && plan.n_local == n_local,
        "plan header ({}, {}, {}, {}) != inputs ({num_layers}, {num_slots}, {ep_size}, {n_local})",
        plan.num_layers,
        plan.num_slots,
        plan.ep_size,
        plan.n_local
    );
    ensure!(
        plan.layers.len() == num_layers,
        "plan has {} layers, expected {num_layers}",
        plan.layers.len()
    );

    let mut totals = [0usize; 3];
    for (l, lp) in plan.layers.iter().enumerate() {
        let old_l = &old[l * num_slots..(l + 1) * num_slots];
        let new_l = &new[l * num_slots..(l + 1) * num_slots];
        ensure!(
            lp.ranks.len() == ep_size,
            "layer {l}: {} rank plans, expected {ep_size}",
            lp.ranks.len()
        );
        for &e in new_l {
            ensure!(
                e == -1 || old_l.contains(&e),
                "layer {l}: plan built although expert {e} of new is in no slot of old"
            );
        }
        for (r, rp) in lp.ranks.iter().enumerate() {
            check_rank(old_l, new_l, n_local, nodes, l, r, rp)?;
            totals[0] += rp.recvs.len();
            totals[1] += rp.local_copies.len();
            totals[2] += rp.dup_fills.len();
        }
        check_sends(old_l, n_local, ep_size, l, &lp.ranks)?;
        check_simulation(old_l, new_l, n_local, l, &lp.ranks)?;
    }
    ensure!(
        [
            plan.total_recvs(),
            plan.total_local_copies(),
            plan.total_dup_fills()
        ] == totals,
        "total_recvs / total_local_copies / total_dup_fills disagree with the lists"
    );
    if num_layers > 0 {
        ensure!(
            plan.rank_layer(num_layers - 1, ep_size - 1).is_ok(),
            "rank_layer rejects the last (layer, rank)"
        );
    }
    ensure!(
        matches!(
            plan.rank_layer(num_layers, 0),
            Err(PlanError::OutOfRange { what: "layer", .. })
        ),
        "rank_layer accepts layer {num_layers}"
    );
    if num_layers > 0 {
        ensure!(
            matches!(
                plan.rank_layer(0, ep_size),
                Err(PlanError::OutOfRange { what: "rank", .. })
            ),
            "rank_layer accepts rank {ep_size}"
        );
    }

    // Determinism.
    match plan_rebalance(old, new, num_layers, num_slots, ep_size, nodes) {
        Ok(again) => ensure!(&again == plan, "planning the same inputs twice differs"),
        Err(e) => return Err(format!("planning the same inputs again fails: {e}")),
    }
    Ok(())
}

/// Lowest row of `rank` whose `old` value is `e`.
fn lowest_row(old_l: &[i64], n_local: usize, rank: usize, e: i64) -> Option<u32> {
    old_l[rank * n_local..(rank + 1) * n_local]
        .iter()
        .position(|&v| v == e)
        .map(|d| d as u32)
}

/// What every row of rank `r` must be, straight from the spec.
fn expected_rows(old_l: &[i64], new_l: &[i64], n_local: usize, r: usize) -> Vec<RowKind> {
    let base = r * n_local;
    let mut primary: Vec<(i64, u32)> = Vec::new();
    (0..n_local)
        .map(|d| {
            let (o, e) = (old_l[base + d], new_l[base + d]);
            if e == -1 || e == o {
                RowKind::Unchanged
            } else if let Some(src_row) = lowest_row(old_l, n_local, r, e) {
                RowKind::Local { expert: e, src_row }
            } else if let Some(&(_, src_row)) = primary.iter().find(|p| p.0 == e) {
                RowKind::Dup { expert: e, src_row }
            } else {
                primary.push((e, d as u32));
                RowKind::Recv { expert: e }
            }
        })
        .collect()
}

fn check_rank(
    old_l: &[i64],
    new_l: &[i64],
    n_local: usize,
    nodes: Option<&[usize]>,
    l: usize,
    r: usize,
    rp: &RankLayerPlan,
) -> Result<(), String> {
    let ep_size = old_l.len() / n_local;
    let at = |what: &str| format!("layer {l}, rank {r}: {what}");
    let in_rows = |row: u32| (row as usize) < n_local;

    // Index ranges first, so the rest may index freely.
    ensure!(
        rp.unchanged.iter().all(|&d| in_rows(d)),
        "{}",
        at("unchanged row out of range")
    );
    ensure!(
        rp.local_copies
            .iter()
            .all(|c| in_rows(c.src_row) && in_rows(c.dst_row)),
        "{}",
        at("local copy row out of range")
    );
    ensure!(
        rp.recvs
            .iter()
            .all(|v| in_rows(v.src_row) && in_rows(v.dst_row) && (v.src_rank as usize) < ep_size),
        "{}",
        at("recv row or source rank out of range")
    );
    ensure!(
        rp.dup_fills
            .iter()
            .all(|f| in_rows(f.src_row) && in_rows(f.dst_row)),
        "{}",
        at("dup fill row out of range")
    );

    // Ordering contracts.
    ensure!(
        rp.unchanged.windows(2).all(|w| w[0] < w[1]),
        "{}",
        at("unchanged not strictly ascending")
    );
    ensure!(
        rp.local_copies
            .windows(2)
            .all(|w| w[0].dst_row < w[1].dst_row),
        "{}",
        at("local_copies not strictly ascending by dst_row")
    );
    ensure!(
        rp.dup_fills.windows(2).all(|w| w[0].dst_row < w[1].dst_row),
        "{}",
        at("dup_fills not strictly ascending by dst_row")
    );
    ensure!(
        rp.recvs
            .windows(2)
            .all(|w| (w[0].src_rank, w[0].dst_row) < (w[1].src_rank, w[1].dst_row)),
        "{}",
        at("recvs not strictly ascending by (src_rank, dst_row)")
    );

    // Every row classified exactly once, as the spec says.
    let want = expected_rows(old_l, new_l, n_local, r);
    let mut got: Vec<Option<RowKind>> = vec![None; n_local];
    let mut put = |row: u32, kind: RowKind| -> Result<(), String> {
        let slot = &mut got[row as usize];
        ensure!(
            slot.is_none(),
            "layer {l}, rank {r}: row {row} appears twice ({:?} and {kind:?})",
            slot
        );
        *slot = Some(kind);
        Ok(())
    };
    for &d in &rp.unchanged {
        put(d, RowKind::Unchanged)?;
    }
    for c in &rp.local_copies {
        put(
            c.dst_row,
            RowKind::Local {
                expert: c.expert,
                src_row: c.src_row,
            },
        )?;
    }
    for v in &rp.recvs {
        put(v.dst_row, RowKind::Recv { expert: v.expert })?;
    }
    for f in &rp.dup_fills {
        put(
            f.dst_row,
            RowKind::Dup {
                expert: f.expert,
                src_row: f.src_row,
            },
        )?;
    }
    for (d, (w, g)) in want.iter().zip(&got).enumerate() {
        ensure!(
            Some(*w) == *g,
            "layer {l}, rank {r}, row {d} (old {}, new {}): expected {w:?}, plan has {g:?}",
            old_l[r * n_local + d],
            new_l[r * n_local + d]
        );
    }

    // Recv sources: a peer holding the expert, at its lowest row; same node if possible.
    for v in &rp.recvs {
        let s = v.src_rank as usize;
        ensure!(
            s != r,
            "{}",
            at(&format!("expert {} received from itself", v.expert))
        );
        ensure!(
            lowest_row(old_l, n_local, s, v.expert) == Some(v.src_row),
            "layer {l}, rank {r}: recv of expert {} from rank {s} row {}, \
             which is not that rank's lowest row holding it (old there: {})",
            v.expert,
            v.src_row,
            old_l[s * n_local + v.src_row as usize]
        );
        if let Some(nodes) = nodes {
            let same_node_holder = (0..ep_size)
                .any(|h| nodes[h] == nodes[r] && lowest_row(old_l, n_local, h, v.expert).is_some());
            ensure!(
                !same_node_holder || nodes[s] == nodes[r],
                "layer {l}, rank {r}: expert {} read across nodes from rank {s} \
                 although a holder on node {} exists",
                v.expert,
                nodes[r]
            );
        }
    }

    // changed_rows / changed_runs.
    let changed = rp.changed_rows();
    let mut expect_changed: Vec<u32> = want
        .iter()
        .enumerate()
        .filter(|(_, k)| **k != RowKind::Unchanged)
        .map(|(d, _)| d as u32)
        .collect();
    expect_changed.sort_unstable();
    ensure!(changed == expect_changed, "{}", at("changed_rows wrong"));
    let runs = rp.changed_runs();
    ensure!(
        runs.iter().all(|&(_, n)| n > 0),
        "{}",
        at("empty changed run")
    );
    ensure!(
        runs.windows(2)
            .all(|w| u64::from(w[0].0) + u64::from(w[0].1) < u64::from(w[1].0)),
        "{}",
        at("changed runs overlap, touch or are unsorted (not maximal)")
    );
    let from_runs: Vec<u32> = runs.iter().flat_map(|&(s, n)| s..s + n).collect();
    ensure!(
        from_runs == changed,
        "{}",
        at("changed_runs do not cover changed_rows")
    );
    Ok(())
}

/// Sends are the recvs seen from the source side.
fn check_sends(
    old_l: &[i64],
    n_local: usize,
    ep_size: usize,
    l: usize,
    ranks: &[RankLayerPlan],
) -> Result<(), String> {
    let mut recv_set: BTreeSet<(u32, u32, i64, u32)> = BTreeSet::new();
    let mut n_recvs = 0usize;
    for (r, rp) in ranks.iter().enumerate() {
        for v in &rp.recvs {
            recv_set.insert((v.src_rank, v.src_row, v.expert, r as u32));
            n_recvs += 1;
        }
    }
    let mut send_set = BTreeSet::new();
    let mut n_sends = 0usize;
    for (s, rp) in ranks.iter().enumerate() {
        ensure!(
            rp.sends
                .windows(2)
                .all(|w| (w[0].src_row, w[0].expert) < (w[1].src_row, w[1].expert)),
            "layer {l}, rank {s}: sends not strictly ascending by (src_row, expert)"
        );
        for sd in &rp.sends {
            ensure!(
                (sd.src_row as usize) < n_local,
                "layer {l}, rank {s}: send row {} out of range",
                sd.src_row
            );
            ensure!(
                old_l[s * n_local + sd.src_row as usize] == sd.expert,
                "layer {l}, rank {s}: sends expert {} from row {} holding {}",
                sd.expert,
                sd.src_row,
                old_l[s * n_local + sd.src_row as usize]
            );
            ensure!(
                !sd.readers.is_empty(),
                "layer {l}, rank {s}: send of expert {} without readers",
                sd.expert
            );
            ensure!(
                sd.readers.windows(2).all(|w| w[0] < w[1]),
                "layer {l}, rank {s}: readers of expert {} not strictly ascending",
                sd.expert
            );
            for &rd in &sd.readers {
                ensure!(
                    (rd as usize) < ep_size && rd as usize != s,
                    "layer {l}, rank {s}: bad reader {rd} of expert {}",
                    sd.expert
                );
                send_set.insert((s as u32, sd.src_row, sd.expert, rd));
                n_sends += 1;
            }
        }
    }
    ensure!(
        n_sends == n_recvs && send_set == recv_set,
        "layer {l}: sends ({n_sends}) do not match recvs ({n_recvs})"
    );
    Ok(())
}

/// Applies the plan to expert ids and compares with `new`.
fn check_simulation(
    old_l: &[i64],
    new_l: &[i64],
    n_local: usize,
    l: usize,
    ranks: &[RankLayerPlan],
) -> Result<(), String> {
    let mut after = old_l.to_vec();
    for (r, rp) in ranks.iter().enumerate() {
        let base = r * n_local;
        // i64::MIN marks a buffer row nothing was written to.
        let mut buf = vec![i64::MIN; n_local];
        for c in &rp.local_copies {
            let v = old_l[base + c.src_row as usize];
            ensure!(
                v == c.expert,
                "layer {l}, rank {r}: local copy of expert {} from row {} holding {v}",
                c.expert,
                c.src_row
            );
            buf[c.dst_row as usize] = v;
        }
        for v in &rp.recvs {
            let got = old_l[v.src_rank as usize * n_local + v.src_row as usize];
            ensure!(
                got == v.expert,
                "layer {l}, rank {r}: recv of expert {} reads {got}",
                v.expert
            );
            buf[v.dst_row as usize] = got;
        }
        for f in &rp.dup_fills {
            let v = buf[f.src_row as usize];
            ensure!(
                v == f.expert,
                "layer {l}, rank {r}: dup fill of expert {} from buffer row {} holding {v}",
                f.expert,
                f.src_row
            );
            buf[f.dst_row as usize] = v;
        }
        for d in rp.changed_rows() {
            after[base + d as usize] = buf[d as usize];
        }
    }
    for (p, (&a, (&o, &n))) in after.iter().zip(old_l.iter().zip(new_l)).enumerate() {
        let want = if n == -1 { o } else { n };
        ensure!(
            a == want,
            "layer {l}, slot {p}: {a} after applying the plan, expected {want}"
        );
    }
    Ok(())
}

/// Checks that `err` is a true statement about the inputs it was returned for.
///
/// Together with [`check_plan`] (which requires valid inputs) this pins down
/// the other half of the contract: the planner rejects exactly the invalid
/// inputs, and the error it gives names a real defect (right array, layer,
/// slot and value).
pub fn check_rejection(
    old: &[i64],
    new: &[i64],
    num_layers: usize,
    num_slots: usize,
    ep_size: usize,
    nodes: Option<&[usize]>,
    err: &PlanError,
) -> Result<(), String> {
    let bogus = || Err(format!("unjustified error: {err} ({err:?})"));
    let justified = match *err {
        PlanError::ZeroEpSize => ep_size == 0,
        PlanError::ZeroSlots => num_slots == 0,
        PlanError::ShapeMismatch {
            num_layers: nl,
            num_slots: ns,
            old_len,
            new_len,
        } => {
            let total = num_layers.checked_mul(num_slots);
            (nl, ns, old_len, new_len) == (num_layers, num_slots, old.len(), new.len())
                && (total != Some(old.len()) || total != Some(new.len()))
        }
        PlanError::SlotsNotDivisible {
            num_slots: ns,
            ep_size: ep,
        } => (ns, ep) == (num_slots, ep_size) && ep > 0 && ns % ep != 0,
        PlanError::InvalidExpert {
            array,
            layer,
            slot,
            value,
        } => {
            let values = match array {
                "old_indices" => Some(old),
                "new_indices" => Some(new),
                _ => None,
            };
            slot < num_slots
                && value < -1
                && values
                    .and_then(|v| v.get(layer.checked_mul(num_slots)?.checked_add(slot)?))
                    .is_some_and(|&v| v == value)
        }
        PlanError::MissingSource {
            layer,
            expert,
            slot,
        } => {
            let start = layer.checked_mul(num_slots);
            let old_l = start.and_then(|s| old.get(s..s.checked_add(num_slots)?));
            slot < num_slots
                && expert >= 0
                && start
                    .and_then(|s| new.get(s.checked_add(slot)?))
                    .is_some_and(|&v| v == expert)
                && old_l.is_some_and(|o| !o.contains(&expert))
        }
        PlanError::NodeOfRankLen { len, ep_size: ep } => {
            ep == ep_size && nodes.is_some_and(|n| n.len() == len && len != ep_size)
        }
        PlanError::OutOfRange { what, value, .. } => {
            what == "num_slots" && value == num_slots && u32::try_from(num_slots).is_err()
        }
    };
    if justified {
        Ok(())
    } else {
        bogus()
    }
}

/// Reads bytes; past the end it yields zeros, so every input decodes.
struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn byte(&mut self) -> u8 {
        let b = self.data.get(self.pos).copied().unwrap_or(0);
        self.pos = self.pos.saturating_add(1);
        b
    }

    fn u64(&mut self) -> u64 {
        let mut a = [0u8; 8];
        for x in &mut a {
            *x = self.byte();
        }
        u64::from_le_bytes(a)
    }
}

/// One decoded fuzz input: the arguments of `plan_rebalance`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FuzzCase {
    pub old: Vec<i64>,
    pub new: Vec<i64>,
    pub num_layers: usize,
    pub num_slots: usize,
    pub ep_size: usize,
    pub nodes: Option<Vec<usize>>,
}

/// Decodes raw fuzzer bytes into planner inputs (every byte string decodes).
///
/// Layout: 6 header bytes, then one byte (or 8 in raw mode) per value.
///
/// - `b[0] % 5` layers (0..=4), `b[1] % 17` ep_size (0..=16, 0 included);
/// - `b[2]`: slots: with flag bit 0 clear `ep * (1 + b % (64 / ep))` (a
///   multiple of ep, <= 64), else `b % 65` (often not divisible, 0 possible);
/// - `b[3]` flags: bit 0 see above; bit 1 node_of_rank present; bit 2 its
///   length off by one; bit 3 shape / size perturbation (next byte picks: old
///   one shorter, new one longer, `num_layers = usize::MAX`, or zero layers
///   with a huge `num_slots`); bits 4-5 value mode of `old` (small ids;
///   small ids plus invalid values < -1 and `i64::MIN`; huge sparse ids up to
///   `i64::MAX`; raw little-endian i64); bit 6 `new` independent of `old`
///   (same mode, so experts are often missing) instead of picked from
///   `old[l]` / kept / emptied; bit 7 `new` gets one random value overwritten;
/// - `b[4]`: `1 + b % 64` distinct experts in small modes;
/// - `b[5]`: number of nodes `1 + b % 4`.
pub fn decode(data: &[u8]) -> FuzzCase {
    let mut rd = Reader { data, pos: 0 };
    let num_layers = usize::from(rd.byte() % 5);
    let ep_size = usize::from(rd.byte() % 17);
    let slots_byte = usize::from(rd.byte());
    let flags = rd.byte();
    let experts = 1 + i64::from(rd.byte() % 64);
    let n_nodes = 1 + usize::from(rd.byte() % 4);
    let num_slots = if flags & 1 == 0 && ep_size > 0 {
        ep_size * (1 + slots_byte % (64 / ep_size).max(1))
    } else {
        slots_byte % 65
    };
    let total = num_layers * num_slots;
    let old_mode = (flags >> 4) & 3;

    let value = |rd: &mut Reader<'_>, mode: u8| -> i64 {
        let b = rd.byte();
        let small = i64::from(b) % (experts + 1) - 1; // -1..experts
        match mode {
            0 => small,
            1 => match b {
                0xff => i64::MIN,
                0xfe => -2,
                _ => i64::from(b) % (experts + 3) - 3, // -3..experts
            },
            2 => match small {
                -1 => -1,
                e if e == experts - 1 => i64::MAX,
                e => (1i64 << 40) + e * 1000,
            },
            _ => {
                let raw = (u64::from(b) | (rd.u64() << 8)) as i64;
                // Keep raw values often valid (>= -1) but not always.
                if b & 1 == 0 {
                    raw.max(-1)
                } else {
                    raw
                }
            }
        }
    };

    let mut old = Vec::with_capacity(total);
    for _ in 0..total {
        old.push(value(&mut rd, old_mode));
    }
    let mut new = Vec::with_capacity(total);
    if flags & 0x40 != 0 {
        for _ in 0..total {
            new.push(value(&mut rd, old_mode));
        }
    } else if num_slots > 0 {
        for l in 0..num_layers {
            for s in 0..num_slots {
                let b = usize::from(rd.byte());
                new.push(match b % 8 {
                    0 => -1,
                    1 | 2 => old[l * num_slots + s],
                    _ => old[l * num_slots + (b / 8) % num_slots],
                });
            }
        }
    }
    if flags & 0x80 != 0 && !new.is_empty() {
        let at = usize::from(rd.byte()) % new.len();
        new[at] = value(&mut rd, 1);
    }

    let (mut num_layers, mut num_slots) = (num_layers, num_slots);
    if flags & 8 != 0 {
        match rd.byte() % 4 {
            0 => {
                old.pop();
            }
            1 => new.push(0),
            2 => num_layers = usize::MAX,
            _ => {
                // Zero layers: empty arrays are the right shape for any num_slots.
                old.clear();
                new.clear();
                num_layers = 0;
                num_slots = match rd.byte() % 4 {
                    0 => usize::MAX,
                    1 => u32::MAX as usize,
                    2 => 1 << 31,
                    _ => (rd.u64() % (1 << 33)) as usize,
                };
            }
        }
    }

    let nodes = if flags & 2 != 0 {
        let len = if flags & 4 != 0 {
            if rd.byte() & 1 == 0 {
                ep_size + 1
            } else {
                ep_size.saturating_sub(1)
            }
        } else {
            ep_size
        };
        Some((0..len).map(|_| usize::from(rd.byte()) % n_nodes).collect())
    } else {
        None
    };

    FuzzCase {
        old,
        new,
        num_layers,
        num_slots,
        ep_size,
        nodes,
    }
}

/// One fuzz iteration: decode `data`, plan it, check the outcome.
///
/// `Ok(())` when the planner either built a plan that satisfies
/// [`check_plan`] or returned an error that [`check_rejection`] confirms.
/// A panic inside the planner propagates (the fuzzer reports it as a crash).
pub fn fuzz_one(data: &[u8]) -> Result<(), String> {
    let c = decode(data);
    let nodes = c.nodes.as_deref();
    let res = plan_rebalance(&c.old, &c.new, c.num_layers, c.num_slots, c.ep_size, nodes);
    let out = match &res {
        Ok(plan) => check_plan(
            &c.old,
            &c.new,
            c.num_layers,
            c.num_slots,
            c.ep_size,
            nodes,
            plan,
        ),
        Err(e) => check_rejection(
            &c.old,
            &c.new,
            c.num_layers,
            c.num_slots,
            c.ep_size,
            nodes,
            e,
        ),
    };
    out.map_err(|m| {
        format!(
            "{m}\n  layers {} slots {} ep {} nodes {:?}\n  old {:?}\n  new {:?}",
            c.num_layers, c.num_slots, c.ep_size, c.nodes, c.old, c.new
        )
    })
}

/// splitmix64: a tiny deterministic generator for test placements, shared by
/// the property tests, the fuzz replay test and the criterion bench.
#[derive(Debug, Clone)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    /// The next 64 pseudo-random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform-ish in `0..n` (`n > 0`; returns 0 for `n == 0`).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            return 0;
        }
        (self.next_u64() % n as u64) as usize
    }

    /// Fisher-Yates shuffle.
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i + 1);
            v.swap(i, j);
        }
    }
}
