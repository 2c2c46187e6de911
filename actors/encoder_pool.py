"""Image encoding on the replica's node: PNG, JPEG and WebP bytes made in a thread pool beside the GPU loop.

A request that names an ``output_format`` (the HTTP service's) gets its image, and its previews, back as bytes, so
the front door forwards them instead of encoding: encoding is CPU work that grows with the GPUs a pool has, and
the replicas' nodes have those CPUs. The pool's threads never touch the GPU or its stage threads (the images are
already on the CPU when they come here), and the encoders release the GIL while they compress, so the GPU loop's
Python thread keeps running beside them. The bytes are ``image_codec.encode_image``'s, the same function the front
door uses for raw pixels, so an image is byte for byte the same wherever it is encoded.

A batch job's images are encoded on threads of their own, at batch-job CPU priority (``cpu_priority.py``): an
interactive image never waits in the queue behind a job's, and its encode takes the core first.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace

from zimage_common.cpu_priority import lower_this_thread
from zimage_common.image_codec import EncodedImage, encode_image
from zimage_common.messages import INTERACTIVE, ImageRequest, ImageResult, StepProgress


class EncoderPool:
    def __init__(self, threads: int, name: str = "encode"):
        self.threads = threads
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix=name)
        self._jobs = ThreadPoolExecutor(threads, thread_name_prefix=f"{name}-job", initializer=lower_this_thread)
        self._lock = threading.Lock()
        self.images = 0
        self.previews = 0
        self.seconds = 0.0  # summed over threads: the CPU time encoding took

    def _encode(self, image, request: ImageRequest) -> EncodedImage:
        t0 = time.perf_counter()
        data = encode_image(image, request.output_format, request.output_compression)
        with self._lock:
            self.seconds += time.perf_counter() - t0
        return EncodedImage(request.output_format, request.output_compression, data)

    def encode_results(self, results, requests: dict[str, ImageRequest]) -> tuple[ImageResult, ...]:
        """``results`` with the pixels of every ok result whose request named a format replaced by its bytes, all
        encoded concurrently."""
        jobs = {}
        for r in results:
            req = requests.get(r.request_id)
            if r.ok and r.image is not None and req is not None and req.output_format:
                jobs[r.request_id] = self._executor(req).submit(self._encode, r.image, req)
        if not jobs:
            return tuple(results)
        with self._lock:
            self.images += len(jobs)
        return tuple(replace(r, image=None, encoded=jobs[r.request_id].result()) if r.request_id in jobs else r
                     for r in results)

    def encode_previews(self, event: StepProgress, requests: dict[str, ImageRequest]) -> StepProgress:
        """A progress event with its preview images encoded as their requests asked."""
        if not event.previews:
            return event
        futures = []
        for request_id, k, image in event.previews:
            req = requests.get(request_id)
            if req is not None and req.output_format and not isinstance(image, EncodedImage):
                futures.append((request_id, k, self._executor(req).submit(self._encode, image, req)))
            else:
                futures.append((request_id, k, image))
        previews = tuple((rid, k, f.result() if isinstance(f, Future) else f) for rid, k, f in futures)
        with self._lock:
            self.previews += sum(1 for _, _, f in futures if isinstance(f, Future))
        return replace(event, previews=previews)

    def _executor(self, request: ImageRequest) -> ThreadPoolExecutor:
        return self._pool if request.priority <= INTERACTIVE else self._jobs

    def stats(self) -> dict:
        with self._lock:
            return {"threads": self.threads, "images": self.images, "previews": self.previews,
                    "seconds": round(self.seconds, 4)}

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._jobs.shutdown(wait=False, cancel_futures=True)
