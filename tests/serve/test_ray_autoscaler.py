"""Ray's cluster autoscaler under Serve, on one machine: Ray's fake multi-node provider stands in for a cluster whose
autoscaler adds GPU nodes (tests/serve/fake_cluster.py says how, and what it took with Ray 2.60).

A head with 1 CPU and nothing a replica can use; one worker node type, `fake_gpu_node` ({"CPU": 1, "fake_gpu": 1}, at
most 2, idle timeout 6 s); a Serve deployment whose replicas need `fake_gpu` (0 to 1 replicas). Requests arrive ->
Serve wants a replica -> the autoscaler adds one node (only the one the replica needs) -> the replica starts there
and answers every request with 200 -> the requests stop -> the replica goes -> the autoscaler removes the idle node
and the cluster is the head alone again. The cluster is driven from a process of its own (tests/serve/
fake_cluster_driver.py): this one is already connected to the serve tests' Ray instance.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from .fake_cluster import GPU_NODE_TYPE, GPU_RESOURCE, _our_processes, driver_env, fake_cluster

DRIVER = Path(__file__).with_name("fake_cluster_driver.py")
DRIVER_TIMEOUT_S = 240
IDLE_TIMEOUT_MIN = 0.1  # the autoscaler removes a node idle this long (6 s)
UP_BOUND_S = 90  # first request -> node added -> replica answering (about 6 s idle, 25 s on a busy machine)
DOWN_BOUND_S = 60  # last answer -> replica gone -> node removed (about 13 s)


def test_autoscaler_adds_a_fake_gpu_node_for_a_replica_and_removes_it_when_idle() -> None:
    # the provider ships with Ray; if a Ray upgrade drops it, this test must fail, not skip
    from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID, FakeMultiNodeProvider

    assert FakeMultiNodeProvider is not None
    t0 = time.monotonic()
    with fake_cluster(head_cpus=1, gpu_node_cpus=1, max_gpu_nodes=2, idle_timeout_minutes=IDLE_TIMEOUT_MIN) as c:
        try:
            proc = subprocess.run([sys.executable, str(DRIVER), "--address", c.address, "--http-port", str(c.http_port),
                                   "--clients", "2", "--load-s", "4", "--down-timeout", str(DOWN_BOUND_S + 30)],
                                  env=driver_env(), capture_output=True, text=True, timeout=DRIVER_TIMEOUT_S)
        except subprocess.TimeoutExpired as e:  # subprocess.run has killed the driver; the cluster goes on exit
            raise AssertionError(f"the driver ran past {DRIVER_TIMEOUT_S} s:\n{c.monitor_log()[-3000:]}") from e
        lines = proc.stdout.strip().splitlines()
        assert lines, f"the driver printed nothing (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
        result = json.loads(lines[-1])
        monitor = c.monitor_log()
        head_started_s = c.head_started_s
    total_s = time.monotonic() - t0

    # everything the cluster started is gone, and so is its temp dir
    assert c.stats["left_over"] == [], c.stats
    assert _our_processes(c.temp_dir, c.head_pid) == []
    assert not c.temp_dir.exists()

    assert "error" not in result, result["error"]
    summary = {k: result.get(k) for k in ("node_added_s", "replica_running_s", "first_200_s", "load_s",
                                           "replica_gone_after_idle_s", "node_gone_after_idle_s", "requests_sent",
                                           "requests_200", "driver_s")}
    print(f"\nfake autoscaling cluster: head up in {head_started_s} s, {summary}, "
          f"shutdown {c.stats.get('serve_shutdown_s')} s + kill {c.stats.get('kill_s')} s, total {total_s:.1f} s")

    # before the load: the head alone, nothing a replica could run on, no replica
    head = result["head_node_id"]
    assert head == FAKE_HEAD_NODE_ID  # RAY_FAKE_CLUSTER=1: the head took the provider's id
    assert result["nodes_before"] == [head] and result["nodes_after_deploy"] == [head]
    assert GPU_RESOURCE not in result["head_resources"]
    assert result["replicas_before"] == 0

    # under load: one node added (the one replica's worth, though the node type allows 2), the replica runs there,
    # and every request sent got its 200 from it
    assert result["max_worker_nodes_alive"] == 1 and len(result["worker_nodes_seen"]) == 1, result
    gpu_node = result["worker_nodes_seen"][0]
    assert gpu_node != head
    assert result["max_replicas_running"] == 1
    assert result["requests_sent"] >= 4
    assert result["requests_200"] == result["requests_sent"], result
    assert result["statuses"] == ["200"] and result["errors"] == []
    assert result["answer_node_ids"] == [gpu_node]
    assert result["node_added_s"] is not None and result["node_added_s"] < UP_BOUND_S, result
    assert result["replica_running_s"] is not None and result["node_added_s"] <= result["replica_running_s"]
    assert result["first_200_s"] is not None and result["first_200_s"] < UP_BOUND_S, result

    # after the load: the replica goes, then the autoscaler removes the node once idle for its timeout
    assert result["back_to_head_only"] and result["nodes_at_end"] == [head], result
    assert result["replica_gone_after_idle_s"] is not None
    assert result["node_gone_after_idle_s"] is not None
    assert result["replica_gone_after_idle_s"] <= result["node_gone_after_idle_s"] < DOWN_BOUND_S, result
    assert result["node_gone_after_idle_s"] >= IDLE_TIMEOUT_MIN * 60 * 0.5, result  # removed for idling, not before

    # the autoscaler's own account: one node added, one removed as idle, no launch failed
    assert monitor.count(f":event_summary:Adding 1 node(s) of type {GPU_NODE_TYPE}.") == 1, monitor[-3000:]
    assert monitor.count(f":event_summary:Removing 1 nodes of type {GPU_NODE_TYPE} (idle).") == 1, monitor[-3000:]
    assert "launch failed" not in monitor and "Failed to launch" not in monitor
