//! Asymmetric logical unit access (SPC-4 §5.15), implicit ALUA only (TPGS = 01b).
//!
//! Every node of a volume is one target port group with one target port. [`PortGroups`] is
//! shared (`Arc`) between the LU and whoever drives path state (the mirror engine): it
//! updates a group's state, the generation counter moves, and the LU posts unit attention
//! `ASYMMETRIC ACCESS STATE CHANGED` (2A/06) to every I_T nexus on its next command.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::RwLock;

use super::cdb::{maint_in, service_action, Opcode};
use super::sense::{asc, ScsiError, SenseKey};

/// Asymmetric access state (SPC-4 §6.27, table 176: the code in RTPG's byte 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum AluaState {
    ActiveOptimized,
    ActiveNonOptimized,
    Standby,
    Unavailable,
    Transitioning,
}

impl AluaState {
    /// ASYMMETRIC ACCESS STATE field value.
    pub fn code(self) -> u8 {
        match self {
            AluaState::ActiveOptimized => 0x0,
            AluaState::ActiveNonOptimized => 0x1,
            AluaState::Standby => 0x2,
            AluaState::Unavailable => 0x3,
            AluaState::Transitioning => 0xf,
        }
    }
}

/// One target port group: one node's path to the volume.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PortGroup {
    pub id: u16,
    pub relative_ports: Vec<u16>,
    pub state: AluaState,
    /// PREF bit in RTPG.
    pub preferred: bool,
}

/// All target port groups of the volume, with their states.
#[derive(Debug)]
pub struct PortGroups {
    groups: RwLock<Vec<PortGroup>>,
    generation: AtomicU64,
}

impl Default for PortGroups {
    /// One group (id 1, relative port 1), Active/Optimized.
    fn default() -> Self {
        PortGroups::single(1, 1)
    }
}

impl PortGroups {
    pub fn new(groups: Vec<PortGroup>) -> Self {
        PortGroups {
            groups: RwLock::new(groups),
            generation: AtomicU64::new(0),
        }
    }

    /// A single Active/Optimized group.
    pub fn single(tpg_id: u16, relative_port: u16) -> Self {
        PortGroups::new(vec![PortGroup {
            id: tpg_id,
            relative_ports: vec![relative_port],
            state: AluaState::ActiveOptimized,
            preferred: false,
        }])
    }

    /// Snapshot of all groups.
    pub fn groups(&self) -> Vec<PortGroup> {
        match self.groups.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Replace the group list; bumps the generation if anything changed.
    pub fn set_groups(&self, new: Vec<PortGroup>) {
        let mut g = match self.groups.write() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if *g != new {
            *g = new;
            self.generation.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Set one group's state (adding the group if unknown). Returns whether it changed.
    pub fn set_state(&self, tpg_id: u16, state: AluaState) -> bool {
        let mut g = match self.groups.write() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let changed = match g.iter_mut().find(|x| x.id == tpg_id) {
            Some(x) if x.state == state => false,
            Some(x) => {
                x.state = state;
                true
            }
            None => {
                g.push(PortGroup {
                    id: tpg_id,
                    relative_ports: Vec::new(),
                    state,
                    preferred: false,
                });
                true
            }
        };
        if changed {
            self.generation.fetch_add(1, Ordering::SeqCst);
        }
        changed
    }

    pub fn state_of(&self, tpg_id: u16) -> Option<AluaState> {
        self.groups()
            .iter()
            .find(|g| g.id == tpg_id)
            .map(|g| g.state)
    }

    /// Moves on every state change; the LU compares it to post 2A/06.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// May `cdb` run through target port group `tpg_id` in its current state?
    /// SPC-4 §5.15.2.4.4–6 (Standby, Unavailable, Transitioning) list the commands still
    /// allowed; everything else is NOT READY with the state's ASC.
    pub fn check_access(&self, tpg_id: u16, cdb: &[u8]) -> Result<(), ScsiError> {
        // An unknown group is treated as Active/Optimized: identity comes from config.
        let state = self.state_of(tpg_id).unwrap_or(AluaState::ActiveOptimized);
        check_state(state, cdb)
    }
}

/// The access rule for one state.
pub fn check_state(state: AluaState, cdb: &[u8]) -> Result<(), ScsiError> {
    let op = Opcode::from_u8(cdb.first().copied().unwrap_or(0));
    let rtpg =
        op == Opcode::MaintenanceIn && service_action(cdb) == maint_in::REPORT_TARGET_PORT_GROUPS;
    let always = matches!(
        op,
        Opcode::Inquiry | Opcode::ReportLuns | Opcode::RequestSense
    ) || rtpg;
    let (allowed, code) = match state {
        AluaState::ActiveOptimized | AluaState::ActiveNonOptimized => return Ok(()),
        // §5.15.2.4.4: also MODE SENSE/SELECT, PR IN/OUT, MAINTENANCE IN/OUT.
        AluaState::Standby => (
            always
                || matches!(
                    op,
                    Opcode::ModeSense6
                        | Opcode::ModeSense10
                        | Opcode::ModeSelect6
                        | Opcode::ModeSelect10
                        | Opcode::PersistentReserveIn
                        | Opcode::PersistentReserveOut
                        | Opcode::MaintenanceIn
                        | Opcode::MaintenanceOut
                ),
            asc::ALUA_STANDBY,
        ),
        // §5.15.2.4.5: also MAINTENANCE IN/OUT (REPORT SUPPORTED OPCODES, SET TPG).
        AluaState::Unavailable => (
            always || matches!(op, Opcode::MaintenanceIn | Opcode::MaintenanceOut),
            asc::ALUA_UNAVAILABLE,
        ),
        AluaState::Transitioning => (always, asc::ALUA_TRANSITIONING),
    };
    if allowed {
        Ok(())
    } else {
        Err(ScsiError::check(SenseKey::NotReady, code))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const READ10: [u8; 10] = [0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0];
    const TUR: [u8; 6] = [0; 6];
    const INQ: [u8; 6] = [0x12, 0, 0, 0, 36, 0];
    const RTPG: [u8; 12] = [0xa3, 0x0a, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0];

    #[test]
    fn unavailable_blocks_io_but_not_discovery() {
        let e = check_state(AluaState::Unavailable, &READ10).unwrap_err();
        assert_eq!(e, ScsiError::check(SenseKey::NotReady, (0x04, 0x0c)));
        assert!(check_state(AluaState::Unavailable, &TUR).is_err());
        assert!(check_state(AluaState::Unavailable, &INQ).is_ok());
        assert!(check_state(AluaState::Unavailable, &RTPG).is_ok());
    }

    #[test]
    fn transitioning_is_04_0a() {
        let e = check_state(AluaState::Transitioning, &READ10).unwrap_err();
        assert_eq!(e, ScsiError::check(SenseKey::NotReady, (0x04, 0x0a)));
        assert!(check_state(AluaState::Transitioning, &RTPG).is_ok());
    }

    #[test]
    fn generation_moves_only_on_change() {
        let pg = PortGroups::single(1, 1);
        let g0 = pg.generation();
        assert!(!pg.set_state(1, AluaState::ActiveOptimized));
        assert_eq!(pg.generation(), g0);
        assert!(pg.set_state(1, AluaState::Unavailable));
        assert_eq!(pg.generation(), g0 + 1);
        assert!(pg.check_access(1, &READ10).is_err());
        assert!(pg.check_access(1, &INQ).is_ok());
    }
}
