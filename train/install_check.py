"""Does this venv fit this node? Checked at job start, before any process group exists.

A venv is usually built once, on a login node, and run on compute nodes. ``make setup`` there
picks fbgemm-gpu-cpu and (from some indexes) a CPU build of torch, and a GPU node would then
train on its CPUs over gloo without a word. The check below fails instead, with one line that
names the evidence and the command that fixes it.

The decision, ``install_problem``, is a pure function of what was seen (tested exhaustively);
``seen_on_this_node`` gathers those facts (torch, importlib.metadata, ``nvidia-smi -L``,
``/dev/nvidia0``, ``CUDA_VISIBLE_DEVICES``).

Escape hatch: ``HASHREC_ALLOW_CPU_ON_GPU_NODE=1`` trains on the CPUs (gloo) even where GPUs
are visible, for a deliberate CPU job on a GPU node.

Also a command, for ``make setup`` to verify what pip installed:
``python -m train.install_check --expect cuda|cpu``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass

CUDA_PACKAGE = "fbgemm-gpu"
CPU_PACKAGE = "fbgemm-gpu-cpu"
ALLOW_CPU_VARIABLE = "HASHREC_ALLOW_CPU_ON_GPU_NODE"
# CUDA_VISIBLE_DEVICES values that hide every GPU on purpose (Slurm sets NoDevFiles on
# nodes without GPU files for the job).
HIDDEN_GPU_VALUES = ("", "-1", "NoDevFiles")


@dataclass(frozen=True)
class InstallFacts:
    """What a rank sees of its node and its venv."""

    # Why we believe GPUs are visible (e.g. "nvidia-smi -L lists 8 GPUs"); None = no sign.
    gpu_evidence: str | None
    # torch.__version__, e.g. "2.13.0+cpu".
    torch_version: str
    # torch.version.cuda: the CUDA version torch was built for; None = a CPU build.
    torch_cuda: str | None
    # torch.cuda.is_available(): the build, the driver and a GPU all agree.
    cuda_usable: bool
    # Installed fbgemm distributions among fbgemm-gpu and fbgemm-gpu-cpu.
    fbgemm_packages: tuple[str, ...]
    # HASHREC_ALLOW_CPU_ON_GPU_NODE=1: train on the CPUs even where GPUs are visible.
    allow_cpu: bool = False


def use_cuda(facts: InstallFacts) -> bool:
    """Whether the job trains on GPUs (nccl) rather than CPUs (gloo)."""
    return facts.cuda_usable and not facts.allow_cpu


def install_problem(facts: InstallFacts) -> str | None:
    """One line saying what is wrong with this venv on this node and which command fixes it,
    or None when the job can start."""
    gpus = facts.gpu_evidence
    accel = "cuda" if gpus else "cpu"
    rebuild = f"rebuild the venv with `make setup ACCEL={accel}`"
    torch_build = (
        f"torch {facts.torch_version} (CUDA {facts.torch_cuda})"
        if facts.torch_cuda
        else f"torch {facts.torch_version} (a CPU build)"
    )
    packages = facts.fbgemm_packages
    if not packages:
        return f"fbgemm is not installed in {sys.prefix}: {rebuild}"
    if len(packages) > 1:
        return (
            f"both {CUDA_PACKAGE} and {CPU_PACKAGE} are installed in {sys.prefix} (they write the "
            f"same files): {rebuild}"
        )
    fbgemm = packages[0]
    if fbgemm == CUDA_PACKAGE and not facts.torch_cuda:
        # The CUDA fbgemm cannot even load against a CPU torch.
        return f"{CUDA_PACKAGE} (the CUDA package) is installed with {torch_build}: {rebuild}"
    if not gpus or facts.allow_cpu:
        return None
    escape = f"or set {ALLOW_CPU_VARIABLE}=1 to train on the CPUs"
    if not facts.torch_cuda:
        return (
            f"GPUs are visible ({gpus}) but this venv has {torch_build}, so the job would train "
            f"on the CPUs: {rebuild} (a venv built where nvidia-smi is missing, such as a login "
            f"node, gets the CPU packages), {escape}"
        )
    if not facts.cuda_usable:
        return (
            f"GPUs are visible ({gpus}) but {torch_build} cannot use them "
            f"(torch.cuda.is_available() is False): the driver may be older than CUDA "
            f"{facts.torch_cuda} needs; build the venv for the driver's CUDA with `make setup "
            f"ACCEL=cuda TORCH_INDEX_URL=<PyTorch's wheel index for that CUDA>`, {escape}"
        )
    if fbgemm == CPU_PACKAGE:
        return (
            f"torch can use the GPUs ({gpus}) but fbgemm is {CPU_PACKAGE}, which has no CUDA "
            f"kernels: {rebuild}, {escape}"
        )
    return None


def gpu_evidence(
    torch_gpu_count: int,
    cuda_visible_devices: str | None,
    nvidia_smi_gpu_count: int | None,
    dev_nvidia0_exists: bool,
) -> str | None:
    """Why we believe this process can see GPUs, or None.

    ``nvidia_smi_gpu_count`` is None where nvidia-smi is missing or failed. When nvidia-smi
    answers, its count decides: a CPU job on a GPU node still has /dev/nvidia* files, but
    Slurm's device cgroup hides the GPUs from nvidia-smi.
    """
    if torch_gpu_count > 0:
        return f"torch.cuda sees {torch_gpu_count} GPU(s)"
    if cuda_visible_devices is not None and cuda_visible_devices.strip() in HIDDEN_GPU_VALUES:
        return None
    if nvidia_smi_gpu_count is not None:
        if nvidia_smi_gpu_count == 0:
            return None
        return f"nvidia-smi -L lists {nvidia_smi_gpu_count} GPU(s)"
    if dev_nvidia0_exists:
        return "/dev/nvidia0 exists"
    if cuda_visible_devices is not None:
        return f"CUDA_VISIBLE_DEVICES={cuda_visible_devices}"
    return None


def _nvidia_smi_gpu_count() -> int | None:
    """GPUs that ``nvidia-smi -L`` lists; None without nvidia-smi or when it fails."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        listing = subprocess.run(
            ["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if listing.returncode != 0:
        # "No devices were found" exits non-zero: a node (or a job) without GPUs.
        return 0 if "No devices were found" in listing.stdout + listing.stderr else None
    return sum(line.startswith("GPU ") for line in listing.stdout.splitlines())


def installed_fbgemm_packages() -> tuple[str, ...]:
    found = []
    for name in (CUDA_PACKAGE, CPU_PACKAGE):
        try:
            importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        found.append(name)
    return tuple(found)


def seen_on_this_node(environ: dict[str, str] | None = None) -> InstallFacts:
    """The facts ``install_problem`` decides on, read from this process and its node."""
    import torch

    environ = os.environ if environ is None else environ
    cuda_usable = torch.cuda.is_available()
    torch_gpu_count = torch.cuda.device_count() if cuda_usable else 0
    # Only where torch sees no GPU is it worth asking the node (nvidia-smi takes ~0.1-1 s).
    evidence = gpu_evidence(
        torch_gpu_count,
        environ.get("CUDA_VISIBLE_DEVICES"),
        None if torch_gpu_count else _nvidia_smi_gpu_count(),
        os.path.exists("/dev/nvidia0"),
    )
    return InstallFacts(
        gpu_evidence=evidence,
        torch_version=torch.__version__,
        torch_cuda=torch.version.cuda,
        cuda_usable=cuda_usable,
        fbgemm_packages=installed_fbgemm_packages(),
        allow_cpu=environ.get(ALLOW_CPU_VARIABLE, "") not in ("", "0"),
    )


def stop_if_unfit() -> None:
    """For ``python -m train`` to call before it imports torchrec: where the venv does not fit
    the node, print the one line and exit 2. (A CUDA fbgemm with a CPU torch fails already
    when torchrec imports fbgemm_gpu, with a traceback; init_distributed's own check comes too
    late for that case.)"""
    problem = install_problem(seen_on_this_node())
    if problem:
        print(f"hashrec: error: {problem}", file=sys.stderr)
        raise SystemExit(2)


def installed_for(
    accel: str, torch_cuda: str | None, fbgemm_packages: tuple[str, ...]
) -> str | None:
    """What ``make setup ACCEL=<accel>`` should have installed but did not; None when it did."""
    wanted = CUDA_PACKAGE if accel == "cuda" else CPU_PACKAGE
    if fbgemm_packages != (wanted,):
        found = " and ".join(fbgemm_packages) or "no fbgemm"
        return f"ACCEL={accel} wants {wanted} alone but the venv has {found}"
    if accel == "cuda" and not torch_cuda:
        return (
            "ACCEL=cuda installed a CPU build of torch: the package index offered a CPU wheel "
            "(pip prefers a local +cpu wheel where one is on offer); name an index that has "
            "CUDA builds, e.g. `make setup ACCEL=cuda "
            "TORCH_INDEX_URL=<PyTorch's wheel index for CUDA 13.0>`"
        )
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--expect", choices=("cuda", "cpu"), required=True,
                        help="the ACCEL that `make setup` installed for")
    args = parser.parse_args()
    import torch

    problem = installed_for(args.expect, torch.version.cuda, installed_fbgemm_packages())
    if problem:
        print(f"hashrec: error: {problem}", file=sys.stderr)
        raise SystemExit(1)
    built = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU"
    print(f"hashrec: installed torch {torch.__version__} ({built} build) with "
          f"{installed_fbgemm_packages()[0]} for ACCEL={args.expect}")


if __name__ == "__main__":
    main()
