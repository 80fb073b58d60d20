# Cluster-specific environment for hashrec's sbatch scripts: edit this one file per cluster.
# Sourced by slurm/train.sbatch and slurm/train_cpu.sbatch before launching.

# Environment modules, if the cluster uses them, e.g.:
# module load cuda/12.8 nccl/2.27

# The Python that has hashrec installed (make setup creates .venv in the checkout).
export HASHREC_PYTHON="${HASHREC_PYTHON:-${SLURM_SUBMIT_DIR:-.}/.venv/bin/python}"

# NCCL over InfiniBand / RoCE; adjust the interface names to the cluster's.
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
# export NCCL_SOCKET_IFNAME=ib0
# export NCCL_IB_HCA=mlx5
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"

# From Slurm 22.05 on, srun no longer takes --cpus-per-task from sbatch: without this, each
# srun task (a torchrun with all of a node's ranks) would be given a single CPU.
if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then
  export SRUN_CPUS_PER_TASK="${SRUN_CPUS_PER_TASK:-$SLURM_CPUS_PER_TASK}"
fi

# Threads: not set here. A task's CPUs are shared by the ranks it runs (8 under torchrun on a
# GPU node, 1 under plain srun), which only the ranks know: with trainer.cpu_affinity=auto
# each rank takes its share of the task's CPUs (near its GPU where the node says) and runs
# one intra-op thread per core of it (train/cpu_affinity.py). A lone rank per task uses all
# of the task's CPUs. To choose yourself: trainer.cpu_affinity=none and
# export OMP_NUM_THREADS=<threads per rank>.

# W&B: offline by default (sync later with `wandb sync outputs/slurm-<job>/wandb`).
# export WANDB_API_KEY=...  and pass logger.mode=online
