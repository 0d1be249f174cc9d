"""The serving application as an import path, for a KubeRay `RayService`.

`cutover serve` deploys from a driver process that also runs the controller loop and the
console. On KubeRay the operator deploys the application itself from `serveConfigV2`:

    import_path: controller.serving.kuberay:app_builder
    args: {config: /etc/cutover/cutover.yaml}

and the loop and the console run as Deployments of their own (`cutover control`,
`cutover console --notify`), each rollout's lease making any number of loops safe.
docs/deploy.md has the manifests.
"""

from __future__ import annotations

import os
from typing import Any

from controller.config import ENV_CONFIG, load_config
from controller.serving.app import build_app, check_remote_safe


def app_builder(args: dict[str, str]) -> Any:
    """Ray Serve's application builder: the config file from `args.config`, else
    $CUTOVER_CONFIG; refused, naming the key, when a node of a cluster could not use it
    (a SQLite file, images on one node's disk) or a pipeline is neither a path nor a hub id."""
    path = args.get("config") or os.environ.get(ENV_CONFIG)
    if not path:
        raise ValueError(
            f"no config: give args.config in serveConfigV2, or set {ENV_CONFIG} on the pods"
        )
    config = load_config(path, check_paths=True)
    check_remote_safe(config, "cluster")
    return build_app(config)
