//! Data-parallel training over MPI (`--features mpi`; OpenMPI or MPICH): `mpirun -n N lowrank
//! train …` runs N ranks that split every global batch (lowrank_train::parallel). Across hosts,
//! give mpirun a hostfile; every rank reads the same data, model and (on resume) checkpoint
//! paths, so put them on storage every host sees, or copy them to the same place on each.

use lowrank_train::parallel::Collective;
use mpi::traits::*;

pub struct Mpi {
    // Finalizes MPI when dropped, after the world communicator.
    world: mpi::topology::SimpleCommunicator,
    _universe: mpi::environment::Universe,
}

impl Mpi {
    /// Join the job when started by an MPI launcher (its environment says so); `None` for a
    /// plain process, which then trains alone exactly as without MPI.
    pub fn init() -> Option<Mpi> {
        super::mpi_world_size()?;
        let universe = mpi::initialize()?;
        let world = universe.world();
        Some(Mpi {
            world,
            _universe: universe,
        })
    }

    /// What stops every rank of the job (after an error on this one, the others would wait
    /// for it forever in the next gradient exchange); usable after `self` moved on.
    pub fn abort_handle() -> fn(i32) -> ! {
        |code| mpi::topology::SimpleCommunicator::world().abort(code)
    }
}

impl Collective for Mpi {
    fn rank(&self) -> usize {
        self.world.rank() as usize
    }
    fn size(&self) -> usize {
        self.world.size() as usize
    }
    fn all_gather_f32(&self, mine: &[f32]) -> Vec<f32> {
        let mut all = vec![0f32; mine.len() * self.size()];
        self.world.all_gather_into(mine, &mut all[..]);
        all
    }
    fn all_gather_u64(&self, mine: &[u64]) -> Vec<u64> {
        let mut all = vec![0u64; mine.len() * self.size()];
        self.world.all_gather_into(mine, &mut all[..]);
        all
    }
}
