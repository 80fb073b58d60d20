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

# One intra-op thread pool per rank sized to the CPUs Slurm gave the task.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"

# W&B: offline by default (sync later with `wandb sync outputs/slurm-<job>/wandb`).
# export WANDB_API_KEY=...  and pass logger.mode=online
