"""Real multi-process Ray clusters for tests: `ray start --head`, optionally with Ray's fake autoscaler.

:class:`RayHead` starts a head node the way a user does (``ray start --head``), on free ports and in its
own temp dir, so it never collides with another cluster on the machine. With ``autoscaling`` it runs
Ray's fake multi-node provider (``fake_multinode``: the provider Ray's own autoscaler tests use, as
``ray.cluster_utils.AutoscalingCluster`` does): the autoscaler launches worker nodes of the configured
types as extra raylets on this machine. :class:`FakeNodeProvider` gives each such node a runtime-env
directory of its own, as a machine of its own would have, and :meth:`RayHead.kill_node` takes one away
the way a spot interruption does.

``ray stop`` (and ``AutoscalingCluster``, which calls ``ray stop --force``) ends *every* Ray process on
the machine, other users' clusters included. :meth:`RayHead.stop` instead ends only this cluster's
processes: each one inherits a marker environment variable from the ``ray start`` that spawned it
(raylets, GCS, dashboard, autoscaler, the fake provider's worker nodes, workers and job drivers), and
stop() signals exactly the processes that carry this cluster's marker.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from ray.autoscaler._private.fake_multi_node.node_provider import FakeMultiNodeProvider

#: Environment variable whose value tags every process of one cluster.
MARKER = "U2S_TEST_RAY_CLUSTER"

#: The fake provider's cluster config, without node types. The ray wheel lacks
#: `ray/autoscaler/_private/fake_multi_node/example.yaml`, which AutoscalingCluster reads; these are the
#: keys of that file in Ray's repository, with Ray's ``fake_multinode`` provider type replaced by
#: :class:`FakeNodeProvider` (an ``external`` provider the autoscaler imports from this module).
FAKE_PROVIDER_CONFIG: dict[str, Any] = {
    "cluster_name": "fake_multinode",
    "max_workers": 8,
    "provider": {"type": "external", "module": f"{__name__}.FakeNodeProvider", "use_node_id_as_ip": True,
                 "disable_node_updaters": True, "disable_launch_config_check": True},
    "head_node_type": "ray.head.default",
    "auth": {}, "upscaling_speed": 1.0, "idle_timeout_minutes": 0.25, "docker": {},
    "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
    "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
    "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
    "rsync_exclude": [], "rsync_filter": [],
}  # fmt: skip
HEAD_NODE_TYPE = "ray.head.default"


class FakeNodeProvider(FakeMultiNodeProvider):
    """Ray's fake multi-node provider, with two things a cloud's nodes have and Ray's fake ones lack.

    * A disk of their own. Ray's fake nodes share the head's session directory, so they would also share
      the folder the runtime-env agents unpack a job's ``working_dir`` into; the agent of a node that
      joins mid-run removes and unpacks that folder again (Ray overwrites it), and the workers of every
      other node lose their current directory (``os.getcwd()`` fails, actor constructors that call it
      die). Here each node gets its own ``runtime_resources_<id>``.
    * An end. A cloud reports an instance that went away (a spot interruption) as terminated, and the
      autoscaler launches a replacement if work still asks for one. Ray's fake provider keeps listing a
      node whose raylet is gone, and the autoscaler never removes it: fake nodes keep the
      ``uninitialized`` status that its liveness check skips, and a dead node stays "needed" for as long
      as Ray Data's resource requests fit it, so no replacement could start past the type's
      ``max_workers``. Here a node whose raylet exited is dropped from the listing, as terminated.
    """

    def non_terminated_nodes(self, tag_filters):
        from ray._private.ray_constants import PROCESS_TYPE_RAYLET

        with self.lock:
            for node_id, node in list(self._nodes.items()):
                ray_node = node.get("node")  # the head's entry has none: that node is not ours
                if ray_node is not None and any(
                    kind == PROCESS_TYPE_RAYLET for kind, _ in ray_node.dead_processes()
                ):
                    del self._nodes[node_id]
                    self._terminate_node(node)  # whatever processes the node has left
            return super().non_terminated_nodes(tag_filters)

    def _create_node_with_resources_and_labels(self, node_config, tags, count, resources, labels):
        import ray._private.parameter

        with self.lock:  # the node id the base class gives the node it is about to create
            name = f"runtime_resources_{self._next_node_id + 1:05d}"
            ray_params = ray._private.parameter.RayParams

            def own_runtime_env_dir(*args: Any, **kwargs: Any) -> Any:
                return ray_params(*args, **{"runtime_env_dir_name": name, **kwargs})

            ray._private.parameter.RayParams = own_runtime_env_dir
            try:
                super()._create_node_with_resources_and_labels(node_config, tags, count, resources, labels)
            finally:
                ray._private.parameter.RayParams = ray_params


def _running(proc: Any) -> bool:
    import psutil

    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_executable() -> str:
    """The `ray` CLI of the running interpreter's environment."""
    return shutil.which("ray", path=os.path.dirname(sys.executable)) or "ray"


def autoscaling_config(
    head_resources: dict[str, float],
    worker_node_types: dict[str, dict[str, Any]],
    gcs_address: str,
    idle_timeout_minutes: float = 0.25,
    max_workers: int = 8,
) -> dict[str, Any]:
    """A fake-multinode autoscaler config: head of ``head_resources``, the given worker node types
    (``{name: {resources, min_workers, max_workers, node_config}}``), worker nodes joining ``gcs_address``."""
    config = copy.deepcopy(FAKE_PROVIDER_CONFIG)
    config["provider"]["gcs_address"] = gcs_address
    config["available_node_types"] = {
        **copy.deepcopy(worker_node_types),
        HEAD_NODE_TYPE: {"resources": dict(head_resources), "node_config": {}, "max_workers": 0},
    }
    config.update(idle_timeout_minutes=idle_timeout_minutes, max_workers=max_workers)
    return config


class RayHead:
    """A Ray head node started with ``ray start --head``; a context manager that stops only its own processes.

    ``num_cpus=0`` gives a head that runs no work (the cluster configs' head); ``worker_node_types`` turns
    on Ray's fake autoscaler with those node types (Ray's launcher format), all at ``min_workers`` at start.
    """

    def __init__(
        self,
        num_cpus: int = 1,
        num_gpus: int = 0,
        resources: dict[str, float] | None = None,
        worker_node_types: dict[str, dict[str, Any]] | None = None,
        idle_timeout_minutes: float = 0.25,
        object_store_memory: int = 256 * 2**20,
        env: dict[str, str] | None = None,
    ) -> None:
        self.num_cpus, self.num_gpus, self.resources = num_cpus, num_gpus, dict(resources or {})
        self.worker_node_types = worker_node_types
        self.idle_timeout_minutes = idle_timeout_minutes
        self.object_store_memory = object_store_memory
        self.extra_env = dict(env or {})
        self.token = uuid.uuid4().hex
        # Short: Ray puts Unix sockets under it (path length limit ~107 bytes).
        self.temp_dir = Path(tempfile.mkdtemp(prefix="u2s-ray-", dir="/tmp"))
        self.port, self.dashboard_port = free_port(), free_port()
        self.node_ip = "127.0.0.1"

    @property
    def gcs_address(self) -> str:
        return f"{self.node_ip}:{self.port}"

    @property
    def dashboard_url(self) -> str:
        """The Job Submission / state API address."""
        return f"http://{self.node_ip}:{self.dashboard_port}"

    def env(self) -> dict[str, str]:
        env = {**os.environ, **self.extra_env, MARKER: self.token}
        env.setdefault("RAY_AUTH_MODE", "disabled")  # Ray 2.60's token auth: off for a throwaway cluster
        env.pop("RAY_ADDRESS", None)
        # Job entrypoints run `python ...`: this interpreter's environment first on PATH.
        env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
        if self.worker_node_types is not None:
            env.update(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1")
        return env

    def start(self) -> RayHead:
        cmd = [
            ray_executable(), "start", "--head", "--disable-usage-stats",
            f"--node-ip-address={self.node_ip}", f"--port={self.port}", f"--temp-dir={self.temp_dir}",
            "--include-dashboard=true", f"--dashboard-host={self.node_ip}",
            f"--dashboard-port={self.dashboard_port}", f"--dashboard-agent-listen-port={free_port()}",
            f"--ray-client-server-port={free_port()}", f"--num-cpus={self.num_cpus}",
            f"--num-gpus={self.num_gpus}", f"--object-store-memory={self.object_store_memory}",
        ]  # fmt: skip
        if self.resources:
            cmd.append(f"--resources={json.dumps(self.resources)}")
        if self.worker_node_types is not None:
            head = {"CPU": self.num_cpus, "GPU": self.num_gpus, **self.resources}
            config = autoscaling_config(
                head, self.worker_node_types, self.gcs_address, self.idle_timeout_minutes
            )
            path = self.temp_dir / "autoscaling.json"
            path.write_text(json.dumps(config))
            cmd.append(f"--autoscaling-config={path}")
        try:
            subprocess.run(cmd, env=self.env(), check=True, capture_output=True, text=True, timeout=180)
        except subprocess.CalledProcessError as e:
            self.stop()
            raise RuntimeError(f"ray start failed ({e.returncode}):\n{e.stdout}\n{e.stderr}") from None
        self.wait_for_dashboard()
        return self

    def wait_for_dashboard(self, timeout: float = 120) -> None:
        """Block until the Job Submission API answers (the dashboard starts after `ray start` returns)."""
        import httpx

        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.dashboard_url}/api/version", timeout=5).status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"the dashboard at {self.dashboard_url} did not answer in {timeout} s")
            time.sleep(1)

    def processes(self) -> list[Any]:
        """This cluster's live processes (those carrying its marker)."""
        import psutil

        found = []
        for proc in psutil.process_iter():
            with contextlib.suppress(psutil.Error):
                if proc.environ().get(MARKER) == self.token:
                    found.append(proc)
        return found

    def node_processes(self, node_id: str) -> list[Any]:
        """The live processes of one of this cluster's worker nodes (hex ``node_id``): its raylet and all
        the raylet started (agents, workers). What else the fake provider started for the node (its log
        monitor) ends when the provider finds the raylet gone (:class:`FakeNodeProvider`)."""
        import psutil

        found: list[Any] = []
        for proc in self.processes():
            with contextlib.suppress(psutil.Error):
                if proc.name() == "raylet" and f"--node_id={node_id}" in proc.cmdline():
                    found += [proc, *proc.children(recursive=True)]
        return found

    def autoscaler_log(self) -> str:
        """What the autoscaler (Ray's monitor) has logged so far: node launches and terminations."""
        logs = sorted(self.temp_dir.glob("session_*/logs/monitor.*"))
        return "".join(path.read_text(errors="replace") for path in logs)

    def kill_node(self, node_id: str) -> list[int]:
        """Take a worker node away as a spot interruption does: SIGKILL all its processes at once (no
        drain, nothing told to Ray). Returns their pids (none: the node had no live process left)."""
        import psutil

        procs = self.node_processes(node_id)
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        deadline = time.monotonic() + 10  # gone, or a zombie until its parent (not us) reaps it
        while time.monotonic() < deadline and any(_running(proc) for proc in procs):
            time.sleep(0.1)
        return [proc.pid for proc in procs]

    def stop(self, grace_s: float = 5) -> None:
        """End this cluster's processes only (SIGTERM, SIGKILL after ``grace_s``); remove its temp dir."""
        import psutil

        procs = self.processes()
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                proc.terminate()
        _, alive = psutil.wait_procs(procs, timeout=grace_s)
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(alive, timeout=grace_s)
        leftovers = self.processes()  # children spawned while the others were stopping
        for proc in leftovers:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(leftovers, timeout=grace_s)
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> RayHead:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
