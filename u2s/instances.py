"""Cloud instance types the cluster configs name: size, GPUs, price, and what Kubernetes lets a pod ask for.

One table for ``u2s plan`` (prices, GPUs and CPUs per node) and for the checks that every pod in
``cluster/kuberay`` fits its node (``tests/test_cluster_configs.py``; the figures are tabulated in
``cluster/README.md``, "Node sizing"). A pod schedules only when its requests fit the node's *allocatable*
less what the node's DaemonSets request; allocatable is the node's capacity less kubelet's reservations.
The reservations follow the EKS AMI's bootstrap (AL2023 ``nodeadm``; Karpenter computes the same):

* kube-reserved CPU: 6% of the first core, 1% of the second, 0.5% of cores 3-4, 0.25% of every core above 4;
* kube-reserved memory: 255 MiB + 11 MiB per pod the node may run (``max_pods``);
* eviction threshold: 100 MiB of memory; 10% of the root volume (``nodefs.available``), plus 1 GiB of it
  kube-reserved.

Assumptions, each a named constant below: the memory a node reports as capacity
(:data:`MEMORY_CAPACITY_FRACTION`, Karpenter's estimate, which decides whether Karpenter launches a node for
a pod at all), the DaemonSets and their requests (:data:`DAEMONSETS`), ``max_pods`` (the VPC CNI's
ENI-based default, the largest value the AMI may reserve for) and the image's size on disk
(:data:`IMAGE_DISK_GIB`). Compare with ``kubectl describe node`` on your cluster and adjust. Prices are
approximate on-demand list prices (AWS us-east-1, late 2025); spot is typically 50-70% lower.
"""

from __future__ import annotations

from dataclasses import dataclass

MIB = 1 / 1024  # GiB per MiB

#: Share of nominal memory counted as the node's capacity. Karpenter subtracts 7.5%
#: (``VM_MEMORY_OVERHEAD_PERCENT``, its default) before it knows a node's real capacity, and launches a node
#: for a pod only if the pod fits that estimate; booted EC2 nodes report 93-97%, so this is the binding one.
MEMORY_CAPACITY_FRACTION = 1 - 0.075
#: Memory kubelet keeps free before it evicts pods (EKS default ``evictionHard: memory.available<100Mi``).
EVICTION_GIB = 100 * MIB
#: Root-volume share kubelet keeps free (``nodefs.available<10%``) and the GiB it reserves for itself.
NODEFS_EVICTION_FRACTION = 0.10
KUBE_RESERVED_EPHEMERAL_GIB = 1.0
#: The u2s image unpacked on a node's disk (CUDA torch, vLLM, Ray; assumed): images share the root volume
#: with pods' ephemeral storage, and kubelet evicts pods when the volume fills, whoever filled it.
IMAGE_DISK_GIB = 40.0


@dataclass(frozen=True)
class DaemonSet:
    """A per-node agent's requests: CPU cores and GiB. ``gpu_only``: runs on GPU nodes only."""

    name: str
    cpu: float
    memory_gib: float
    gpu_only: bool = False


#: Agents assumed on every node of an EKS cluster running u2s (requests as their charts set them; assumed).
DAEMONSETS: tuple[DaemonSet, ...] = (
    DaemonSet("aws-node (VPC CNI)", 0.025, 0.0),
    DaemonSet("kube-proxy", 0.100, 0.0),
    DaemonSet("ebs-csi-node", 0.030, 120 * MIB),
    DaemonSet("eks-pod-identity-agent", 0.025, 0.0),
    DaemonSet("fluent-bit (logs to CloudWatch/S3)", 0.100, 200 * MIB),
    DaemonSet("node-exporter (Prometheus)", 0.100, 180 * MIB),
    DaemonSet("nvidia-device-plugin", 0.050, 100 * MIB, gpu_only=True),
    DaemonSet("dcgm-exporter (GPU metrics)", 0.100, 512 * MIB, gpu_only=True),
)


@dataclass(frozen=True)
class InstanceType:
    """One instance type: vCPUs, nominal memory (GiB), GPUs and their kind, on-demand $/hour, pod limit.

    ``max_pods``: the pods kubelet may run, which sizes its memory reservation (the VPC CNI's ENI-based
    default; a node configured for fewer, e.g. ``maxPods: 110``, reserves less). ``nvme_gib``: local
    instance-store NVMe (0: none), usable as node-local cache (``instanceStorePolicy: RAID0``)."""

    name: str
    vcpus: int
    memory_gib: float
    usd_per_hour: float
    gpus: int = 0
    gpu: str | None = None  # Ray's accelerator type name (H100, L40S...)
    max_pods: int = 110
    nvme_gib: int = 0

    @property
    def usd_per_gpu_hour(self) -> float:
        return self.usd_per_hour / self.gpus if self.gpus else 0.0

    def kube_reserved_cpu(self) -> float:
        """Cores kubelet reserves (the EKS AMI's formula)."""
        steps = ((1, 0.06), (1, 0.01), (2, 0.005), (self.vcpus, 0.0025))
        left, reserved = self.vcpus, 0.0
        for cores, share in steps:
            take = min(left, cores)
            reserved += take * share
            left -= take
        return reserved

    def kube_reserved_memory_gib(self) -> float:
        return (255 + 11 * self.max_pods) * MIB

    def allocatable(self) -> tuple[float, float]:
        """(cores, GiB) Kubernetes reports as allocatable on a node of this type."""
        memory = self.memory_gib * MEMORY_CAPACITY_FRACTION - self.kube_reserved_memory_gib() - EVICTION_GIB
        return self.vcpus - self.kube_reserved_cpu(), memory

    def daemonset_requests(self) -> tuple[float, float]:
        """(cores, GiB) the assumed DaemonSets request on a node of this type."""
        mine = [d for d in DAEMONSETS if self.gpus or not d.gpu_only]
        return sum(d.cpu for d in mine), sum(d.memory_gib for d in mine)

    def pod_room(self) -> tuple[float, float]:
        """(cores, GiB) left for one workload pod: allocatable less the DaemonSets' requests."""
        (cpu, memory), (ds_cpu, ds_memory) = self.allocatable(), self.daemonset_requests()
        return cpu - ds_cpu, memory - ds_memory


def ephemeral_room(root_volume_gib: float) -> float:
    """GiB of ``ephemeral-storage`` a pod may request on a root volume of this size and stay clear of
    disk-pressure eviction: the volume less kubelet's reservation, its eviction threshold and the image."""
    return root_volume_gib * (1 - NODEFS_EVICTION_FRACTION) - KUBE_RESERVED_EPHEMERAL_GIB - IMAGE_DISK_GIB


#: The instance types the configs in ``cluster/`` name, and the nearest alternatives. p5.4xlarge is
#: priced as an eighth of p5.48xlarge (no single-GPU list price was published when this was written); its
#: ``max_pods`` is assumed (the 16-vCPU types' 234), and 250 (the VPC CNI's cap) for the 8-GPU types.
INSTANCE_TYPES: dict[str, InstanceType] = {
    t.name: t
    for t in (
        InstanceType("m6i.2xlarge", 8, 32, 0.384, max_pods=58),
        InstanceType("m6i.4xlarge", 16, 64, 0.768, max_pods=234),
        InstanceType("m6i.8xlarge", 32, 128, 1.536, max_pods=234),
        InstanceType("p5.4xlarge", 16, 256, 6.88, gpus=1, gpu="H100", max_pods=234, nvme_gib=3800),
        InstanceType("p5.48xlarge", 192, 2048, 55.04, gpus=8, gpu="H100", max_pods=250, nvme_gib=30400),
        InstanceType("p5en.48xlarge", 192, 2048, 63.30, gpus=8, gpu="H200", max_pods=250, nvme_gib=30400),
        InstanceType("p4de.24xlarge", 96, 1152, 27.447, gpus=8, gpu="A100", max_pods=250, nvme_gib=7600),
        InstanceType("g6e.xlarge", 4, 32, 1.861, gpus=1, gpu="L40S", max_pods=58, nvme_gib=250),
        InstanceType("g6e.2xlarge", 8, 64, 2.242, gpus=1, gpu="L40S", max_pods=58, nvme_gib=450),
        InstanceType("g6e.4xlarge", 16, 128, 3.004, gpus=1, gpu="L40S", max_pods=234, nvme_gib=600),
        InstanceType("g6.2xlarge", 8, 32, 0.978, gpus=1, gpu="L4", max_pods=58, nvme_gib=450),
    )
}


def instance_type(name: str) -> InstanceType:
    """The table's entry for ``name``; a clear error naming the known ones otherwise."""
    try:
        return INSTANCE_TYPES[name]
    except KeyError:
        known = ", ".join(sorted(INSTANCE_TYPES))
        raise ValueError(f"unknown instance type {name!r} (known: {known})") from None
