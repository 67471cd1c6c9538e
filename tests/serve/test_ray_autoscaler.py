"""Serve's autoscaler and Ray's cluster autoscaler together, on a real quantserve variant, scale to zero included.
Ray's fake multi-node provider stands in for a cluster whose autoscaler adds GPU nodes (tests/serve/fake_cluster.py
says how, and what it took with Ray 2.60).

A head with 1 CPU and nothing a replica can use; one worker node type, `fake_gpu_node` ({"CPU": 1, "fake_gpu": 1}, at
most 2, idle timeout 6 s). Serve on the head (HeadOnly proxy), and quantserve's deploy of one digits variant (nf4)
whose replica reserves `resources.custom: {fake_gpu: 1}`, 0..1 replicas (tests/serve/fake_cluster_driver.py, a
process of its own: this one is already connected to the serve tests' Ray instance):

  deploy   the deploy starts one replica even at min 0 -> the autoscaler adds a node -> the replica runs there, not
           on the head -> the deploy returns;
  idle     the variant goes to zero (/readyz: scaled_to_zero) -> the node idles -> the autoscaler removes it;
  request  a request at zero -> Serve wants a replica -> a node is added -> the replica starts there -> 200; then
           two clients for 3 s, every request answered 200;
  idle     again: the replica goes, the node is removed, the head is alone.

One cluster for all of it (a cluster's start and stop cost ~10 s). The cold request's time to its 200 includes
~5 s in the Ingress before Serve sees it: its first generation request imports the digits pipeline (torch,
diffusers) for the prompt check, on its event loop.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from .fake_cluster import GPU_NODE_TYPE, GPU_RESOURCE, _our_processes, driver_env, fake_cluster

DRIVER = Path(__file__).with_name("fake_cluster_driver.py")
IDLE_TIMEOUT_MIN = 0.1  # the autoscaler removes a node idle this long (6 s)
UP_BOUND_S = 90  # deploy or request -> node added -> replica running (about 15 s idle, twice that on a busy machine)
DOWN_BOUND_S = 60  # deploy returned or last answer -> replica gone -> node removed (about 10-13 s)
DRIVER_TIMEOUT_S = 300  # every wait of the driver is bounded by UP_BOUND_S or DOWN_BOUND_S; this bounds the sum
# quantserve's work policy. While no replica runs it holds the target (a deploy's initial replica waits ~6 s for its
# node here, longer than downscale_to_zero_delay_s: wanting 0 meanwhile stopped it before it ever loaded).
POLICY = "work"
ADD = f":event_summary:Adding 1 node(s) of type {GPU_NODE_TYPE}."
REMOVE = f":event_summary:Removing 1 nodes of type {GPU_NODE_TYPE} (idle)."


def test_a_quantserve_variant_scales_to_zero_and_back_with_the_nodes_it_needs() -> None:
    # the provider ships with Ray; if a Ray upgrade drops it, this test must fail, not skip
    from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID, FakeMultiNodeProvider

    assert FakeMultiNodeProvider is not None
    t0 = time.monotonic()
    with fake_cluster(head_cpus=1, gpu_node_cpus=1, max_gpu_nodes=2, idle_timeout_minutes=IDLE_TIMEOUT_MIN) as c:
        try:
            proc = subprocess.run([sys.executable, str(DRIVER), "--address", c.address, "--http-port", str(c.http_port),
                                   "--policy", POLICY, "--clients", "2", "--load-s", "3",
                                   "--bound-s", str(UP_BOUND_S)],
                                  env=driver_env(), capture_output=True, text=True, timeout=DRIVER_TIMEOUT_S)
        except subprocess.TimeoutExpired as e:  # subprocess.run has killed the driver; the cluster goes on exit
            raise AssertionError(f"the driver ran past {DRIVER_TIMEOUT_S} s:\n{c.monitor_log()[-3000:]}") from e
        lines = proc.stdout.strip().splitlines()
        assert lines, f"the driver printed nothing (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
        result = json.loads(lines[-1])
        # the monitor logs a removal just after the node is gone: give its log a moment to catch up (bounded)
        deadline = time.monotonic() + 15
        while c.monitor_log().count(REMOVE) < 2 and time.monotonic() < deadline:
            time.sleep(0.25)
        monitor = c.monitor_log()
        head_started_s = c.head_started_s
    total_s = time.monotonic() - t0

    # everything the cluster started is gone, and so is its temp dir
    assert c.stats["left_over"] == [], c.stats
    assert _our_processes(c.temp_dir, c.head_pid) == []
    assert not c.temp_dir.exists()

    assert "error" not in result, f"{result['error']}\nseen so far: {json.dumps(result.get('phases'))}"
    phases = result["phases"]
    print(f"\nfake autoscaling cluster, quantserve variant ({POLICY} policy): head up in {head_started_s} s; "
          f"{json.dumps(phases)}; requests {result['requests_200']}/{result['requests_sent']} answered 200; "
          f"driver {result['driver_s']} s, Serve shutdown {c.stats.get('serve_shutdown_s')} s + kill "
          f"{c.stats.get('kill_s')} s; total {total_s:.1f} s")

    # before: the head alone, with nothing a replica could run on; the replica asks for a fake_gpu
    head = result["head_node_id"]
    assert head == FAKE_HEAD_NODE_ID  # RAY_FAKE_CLUSTER=1: the head took the provider's id
    assert result["nodes_before"] == [head]
    assert GPU_RESOURCE not in result["head_resources"]
    assert result["ray_actor_options"]["resources"] == {GPU_RESOURCE: 1}
    # the proxy and the Ingress stay on the head: nothing but the variant's replica may hold a worker node
    assert result["proxy_nodes"] == [head] and result["ingress_nodes"] == [head], result

    # two worker nodes over the test, one at a time (one replica's worth, though the node type allows 2), and the
    # variant's replica ran on each in turn: the deploy's on the first, the cold start's on the second
    first_node, second_node = result["worker_nodes_seen"]
    assert head not in (first_node, second_node)
    assert result["max_worker_nodes_alive"] == 1 and result["max_replicas"] == 1, result
    assert result["replica_nodes_by_phase"] == [[first_node], [second_node]], result

    # a. the deploy: one replica at min 0, a node added for it, the replica running there when the deploy returns
    a = phases["deploy"]
    assert a["node_added_s"] is not None and a["replica_running_s"] is not None, a
    assert a["node_added_s"] <= a["replica_running_s"] < UP_BOUND_S, a
    assert result["deploy_returned_with"]["replicas"] == [["RUNNING", first_node]], result["deploy_returned_with"]

    # b. idle: the variant at zero (as /readyz says), then the idle node removed
    b = phases["idle"]
    ready = result["readyz_at_zero"]
    assert ready["variants"]["v"]["scaled_to_zero"] is True and ready["variants"]["v"]["running_replicas"] == 0, ready
    assert b["scaled_to_zero_s"] is not None and b["node_removed_s"] is not None, b
    assert b["scaled_to_zero_s"] <= b["node_removed_s"] < DOWN_BOUND_S, b
    assert b["node_removed_after_replica_gone_s"] >= IDLE_TIMEOUT_MIN * 60 * 0.5, b  # removed for idling
    assert result["nodes_at_zero"] == [head]

    # c. a request at zero: a node added, the replica started there, the request answered; then every request 200
    c_ = phases["request"]
    assert c_["cold_status"] == 200, result["failures"]
    assert c_["node_added_s"] is not None and c_["replica_running_s"] is not None, c_
    assert c_["node_added_s"] <= c_["replica_running_s"] < UP_BOUND_S, c_
    assert c_["node_added_s"] < c_["first_200_s"] < UP_BOUND_S, c_
    assert result["requests_sent"] >= 4, result
    assert result["requests_200"] == result["requests_sent"] and result["failures"] == [], result

    # d. idle again: the replica goes, then the node; the head alone, the variant at zero
    d = phases["idle_again"]
    assert d["replica_gone_s"] is not None and d["node_removed_s"] is not None, d
    assert d["replica_gone_s"] <= d["node_removed_s"] < DOWN_BOUND_S, d
    assert d["node_removed_after_replica_gone_s"] >= IDLE_TIMEOUT_MIN * 60 * 0.5, d
    assert result["nodes_at_end"] == [head]
    assert result["readyz_at_end"]["variants"]["v"]["scaled_to_zero"] is True, result["readyz_at_end"]
    assert result["sampler_errors"] == [], result["sampler_errors"]

    # the autoscaler's own account: two nodes added, two removed as idle, no launch failed
    assert monitor.count(ADD) == 2, monitor[-3000:]
    assert monitor.count(REMOVE) == 2, monitor[-3000:]
    assert "launch failed" not in monitor and "Failed to launch" not in monitor
