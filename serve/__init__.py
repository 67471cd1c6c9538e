"""quantserve.serve: the Ray Serve application (ingress, A/B router, model deployments, metrics)."""
