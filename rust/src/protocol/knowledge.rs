//! What the survivors of a failed exchange know, and the verdict they derive.
//!
//! [`Knowledge`] is a join-semilattice: merging only ever adds facts, so ranks
//! that exchange it in rounds (see `agreement`) converge, and every rank that
//! decides on the same knowledge derives the same [`Verdict`]: whether the
//! exchange may be committed and which rank is named as the culprit.

use super::ranks::RankSet;

/// Why a rank gave up on an exchange on its own (not because a peer told it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AbortCode {
    /// Waited past the deadline (liveness; the culprit comes from `blocked_on`).
    Deadline = 1,
    /// Data read from / written by the culprit failed verification.
    Checksum = 2,
    /// Peers disagree on the exchange (placement fingerprint, layer, rows).
    Disagreement = 3,
    /// The caller was interrupted (Ctrl-C); the culprit is the reporter.
    Interrupted = 4,
    /// The caller failed after validation; the culprit is the reporter.
    LocalError = 5,
    /// The communicator was closed during the exchange.
    Closed = 6,
    /// A transfer or message to the culprit failed in the transport.
    Transport = 7,
}

impl AbortCode {
    pub fn from_u8(v: u8) -> Option<AbortCode> {
        Some(match v {
            1 => AbortCode::Deadline,
            2 => AbortCode::Checksum,
            3 => AbortCode::Disagreement,
            4 => AbortCode::Interrupted,
            5 => AbortCode::LocalError,
            6 => AbortCode::Closed,
            7 => AbortCode::Transport,
            _ => return None,
        })
    }

    /// A verdict about a rank's data or intent (not about its liveness).
    fn is_verdict(self) -> bool {
        matches!(
            self,
            AbortCode::Checksum
                | AbortCode::Interrupted
                | AbortCode::LocalError
                | AbortCode::Closed
        )
    }
}

/// What a rank was waiting for when it gave up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Waiting {
    /// A peer's READY (the peer had not entered the exchange).
    Ready = 1,
    /// A transfer with the peer (a READ from it, or its WRITE into us).
    Transfer = 2,
    /// A peer's DONE.
    Done = 3,
    /// This rank's own caller (e.g. verification never finished).
    Caller = 4,
}

impl Waiting {
    pub fn from_u8(v: u8) -> Option<Waiting> {
        Some(match v {
            1 => Waiting::Ready,
            2 => Waiting::Transfer,
            3 => Waiting::Done,
            4 => Waiting::Caller,
            _ => return None,
        })
    }
}

/// A rank's own account of an exchange, frozen when it joins the agreement.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Report {
    /// The rank's caller had begun the exchange.
    pub entered: bool,
    /// Its placement fingerprint for the exchange (if it had entered).
    pub fingerprint: Option<u64>,
    /// Whom it was waiting for, and for what.
    pub blocked_on: Option<(u32, Waiting)>,
    /// Why it gave up on its own, naming a culprit.
    pub accuse: Option<(AbortCode, u32)>,
}

/// Facts about one exchange, merged by union.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Knowledge {
    /// Some rank committed the exchange (it had every DONE, or proof of it).
    pub committed: bool,
    /// Ranks known to have said DONE (their incoming data had landed).
    pub done: RankSet,
    /// Ranks that did not answer a round of the agreement.
    pub dead: RankSet,
    /// Ranks that closed their communicator (said BYE): gone, but not failed.
    pub left: RankSet,
    /// `reports[r]`: rank r's own report (only r writes it).
    pub reports: Vec<Option<Report>>,
}

/// Why the culprit was named.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blame {
    /// It stopped answering (died, hung, or its link is down).
    Dead,
    /// A rank's verdict (checksum, interrupt, local error, close).
    Verdict(AbortCode),
    /// Its placement fingerprint differs from the others'.
    Disagreement,
    /// It had not begun the exchange before the others' deadline.
    Absent,
    /// Waiting chains end at it (it was slow).
    Stalled(Waiting),
    /// A transport failure involving it.
    Transport,
}

/// The outcome every rank derives from the same knowledge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    /// Every rank's incoming data had landed: the exchange may be committed.
    pub commit: bool,
    pub culprit: u32,
    pub blame: Blame,
}

impl Knowledge {
    pub fn new(world: u32) -> Knowledge {
        Knowledge {
            committed: false,
            done: RankSet::new(world),
            dead: RankSet::new(world),
            left: RankSet::new(world),
            reports: vec![None; world as usize],
        }
    }

    pub fn world(&self) -> u32 {
        self.done.world()
    }

    /// Adds `other`'s facts; reports are single-writer, so the first one kept wins.
    pub fn merge(&mut self, other: &Knowledge) {
        self.committed |= other.committed;
        self.done.union_with(&other.done);
        self.dead.union_with(&other.dead);
        self.left.union_with(&other.left);
        for (mine, theirs) in self.reports.iter_mut().zip(&other.reports) {
            if mine.is_none() {
                mine.clone_from(theirs);
            }
        }
    }

    /// The deterministic outcome (see [`Verdict`]). Culprit order: the lowest
    /// rank that stopped answering without saying goodbye; else the lowest rank named by a verdict;
    /// else the lowest rank whose fingerprint differs from the plurality's;
    /// else the lowest rank that never began; else the end of the lowest
    /// waiting chain; else the lowest rank named by a transport failure.
    pub fn verdict(&self) -> Verdict {
        let world = self.world();
        let commit = self.committed || self.done.len() == world as usize;
        let (culprit, blame) = self.culprit();
        Verdict {
            commit,
            culprit: culprit.min(world.saturating_sub(1)),
            blame,
        }
    }

    fn culprit(&self) -> (u32, Blame) {
        if let Some(d) = self.dead.iter().find(|&r| !self.left.contains(r)) {
            return (d, Blame::Dead);
        }
        let reports = || {
            self.reports
                .iter()
                .enumerate()
                .filter_map(|(r, p)| p.as_ref().map(|p| (r as u32, p)))
        };
        if let Some((code, c)) = reports()
            .filter_map(|(_, p)| p.accuse)
            .filter(|(code, _)| code.is_verdict())
            .min_by_key(|&(code, c)| (c, code))
        {
            return (c, Blame::Verdict(code));
        }
        if let Some(r) = self.fingerprint_outlier() {
            return (r, Blame::Disagreement);
        }
        if let Some(c) = reports()
            .filter_map(|(_, p)| p.accuse)
            .filter(|(code, _)| *code == AbortCode::Disagreement)
            .map(|(_, c)| c)
            .min()
        {
            return (c, Blame::Disagreement);
        }
        if let Some((r, _)) = reports().find(|(_, p)| !p.entered) {
            return (r, Blame::Absent);
        }
        if let Some((start, _)) = reports().find(|(_, p)| p.blocked_on.is_some()) {
            return self.chain_end(start);
        }
        if let Some(c) = reports()
            .filter_map(|(_, p)| p.accuse)
            .map(|(_, c)| c)
            .min()
        {
            return (c, Blame::Transport);
        }
        if let Some(l) = self.left.min() {
            return (l, Blame::Verdict(AbortCode::Closed));
        }
        (0, Blame::Transport)
    }

    /// The lowest rank whose fingerprint is not the most common one (ties:
    /// the smaller value wins), if fingerprints differ.
    fn fingerprint_outlier(&self) -> Option<u32> {
        let fps: Vec<(u32, u64)> = self
            .reports
            .iter()
            .enumerate()
            .filter_map(|(r, p)| p.as_ref()?.fingerprint.map(|f| (r as u32, f)))
            .collect();
        let mut values: Vec<u64> = fps.iter().map(|&(_, f)| f).collect();
        values.sort_unstable();
        let mut best: Option<(usize, u64)> = None;
        let mut i = 0;
        while i < values.len() {
            let j = values[i..].iter().take_while(|&&v| v == values[i]).count();
            if best.map_or(true, |(n, _)| j > n) {
                best = Some((j, values[i]));
            }
            i += j;
        }
        let (_, common) = best?;
        fps.iter().find(|&&(_, f)| f != common).map(|&(r, _)| r)
    }

    /// Follows `blocked_on` from `start` to a rank that waits for nobody (or
    /// for itself / its caller), or to the lowest rank of a cycle.
    fn chain_end(&self, start: u32) -> (u32, Blame) {
        let world = self.world();
        let mut seen = RankSet::new(world);
        let mut cur = start;
        let mut why = Waiting::Ready;
        for _ in 0..=world {
            seen.insert(cur);
            let next = self
                .reports
                .get(cur as usize)
                .and_then(|p| p.as_ref())
                .and_then(|p| p.blocked_on);
            match next {
                Some((n, w)) if n != cur && w != Waiting::Caller => {
                    why = w;
                    if seen.contains(n) {
                        // a cycle: name its lowest rank
                        let mut low = n;
                        let mut c = n;
                        for _ in 0..=world {
                            low = low.min(c);
                            match self
                                .reports
                                .get(c as usize)
                                .and_then(|p| p.as_ref())
                                .and_then(|p| p.blocked_on)
                            {
                                Some((m, _)) if m != n => c = m,
                                _ => break,
                            }
                        }
                        return (low, Blame::Stalled(why));
                    }
                    cur = n;
                }
                Some((_, w)) => return (cur, Blame::Stalled(w)),
                None => return (cur, Blame::Stalled(why)),
            }
        }
        (cur, Blame::Stalled(why))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(entered: bool, fp: u64, blocked: Option<(u32, Waiting)>) -> Option<Report> {
        Some(Report {
            entered,
            fingerprint: entered.then_some(fp),
            blocked_on: blocked,
            accuse: None,
        })
    }

    #[test]
    fn commit_needs_every_done_or_a_commit() {
        let mut k = Knowledge::new(3);
        k.done.insert(0);
        k.done.insert(2);
        assert!(!k.verdict().commit);
        k.done.insert(1);
        assert!(k.verdict().commit);
        let mut k2 = Knowledge::new(3);
        k2.committed = true;
        assert!(k2.verdict().commit);
    }

    #[test]
    fn culprit_order() {
        let mut k = Knowledge::new(4);
        k.reports[0] = report(true, 7, Some((1, Waiting::Done)));
        k.reports[1] = report(true, 7, Some((3, Waiting::Transfer)));
        k.reports[3] = report(true, 7, None);
        k.reports[2] = report(true, 7, Some((0, Waiting::Done)));
        // chain 2 -> 0 -> 1 -> 3 (waits for nobody)
        assert_eq!(k.verdict().culprit, 3);
        k.reports[3] = report(false, 7, None);
        assert_eq!(k.verdict().blame, Blame::Absent);
        k.reports[2] = report(true, 9, None);
        assert_eq!(
            (k.verdict().culprit, k.verdict().blame),
            (2, Blame::Disagreement)
        );
        k.reports[1].as_mut().unwrap().accuse = Some((AbortCode::Checksum, 3));
        assert_eq!(k.verdict().blame, Blame::Verdict(AbortCode::Checksum));
        k.dead.insert(2);
        k.dead.insert(1);
        assert_eq!((k.verdict().culprit, k.verdict().blame), (1, Blame::Dead));
    }

    #[test]
    fn waiting_cycles_name_their_lowest_rank() {
        let mut k = Knowledge::new(3);
        k.reports[2] = report(true, 1, Some((1, Waiting::Transfer)));
        k.reports[1] = report(true, 1, Some((2, Waiting::Done)));
        k.reports[0] = report(true, 1, Some((2, Waiting::Done)));
        assert_eq!(k.verdict().culprit, 1);
    }

    #[test]
    fn merge_is_a_union_and_keeps_first_reports() {
        let mut a = Knowledge::new(2);
        let mut b = Knowledge::new(2);
        a.done.insert(0);
        b.dead.insert(1);
        b.reports[1] = report(true, 3, None);
        a.merge(&b);
        assert!(a.done.contains(0) && a.dead.contains(1) && a.reports[1].is_some());
        let before = a.clone();
        a.merge(&before);
        assert_eq!(a, before);
    }
}
