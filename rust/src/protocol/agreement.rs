//! Failure agreement: every surviving rank derives the same outcome for a
//! failed exchange.
//!
//! Synchronous flooding with early stopping. In round `r` a rank sends its
//! [`Knowledge`] to every rank not known dead and waits (at most one round
//! timeout) for round-`r` knowledge from each of them; ranks that stay silent
//! are added to `dead`. Knowledge only grows (a union), so ranks converge. A
//! rank decides at the end of a round in which it heard from exactly the
//! ranks it heard from in the round before (round 0 = everyone): nobody it
//! counted on failed, so everyone it heard from holds the same knowledge. A
//! decided rank tells the others (`decided`), and they adopt its knowledge;
//! it answers late messages the same way. Each failure during the agreement
//! costs at most one more round, so a rank decides within
//! `(2 + failures) * round_timeout`.

use std::collections::BTreeMap;

use super::knowledge::Knowledge;
use super::ranks::RankSet;
use super::wire::{Msg, Resolve};
use super::Time;

/// One agreement instance (one exchange) at one rank.
#[derive(Debug, Clone)]
pub(crate) struct Agreement {
    pub seq: u64,
    me: u32,
    round: u32,
    round_end: Time,
    round_timeout: Time,
    pub k: Knowledge,
    /// `heard[r]`: ranks whose round-`r` knowledge arrived (this rank included).
    heard: BTreeMap<u32, RankSet>,
    pub decided: Option<Knowledge>,
    /// A decision was adopted from a peer and has been passed on once.
    relayed: bool,
    /// The session has acted on the decision.
    pub applied: bool,
}

impl Agreement {
    /// Joins the agreement with this rank's own knowledge; returns the round-1
    /// messages to send.
    pub fn start(
        seq: u64,
        me: u32,
        now: Time,
        round_timeout: Time,
        k: Knowledge,
        out: &mut Vec<(u32, Vec<u8>)>,
    ) -> Agreement {
        let world = k.world();
        let mut heard = BTreeMap::new();
        heard.insert(0, RankSet::full(world));
        let mut mine = RankSet::new(world);
        mine.insert(me);
        heard.insert(1, mine);
        let a = Agreement {
            seq,
            me,
            round: 1,
            round_end: now.saturating_add(round_timeout),
            round_timeout,
            k,
            heard,
            decided: None,
            relayed: false,
            applied: false,
        };
        a.broadcast(false, &a.k, out);
        a
    }

    /// When this instance next needs [`Agreement::poll`], if undecided.
    pub fn next_timeout(&self) -> Option<Time> {
        self.decided.is_none().then_some(self.round_end)
    }

    /// Handles a peer's round message.
    pub fn handle(&mut self, now: Time, from: u32, msg: &Resolve, out: &mut Vec<(u32, Vec<u8>)>) {
        if let Some(final_k) = &self.decided {
            if !msg.decided {
                // A late or slow rank: hand it the decision.
                out.push((from, self.encode(self.round + 1, true, final_k)));
            }
            return;
        }
        if msg.decided {
            let k = msg.knowledge.clone();
            self.decided = Some(k.clone());
            if !self.relayed {
                // Pass the decision on once, in case its sender died mid-broadcast.
                self.relayed = true;
                self.broadcast(true, &k, out);
            }
            return;
        }
        self.k.merge(&msg.knowledge);
        let world = self.k.world();
        self.heard
            .entry(msg.round)
            .or_insert_with(|| RankSet::new(world))
            .insert(from);
        self.poll(now, out);
    }

    /// Ends rounds that are complete or timed out; may decide.
    pub fn poll(&mut self, now: Time, out: &mut Vec<(u32, Vec<u8>)>) {
        let world = self.k.world();
        while self.decided.is_none() {
            let mut waiting = RankSet::full(world);
            for d in self.k.dead.iter() {
                waiting.remove(d);
            }
            let heard = self
                .heard
                .entry(self.round)
                .or_insert_with(|| RankSet::new(world))
                .clone();
            if !heard.is_superset(&waiting) && now < self.round_end {
                return;
            }
            for r in waiting.iter().filter(|&r| !heard.contains(r)) {
                self.k.dead.insert(r);
            }
            let before = self
                .heard
                .get(&(self.round - 1))
                .cloned()
                .unwrap_or_else(|| RankSet::full(world));
            if heard == before {
                let k = self.k.clone();
                self.broadcast(true, &k, out);
                self.decided = Some(k);
                return;
            }
            self.round += 1;
            self.round_end = now.saturating_add(self.round_timeout);
            self.heard
                .entry(self.round)
                .or_insert_with(|| RankSet::new(world))
                .insert(self.me);
            let k = self.k.clone();
            self.broadcast(false, &k, out);
        }
    }

    fn encode(&self, round: u32, decided: bool, k: &Knowledge) -> Vec<u8> {
        Msg::Resolve(Resolve {
            seq: self.seq,
            round,
            decided,
            knowledge: k.clone(),
        })
        .encode()
    }

    fn broadcast(&self, decided: bool, k: &Knowledge, out: &mut Vec<(u32, Vec<u8>)>) {
        let round = if decided { self.round + 1 } else { self.round };
        let bytes = self.encode(round, decided, k);
        for p in 0..k.world() {
            if p != self.me && !k.dead.contains(p) {
                out.push((p, bytes.clone()));
            }
        }
    }
}
