"""``zimage-orch pool up|status|down``: a replica pool (``frontdoor.pool``) as an operator sees it.

- ``up``: create the pool's replicas and wait until every one is loaded, then exit, leaving them for the front doors
  (``serve`` with the same config attaches; without ``up`` the first ``serve`` creates them);
- ``status``: the pool's replicas (created by whom, each one's admission gate, encoder pool and keyed-image counters)
  and its Idempotency-Key store;
- ``down``: remove the replicas, the store, the registry and the placement groups.
"""

from __future__ import annotations

import asyncio
import json

from zimage_common.config import load_config
from zimage_common.errors import ConfigError


def cmd_pool(args) -> int:
    from . import ray_backend, ray_pool
    from .pool import pool_deployment_id, pool_namespace

    config = load_config(args.config, args.set)
    if config.frontdoor.pool is None:
        raise ConfigError(f"{args.config}: frontdoor.pool is not set; name the pool the front doors share "
                          f"(e.g. --set frontdoor.pool=main)")
    ns = pool_namespace(config.cluster.namespace, config.frontdoor.pool)
    ray_backend.connect(config.cluster)
    if args.action == "up":
        from .deployment import Deployment

        async def up():
            dep = await Deployment.start(config)
            await dep.shutdown()  # leaves the pool's replicas running
            return dep

        dep = asyncio.run(up())
        print(json.dumps({"pool": config.frontdoor.pool, "namespace": ns,
                          "created_by": dep.pool_record["created_by"],
                          "replicas": sorted(dep.replicas)}, indent=2))
        return 0
    record = ray_pool.pool_record(ns)
    pool_id = pool_deployment_id(config.frontdoor.pool)
    names = [ray_backend.replica_name(pool_id, s.replica_id) for s in (record["specs"] if record else [])]
    if args.action == "down":
        removed = ray_pool.pool_down(ns, f"zimage-{pool_id}-", names)
        print(json.dumps({"pool": config.frontdoor.pool, "namespace": ns, **removed}, indent=2))
        return 0
    status = {"pool": config.frontdoor.pool, "namespace": ns, "exists": record is not None,
              "created_by": record["created_by"] if record else None,
              "replicas": ray_pool.replica_stats(ns, names) if record else {},
              "idempotency": ray_pool.store_stats(ns)}
    print(json.dumps(status, indent=2, default=str))
    return 0 if record is not None else 1


def add_parser(sub) -> None:
    p = sub.add_parser("pool", help="create, inspect or remove a replica pool shared by front doors (frontdoor.pool)")
    p.add_argument("action", choices=("up", "status", "down"),
                   help="up: create and load the replicas, then exit leaving them; status: the replicas and the "
                   "Idempotency-Key store; down: remove them")
    p.add_argument("config", help="the config the front doors serve (frontdoor.pool and cluster.address set)")
    p.add_argument("--set", action="append", default=[], metavar="PATH=VALUE", help="override a config field")
    p.set_defaults(fn=cmd_pool)
