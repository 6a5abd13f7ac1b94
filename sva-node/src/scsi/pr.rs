//! Persistent reservations and SCSI-2 RESERVE/RELEASE.
// STUB: replaced by the pr branch

use super::sense::{Asc, ScsiError};
use super::NexusId;

#[derive(Debug, Clone, Default)]
pub struct Reservations {}

#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct PrSnapshot {}

#[derive(Debug, Clone, Default)]
pub struct PrOutcome {
    pub unit_attentions: Vec<(NexusId, Asc)>,
    pub persist: bool,
}

impl Reservations {
    pub fn new() -> Self {
        Reservations {}
    }
    pub fn conflicts(&self, _nexus: &NexusId, _cdb: &[u8]) -> bool {
        false
    }
    pub fn persistent_reserve_in(
        &self,
        _nexus: &NexusId,
        _cdb: &[u8],
    ) -> Result<Vec<u8>, ScsiError> {
        Err(ScsiError::invalid_opcode())
    }
    pub fn persistent_reserve_out(
        &mut self,
        _nexus: &NexusId,
        _cdb: &[u8],
        _params: &[u8],
    ) -> Result<PrOutcome, ScsiError> {
        Err(ScsiError::invalid_opcode())
    }
    pub fn reserve(&mut self, _nexus: &NexusId, _cdb: &[u8]) -> Result<(), ScsiError> {
        Ok(())
    }
    pub fn release(&mut self, _nexus: &NexusId, _cdb: &[u8]) -> Result<(), ScsiError> {
        Ok(())
    }
    pub fn nexus_lost(&mut self, _nexus: &NexusId) {}
    pub fn reset(&mut self) {}
    pub fn snapshot(&self) -> PrSnapshot {
        PrSnapshot {}
    }
    pub fn restore(_s: PrSnapshot) -> Self {
        Reservations {}
    }
}
