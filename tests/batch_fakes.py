"""A whole Deployment on fake replicas that take a set time per batch and count every image they generate (in
memory, and optionally in a file that outlives a SIGKILL): batch jobs and url responses tested without Ray."""

import asyncio
import os

from fakes import FakeNode, FakeReplica

from orchestrator.deployment import Deployment
from zimage_common.messages import ReplicaHealth


class TimedReplica(FakeReplica):
    """A batch takes ``base_s + per_image_s * images`` (a GPU-like cost), one after another as on one GPU (the
    router keeps more than one at a replica); each generated image is counted, with its prompt, in ``generated``
    and appended to ``count_file``."""

    def __init__(self, replica_id, node, max_pixels, max_batch_tokens, base_s, per_image_s, count_file, generated):
        super().__init__(replica_id, max_pixels, max_batch_tokens)
        self.node = node
        self.base_s, self.per_image_s = base_s, per_image_s
        self.count_file = count_file
        self.generated = generated
        self.fail_prompts = set()  # prompts whose request fails on the replica (one request's failure)
        self._gpu: asyncio.Lock | None = None

    async def run(self, batch, on_progress=None):
        if self.base_s or self.per_image_s:
            self._gpu = self._gpu or asyncio.Lock()
            async with self._gpu:
                await asyncio.sleep(self.base_s + self.per_image_s * len(batch))
        out = await super().run(batch)
        results = []
        for r, req in zip(out.results, batch.requests):
            if req.prompt in self.fail_prompts:
                from dataclasses import replace

                r = replace(r, ok=False, image=None, error="fake replica error", error_type="replica_error")
            results.append(r)
        self.generated.extend(req.prompt for req in batch.requests)
        if self.count_file is not None:
            with open(self.count_file, "a") as f:
                f.write("".join(req.prompt + "\n" for req in batch.requests))
                f.flush()
                os.fsync(f.fileno())
        return type(out)(out.batch_id, out.replica_id, tuple(results), out.stage_times)

    async def start(self, timeout_s):
        return ReplicaHealth(self.replica_id, True, {}, "float32", pid=1)

    async def check(self):
        return 0.0

    async def health(self):
        return ReplicaHealth(self.replica_id, True, {}, "float32", pid=1)

    async def call(self, method, *args, **kw):
        return []

    def kill(self, no_restart=False):
        pass

    def close(self):
        pass


class TimedBackend:
    def __init__(self, replicas=2, base_s=0.0, per_image_s=0.0, count_file=None):
        self.nodes = [FakeNode(f"n{i}", f"id{i}") for i in range(replicas)]
        self.base_s, self.per_image_s, self.count_file = base_s, per_image_s, count_file
        self.generated = []
        self.made = {}

    def connect(self, cluster):
        pass

    def live_nodes(self):
        return self.nodes

    def probe_gpu_memory_gib(self, node):
        return 24.0

    def node_alive(self, node_id):
        return True

    def make_replica(self, spec, encoder_host=None):
        r = TimedReplica(spec.replica_id, spec.node, spec.max_pixels, spec.max_batch_tokens, self.base_s,
                         self.per_image_s, self.count_file, self.generated)
        self.made[spec.replica_id] = r
        return r


def factory(backend):
    """A ``deployment_factory`` for ``create_app`` and the batch CLI: a real Deployment on ``backend``."""

    async def start(config, observer=None):
        return await Deployment.start(config, observer=observer, backend=backend)

    return start
